//! Chat prompts: renders the checkpoint's own chat template (`chat_template.jinja`, or
//! `chat_template` in `tokenizer_config.json`) with minijinja configured like transformers'
//! jinja2 sandbox (`trim_blocks`, `lstrip_blocks`, loop controls, Python string methods,
//! `raise_exception`). Without a template, the Gemma 4 turn format is written directly:
//! `<bos><|turn>user\n{text}<turn|>\n … <|turn>model\n`.

use std::path::Path;

use minijinja::{context, Environment};
use serde::Serialize;

use crate::error::{Error, Result};

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
}

impl ChatTemplate {
    /// Loads the template of checkpoint `dir`, falling back to the built-in turn format.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let jinja = dir.join("chat_template.jinja");
        let config = dir.join("tokenizer_config.json");
        let mut bos = "<bos>".to_string();
        let mut eos = "<eos>".to_string();
        let mut source = None;
        if config.exists() {
            let v = crate::error::read_json(&config)?;
            if let Some(b) = v.get("bos_token").and_then(|b| b.as_str()) {
                bos = b.to_string();
            }
            if let Some(e) = v.get("eos_token").and_then(|e| e.as_str()) {
                eos = e.to_string();
            }
            source = v
                .get("chat_template")
                .and_then(|t| t.as_str())
                .map(str::to_string);
        }
        if jinja.exists() {
            source = Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?);
        }
        Self::new(source.as_deref(), &bos, &eos)
    }

    /// `source = None` selects the built-in Gemma 4 turn format.
    pub fn new(source: Option<&str>, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        let mut syntax = minijinja::syntax::SyntaxConfig::builder();
        syntax.trim_blocks(true).lstrip_blocks(true);
        env.set_syntax(syntax.build().map_err(|e| Error::Template(e.to_string()))?);
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
        let src = source.unwrap_or(BUILTIN_TEMPLATE).to_string();
        env.add_template_owned("chat", src)
            .map_err(|e| Error::Template(e.to_string()))?;
        Ok(ChatTemplate {
            env,
            from_checkpoint,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    pub fn is_from_checkpoint(&self) -> bool {
        self.from_checkpoint
    }

    /// Renders `messages`; `add_generation_prompt` opens the model's turn.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Template(e.to_string()))?;
        tmpl.render(context! {
            messages => minijinja::value::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| Error::Template(format!("{e:#}")))
    }
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
