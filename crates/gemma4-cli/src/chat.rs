//! `gemma4 chat`: an interactive chat in the terminal, on the same machinery as the
//! server: the checkpoint's template, the output parser (thoughts shown apart from the
//! answer), and the previous turn's KV cache reused for the next one
//! ([`gemma4::Sequence::continue_from`]).
//!
//! Commands: `/image PATH` and `/audio PATH` attach media to the next message,
//! `/system TEXT` sets the system message, `/clear` forgets the conversation, `/save
//! FILE` writes it as JSON (media as `{"type": "image"}` placeholders), `/exit` ends.
//! `--messages FILE.json` starts from a conversation in the OpenAI form.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use gemma4::generate::GenerateOptions;
use gemma4::model::Media;
use gemma4::prompt::output_parser::{Delta, Markers, OutputParser};
use gemma4::{step, Gemma4, Prompt, Sequence};
use serde_json::{json, Map, Value};

use crate::args::{DraftArgs, ModelArgs, SamplingArgs};

#[derive(Args)]
pub(crate) struct ChatArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Start from this conversation (a JSON list of OpenAI-style messages).
    #[arg(long, value_name = "FILE")]
    pub(crate) messages: Option<PathBuf>,
    /// The system message.
    #[arg(long)]
    pub(crate) system: Option<String>,
    /// Let the model think before it answers (the template's `enable_thinking`).
    #[arg(long)]
    pub(crate) think: bool,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 1024)]
    pub(crate) max_tokens: usize,
    #[command(flatten)]
    pub(crate) sampling: SamplingArgs,
    #[command(flatten)]
    pub(crate) draft: DraftArgs,
}

struct Chat {
    messages: Vec<Value>,
    media: Media,
    /// Media attached for the next message: `image` or `audio` parts.
    pending: Vec<Value>,
    previous: Option<Sequence>,
    draft: Option<gemma4::generate::speculative::DraftOptions>,
}

