//! The chat page `gemma4 serve` answers at `/`: one HTML page, its script and style sheet,
//! all compiled into the binary (no CDN, no install step: it works offline).
//!
//! The page is a client of the server's own OpenAI API (`/v1/chat/completions` streamed,
//! `/v1/models`, `/tokenize` for an attachment's token cost, `/metrics` for the queue). It
//! keeps its conversations in the browser's local storage; the server keeps nothing for
//! it. The assets need no API key; with `--api-key` the page asks for the key and sends it
//! on every API call.

use std::sync::Arc;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::App;

const INDEX: &str = include_str!("web/index.html");
const APP_JS: &str = include_str!("web/app.js");
const MARKDOWN_JS: &str = include_str!("web/markdown.js");
const RECORDER_JS: &str = include_str!("web/recorder-worklet.js");
const STYLE: &str = include_str!("web/style.css");
const ICON: &str = include_str!("web/icon.svg");

/// Everything the page may load or connect to is this server; inline scripts and styles
/// are refused, so a model's answer rendered into the page can never run code.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data: blob:; media-src 'self' data: blob:; connect-src 'self'; \
    base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub(super) fn routes() -> Router<Arc<App>> {
    Router::new()
        .route(
            "/",
            get(|| async { asset(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/assets/app.js",
            get(|| async { asset(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/assets/markdown.js",
            get(|| async { asset(MARKDOWN_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/assets/recorder-worklet.js",
            get(|| async { asset(RECORDER_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/assets/style.css",
            get(|| async { asset(STYLE, "text/css; charset=utf-8") }),
        )
        .route(
            "/assets/icon.svg",
            get(|| async { asset(ICON, "image/svg+xml") }),
        )
}

fn asset(body: &'static str, mime: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, mime),
            // The binary may be replaced by a newer one behind the same address.
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}
