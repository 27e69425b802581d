//! Chat prompts: renders the checkpoint's own chat template (`chat_template.jinja`, or
//! `chat_template` in `tokenizer_config.json`) with minijinja configured like transformers'
//! jinja2 sandbox (`trim_blocks`, `lstrip_blocks`, loop controls, Python string methods,
//! `raise_exception`). Without a template, the Gemma 4 turn format is written directly:
//! `<bos><|turn>user\n{text}<turn|>\n … <|turn>model\n`.
//!
//! A template is code from the checkpoint (or a GGUF file), so it runs within [`Limits`]:
//! fuel (`template_fuel` per render, charged per instruction and per byte produced: no
//! endless loops, no gigabyte strings), tags of at most
//! `max_template_tag_chars` characters (a long expression chain would overflow the stack
//! when compiled) and output of at most `max_template_output_bytes`. Errors name the
//! template's origin and the limit.

use std::path::Path;

use minijinja::{context, Environment};
use serde::Serialize;

use crate::error::{printable, Error, Result};
use crate::limits::{named, Limits};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    /// Whether this is the checkpoint's template (`false` = built-in turn format).
    from_checkpoint: bool,
    bos_token: String,
    eos_token: String,
    /// Where the template came from, for errors.
    origin: String,
    max_output: usize,
    fuel: u64,
    /// A launch-era template, which reads tool results only from `tool_responses`
    /// ([`super::tool_responses`]).
    fold_tool_results: bool,
}

/// A `bos_token`/`eos_token` of `tokenizer_config.json`: a string, or transformers'
/// `AddedToken` object with its `content`.
fn token_text(v: Option<&serde_json::Value>) -> Option<String> {
    let v = v?;
    v.as_str()
        .or_else(|| v.get("content").and_then(|c| c.as_str()))
        .map(str::to_string)
}

impl ChatTemplate {
    /// Loads the template of checkpoint `dir`, falling back to the built-in turn format.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_dir_with(dir, &Limits::DEFAULT)
    }

    /// [`Self::from_dir`] within `limits`.
    pub fn from_dir_with(dir: &Path, limits: &Limits) -> Result<Self> {
        let jinja = dir.join("chat_template.jinja");
        let config = dir.join("tokenizer_config.json");
        let mut bos = "<bos>".to_string();
        let mut eos = "<eos>".to_string();
        let mut source = None;
        let mut origin = String::from("built-in");
        if config.exists() {
            let v = crate::error::read_json(&config)?;
            bos = token_text(v.get("bos_token")).unwrap_or(bos);
            eos = token_text(v.get("eos_token")).unwrap_or(eos);
            source = match v.get("chat_template") {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                // transformers' list form: named templates, `default` for chat.
                Some(serde_json::Value::Array(list)) => Some(
                    list.iter()
                        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                        .and_then(|t| t.get("template")?.as_str())
                        .ok_or_else(|| {
                            Error::config(
                                &config,
                                "`chat_template` is a list without a `default` template",
                            )
                        })?
                        .to_string(),
                ),
                Some(_) => {
                    return Err(Error::config(
                        &config,
                        "`chat_template` is neither a string nor a list of named templates",
                    ))
                }
            };
            origin = format!("{} `chat_template`", config.display());
        }
        if jinja.exists() {
            source = Some(crate::loading::input::read_text(&jinja)?);
            origin = jinja.display().to_string();
        }
        Self::from_source(source.as_deref(), &bos, &eos, &origin, limits)
    }

    /// `source = None` selects the built-in Gemma 4 turn format.
    pub fn new(source: Option<&str>, bos_token: &str, eos_token: &str) -> Result<Self> {
        let origin = if source.is_some() {
            "given source"
        } else {
            "built-in"
        };
        Self::from_source(source, bos_token, eos_token, origin, &Limits::DEFAULT)
    }

    /// As [`Self::new`], `origin` naming the template in errors, within `limits`.
    pub fn from_source(
        source: Option<&str>,
        bos_token: &str,
        eos_token: &str,
        origin: &str,
        limits: &Limits,
    ) -> Result<Self> {
        let bad = |message: String| Error::Template(format!("{origin}: {message}"));
        if let Some(src) = source {
            let max = limits.max_template_tag_chars;
            if let Some(len) = longest_tag(src).filter(|&l| l > max) {
                return Err(bad(format!(
                    "a tag of {len} characters, over {}",
                    named("max_template_tag_chars", max)
                )));
            }
        }
        let mut env = Environment::new();
        let mut syntax = minijinja::syntax::SyntaxConfig::builder();
        syntax.trim_blocks(true).lstrip_blocks(true);
        env.set_syntax(syntax.build().map_err(|e| bad(e.to_string()))?);
        env.set_fuel(Some(limits.template_fuel));
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        let from_checkpoint = source.is_some();
        let fold_tool_results =
            source.is_some_and(super::tool_responses::reads_only_tool_responses);
        let src = source.unwrap_or(BUILTIN_TEMPLATE).to_string();
        env.add_template_owned("chat", src)
            .map_err(|e| bad(printable(&e.to_string())))?;
        Ok(ChatTemplate {
            env,
            from_checkpoint,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
            origin: origin.to_string(),
            max_output: limits.max_template_output_bytes,
            fuel: limits.template_fuel,
            fold_tool_results,
        })
    }

    pub fn is_from_checkpoint(&self) -> bool {
        self.from_checkpoint
    }

    /// Renders `messages`; `add_generation_prompt` opens the model's turn.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let messages =
            serde_json::to_value(messages).map_err(|e| Error::Template(e.to_string()))?;
        self.render_json(
            &messages,
            None,
            add_generation_prompt,
            &serde_json::Map::new(),
        )
    }

    /// Renders messages in transformers' form (`role`, `content` as a string or a list of
    /// typed parts, `tool_calls`, ...) with `tools` (JSON schemas) and extra template
    /// variables (`enable_thinking`, ...), as `apply_chat_template(messages, tools=tools,
    /// add_generation_prompt=..., **kwargs)` does. A kwarg cannot replace `messages`,
    /// `tools`, `add_generation_prompt` or the special tokens.
    pub fn render_json(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
        kwargs: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        use minijinja::value::{Serde, Value};
        let bad = |message: String| Error::Template(format!("{}: {message}", self.origin));
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| bad(printable(&e.to_string())))?;
        let mut out = LimitedOutput {
            bytes: Vec::new(),
            max: self.max_output,
            over: false,
        };
        let folded;
        let messages = if self.fold_tool_results {
            folded = super::tool_responses::fold_tool_results(messages);
            &folded
        } else {
            messages
        };
        let base = context! {
            messages => Value::from(Serde(messages)),
            tools => tools.map(|t| Value::from(Serde(t))),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        // Earlier contexts win in a merge: the fixed variables go first.
        let ctx = minijinja::context! { ..base, ..Value::from(Serde(kwargs)) };
        let rendered = tmpl.render_captured_to(ctx, &mut out);
        match rendered {
            Ok(_) => Ok(String::from_utf8_lossy(&out.bytes).into_owned()),
            Err(_) if out.over => Err(bad(format!(
                "the rendered prompt exceeds {}",
                named("max_template_output_bytes", self.max_output)
            ))),
            Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel => Err(bad(format!(
                "the template ran out of fuel (one per instruction, one per 64 bytes it \
                 produces): it does more work than {}",
                named("template_fuel", self.fuel)
            ))),
            Err(e) => Err(bad(printable(&e.to_string()))),
        }
    }
}

