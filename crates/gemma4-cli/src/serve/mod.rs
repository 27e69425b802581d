//! `gemma4 serve`: an OpenAI-compatible HTTP server over the library's continuous-batching
//! engine ([`gemma4::generate::engine`]).
//!
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//! `GET /health` (503 while the model loads; never needs the key), `GET /auth` (whether
//! a key is needed, and whether the one sent is right), `GET /metrics`
//! (Prometheus text), `POST /tokenize`, `POST /detokenize`, and a chat page at `/`
//! ([`web`], off with `--no-webui`). Requests are parsed in
//! [`request`], run and answered (whole or as server-sent events) in [`respond`]. The
//! socket is bound before the model loads, so `/health` answers from the start; SIGTERM
//! or Ctrl-C stops accepting connections and lets the requests in flight finish.

mod error;
mod metrics;
mod request;
mod respond;
mod stop;
mod web;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Args;
use gemma4::generate::constraint::ConstraintCompiler;
use gemma4::generate::engine::{Engine, EngineOptions};
use gemma4::prompt::output_parser::Markers;
use gemma4::Gemma4;
use serde_json::{json, Value};

use crate::args::{DraftArgs, ModelArgs};
pub(crate) use error::ApiError;
use metrics::Metrics;
pub(crate) use request::message as message_for_template;

#[derive(Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Speculative decoding for every request (a request's `draft_tokens` overrides the
    /// count; 0 turns it off); requests with `response_format` do not draft.
    #[command(flatten)]
    pub(crate) draft: DraftArgs,
    /// Address to listen on (0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) host: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub(crate) port: u16,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health (also read from
    /// GEMMA4_API_KEY).
    #[arg(long, env = "GEMMA4_API_KEY", hide_env_values = true)]
    pub(crate) api_key: Option<String>,
    /// The model id clients use (default: the checkpoint directory's name).
    #[arg(long)]
    pub(crate) served_model_name: Option<String>,
    /// Sequences generated at once (continuous batching).
    #[arg(long, default_value_t = 4)]
    pub(crate) parallel: usize,
    /// Requests that may wait for a free sequence; past it, 429.
    #[arg(long, default_value_t = 64)]
    pub(crate) max_queue: usize,
    /// Prompt tokens run per step while prefilling, so running streams keep going.
    #[arg(long, default_value_t = 256)]
    pub(crate) prefill_chunk: usize,
    /// MB of KV cache kept from finished requests, so a conversation's next turn (or
    /// another request with the same system prompt) skips the prefix it shares (0: off).
    #[arg(long, default_value_t = 1024)]
    pub(crate) cache_mb: usize,
    /// Largest request body in MB (413 above it; base64 media make bodies large).
    #[arg(long, default_value_t = 32)]
    pub(crate) max_body_mb: usize,
    /// Images and audio clips one request may carry.
    #[arg(long, default_value_t = 8)]
    pub(crate) max_media: usize,
    /// Seconds a request may run before it is cut off.
    #[arg(long, default_value_t = 600)]
    pub(crate) timeout: u64,
    /// Seconds a connection may sit without sending a request's headers (an idle
    /// keep-alive connection, or a client that never finishes its headers), and the
    /// longest pause inside a request's body; past it the connection is closed.
    #[arg(long, default_value_t = 60)]
    pub(crate) idle_timeout: u64,
    /// Let `image_url` / `input_audio` name local files (`file://` or a path); by default
    /// only `data:` URIs are read.
    #[arg(long)]
    pub(crate) allow_local_media: bool,
    /// Do not serve the chat page at `/` (the API only).
    #[arg(long)]
    pub(crate) no_webui: bool,
}

/// What the handlers share.
pub(crate) struct App {
    pub(crate) loaded: OnceLock<Loaded>,
    pub(crate) load_error: OnceLock<String>,
    pub(crate) name: String,
    pub(crate) api_key: Option<String>,
    pub(crate) max_media: usize,
    pub(crate) timeout: Duration,
    pub(crate) allow_local_media: bool,
    /// Serve the chat page ([`web`]).
    pub(crate) webui: bool,
    pub(crate) metrics: Metrics,
}

