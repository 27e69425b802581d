//! Chat and text completions: a request is prepared off the async threads, submitted to
//! the engine, and its tokens are turned into the answer, whole or streamed.
//!
//! Chat output goes through the library's output parser (thoughts to
//! `reasoning_content`, calls to `tool_calls`, markers never in `content`), text
//! completions through the plain stream decoder; both then pass the stop strings. A
//! stream is server-sent events: a first chunk with the role, deltas, one chunk with the
//! finish reason, the usage chunk when asked for, `data: [DONE]`; comments keep the
//! connection alive while a prompt prefills, and an error mid-stream is a
//! `data: {"error": ...}` event. A client that goes away cancels its sequence: the
//! answer's channel closes, which drops the engine's receiver.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use gemma4::generate::constraint::{Constraint, ConstraintCompiler, ResponseFormat};
use gemma4::generate::engine::{Event, Job, Logprobs, SubmitError};
use gemma4::generate::{GenerateOptions, StopReason};
use gemma4::lora::AdapterSet;
use gemma4::prompt::output_parser::{Delta, Markers, OutputParser, ToolCall};
use gemma4::prompt::tokenizer::{StreamDecoder, Tokenizer};
use gemma4::text::model::PromptInput;
use gemma4::{Gemma4, Prompt};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::request::{render_chat, settings, token_ids, Settings};
use super::stop::StopScan;
use super::{json_body, ApiError, App, Loaded};

/// A piece of an answer.
enum Piece {
    /// Text, with the log-probabilities of the tokens it came from (when asked for).
    Content(String, Vec<Value>),
    Reasoning(String),
    Call(usize, ToolCall),
}

/// Turns tokens into pieces: the output parser for chat, the plain decoder for text.
struct Output<'a> {
    tok: &'a Tokenizer,
    parser: Option<OutputParser<'a>>,
    plain: StreamDecoder,
    stop: StopScan,
    logprobs: bool,
    pending: Vec<Value>,
    calls: usize,
    parallel_tool_calls: bool,
    /// A stop string ended the answer.
    stopped: bool,
    /// The ids generated so far.
    ids: Vec<u32>,
}

impl<'a> Output<'a> {
    fn new(tok: &'a Tokenizer, markers: Option<Markers>, s: &Settings) -> Self {
        Output {
            tok,
            parser: markers.map(|m| OutputParser::new(tok, m)),
            plain: StreamDecoder::new(),
            stop: StopScan::new(s.stop.clone()),
            logprobs: s.logprobs.is_some(),
            pending: Vec::new(),
            calls: 0,
            parallel_tool_calls: s.parallel_tool_calls,
            stopped: false,
            ids: Vec::new(),
        }
    }

    /// Reads ids the prompt already holds (a forced tool-call opening) as if generated.
    fn prime(&mut self, ids: &[u32]) -> Result<(), ApiError> {
        if let Some(p) = &mut self.parser {
            for &id in ids {
                p.push(id)?;
            }
        }
        Ok(())
    }

    fn token(&mut self, id: u32, lp: Option<Logprobs>) -> Result<Vec<Piece>, ApiError> {
        self.ids.push(id);
        let was_content = self.parser.as_ref().is_none_or(|p| p.in_content());
        let deltas = match &mut self.parser {
            Some(p) => p.push(id)?,
            None => self
                .plain
                .push(self.tok, id)?
                .map(Delta::Content)
                .into_iter()
                .collect(),
        };
        if let (true, Some(lp)) = (self.logprobs, lp) {
            let still = self.parser.as_ref().is_none_or(|p| p.in_content());
            if was_content && still && !self.tok.decode(&[id], true)?.is_empty() {
                self.pending.push(self.entry(id, &lp)?);
            }
        }
        Ok(self.convert(deltas))
    }

