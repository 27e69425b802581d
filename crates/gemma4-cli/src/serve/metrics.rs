//! `GET /metrics`: Prometheus text. Requests by status are counted here; tokens,
//! sequences, speeds and cache bytes come from the engine's counters.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::{ApiError, App};

#[derive(Default)]
pub(crate) struct Metrics {
    by_status: Mutex<BTreeMap<u16, u64>>,
}

impl Metrics {
    pub(crate) fn count_status(&self, status: u16) {
        if let Ok(mut m) = self.by_status.lock() {
            *m.entry(status).or_default() += 1;
        }
    }
}

pub(crate) async fn metrics(State(app): State<Arc<App>>) -> Result<impl IntoResponse, ApiError> {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP gemma4_{name} {help}");
        let _ = writeln!(out, "# TYPE gemma4_{name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "gemma4_{name}{labels} {v}");
        }
    };
    let statuses: Vec<(String, f64)> = app
        .metrics
        .by_status
        .lock()
        .map(|m| {
            m.iter()
                .map(|(s, n)| (format!("{{status=\"{s}\"}}"), *n as f64))
                .collect()
        })
        .unwrap_or_default();
    metric(
        "requests_total",
        "counter",
        "HTTP requests answered, by status.",
        &statuses,
    );
    if let Ok(l) = app.loaded() {
        let s = l.engine.stats();
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
        let one = |v: f64| vec![(String::new(), v)];
        metric(
            "prompt_tokens_total",
            "counter",
            "Prompt tokens run.",
            &one(get(&s.prompt_tokens)),
        );
        metric(
            "generated_tokens_total",
            "counter",
            "Tokens generated.",
            &one(get(&s.generated_tokens)),
        );
        metric(
            "running_sequences",
            "gauge",
            "Sequences generating now.",
            &one(s.running.load(Ordering::SeqCst) as f64),
        );
        metric(
            "queued_requests",
            "gauge",
            "Requests waiting for a free sequence.",
            &one(s.queued.load(Ordering::SeqCst) as f64),
        );
        let rate = |tokens: f64, micros: f64| {
            if micros > 0.0 {
                tokens / (micros / 1e6)
            } else {
                0.0
            }
        };
        metric(
            "prefill_tokens_per_second",
            "gauge",
            "Prompt tokens per second over the steps that ran prompt tokens, since start.",
            &one(rate(get(&s.prefill_step_tokens), get(&s.prefill_micros))),
        );
        metric(
            "decode_tokens_per_second",
            "gauge",
            "Tokens per second (all sequences together) over decode-only steps, since start.",
            &one(rate(get(&s.decode_step_tokens), get(&s.decode_micros))),
        );
        metric(
            "prefix_cache_hits_total",
            "counter",
            "Requests that started from a kept sequence's cache.",
            &one(get(&s.prefix_cache_hits)),
        );
        metric(
            "prefix_cache_tokens_total",
            "counter",
            "Prompt tokens the prefix cache spared.",
            &one(get(&s.prefix_cache_tokens)),
        );
        metric(
            "prefix_cache_bytes",
            "gauge",
            "Bytes of KV cache kept for later prompts (--cache-mb).",
            &one(get(&s.prefix_cache_bytes)),
        );
        let (rounds, drafted, accepted) = (
            get(&s.draft_rounds),
            get(&s.drafted_tokens),
            get(&s.accepted_tokens),
        );
        metric(
            "draft_rounds_total",
            "counter",
            "Speculative decoding: verification passes that checked drafted tokens.",
            &one(rounds),
        );
        metric(
            "draft_tokens_total",
            "counter",
            "Speculative decoding: tokens the drafter proposed.",
            &one(drafted),
        );
        metric(
            "draft_accepted_tokens_total",
            "counter",
            "Speculative decoding: proposed tokens the model kept.",
            &one(accepted),
        );
        metric(
            "draft_acceptance_rate",
            "gauge",
            "Kept over proposed tokens, since start.",
            &one(if drafted > 0.0 {
                accepted / drafted
            } else {
                0.0
            }),
        );
        metric(
            "draft_mean_accepted_length",
            "gauge",
            "Drafted tokens kept per verification pass, since start.",
            &one(if rounds > 0.0 { accepted / rounds } else { 0.0 }),
        );
        metric(
            "kv_cache_bytes",
            "gauge",
            "Bytes the running sequences' KV caches hold.",
            &one(get(&s.kv_cache_bytes)),
        );
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out))
}