/// The model, once loaded.
pub(crate) struct Loaded {
    pub(crate) model: Arc<Gemma4>,
    /// The drafter of `--draft`, with its default tokens per round.
    pub(crate) draft: Option<gemma4::generate::speculative::DraftOptions>,
    pub(crate) engine: Engine,
    pub(crate) markers: Option<Markers>,
    pub(crate) created: u64,
    /// Made on the first request with a `response_format` (the token trie of a large
    /// vocabulary takes a moment).
    pub(crate) constraints: std::sync::OnceLock<Result<ConstraintCompiler, String>>,
}

impl App {
    pub(crate) fn loaded(&self) -> Result<&Loaded, ApiError> {
        self.loaded
            .get()
            .ok_or_else(|| match self.load_error.get() {
                Some(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.clone()),
                None => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the model is loading"),
            })
    }
}

/// The directory's name, or for a hub cache snapshot (`models--ORG--NAME/snapshots/REV`)
/// its hub id.
fn default_name(dir: &std::path::Path) -> String {
    let parts: Vec<String> = dir
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if let [.., repo, snapshots, _rev] = parts.as_slice() {
        if snapshots == "snapshots" {
            if let Some(id) = repo.strip_prefix("models--") {
                return id.replacen("--", "/", 1);
            }
        }
    }
    parts.last().cloned().unwrap_or_else(|| "gemma4".into())
}