    fn entry(&self, id: u32, lp: &Logprobs) -> Result<Value, ApiError> {
        let text = |id: u32| -> Result<(String, Vec<u8>), ApiError> {
            let t = self.tok.decode(&[id], false)?;
            // A byte-fallback token (`<0xE3>`) is one byte of a character, not text.
            let byte = self.tok.id_to_token(id).and_then(|p| {
                let hex = p.strip_prefix("<0x")?.strip_suffix('>')?;
                u8::from_str_radix(hex, 16).ok()
            });
            let b = byte.map_or_else(|| t.as_bytes().to_vec(), |b| vec![b]);
            Ok((t, b))
        };
        let (t, b) = text(id)?;
        let top = lp
            .top
            .iter()
            .map(|&(i, l)| {
                let (t, b) = text(i)?;
                Ok(json!({"token": t, "logprob": l, "bytes": b}))
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        Ok(json!({"token": t, "logprob": lp.logprob, "bytes": b, "top_logprobs": top}))
    }

    fn convert(&mut self, deltas: Vec<Delta>) -> Vec<Piece> {
        let mut out = Vec::new();
        for d in deltas {
            if self.stopped {
                break;
            }
            match d {
                Delta::Content(s) => {
                    let (text, hit) = self.stop.push(&s);
                    if !text.is_empty() {
                        out.push(Piece::Content(text, std::mem::take(&mut self.pending)));
                    }
                    self.stopped = hit;
                }
                Delta::Reasoning(s) => out.push(Piece::Reasoning(s)),
                Delta::ToolCall { call, .. } => {
                    if self.parallel_tool_calls || self.calls == 0 {
                        out.push(Piece::Call(self.calls, call));
                        self.calls += 1;
                    }
                }
            }
        }
        out
    }

    /// The end of the answer: what the parser and the stop scan still held.
    fn finish(&mut self) -> Vec<Piece> {
        let deltas = self.parser.as_mut().map(|p| p.finish()).unwrap_or_default();
        let mut out = self.convert(deltas);
        if !self.stopped {
            let rest = self.stop.flush();
            if !rest.is_empty() || !self.pending.is_empty() {
                out.push(Piece::Content(rest, std::mem::take(&mut self.pending)));
            }
        }
        out
    }

    fn finish_reason(&self, reason: Option<StopReason>) -> &'static str {
        match (self.stopped, reason) {
            (true, _) => "stop",
            (false, Some(StopReason::MaxTokens | StopReason::ContextFull)) => "length",
            _ if self.calls > 0 => "tool_calls",
            _ => "stop",
        }
    }
}

/// Ids of a request, its time and model name.
struct Meta {
    id: String,
    created: u64,
    model: String,
    prompt_tokens: usize,
}

fn random_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let x = (t ^ N
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15))
    .wrapping_mul(0xD6E8_FEB8_6659_FD93);
    format!("{x:016x}")
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The request's `model`, when given: the served model (its base weights) or one of its
/// `--lora` adapters by name, which the answer then runs with (as vLLM serves LoRA
/// modules). The name is echoed in the answer.
fn requested_model(app: &App, l: &Loaded, v: &Value) -> Result<(String, AdapterSet), ApiError> {
    let adapters = l.model.adapters();
    match v.get("model").and_then(Value::as_str) {
        None => Ok((app.name.clone(), AdapterSet::NONE)),
        Some(m) if m == app.name => Ok((app.name.clone(), AdapterSet::NONE)),
        Some(m) => match adapters.iter().find(|a| a.name == m) {
            Some(a) => Ok((a.name.clone(), a.set())),
            None => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "the model `{m}` does not exist; this server serves {}",
                    std::iter::once(&app.name)
                        .chain(adapters.iter().map(|a| &a.name))
                        .map(|n| format!("`{n}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
            .code("model_not_found")),
        },
    }
}

/// Every id that ends a turn: the checkpoint's EOS ids and, on a Gemma 4 vocabulary,
/// `<eos>`, `<turn|>` and `<|tool_response>` (the model waits for the tool's answer).
fn stop_ids(l: &Loaded) -> Vec<u32> {
    let mut ids = l.model.stop_ids();
    if let Some(m) = l.markers {
        ids.extend(m.message_ends());
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// `format` compiled for the model (the first call builds the compiler). Blocking.
fn constraint(l: &Loaded, format: &ResponseFormat) -> Result<Constraint, ApiError> {
    let compiler = l.constraints.get_or_init(|| {
        let tok = l.model.tokenizer().map_err(|e| e.to_string())?;
        let end = *stop_ids(l).first().ok_or("the model has no stop ids")?;
        ConstraintCompiler::new(tok, l.model.config.text.vocab_size, end).map_err(|e| e.to_string())
    });
    match compiler {
        Ok(c) => Ok(c.compile(format)?),
        Err(e) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.clone())),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

/// Submits a prepared prompt; its events arrive on the returned channel (closing it
/// cancels the sequence).
fn submit(
    l: &Loaded,
    input: PromptInput,
    s: &Settings,
    constraint: Option<Constraint>,
) -> Result<(mpsc::UnboundedReceiver<Event>, usize), ApiError> {
    let prompt_tokens = input.ids.len();
    let ctx = l.model.config.text.max_position_embeddings;
    if prompt_tokens >= ctx {
        return Err(ApiError::bad(
            "messages",
            format!("the prompt is {prompt_tokens} tokens; the model's context is {ctx}"),
        )
        .code("context_length_exceeded"));
    }
    let room = ctx - prompt_tokens;
    let draft = match (&l.draft, s.draft_tokens) {
        (None, Some(n)) if n > 0 => {
            return Err(ApiError::bad(
                "draft_tokens",
                "this server runs no drafter (start it with --draft)",
            ))
        }
        (None, _) | (Some(_), Some(0)) => None,
        (Some(d), None) => Some(d.clone()),
        (Some(d), Some(n)) => Some(gemma4::generate::speculative::DraftOptions {
            tokens: n,
            ..d.clone()
        }),
    };
    let options = GenerateOptions {
        max_new_tokens: s.max_tokens.unwrap_or(room).min(room),
        sampling: s.sampling.clone(),
        stop_ids: if s.ignore_eos {
            Vec::new()
        } else {
            stop_ids(l)
        },
        adapters: s.adapters,
        constraint,
        draft,
    };
    let job = Job {
        prompt: input,
        options,
        top_logprobs: s.logprobs,
    };
    let events = l.engine.submit(job).map_err(|e| match e {
        SubmitError::QueueFull => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "the server is busy: every sequence is running and the queue is full",
        ),
        SubmitError::Stopped => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the engine has stopped")
        }
    })?;
    // The engine's channel is std's; a thread forwards it, and ends (dropping the
    // engine's receiver, which cancels the sequence) once the answer stops listening.
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::task::spawn_blocking(move || {
        for e in events {
            if tx.send(e).is_err() {
                break;
            }
        }
    });
    Ok((rx, prompt_tokens))
}

pub(crate) async fn chat_completions(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match chat(app, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat(app: Arc<App>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let v = json_body(body)?;
    let l = app.loaded()?;
    let (served_as, adapters) = requested_model(&app, l, &v)?;
    let mut s = settings(&l.model, &v)?;
    (s.served_as, s.adapters) = (Some(served_as), adapters);
    let markers = l.markers.ok_or_else(|| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the tokenizer lacks Gemma 4's output markers",
        )
    })?;
    let (max_media, allow) = (app.max_media, app.allow_local_media);
    let format = s.response_format.clone();
    let a = app.clone();
    let (input, forced, constraint) = blocking(move || {
        let l = a.loaded()?;
        let chat = render_chat(&l.model, &v, max_media, allow)?;
        if format.is_some() && !chat.forced.is_empty() {
            return Err(ApiError::bad(
                "response_format",
                "cannot hold an answer that `tool_choice` forces to be a tool call",
            ));
        }
        let input = l
            .model
            .prepare_with(&Prompt::Rendered(chat.text), &chat.media, adapters)?;
        let forced = match chat.forced.is_empty() {
            true => Vec::new(),
            false => l.model.tokenizer()?.encode_raw(&chat.forced)?,
        };
        // A thought may come first, free; the grammar holds the answer after it.
        let constraint = format
            .map(|f| {
                let c = constraint(l, &f)?;
                Ok::<_, ApiError>(c.after_reasoning(markers.channel_open, markers.channel_close))
            })
            .transpose()?;
        Ok((input, forced, constraint))
    })
    .await?;
    let (events, prompt_tokens) = submit(l, input, &s, constraint)?;
    answer(
        &app,
        l.model.clone(),
        Some(markers),
        forced,
        events,
        s,
        prompt_tokens,
        Kind::Chat,
    )
    .await
}

pub(crate) async fn completions(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match completion(app, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn completion(
    app: Arc<App>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let v = json_body(body)?;
    let l = app.loaded()?;
    let (served_as, adapters) = requested_model(&app, l, &v)?;
    let mut s = settings(&l.model, &v)?;
    (s.served_as, s.adapters) = (Some(served_as), adapters);
    let prompt = match v.get("prompt") {
        Some(Value::String(t)) => Prompt::Text(t.clone()),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            Prompt::Text(a[0].as_str().unwrap_or_default().to_string())
        }
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_array() => {
            Prompt::Ids(token_ids(Some(&a[0]), "prompt")?)
        }
        Some(a @ Value::Array(_)) => Prompt::Ids(token_ids(Some(a), "prompt")?),
        _ => {
            return Err(ApiError::bad(
                "prompt",
                "a string or token ids (one prompt per request) is required",
            ))
        }
    };
    let format = s.response_format.clone();
    let a = app.clone();
    let (input, constraint) = blocking(move || {
        let l = a.loaded()?;
        let input = l.model.prepare(&prompt, &Default::default())?;
        Ok((input, format.map(|f| constraint(l, &f)).transpose()?))
    })
    .await?;
    let (events, prompt_tokens) = submit(l, input, &s, constraint)?;
    answer(
        &app,
        l.model.clone(),
        None,
        Vec::new(),
        events,
        s,
        prompt_tokens,
        Kind::Text,
    )
    .await
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

/// Everything an answer accumulates.
#[derive(Default)]
struct Whole {
    content: String,
    reasoning: Option<String>,
    calls: Vec<Value>,
    logprobs: Vec<Value>,
}

impl Whole {
    fn add(&mut self, p: &Piece) {
        match p {
            Piece::Content(t, lp) => {
                self.content.push_str(t);
                self.logprobs.extend(lp.iter().cloned());
            }
            Piece::Reasoning(t) => self.reasoning.get_or_insert_with(String::new).push_str(t),
            Piece::Call(_, c) => self.calls.push(crate::openai::tool_call_json(
                c,
                &format!("call_{}", random_id()),
            )),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn answer(
    app: &App,
    model: Arc<Gemma4>,
    markers: Option<Markers>,
    forced: Vec<u32>,
    events: mpsc::UnboundedReceiver<Event>,
    s: Settings,
    prompt_tokens: usize,
    kind: Kind,
) -> Result<Response, ApiError> {
    let deadline = Instant::now() + app.timeout;
    let meta = Meta {
        id: match kind {
            Kind::Chat => format!("chatcmpl-{}", random_id()),
            Kind::Text => format!("cmpl-{}", random_id()),
        },
        created: now(),
        model: s.served_as.clone().unwrap_or_else(|| app.name.clone()),
        prompt_tokens,
    };
    if s.stream {
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        tokio::spawn(async move {
            let tok = match model.tokenizer() {
                Ok(t) => t,
                Err(e) => {
                    let _ = tx.send(sse(&ApiError::from(e).body())).await;
                    return;
                }
            };
            stream(tok, markers, forced, events, s, meta, kind, deadline, tx).await;
        });
        let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
        }));
        return Ok((
            [
                (header::CONTENT_TYPE, "text/event-stream"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            body,
        )
            .into_response());
    }
    let tok = model.tokenizer()?;
    let mut out = Output::new(tok, markers, &s);
    out.prime(&forced)?;
    let mut whole = Whole::default();
    let reason = run(&mut out, events, deadline, |p| {
        whole.add(&p);
        true
    })
    .await?;
    for p in out.finish() {
        whole.add(&p);
    }
    let finish = out.finish_reason(reason);
    let usage = usage(&meta, out.ids.len());
    let body = match kind {
        Kind::Chat => {
            let mut message = json!({
                "role": "assistant",
                "content": if whole.content.is_empty() && !whole.calls.is_empty() {
                    Value::Null
                } else {
                    Value::String(whole.content)
                },
            });
            if let Some(r) = whole.reasoning {
                message["reasoning_content"] = json!(r);
            }
            if !whole.calls.is_empty() {
                message["tool_calls"] = json!(whole.calls);
            }
            json!({
                "id": meta.id, "object": "chat.completion", "created": meta.created,
                "model": meta.model,
                "choices": [{
                    "index": 0, "message": message, "finish_reason": finish,
                    "logprobs": if s.logprobs.is_some() { json!({"content": whole.logprobs}) } else { Value::Null },
                }],
                "usage": usage,
            })
        }
        Kind::Text => json!({
            "id": meta.id, "object": "text_completion", "created": meta.created,
            "model": meta.model,
            "choices": [{
                "index": 0, "text": whole.content, "finish_reason": finish,
                "logprobs": if s.logprobs.is_some() { legacy_logprobs(&whole.logprobs) } else { Value::Null },
            }],
            "usage": usage,
        }),
    };
    let mut body = body;
    if s.return_token_ids {
        body["choices"][0]["token_ids"] = json!(out.ids);
    }
    Ok(Json(body).into_response())
}

fn usage(meta: &Meta, generated: usize) -> Value {
    json!({
        "prompt_tokens": meta.prompt_tokens,
        "completion_tokens": generated,
        "total_tokens": meta.prompt_tokens + generated,
    })
}

/// The completions API's older log-probability shape.
fn legacy_logprobs(entries: &[Value]) -> Value {
    let mut offset = 0usize;
    let (mut tokens, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for e in entries {
        let t = e["token"].as_str().unwrap_or_default();
        tokens.push(json!(t));
        lps.push(e["logprob"].clone());
        let top: serde_json::Map<String, Value> = e["top_logprobs"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| {
                (
                    x["token"].as_str().unwrap_or_default().to_string(),
                    x["logprob"].clone(),
                )
            })
            .collect();
        tops.push(Value::Object(top));
        offsets.push(json!(offset));
        offset += t.len();
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

/// What the next engine event means for an answer.
enum Step {
    /// A prompt chunk ran: `done` of `total` tokens.
    Progress(usize, usize),
    /// A token, as the pieces of answer it completed (check `Output::stopped` after).
    Pieces(Vec<Piece>),
    /// The engine finished the sequence, for this reason.
    End(StopReason),
}

/// Waits for the engine's next event (until `deadline`) and reads it through `out`.
async fn next_step(
    out: &mut Output<'_>,
    events: &mut mpsc::UnboundedReceiver<Event>,
    deadline: Instant,
) -> Result<Step, ApiError> {
    let left = deadline.saturating_duration_since(Instant::now());
    match tokio::time::timeout(left, events.recv()).await {
        Err(_) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "the request ran past the server's --timeout",
        )),
        Ok(None) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the engine dropped the request",
        )),
        Ok(Some(Event::Prefill { done, total })) => Ok(Step::Progress(done, total)),
        Ok(Some(Event::Token { id, logprobs })) => Ok(Step::Pieces(out.token(id, logprobs)?)),
        Ok(Some(Event::Finished { reason, .. })) => Ok(Step::End(reason)),
        Ok(Some(Event::Failed(m))) => Err(ApiError::new(StatusCode::BAD_REQUEST, m)),
    }
}

/// Reads the engine's events until the answer is complete, handing each piece to `emit`
/// (which says whether the client still listens). Returns the engine's stop reason
/// (`None` when a stop string or the client ended it).
async fn run(
    out: &mut Output<'_>,
    mut events: mpsc::UnboundedReceiver<Event>,
    deadline: Instant,
    mut emit: impl FnMut(Piece) -> bool,
) -> Result<Option<StopReason>, ApiError> {
    loop {
        match next_step(out, &mut events, deadline).await? {
            Step::Progress(..) => {}
            Step::Pieces(pieces) => {
                for p in pieces {
                    if !emit(p) {
                        return Ok(None);
                    }
                }
                if out.stopped {
                    return Ok(None);
                }
            }
            Step::End(reason) => return Ok(Some(reason)),
        }
    }
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

#[allow(clippy::too_many_arguments)]
async fn stream(
    tok: &Tokenizer,
    markers: Option<Markers>,
    forced: Vec<u32>,
    mut events: mpsc::UnboundedReceiver<Event>,
    s: Settings,
    meta: Meta,
    kind: Kind,
    deadline: Instant,
    tx: mpsc::Sender<Bytes>,
) {
    let object = match kind {
        Kind::Chat => "chat.completion.chunk",
        Kind::Text => "text_completion",
    };
    let chunk = |choice: Value| {
        sse(&json!({
            "id": meta.id, "object": object, "created": meta.created, "model": meta.model,
            "choices": [choice],
        }))
    };
    let delta = |d: Value, lp: Value| match kind {
        Kind::Chat => chunk(json!({"index": 0, "delta": d, "logprobs": lp, "finish_reason": null})),
        Kind::Text => chunk(json!({
            "index": 0, "text": d.get("content").cloned().unwrap_or(json!("")),
            "logprobs": lp, "finish_reason": null,
        })),
    };
    let piece = |p: Piece| -> Option<Bytes> {
        let lp_of = |entries: Vec<Value>| match (s.logprobs.is_some(), kind) {
            (false, _) => Value::Null,
            (true, Kind::Chat) => json!({ "content": entries }),
            (true, Kind::Text) => legacy_logprobs(&entries),
        };
        match p {
            Piece::Content(t, lp) if !t.is_empty() || !lp.is_empty() => {
                Some(delta(json!({ "content": t }), lp_of(lp)))
            }
            Piece::Content(..) => None,
            Piece::Reasoning(t) => Some(delta(json!({ "reasoning_content": t }), Value::Null)),
            // OpenAI's shape: the first delta names the call (arguments empty), the
            // arguments follow. The call is parsed whole (its object notation becomes
            // JSON only once it closes), so they follow at once, in one piece.
            Piece::Call(i, c) => {
                let mut call = crate::openai::tool_call_json(&c, &format!("call_{}", random_id()));
                call["index"] = json!(i);
                let arguments = std::mem::take(&mut call["function"]["arguments"]);
                call["function"]["arguments"] = json!("");
                let rest = json!({"index": i, "function": {"arguments": arguments}});
                let mut both = delta(json!({ "tool_calls": [call] }), Value::Null).to_vec();
                both.extend_from_slice(&delta(json!({ "tool_calls": [rest] }), Value::Null));
                Some(Bytes::from(both))
            }
        }
    };
    if kind == Kind::Chat
        && tx
            .send(delta(
                json!({"role": "assistant", "content": ""}),
                Value::Null,
            ))
            .await
            .is_err()
    {
        return;
    }
    let mut out = Output::new(tok, markers, &s);
    if let Err(e) = out.prime(&forced) {
        let _ = tx.send(sse(&e.body())).await;
        return;
    }
    let mut reason = None;
    loop {
        match next_step(&mut out, &mut events, deadline).await {
            Err(e) => {
                let _ = tx.send(sse(&e.body())).await;
                return;
            }
            Ok(Step::Progress(done, total)) => {
                // A comment: keeps proxies and clients from timing out a long prefill.
                if tx
                    .send(Bytes::from(format!(": prefill {done}/{total}\n\n")))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Ok(Step::Pieces(pieces)) => {
                for p in pieces {
                    if let Some(b) = piece(p) {
                        if tx.send(b).await.is_err() {
                            return;
                        }
                    }
                }
                if out.stopped {
                    break;
                }
            }
            Ok(Step::End(r)) => {
                reason = Some(r);
                break;
            }
        }
    }
    // Stop listening to the engine first: a stop string cancels the sequence now.
    drop(events);
    for p in out.finish() {
        if let Some(b) = piece(p) {
            if tx.send(b).await.is_err() {
                return;
            }
        }
    }
    let finish = out.finish_reason(reason);
    let last = match kind {
        Kind::Chat => {
            chunk(json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish}))
        }
        Kind::Text => {
            chunk(json!({"index": 0, "text": "", "logprobs": null, "finish_reason": finish}))
        }
    };
    if tx.send(last).await.is_err() {
        return;
    }
    if s.include_usage {
        let u = sse(&json!({
            "id": meta.id, "object": object, "created": meta.created, "model": meta.model,
            "choices": [], "usage": usage(&meta, out.ids.len()),
        }));
        if tx.send(u).await.is_err() {
            return;
        }
    }
    let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
}
