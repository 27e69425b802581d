//! Training data: JSONL rows in the shapes TRL's `SFTTrainer` reads, turned into token ids
//! and per-token labels ([`Example`]).
//!
//! - `{"messages": [...]}` (optionally `"tools": [...]`): rendered with the checkpoint's
//!   chat template; only the model's turns are supervised, from after `<|turn>model\n` up
//!   to and including `<turn|>` (Gemma 4's template has no `{% generation %}` markers, so
//!   TRL's `assistant_only_loss` would find none; the turn markers are what delimit them).
//! - `{"prompt": ..., "completion": ...}`: only the completion is supervised. Strings are
//!   plain text (the prompt with `<bos>`, the completion followed by `<eos>`, as TRL
//!   appends the EOS token); lists of messages are rendered with the template, the prompt
//!   with the generation prompt, the completion as what follows it.
//! - `{"text": ...}`: everything is supervised (`<bos>` text `<eos>`).
//!
//! Pad tokens are never supervised. A row the engine cannot use (no supervised token,
//! longer than `max_len`, unreadable) is skipped with its line number and reason, counted,
//! never silently dropped; a file with no usable row is an error.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::Gemma4;
use crate::train::gradients::Example;

/// What loading a file gave.
#[derive(Debug, Clone, Default)]
pub struct DataSet {
    pub examples: Vec<Example>,
    /// Rows left out: line number (from 1) and why.
    pub skipped: Vec<(usize, String)>,
}

impl DataSet {
    /// Supervised tokens over all examples.
    pub fn supervised(&self) -> usize {
        self.examples.iter().map(Example::supervised).sum()
    }
}

/// Reads JSONL file `path` for `model`, keeping rows of at most `max_len` tokens.
pub fn load_jsonl(path: &Path, model: &Gemma4, max_len: usize) -> Result<DataSet> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut data = DataSet::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                data.skipped.push((i + 1, format!("not JSON: {e}")));
                continue;
            }
        };
        match example_of_row(model, &row) {
            Ok(ex) if ex.ids.len() > max_len => data.skipped.push((
                i + 1,
                format!("{} tokens, over --max-len {max_len}", ex.ids.len()),
            )),
            Ok(ex) if ex.supervised() == 0 => {
                data.skipped.push((i + 1, "no supervised token".into()))
            }
            Ok(ex) => data.examples.push(ex),
            Err(e) => data.skipped.push((i + 1, e.to_string())),
        }
    }
    if data.examples.is_empty() {
        let why = data
            .skipped
            .first()
            .map(|(l, w)| format!(" (line {l}: {w})"))
            .unwrap_or_default();
        return Err(Error::invalid_argument(
            "data",
            format!("{}: no usable row{why}", path.display()),
        ));
    }
    Ok(data)
}

fn special(model: &Gemma4, token: &str) -> Result<u32> {
    model
        .tokenizer()?
        .token_to_id(token)
        .ok_or_else(|| Error::invalid_argument("tokenizer", format!("has no `{token}` token")))
}

/// One row as ids and labels.
pub fn example_of_row(model: &Gemma4, row: &Value) -> Result<Example> {
    let tok = model.tokenizer()?;
    let pad = model.config.text.pad_token_id;
    let mut ex = if let Some(messages) = row.get("messages") {
        let text = render(model, messages, row.get("tools"), false)?;
        chat_example(model, &text, 0)?
    } else if let (Some(p), Some(c)) = (row.get("prompt"), row.get("completion")) {
        match (p, c) {
            (Value::String(p), Value::String(c)) => {
                let prompt = tok.encode(p)?;
                let mut completion = tok.encode_raw(c)?;
                completion.push(special(model, "<eos>")?);
                let labels = prompt
                    .iter()
                    .map(|_| None)
                    .chain(completion.iter().map(|&t| Some(t)))
                    .collect();
                Example::new([prompt, completion].concat(), labels)
            }
            (Value::Array(p), Value::Array(c)) => {
                let prompt = render(model, &Value::Array(p.clone()), row.get("tools"), true)?;
                let all = [p.clone(), c.clone()].concat();
                let text = render(model, &Value::Array(all), row.get("tools"), false)?;
                if !text.starts_with(prompt.as_str()) {
                    return Err(Error::invalid_argument(
                        "completion",
                        "the rendered conversation does not begin with the rendered prompt",
                    ));
                }
                chat_example(model, &text, prompt.len())?
            }
            _ => {
                return Err(Error::invalid_argument(
                    "prompt",
                    "prompt and completion are both strings or both lists of messages",
                ))
            }
        }
    } else if let Some(Value::String(t)) = row.get("text") {
        let mut ids = tok.encode(t)?;
        ids.push(special(model, "<eos>")?);
        let labels = ids.iter().map(|&t| Some(t)).collect();
        Example::new(ids, labels)
    } else {
        return Err(Error::invalid_argument(
            "row",
            "has none of `messages`, `prompt` + `completion`, `text`",
        ));
    };
    for (id, l) in ex.ids.iter().zip(ex.labels.iter_mut()) {
        if *id == pad {
            *l = None;
        }
    }
    Ok(ex)
}

fn render(model: &Gemma4, messages: &Value, tools: Option<&Value>, gen: bool) -> Result<String> {
    if let Some(parts) = messages.as_array() {
        for m in parts {
            if let Some(Value::Array(content)) = m.get("content") {
                if content
                    .iter()
                    .any(|p| p.get("type").and_then(Value::as_str) != Some("text"))
                {
                    return Err(Error::invalid_argument(
                        "messages",
                        "image, audio and video parts are not supported in training data yet",
                    ));
                }
            }
        }
    }
    model
        .chat_template
        .render_json(messages, tools, gen, &serde_json::Map::new())
}

/// A rendered conversation's ids, with the model turns that start at or after byte `from`
/// supervised (up to and including their `<turn|>`).
fn chat_example(model: &Gemma4, text: &str, from: usize) -> Result<Example> {
    let tok = model.tokenizer()?;
    let open = "<|turn>model\n";
    let close = "<turn|>";
    special(model, "<|turn>")?;
    let mut spans = Vec::new();
    let mut at = 0;
    while let Some(i) = text[at..].find(open) {
        let start = at + i + open.len();
        let end = match text[start..].find(close) {
            Some(j) => start + j + close.len(),
            None => text.len(),
        };
        if start >= from {
            spans.push((start, end));
        }
        at = end;
    }
    let (ids, offsets) = tok.encode_raw_with_offsets(text)?;
    let labels = ids
        .iter()
        .zip(&offsets)
        .map(|(&id, &(s, e))| {
            spans
                .iter()
                .any(|&(a, b)| s >= a && e <= b && e > s)
                .then_some(id)
        })
        .collect();
    Ok(Example::new(ids, labels))
}
