//! OpenAI requests read into what the library takes: chat messages in transformers' form
//! rendered with the checkpoint's own template (media decoded from `data:` URIs, tool-call
//! arguments parsed from their JSON strings, `tools`, `tool_choice`,
//! `chat_template_kwargs`), and the sampling and length settings. Every problem is a 400
//! naming the field.

use base64::Engine as _;
use gemma4::audio::decode::{decode_audio_with, load_audio_with};
use gemma4::generate::constraint::ResponseFormat;
use gemma4::generate::sampling::SamplingParams;
use gemma4::model::Media;
use gemma4::vision::image_processor::{decode_image_with, load_image_with};
use gemma4::Gemma4;
use serde_json::{Map, Value};

use super::ApiError;

/// A chat rendered for the model.
pub(crate) struct RenderedChat {
    /// The template's output, with the forced opening of a tool call when `tool_choice`
    /// asks for one.
    pub(crate) text: String,
    pub(crate) media: Media,
    /// What `tool_choice` forced at the end of `text` (the output parser reads it first).
    pub(crate) forced: String,
}

/// How to generate, from the request.
pub(crate) struct Settings {
    pub(crate) max_tokens: Option<usize>,
    pub(crate) sampling: SamplingParams,
    pub(crate) stop: Vec<String>,
    /// Alternatives per token when log-probabilities are asked for.
    pub(crate) logprobs: Option<usize>,
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
    pub(crate) parallel_tool_calls: bool,
    /// `response_format` `json_object` / `json_schema`.
    pub(crate) response_format: Option<ResponseFormat>,
    /// vLLM's `ignore_eos`: no stop id ends the answer (benchmarks on random weights).
    pub(crate) ignore_eos: bool,
    /// vLLM's `return_token_ids`: a whole answer also carries its generated ids.
    pub(crate) return_token_ids: bool,
    /// The adapters `model` names (none: the base model), and the name it was asked by.
    pub(crate) adapters: gemma4::lora::AdapterSet,
    pub(crate) served_as: Option<String>,
    /// Tokens drafted per round with the server's `--draft` (0: none); `None`: the
    /// server's default.
    pub(crate) draft_tokens: Option<usize>,
}

fn field<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    v.get(name).filter(|x| !x.is_null())
}

fn as_f64(v: &Value, name: &str) -> Result<Option<f64>, ApiError> {
    field(v, name)
        .map(|x| {
            x.as_f64()
                .filter(|f| f.is_finite())
                .ok_or_else(|| ApiError::bad(name, "must be a number"))
        })
        .transpose()
}

fn as_usize(v: &Value, name: &str) -> Result<Option<usize>, ApiError> {
    field(v, name)
        .map(|x| {
            x.as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| ApiError::bad(name, "must be a non-negative integer"))
        })
        .transpose()
}

fn as_bool(v: &Value, name: &str) -> Result<Option<bool>, ApiError> {
    field(v, name)
        .map(|x| {
            x.as_bool()
                .ok_or_else(|| ApiError::bad(name, "must be true or false"))
        })
        .transpose()
}

/// Token ids from a JSON array.
pub(crate) fn token_ids(v: Option<&Value>, name: &str) -> Result<Vec<u32>, ApiError> {
    let arr = v
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::bad(name, "an array of token ids is required"))?;
    arr.iter()
        .map(|x| {
            x.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| ApiError::bad(name, format!("{x} is not a token id")))
        })
        .collect()
}

/// A seed for a request that names none.
fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (t ^ COUNTER
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15))
    .wrapping_mul(0xBF58_476D_1CE4_E5B9)
}

