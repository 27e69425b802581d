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

const JS: &str = "text/javascript; charset=utf-8";

/// Path, body and type of each file of the page.
const ASSETS: [(&str, &str, &str); 6] = [
    (
        "/",
        include_str!("web/index.html"),
        "text/html; charset=utf-8",
    ),
    ("/assets/app.js", include_str!("web/app.js"), JS),
    ("/assets/markdown.js", include_str!("web/markdown.js"), JS),
    (
        "/assets/recorder-worklet.js",
        include_str!("web/recorder-worklet.js"),
        JS,
    ),
    (
        "/assets/style.css",
        include_str!("web/style.css"),
        "text/css; charset=utf-8",
    ),
    (
        "/assets/icon.svg",
        include_str!("web/icon.svg"),
        "image/svg+xml",
    ),
];

/// Everything the page may load or connect to is this server; inline scripts and styles
/// are refused, so a model's answer rendered into the page can never run code.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data: blob:; media-src 'self' data: blob:; connect-src 'self'; \
    base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub(super) fn routes() -> Router<Arc<App>> {
    ASSETS.iter().fold(Router::new(), |r, &(path, body, mime)| {
        r.route(path, get(move || async move { asset(body, mime) }))
    })
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