/// A rendering target that refuses to grow past `max` bytes.
struct LimitedOutput {
    bytes: Vec<u8>,
    max: usize,
    over: bool,
}

impl std::io::Write for LimitedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len().saturating_add(buf.len()) > self.max {
            self.over = true;
            return Err(std::io::Error::other("output limit"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The length in characters of the longest `{{ … }}` / `{% … %}` tag of `src`.
fn longest_tag(src: &str) -> Option<usize> {
    let mut longest = None;
    let mut rest = src;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let close = match after.chars().next() {
            Some('{') => "}}",
            Some('%') => "%}",
            _ => {
                rest = after;
                continue;
            }
        };
        let body = &after[1..];
        let len = body.find(close).unwrap_or(body.len());
        longest = longest.max(Some(body[..len].chars().count()));
        rest = &body[len..];
    }
    longest
}

/// The Gemma 4 turn format (§8 of the spec) for checkpoints without a template.
const BUILTIN_TEMPLATE: &str = "{{ bos_token }}
{%- for message in messages -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{{ '<|turn>' + role + '\\n' + (message['content'] | trim) + '<turn|>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|turn>model\\n' }}{%- endif -%}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_turn_format() {
        let t = ChatTemplate::new(None, "<bos>", "<eos>").unwrap();
        let out = t
            .render(
                &[
                    Message::new("user", " Hi "),
                    Message::new("assistant", "Yo"),
                    Message::new("user", "Q"),
                ],
                true,
            )
            .unwrap();
        assert_eq!(out, "<bos><|turn>user\nHi<turn|>\n<|turn>model\nYo<turn|>\n<|turn>user\nQ<turn|>\n<|turn>model\n");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t =
            ChatTemplate::new(Some("{{ raise_exception('bad role') }}"), "<bos>", "<eos>").unwrap();
        let err = t.render(&[], false).unwrap_err().to_string();
        assert!(err.contains("bad role"), "{err}");
    }

    #[test]
    fn python_string_methods_work() {
        let t = ChatTemplate::new(
            Some("{{ messages[0]['content'].strip().upper() }}"),
            "<bos>",
            "<eos>",
        )
        .unwrap();
        assert_eq!(
            t.render(&[Message::new("user", "  ab ")], false).unwrap(),
            "AB"
        );
    }
}