/// The sampling and length settings of a chat or completion request. Without any
/// sampling field the checkpoint's `generation_config.json` decides (greedy unless it
/// samples), as vLLM does.
pub(crate) fn settings(model: &Gemma4, v: &Value) -> Result<Settings, ApiError> {
    if let Some(n) = as_usize(v, "n")? {
        if n != 1 {
            return Err(ApiError::bad("n", "only 1 choice per request is supported"));
        }
    }
    let temperature = as_f64(v, "temperature")?;
    let top_p = as_f64(v, "top_p")?;
    let min_p = as_f64(v, "min_p")?;
    // vLLM's convention: 0 or -1 turns top-k off.
    let top_k = match field(v, "top_k") {
        None => None,
        Some(x) => match x.as_i64() {
            Some(k) if k <= 0 => None,
            Some(k) => Some(k as usize),
            None => return Err(ApiError::bad("top_k", "must be an integer")),
        },
    };
    let g = &model.generation_config;
    let any = temperature.is_some() || top_p.is_some() || top_k.is_some() || min_p.is_some();
    let seed = match field(v, "seed") {
        None => fresh_seed(),
        Some(x) => x
            .as_u64()
            .or_else(|| x.as_i64().map(|i| i as u64))
            .ok_or_else(|| ApiError::bad("seed", "must be an integer"))?,
    };
    let repetition_penalty = as_f64(v, "repetition_penalty")?;
    let mut sampling = if !any && !g.do_sample {
        SamplingParams::greedy()
    } else {
        SamplingParams {
            temperature: temperature.or(g.temperature).or(Some(1.0)),
            top_k: if any { top_k } else { g.top_k },
            top_p: if any { top_p } else { g.top_p },
            min_p: if any { min_p } else { g.min_p },
            ..Default::default()
        }
    };
    sampling.repetition_penalty = repetition_penalty.or(g.repetition_penalty);
    sampling.presence_penalty = as_f64(v, "presence_penalty")?;
    sampling.frequency_penalty = as_f64(v, "frequency_penalty")?;
    sampling.seed = seed;
    sampling.validate()?;
    let stop = match field(v, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 16 => a
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| ApiError::bad("stop", "must be a string or a list of strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::bad(
                "stop",
                "must be a string or a list of at most 16 strings",
            ))
        }
    };
    let max_tokens = match as_usize(v, "max_completion_tokens")? {
        Some(n) => Some(n),
        None => as_usize(v, "max_tokens")?,
    };
    if max_tokens == Some(0) {
        return Err(ApiError::bad("max_tokens", "must be at least 1"));
    }
    // `logprobs` is a bool in chat and a count in completions.
    let logprobs = match field(v, "logprobs") {
        None | Some(Value::Bool(false)) => None,
        Some(Value::Bool(true)) => Some(as_usize(v, "top_logprobs")?.unwrap_or(0)),
        Some(x) => Some(
            x.as_u64()
                .ok_or_else(|| ApiError::bad("logprobs", "must be true or false"))?
                as usize,
        ),
    };
    if logprobs.is_none() && field(v, "top_logprobs").is_some() {
        return Err(ApiError::bad("top_logprobs", "needs `logprobs: true`"));
    }
    if logprobs.is_some_and(|k| k > 20) {
        return Err(ApiError::bad("top_logprobs", "must be at most 20"));
    }
    let stream = as_bool(v, "stream")?.unwrap_or(false);
    let include_usage = match field(v, "stream_options") {
        None => false,
        Some(_) if !stream => {
            return Err(ApiError::bad(
                "stream_options",
                "is only allowed when `stream` is true",
            ))
        }
        Some(o) => as_bool(o, "include_usage")
            .map_err(|_| ApiError::bad("stream_options.include_usage", "must be true or false"))?
            .unwrap_or(false),
    };
    let response_format = response_format(v)?;
    Ok(Settings {
        max_tokens,
        sampling,
        stop,
        logprobs,
        stream,
        include_usage,
        parallel_tool_calls: as_bool(v, "parallel_tool_calls")?.unwrap_or(true),
        response_format,
        ignore_eos: as_bool(v, "ignore_eos")?.unwrap_or(false),
        return_token_ids: as_bool(v, "return_token_ids")?.unwrap_or(false),
        adapters: Default::default(),
        served_as: None,
        draft_tokens: match as_usize(v, "draft_tokens")? {
            Some(n) if n > gemma4::generate::speculative::MAX_DRAFT_TOKENS => {
                return Err(ApiError::bad(
                    "draft_tokens",
                    format!(
                        "must be at most {}",
                        gemma4::generate::speculative::MAX_DRAFT_TOKENS
                    ),
                ))
            }
            n => n,
        },
    })
}

/// Bytes of a `data:` URI's base64 payload.
fn data_uri(url: &str, param: &str) -> Result<Vec<u8>, ApiError> {
    let rest = url
        .strip_prefix("data:")
        .ok_or_else(|| ApiError::bad(param, "is not a data: URI"))?;
    let (meta, payload) = rest
        .split_once(',')
        .ok_or_else(|| ApiError::bad(param, "a data: URI without a `,`"))?;
    if !meta.ends_with(";base64") {
        return Err(ApiError::bad(param, "only base64 data: URIs are read"));
    }
    base64_bytes(payload, param)
}

fn base64_bytes(payload: &str, param: &str) -> Result<Vec<u8>, ApiError> {
    let clean: String = payload
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(&clean)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(&clean))
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(&clean))
        .map_err(|e| ApiError::bad(param, format!("bad base64: {e}")))
}

/// A local path named by a media URL, when the server allows them.
fn local_path(url: &str, param: &str, allow: bool) -> Result<std::path::PathBuf, ApiError> {
    if url.starts_with("http://") || url.starts_with("https://") {
        return Err(ApiError::bad(
            param,
            "remote URLs are not fetched; send the media as a data: URI",
        ));
    }
    if !allow {
        return Err(ApiError::bad(
            param,
            "local files are read only when the server runs with --allow-local-media; \
             send the media as a data: URI",
        ));
    }
    Ok(url.strip_prefix("file://").unwrap_or(url).into())
}