pub(crate) fn cmd_chat(a: ChatArgs) -> Result<()> {
    let tty = std::io::stdin().is_terminal();
    let model = crate::args::load_with(&a.model, true, true)?;
    let tok = model.tokenizer()?;
    let markers = Markers::from_tokenizer(tok)?;
    let mut chat = Chat {
        messages: Vec::new(),
        media: Media::default(),
        pending: Vec::new(),
        previous: None,
        draft: a.draft.options(&model)?,
    };
    if let Some(path) = &a.messages {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--messages {}", path.display()))?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("--messages {}: not JSON", path.display()))?;
        let list = v
            .as_array()
            .with_context(|| format!("--messages {}: not a list of messages", path.display()))?;
        for (i, m) in list.iter().enumerate() {
            let m = crate::serve::message_for_template(&model, m, i, &mut chat.media, true)
                .map_err(|e| anyhow::anyhow!("--messages {}: {}", path.display(), e.message))?;
            chat.messages.push(m);
        }
    }
    if let Some(s) = &a.system {
        set_system(&mut chat.messages, s);
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let dim = |s: &str| {
        if tty {
            format!("\x1b[2m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    };
    if tty {
        eprintln!(
            "{}",
            dim("chat: /image PATH, /audio PATH, /system TEXT, /clear, /save FILE, /exit")
        );
    }
    loop {
        if tty {
            eprint!("> ");
            std::io::stderr().flush().ok();
        }
        let Some(line) = lines.next() else { break };
        let line = line?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(cmd) = line.strip_prefix('/') {
            let (name, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
            let arg = arg.trim();
            match name {
                "exit" | "quit" => break,
                "clear" => {
                    chat.messages.retain(|m| m["role"] == "system");
                    chat.media = Media::default();
                    chat.pending.clear();
                    chat.previous = None;
                    eprintln!("{}", dim("(conversation cleared)"));
                }
                "system" => {
                    set_system(&mut chat.messages, arg);
                    eprintln!("{}", dim("(system message set)"));
                }
                "image" | "audio" if arg.is_empty() => eprintln!("usage: /{name} PATH"),
                "image" if model.vision.is_none() => {
                    eprintln!("error: this checkpoint has no vision encoder")
                }
                "audio" if model.audio.is_none() => {
                    eprintln!("error: this checkpoint has no audio encoder")
                }
                "image" => match model.load_image(arg.as_ref()) {
                    Ok(img) => {
                        chat.media.images.push(img);
                        chat.pending.push(json!({"type": "image"}));
                        eprintln!("{}", dim(&format!("(image attached: {arg})")));
                    }
                    Err(e) => eprintln!("error: {e}"),
                },
                "audio" => match model.load_audio(arg.as_ref()) {
                    Ok(clip) => {
                        chat.media.audio.push(clip);
                        chat.pending.push(json!({"type": "audio"}));
                        eprintln!("{}", dim(&format!("(audio attached: {arg})")));
                    }
                    Err(e) => eprintln!("error: {e}"),
                },
                "save" if !arg.is_empty() => {
                    match std::fs::write(arg, serde_json::to_string_pretty(&chat.messages)?) {
                        Ok(()) => eprintln!("{}", dim(&format!("(saved to {arg})"))),
                        Err(e) => eprintln!("error: {arg}: {e}"),
                    }
                }
                _ => eprintln!(
                    "unknown command /{name} (try /image, /audio, /system, /clear, /save, /exit)"
                ),
            }
            continue;
        }
        let content = if chat.pending.is_empty() {
            json!(line)
        } else {
            let mut parts = std::mem::take(&mut chat.pending);
            parts.push(json!({"type": "text", "text": line}));
            Value::Array(parts)
        };
        chat.messages
            .push(json!({"role": "user", "content": content}));
        match turn(&a, &model, markers, &mut chat, tty) {
            Ok(answer) => chat.messages.push(answer),
            Err(e) => {
                // The message stays unanswered out of the history.
                chat.messages.pop();
                eprintln!("error: {e:#}");
            }
        }
    }
    Ok(())
}

fn set_system(messages: &mut Vec<Value>, text: &str) {
    messages.retain(|m| m["role"] != "system");
    messages.insert(0, json!({"role": "system", "content": text}));
}

/// Runs one answer, printing it as it comes; returns the assistant message.
fn turn(
    a: &ChatArgs,
    model: &Gemma4,
    markers: Markers,
    chat: &mut Chat,
    tty: bool,
) -> Result<Value> {
    let mut kwargs = Map::new();
    kwargs.insert("enable_thinking".into(), json!(a.think));
    let text = model.chat_template.render_json(
        &Value::Array(chat.messages.clone()),
        None,
        true,
        &kwargs,
    )?;
    let input = model.prepare_with(&Prompt::Rendered(text), &chat.media, model.all_adapters())?;
    let room = model
        .config
        .text
        .max_position_embeddings
        .saturating_sub(input.ids.len());
    if room == 0 {
        bail!(
            "the conversation has reached the model's context ({} tokens); /clear to start over",
            input.ids.len()
        );
    }
    let mut stop_ids = model.stop_ids();
    stop_ids.extend(markers.message_ends());
    let opts = GenerateOptions {
        max_new_tokens: a.max_tokens.min(room),
        sampling: a.sampling.params(model),
        stop_ids,
        adapters: model.all_adapters(),
        constraint: None,
        draft: chat.draft.clone(),
    };
    let mut seq = match chat.previous.take() {
        Some(prev) => Sequence::continue_from(&model.text, input, &opts, prev)?,
        None => Sequence::new(&model.text, input, &opts)?,
    };
    let tok = model.tokenizer()?;
    let mut parser = OutputParser::new(tok, markers);
    let mut out = std::io::stdout();
    let mut thinking = false;
    let print = |d: Delta, thinking: &mut bool, out: &mut std::io::Stdout| -> Result<()> {
        match d {
            Delta::Reasoning(t) => {
                if !*thinking {
                    *thinking = true;
                    eprint!(
                        "{}",
                        if tty {
                            "\x1b[2mthinking: "
                        } else {
                            "thinking: "
                        }
                    );
                }
                eprint!("{t}");
            }
            Delta::Content(t) => {
                if *thinking {
                    *thinking = false;
                    eprintln!("{}", if tty { "\x1b[0m" } else { "" });
                }
                write!(out, "{t}")?;
                out.flush()?;
            }
            Delta::ToolCall { call, .. } => {
                writeln!(out, "[tool call] {} {}", call.name, call.arguments)?;
            }
        }
        Ok(())
    };
    while !seq.is_finished() {
        let outs = step(&model.text, &mut [&mut seq], 512)?;
        for id in outs
            .into_iter()
            .next()
            .flatten()
            .map_or(vec![], |o| o.tokens)
        {
            for d in parser.push(id)? {
                print(d, &mut thinking, &mut out)?;
            }
        }
    }
    for d in parser.finish() {
        print(d, &mut thinking, &mut out)?;
    }
    if thinking && tty {
        eprint!("\x1b[0m");
    }
    writeln!(out)?;
    if let (true, Some(s)) = (tty, seq.draft_stats()) {
        eprintln!(
            "\x1b[2m(draft: {} of {} accepted, {:.2} per round)\x1b[0m",
            s.accepted,
            s.drafted,
            s.mean_accepted()
        );
    }
    let m = parser.message().clone();
    chat.previous = Some(seq);
    let mut answer = json!({"role": "assistant", "content": m.content});
    if !m.tool_calls.is_empty() {
        answer["tool_calls"] = m
            .tool_calls
            .iter()
            .map(|c| json!({"type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
            .collect();
    }
    Ok(answer)
}