pub(crate) fn cmd_serve(a: ServeArgs, pool: Arc<rayon::ThreadPool>) -> Result<()> {
    let name = a
        .served_model_name
        .clone()
        .unwrap_or_else(|| default_name(&a.model.model));
    let app = Arc::new(App {
        loaded: OnceLock::new(),
        load_error: OnceLock::new(),
        name,
        api_key: a.api_key.clone().filter(|k| !k.is_empty()),
        max_media: a.max_media,
        timeout: Duration::from_secs(a.timeout.max(1)),
        allow_local_media: a.allow_local_media,
        webui: !a.no_webui,
        metrics: Metrics::default(),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(a, app, pool))
}

async fn serve(a: ServeArgs, app: Arc<App>, pool: Arc<rayon::ThreadPool>) -> Result<()> {
    let addr: SocketAddr = format!("{}:{}", a.host, a.port)
        .parse()
        .or_else(|_| {
            use std::net::ToSocketAddrs;
            (a.host.as_str(), a.port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut i| i.next())
                .ok_or(())
        })
        .map_err(|_| anyhow::anyhow!("--host: `{}` is not an address", a.host))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    eprintln!(
        "listening on http://{local} (loading {})",
        a.model.model.display()
    );
    // Load in the background: /health says 503 until the model is ready.
    let loading = app.clone();
    let engine_opts = EngineOptions {
        parallel: a.parallel.max(1),
        max_queue: a.max_queue,
        prefill_chunk: a.prefill_chunk.max(1),
        cache_bytes: a.cache_mb.saturating_mul(1 << 20),
    };
    let model_args = a.model;
    let draft_args = a.draft;
    tokio::task::spawn_blocking(
        move || match load(&model_args, &draft_args, engine_opts, pool) {
            Ok(l) => {
                eprintln!("model ready: {}", loading.name);
                let _ = loading.loaded.set(l);
            }
            Err(e) => {
                let message = format!("{e:#}");
                eprintln!("error: {message}");
                let _ = loading.load_error.set(message);
            }
        },
    );
    let max_body = a.max_body_mb.saturating_mul(1 << 20);
    let idle = Duration::from_secs(a.idle_timeout.max(1));
    let router = router(app.clone(), max_body)
        .layer(axum::middleware::from_fn_with_state(idle, body_within));
    accept(listener, router, idle).await;
    Ok(())
}

/// Serves connections until SIGTERM or Ctrl-C, then waits for the requests in flight.
/// (Our own loop rather than `axum::serve`: hyper closes a connection that sends no
/// request headers for `idle` only when given a timer, which `axum::serve` does not set.)
async fn accept(listener: tokio::net::TcpListener, router: Router, idle: Duration) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;

    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(idle);
    let builder = builder.http1_only();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut stop = std::pin::pin!(shutdown_signal());
    loop {
        let stream = tokio::select! {
            conn = listener.accept() => match conn {
                Ok((stream, _)) => stream,
                // Out of file descriptors and the like: wait, do not spin.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            // hyper's timer starts with the first byte: a connection that never sends
            // one is closed here.
            let mut first = [0u8; 1];
            if !matches!(
                tokio::time::timeout(idle, stream.peek(&mut first)).await,
                Ok(Ok(1))
            ) {
                return;
            }
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            let _ = watcher.watch(conn.into_owned()).await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// The request's body, cut off (400, as a body that cannot be read) when it pauses for
/// longer than `idle`.
async fn body_within(State(idle): State<Duration>, req: Request, next: Next) -> Response {
    use futures_util::StreamExt;
    let (parts, body) = req.into_parts();
    let frames = futures_util::stream::unfold(Some(body.into_data_stream()), move |s| async move {
        let mut s = s?;
        match tokio::time::timeout(idle, s.next()).await {
            Ok(Some(item)) => Some((item, Some(s))),
            Ok(None) => None,
            Err(_) => Some((
                Err(axum::Error::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the request body paused for over {} s (--idle-timeout)",
                        idle.as_secs()
                    ),
                ))),
                None,
            )),
        }
    });
    next.run(Request::from_parts(
        parts,
        axum::body::Body::from_stream(frames),
    ))
    .await
}

fn load(
    args: &ModelArgs,
    draft: &DraftArgs,
    opts: EngineOptions,
    pool: Arc<rayon::ThreadPool>,
) -> Result<Loaded> {
    let dtype = args.dtype()?;
    let model = Arc::new(pool.install(|| -> Result<Gemma4> {
        let load_opts = gemma4::LoadOptions {
            dtype,
            progress: crate::args::load_progress("loading"),
            quant: args.quant,
            limits: args.limits.limits(),
            ..Default::default()
        };
        let mut model = Gemma4::load(&args.model, load_opts)?;
        crate::args::attach_loras(&mut model, &args.lora)?;
        Ok(model)
    })?);
    let draft = pool.install(|| draft.options(&model))?;
    let markers = model
        .tokenizer()
        .ok()
        .and_then(|t| Markers::from_tokenizer(t).ok());
    let engine = Engine::start(model.clone(), |g: &Gemma4| &g.text, opts, Some(pool));
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(Loaded {
        model,
        draft,
        engine,
        markers,
        created,
        constraints: std::sync::OnceLock::new(),
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("shutting down: finishing the requests in flight");
}

pub(crate) fn router(app: Arc<App>, max_body: usize) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(respond::chat_completions))
        .route("/v1/completions", post(respond::completions))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics::metrics))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route_layer(axum::middleware::from_fn_with_state(app.clone(), authorize));
    let mut open = Router::new()
        .route("/health", get(health))
        .route("/auth", get(auth));
    if app.webui {
        // The page and its assets need no key: the page asks for it and sends it on
        // every API call.
        open = open.merge(web::routes());
    }
    open.merge(api)
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "no such endpoint").code("not_found")
        })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            count_status,
        ))
        .with_state(app)
}