/// One content part into the template's form, decoding its media into `media`.
fn content_part(
    model: &Gemma4,
    part: &Value,
    param: &str,
    media: &mut Media,
    allow_local: bool,
) -> Result<Value, ApiError> {
    let limits = &model.limits;
    let kind = part
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad(param, "a content part needs a `type`"))?;
    match kind {
        "text" => {
            let text = part
                .get("text")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::bad(format!("{param}.text"), "a string is required"))?;
            Ok(serde_json::json!({"type": "text", "text": text}))
        }
        "image_url" => {
            let p = format!("{param}.image_url");
            let url = part
                .get("image_url")
                .and_then(|u| u.get("url").or(Some(u)))
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::bad(&p, "needs a `url`"))?;
            let image = if url.starts_with("data:") {
                decode_image_with(&data_uri(url, &p)?, &p, limits)?
            } else {
                load_image_with(&local_path(url, &p, allow_local)?, limits)?
            };
            media.images.push(image);
            Ok(serde_json::json!({"type": "image"}))
        }
        "input_audio" | "audio_url" => {
            let p = format!("{param}.{kind}");
            let clip = if kind == "input_audio" {
                let a = part
                    .get("input_audio")
                    .ok_or_else(|| ApiError::bad(&p, "is required"))?;
                let data = a.get("data").and_then(Value::as_str).ok_or_else(|| {
                    ApiError::bad(format!("{p}.data"), "base64 audio is required")
                })?;
                let format = a.get("format").and_then(Value::as_str).unwrap_or("wav");
                // The format only hints the decoder (the file's own header decides).
                let name = format!("{p}.{format}");
                decode_audio_with(&base64_bytes(data, &p)?, &name, limits)?
            } else {
                let url = part
                    .get("audio_url")
                    .and_then(|u| u.get("url").or(Some(u)))
                    .and_then(Value::as_str)
                    .ok_or_else(|| ApiError::bad(&p, "needs a `url`"))?;
                if url.starts_with("data:") {
                    decode_audio_with(&data_uri(url, &p)?, &p, limits)?
                } else {
                    load_audio_with(&local_path(url, &p, allow_local)?, limits)?
                }
            };
            media.audio.push(clip);
            Ok(serde_json::json!({"type": "audio"}))
        }
        other => Err(ApiError::bad(
            param,
            format!(
                "content parts of type `{other}` are not supported (text, image_url, input_audio)"
            ),
        )),
    }
}

/// One message into transformers' form.
pub(crate) fn message(
    model: &Gemma4,
    m: &Value,
    i: usize,
    media: &mut Media,
    allow_local: bool,
) -> Result<Value, ApiError> {
    let param = format!("messages[{i}]");
    let mut out = m
        .as_object()
        .cloned()
        .ok_or_else(|| ApiError::bad(&param, "must be an object"))?;
    let role = out
        .get("role")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad(format!("{param}.role"), "is required"))?;
    if !matches!(role, "system" | "developer" | "user" | "assistant" | "tool") {
        return Err(ApiError::bad(
            format!("{param}.role"),
            format!("`{role}` is not one of system, developer, user, assistant, tool"),
        ));
    }
    let content = match out.get("content") {
        None | Some(Value::Null) => Value::String(String::new()),
        Some(Value::String(s)) => Value::String(s.clone()),
        Some(Value::Array(parts)) => {
            let parts = parts
                .iter()
                .enumerate()
                .map(|(j, p)| {
                    content_part(
                        model,
                        p,
                        &format!("{param}.content[{j}]"),
                        media,
                        allow_local,
                    )
                })
                .collect::<Result<Vec<_>, _>>()?;
            // Text alone reads as one string (what a client means by several text parts).
            if parts.iter().all(|p| p["type"] == "text") {
                Value::String(
                    parts
                        .iter()
                        .filter_map(|p| p["text"].as_str())
                        .collect::<Vec<_>>()
                        .join("\n"),
                )
            } else {
                Value::Array(parts)
            }
        }
        Some(_) => {
            return Err(ApiError::bad(
                format!("{param}.content"),
                "must be a string or a list of parts",
            ))
        }
    };
    out.insert("content".into(), content);
    if let Some(calls) = out.get_mut("tool_calls").filter(|c| !c.is_null()) {
        let list = calls
            .as_array_mut()
            .ok_or_else(|| ApiError::bad(format!("{param}.tool_calls"), "must be a list"))?;
        for (j, c) in list.iter_mut().enumerate() {
            let p = format!("{param}.tool_calls[{j}].function");
            let f = c
                .get_mut("function")
                .and_then(Value::as_object_mut)
                .ok_or_else(|| ApiError::bad(&p, "is required"))?;
            // The template prints arguments as an object; the API sends a JSON string.
            if let Some(Value::String(s)) = f.get("arguments") {
                let parsed: Value = serde_json::from_str(s).map_err(|e| {
                    ApiError::bad(format!("{p}.arguments"), format!("is not JSON: {e}"))
                })?;
                f.insert("arguments".into(), parsed);
            }
        }
    }
    Ok(Value::Object(out))
}

