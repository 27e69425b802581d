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
//! Messages may hold image, video and audio parts (`{"type": "image", "image": PATH}`, or
//! `"path"`/`"url"`; a bare `{"type": "image"}` takes the next of the row's `"images"`
//! list, as TRL's vision datasets have it; `"videos"` and `"audios"` likewise). Relative
//! paths are read from the data file's directory. The template renders each part's marker,
//! which is expanded as the processor does; the frozen towers encode the media once, when
//! the data is read ([`Example::media`]), and the soft tokens are never supervised.
//!
//! Pad tokens are never supervised. A row the engine cannot use (no supervised token,
//! longer than `max_len`, unreadable) is skipped with its line number and reason, counted,
//! never silently dropped; a file with no usable row is an error.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::Gemma4;
use crate::multimodal::{expand_prompt, ProcessedMedia};
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
    load_jsonl_with(path, model, max_len, false)
}

/// [`load_jsonl`], the examples also keeping their processed media when `keep_sources`
/// (for training the towers, which encode them again at every step).
pub fn load_jsonl_with(
    path: &Path,
    model: &Gemma4,
    max_len: usize,
    keep_sources: bool,
) -> Result<DataSet> {
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
        match example_of_row_with(model, &row, path.parent(), keep_sources) {
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

/// Which encoders the rows of JSONL file `path` need: (vision, audio) for image or video
/// parts and audio parts in their messages, so a caller loads only the towers it uses.
/// Rows that are not JSON are left for [`load_jsonl`] to report.
pub fn media_kinds(path: &Path) -> Result<(bool, bool)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let (mut vision, mut audio) = (false, false);
    for row in text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
    {
        let lists = ["messages", "prompt", "completion"]
            .into_iter()
            .filter_map(|k| row.get(k).and_then(Value::as_array));
        for m in lists.flatten() {
            for part in m
                .get("content")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                match part.get("type").and_then(Value::as_str) {
                    Some("image" | "video") => vision = true,
                    Some("audio") => audio = true,
                    _ => {}
                }
            }
        }
    }
    Ok((vision, audio))
}

fn special(model: &Gemma4, token: &str) -> Result<u32> {
    model
        .tokenizer()?
        .token_to_id(token)
        .ok_or_else(|| Error::invalid_argument("tokenizer", format!("has no `{token}` token")))
}

/// One row as ids and labels (media paths relative to the working directory).
pub fn example_of_row(model: &Gemma4, row: &Value) -> Result<Example> {
    example_of_row_in(model, row, None)
}

/// One row as ids and labels, relative media paths read from `dir`.
pub fn example_of_row_in(model: &Gemma4, row: &Value, dir: Option<&Path>) -> Result<Example> {
    example_of_row_with(model, row, dir, false)
}