/// Whether the request carries the Bearer key (compared in constant time), or none is
/// needed.
fn key_ok(app: &App, headers: &axum::http::HeaderMap) -> bool {
    let Some(key) = &app.api_key else {
        return true;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    given.len() == key.len()
        && given
            .bytes()
            .zip(key.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn authorize(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if !key_ok(&app, req.headers()) {
        return ApiError::new(StatusCode::UNAUTHORIZED, "a missing or wrong API key")
            .code("invalid_api_key")
            .into_response();
    }
    next.run(req).await
}

/// `GET /auth`: whether a key is needed and whether the one sent is right, always 200 (the
/// chat page asks for the key before its first call instead of meeting a 401).
async fn auth(State(app): State<Arc<App>>, headers: axum::http::HeaderMap) -> Json<Value> {
    Json(json!({
        "key_required": app.api_key.is_some(),
        "key_valid": key_ok(&app, &headers),
    }))
}

async fn count_status(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let r = next.run(req).await;
    app.metrics.count_status(r.status().as_u16());
    r
}

async fn health(State(app): State<Arc<App>>) -> Response {
    match app.loaded() {
        Ok(_) => Json(json!({"status": "ok"})).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn models(State(app): State<Arc<App>>) -> Result<Json<Value>, ApiError> {
    let l = app.loaded()?;
    let max_len = l.model.config.text.max_position_embeddings;
    let mut data = vec![json!({
        "id": app.name,
        "object": "model",
        "created": l.created,
        "owned_by": "gemma4",
        "max_model_len": max_len,
        // What the chat page offers: attachments only where the encoders are loaded.
        "capabilities": {
            "vision": l.model.vision.is_some(),
            "audio": l.model.audio.is_some(),
        },
    })];
    // Each `--lora` adapter is a model of its own, as vLLM lists LoRA modules.
    for a in l.model.adapters() {
        data.push(json!({
            "id": a.name,
            "object": "model",
            "created": l.created,
            "owned_by": "gemma4",
            "root": a.dir.display().to_string(),
            "parent": app.name,
            "max_model_len": max_len,
        }));
    }
    Ok(Json(json!({"object": "list", "data": data})))
}

/// A JSON body, or the OpenAI error for a body that is too large or not JSON.
pub(crate) fn json_body(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let bytes = body.map_err(|e| {
        let status = e.status();
        ApiError::new(
            status,
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                "the request body is larger than the server's limit (--max-body-mb)".to_string()
            } else {
                e.body_text()
            },
        )
    })?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the body is not JSON: {e}"),
        )
    })?;
    if !v.is_object() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object",
        ));
    }
    Ok(v)
}

/// `{"content": text, "add_special": bool}` or a chat (`messages`, `tools`,
/// `chat_template_kwargs`, `add_generation_prompt`) rendered with the checkpoint's
/// template; answers the ids. A chat's images and audio clips are expanded to their soft
/// tokens, whose numbers are answered per item (`image_tokens`, `audio_tokens`).
async fn tokenize(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let v = json_body(body)?;
    let l = app.loaded()?;
    let model = l.model.clone();
    let (max_media, allow_local) = (app.max_media, app.allow_local_media);
    #[allow(clippy::type_complexity)]
    let ids = tokio::task::spawn_blocking(
        move || -> Result<(Vec<u32>, Vec<usize>, Vec<usize>), ApiError> {
            let tok = model.tokenizer()?;
            if v.get("messages").is_some() {
                let chat = request::render_chat(&model, &v, max_media, allow_local)?;
                if chat.media.images.is_empty() && chat.media.audio.is_empty() {
                    return Ok((tok.encode_raw(&chat.text)?, Vec::new(), Vec::new()));
                }
                // What the model sees: each marker expanded to its media's soft tokens, as
                // the processor does (the chat page shows each attachment's cost from it).
                let processed = model.process_media(&chat.media)?;
                let text = model.expand_markers(&chat.text, &processed)?;
                return Ok((
                    tok.encode_raw(&text)?,
                    processed.images.iter().map(|i| i.num_soft_tokens).collect(),
                    processed.audio.iter().map(|a| a.num_soft_tokens).collect(),
                ));
            }
            let text = v
                .get("content")
                .or_else(|| v.get("prompt"))
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::bad("content", "a string is required"))?;
            let special = v
                .get("add_special")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let ids = if special {
                tok.encode(text)?
            } else {
                tok.encode_raw(text)?
            };
            Ok((ids, Vec::new(), Vec::new()))
        },
    )
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    let (ids, image_tokens, audio_tokens) = ids;
    Ok(Json(json!({
        "tokens": ids,
        "count": ids.len(),
        "image_tokens": image_tokens,
        "audio_tokens": audio_tokens,
        "max_model_len": l.model.config.text.max_position_embeddings,
    })))
}

async fn detokenize(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let v = json_body(body)?;
    let l = app.loaded()?;
    let ids = request::token_ids(v.get("tokens"), "tokens")?;
    let vocab = l.model.config.text.vocab_size;
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        return Err(ApiError::bad(
            "tokens",
            format!("{bad} is outside the vocabulary of {vocab}"),
        ));
    }
    let text = l.model.tokenizer()?.decode(&ids, false)?;
    Ok(Json(json!({ "content": text })))
}