/// Renders a chat request's messages with the checkpoint's template.
pub(crate) fn render_chat(
    model: &Gemma4,
    v: &Value,
    max_media: usize,
    allow_local: bool,
) -> Result<RenderedChat, ApiError> {
    let messages = v
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::bad("messages", "a non-empty list is required"))?;
    let mut media = Media::default();
    let messages = messages
        .iter()
        .enumerate()
        .map(|(i, m)| message(model, m, i, &mut media, allow_local))
        .collect::<Result<Vec<_>, _>>()?;
    let count = media.images.len() + media.audio.len();
    if count > max_media {
        return Err(ApiError::bad(
            "messages",
            format!(
                "{count} images and audio clips; at most {max_media} per request (--max-media)"
            ),
        ));
    }
    let tools = match field(v, "tools") {
        None => None,
        Some(t @ Value::Array(_)) => Some(t.clone()),
        Some(_) => return Err(ApiError::bad("tools", "must be a list")),
    };
    let mut kwargs = match field(v, "chat_template_kwargs") {
        None => Map::new(),
        Some(Value::Object(o)) => o.clone(),
        Some(_) => return Err(ApiError::bad("chat_template_kwargs", "must be an object")),
    };
    if let Some(effort) = field(v, "reasoning_effort") {
        kwargs
            .entry("reasoning_effort")
            .or_insert_with(|| effort.clone());
    }
    let add_generation_prompt = as_bool(v, "add_generation_prompt")?.unwrap_or(true);
    let names: Vec<&str> = tools
        .iter()
        .flat_map(|t| t.as_array().into_iter().flatten())
        .filter_map(|t| t.pointer("/function/name").and_then(Value::as_str))
        .collect();
    let (tools, forced) = match field(v, "tool_choice") {
        None => (tools.as_ref(), String::new()),
        Some(Value::String(s)) => match s.as_str() {
            "auto" => (tools.as_ref(), String::new()),
            // The model does not see the tools, so it cannot call them.
            "none" => (None, String::new()),
            // The model's turn opens a call; it picks which.
            "required" if !names.is_empty() => (tools.as_ref(), "<|tool_call>call:".to_string()),
            "required" => return Err(ApiError::bad("tool_choice", "`required` needs `tools`")),
            other => {
                return Err(ApiError::bad(
                    "tool_choice",
                    format!("`{other}` is not none, auto or required"),
                ))
            }
        },
        Some(o) => {
            let name = o
                .pointer("/function/name")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::bad("tool_choice", "needs `function.name`"))?;
            if !names.contains(&name) {
                return Err(ApiError::bad(
                    "tool_choice",
                    format!("names `{name}`, which is not in `tools`"),
                ));
            }
            (tools.as_ref(), format!("<|tool_call>call:{name}{{"))
        }
    };
    let mut text = model.chat_template.render_json(
        &Value::Array(messages),
        tools,
        add_generation_prompt,
        &kwargs,
    )?;
    text.push_str(&forced);
    Ok(RenderedChat {
        text,
        media,
        forced,
    })
}

/// OpenAI's `response_format`: `text` (free), `json_object`, or `json_schema` with its
/// `schema` (missing: any JSON value).
fn response_format(v: &Value) -> Result<Option<ResponseFormat>, ApiError> {
    let Some(rf) = field(v, "response_format") else {
        return Ok(None);
    };
    match rf.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(ResponseFormat::JsonObject)),
        Some("json_schema") => {
            let spec = field(rf, "json_schema").ok_or_else(|| {
                ApiError::bad(
                    "response_format.json_schema",
                    "is required for `json_schema`",
                )
            })?;
            match field(spec, "schema") {
                None => Ok(Some(ResponseFormat::JsonSchema(Value::Bool(true)))),
                Some(schema @ (Value::Object(_) | Value::Bool(_))) => {
                    Ok(Some(ResponseFormat::JsonSchema(schema.clone())))
                }
                Some(_) => Err(ApiError::bad(
                    "response_format.json_schema.schema",
                    "must be a JSON schema (an object)",
                )),
            }
        }
        _ => Err(ApiError::bad(
            "response_format",
            "`type` must be `text`, `json_object` or `json_schema`",
        )),
    }
}