/// [`example_of_row_in`], keeping the processed media when `keep_sources`.
pub fn example_of_row_with(
    model: &Gemma4,
    row: &Value,
    dir: Option<&Path>,
    keep_sources: bool,
) -> Result<Example> {
    let tok = model.tokenizer()?;
    let pad = model.config.text.pad_token_id;
    let mut ex = if let Some(messages) = row.get("messages") {
        let (messages, media) = media_parts(messages, row, dir)?;
        let text = render(model, &messages, row.get("tools"), false)?;
        let media = load_media(model, &media)?;
        chat_example(
            model,
            &expand(model, &text, &media)?,
            0,
            media,
            keep_sources,
        )?
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
                let all = Value::Array([p.clone(), c.clone()].concat());
                let (all, media) = media_parts(&all, row, dir)?;
                let (prompt_parts, prompt_media) = media_parts(&Value::Array(p.clone()), row, dir)?;
                let media = load_media(model, &media)?;
                // The prompt's media are the first of the row's, in reading order.
                let prompt_media = ProcessedMedia {
                    images: media.images[..prompt_media.images.len()].to_vec(),
                    videos: media.videos[..prompt_media.videos.len()].to_vec(),
                    audio: media.audio[..prompt_media.audio.len()].to_vec(),
                };
                let prompt = render(model, &prompt_parts, row.get("tools"), true)?;
                let prompt = expand(model, &prompt, &prompt_media)?;
                let text = expand(
                    model,
                    &render(model, &all, row.get("tools"), false)?,
                    &media,
                )?;
                if !text.starts_with(prompt.as_str()) {
                    return Err(Error::invalid_argument(
                        "completion",
                        "the rendered conversation does not begin with the rendered prompt",
                    ));
                }
                chat_example(model, &text, prompt.len(), media, keep_sources)?
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
    let mm = &model.config.mm_tokens;
    for (&id, l) in ex.ids.iter().zip(ex.labels.iter_mut()) {
        if id == pad || id == mm.image || id == mm.video || id == mm.audio {
            *l = None;
        }
    }
    Ok(ex)
}

/// The media files a row's messages name, by kind, in reading order.
#[derive(Debug, Default)]
struct MediaFiles {
    images: Vec<PathBuf>,
    videos: Vec<PathBuf>,
    audio: Vec<PathBuf>,
}

/// `messages` with each media part reduced to its type (what the template renders as a
/// marker), and the files those parts name.
fn media_parts(messages: &Value, row: &Value, dir: Option<&Path>) -> Result<(Value, MediaFiles)> {
    let mut files = MediaFiles::default();
    let mut out = messages.clone();
    let Some(list) = out.as_array_mut() else {
        return Err(Error::invalid_argument("messages", "is not a list"));
    };
    let mut taken = [0usize; 3];
    for m in list {
        let Some(Value::Array(content)) = m.get_mut("content") else {
            continue;
        };
        for part in content {
            let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
            let (k, list_key, alt_key) = match kind {
                "text" => continue,
                "image" => (0, "images", "images"),
                "video" => (1, "videos", "videos"),
                "audio" => (2, "audios", "audio"),
                other => {
                    return Err(Error::invalid_argument(
                        "messages",
                        format!(
                        "content parts of type `{other}` are not read (text, image, video, audio)"
                    ),
                    ))
                }
            };
            let named = [kind, "path", "url"]
                .iter()
                .find_map(|key| part.get(*key).and_then(Value::as_str))
                .map(str::to_string);
            let source = match named {
                Some(s) => s,
                None => {
                    let from = row.get(list_key).or_else(|| row.get(alt_key));
                    let s = from
                        .and_then(Value::as_array)
                        .and_then(|a| a.get(taken[k]))
                        .and_then(Value::as_str)
                        .ok_or_else(|| {
                            Error::invalid_argument(
                                list_key,
                                format!(
                                    "a `{kind}` part names no file and the row's `{list_key}` list has no entry {}",
                                    taken[k] + 1
                                ),
                            )
                        })?;
                    taken[k] += 1;
                    s.to_string()
                }
            };
            if source.starts_with("http://")
                || source.starts_with("https://")
                || source.starts_with("data:")
            {
                return Err(Error::invalid_argument(
                    kind,
                    format!(
                        "`{}…` is not read in training data: give a file path",
                        &source[..source.len().min(24)]
                    ),
                ));
            }
            let path = PathBuf::from(source.strip_prefix("file://").unwrap_or(&source));
            let path = match (dir, path.is_relative()) {
                (Some(d), true) => d.join(path),
                _ => path,
            };
            [&mut files.images, &mut files.videos, &mut files.audio][k].push(path);
            *part = serde_json::json!({ "type": kind });
        }
    }
    Ok((out, files))
}

/// Reads and processes a row's media for the checkpoint's encoders.
fn load_media(model: &Gemma4, files: &MediaFiles) -> Result<ProcessedMedia> {
    let images = files
        .images
        .iter()
        .map(|p| model.load_image(p))
        .collect::<Result<Vec<_>>>()?;
    let videos = files
        .videos
        .iter()
        .map(|p| model.load_video(p))
        .collect::<Result<Vec<_>>>()?;
    let audio = files
        .audio
        .iter()
        .map(|p| model.load_audio(p))
        .collect::<Result<Vec<_>>>()?;
    model.process_media(&crate::Media {
        images,
        videos,
        audio,
    })
}

/// `text` with its media markers expanded as the processor does.
fn expand(model: &Gemma4, text: &str, media: &ProcessedMedia) -> Result<String> {
    match media.is_empty() {
        true => Ok(text.to_string()),
        false => expand_prompt(text, &model.markers()?, media),
    }
}

fn render(model: &Gemma4, messages: &Value, tools: Option<&Value>, gen: bool) -> Result<String> {
    model
        .chat_template
        .render_json(messages, tools, gen, &serde_json::Map::new())
}

/// A rendered conversation's ids, with the model turns that start at or after byte `from`
/// supervised (up to and including their `<turn|>`).
fn chat_example(
    model: &Gemma4,
    text: &str,
    from: usize,
    media: ProcessedMedia,
    keep_sources: bool,
) -> Result<Example> {
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
    let mut ex = Example::new(ids, labels);
    ex.media = model.encode_media(&ex.ids, &media)?;
    if keep_sources && ex.media.is_some() {
        ex.sources = vec![(0, std::sync::Arc::new(media))];
    }
    Ok(ex)
}
