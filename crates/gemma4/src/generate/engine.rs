//! Continuous batching: one thread owns the decoder and runs [`step`] over every sequence
//! in flight, while requests join and leave between steps.
//!
//! A request is a prepared prompt ([`crate::Gemma4::prepare`]) with its generation
//! options; it gets a channel of [`Event`]s: a progress event per prompt chunk, then a
//! token event per token (one per step, or several with speculative decoding: a
//! sequence whose options carry a drafter brings its drafts to the shared step and keeps
//! what the model verifies), then how it finished. Up to `parallel` sequences run at once; further
//! requests wait in a queue of `max_queue`, and past that [`Engine::submit`] refuses them
//! ([`SubmitError::QueueFull`]). Dropping the receiver cancels the request: the engine
//! sees it at the next event it sends, within one step. Long prompts run in chunks of
//! `prefill_chunk` tokens, so sequences already decoding keep producing tokens.
//! Sequences with different LoRA adapters ([`GenerateOptions::adapters`]) never share a
//! step: the adapter sets in flight take turns, one step each.
//!
//! Prefix cache: finished sequences are kept, up to `cache_bytes` of KV cache, least
//! recently used dropped first. A new request starts from the kept sequence that shares
//! the longest prefix with its prompt ([`Sequence::shared_prefix`]: ids, per-layer ids
//! and media embeddings all equal): the next turn of a conversation takes it over
//! ([`Sequence::continue_from`]); a request that departs from it earlier, such as
//! another conversation with the same system prompt, gets a copy
//! ([`Sequence::branch_from`]). Only a kept sequence with the request's adapters counts.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;

use crate::generate::sequence::{step, Sequence};
use crate::generate::speculative::DraftStats;
use crate::generate::{GenerateOptions, StopReason};
use crate::lora::AdapterSet;
use crate::text::model::{PromptInput, TextModel};

/// How the engine schedules.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// Sequences run at once.
    pub parallel: usize,
    /// Requests that may wait for a free slot.
    pub max_queue: usize,
    /// Prompt tokens a sequence runs per step while prefilling.
    pub prefill_chunk: usize,
    /// Bytes of KV cache kept from finished sequences for later prompts that share their
    /// prefix (0: none).
    pub cache_bytes: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            parallel: 4,
            max_queue: 64,
            prefill_chunk: 512,
            cache_bytes: 1 << 30,
        }
    }
}

/// A request for the engine.
pub struct Job {
    pub prompt: PromptInput,
    pub options: GenerateOptions,
    /// Also report the chosen token's log-probability and this many alternatives (0: the
    /// chosen one only); `None`: no log-probabilities.
    pub top_logprobs: Option<usize>,
}

/// A token's log-probability under the model (log-softmax of its logits, before any
/// sampling adjustment) and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Logprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// What happens to a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Prompt tokens run so far, of `total`.
    Prefill {
        done: usize,
        total: usize,
    },
    Token {
        id: u32,
        logprobs: Option<Logprobs>,
    },
    Finished {
        reason: StopReason,
        prompt_tokens: usize,
        generated_tokens: usize,
    },
    Failed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// `max_queue` requests are waiting already.
    QueueFull,
    /// The engine thread has stopped.
    Stopped,
}

/// Counters for monitoring, updated by the engine thread.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub running: AtomicUsize,
    pub queued: AtomicUsize,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Time spent in steps that ran prompt tokens, and in steps that only decoded, in µs.
    pub prefill_micros: AtomicU64,
    pub decode_micros: AtomicU64,
    /// Prompt tokens run in prefill steps and tokens made in decode-only steps.
    pub prefill_step_tokens: AtomicU64,
    pub decode_step_tokens: AtomicU64,
    /// Bytes the KV caches of running sequences hold.
    pub kv_cache_bytes: AtomicU64,
    /// Requests that started from a kept sequence, the prompt tokens that spared, and the
    /// bytes the kept sequences hold.
    pub prefix_cache_hits: AtomicU64,
    pub prefix_cache_tokens: AtomicU64,
    pub prefix_cache_bytes: AtomicU64,
    /// Speculative decoding: verification rounds, tokens drafted and drafts kept.
    pub draft_rounds: AtomicU64,
    pub drafted_tokens: AtomicU64,
    pub accepted_tokens: AtomicU64,
}

/// A handle to the engine thread; cloning shares it. The thread ends when every handle
/// is dropped and the sequences in flight are done.
#[derive(Clone)]
pub struct Engine {
    tx: SyncSender<(Job, Sender<Event>)>,
    stats: Arc<EngineStats>,
}

struct Running {
    seq: Sequence,
    events: Sender<Event>,
    top_logprobs: Option<usize>,
    total: usize,
    /// The sequence's speculative statistics already added to [`EngineStats`].
    counted: DraftStats,
}

impl Engine {
    /// Starts the engine thread for `model` (any owner of a [`TextModel`], such as an
    /// `Arc<Gemma4>` through `text`). `pool`, when given, is the rayon pool the engine
    /// runs on as one of its workers (the kernels' work is then shared out without waking
    /// the thread each time).
    pub fn start<M>(
        model: Arc<M>,
        text: fn(&M) -> &TextModel,
        opts: EngineOptions,
        pool: Option<Arc<rayon::ThreadPool>>,
    ) -> Engine
    where
        M: Send + Sync + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(opts.max_queue);
        let stats = Arc::new(EngineStats::default());
        let s = stats.clone();
        std::thread::Builder::new()
            .name("gemma4-engine".into())
            .spawn(move || {
                let work = || run(text(&model), rx, opts, &s);
                match pool {
                    Some(p) => p.install(work),
                    None => work(),
                }
            })
            .expect("spawning the engine thread");
        Engine { tx, stats }
    }

    /// Queues `job`; its events arrive on the returned channel.
    pub fn submit(&self, job: Job) -> Result<Receiver<Event>, SubmitError> {
        let (etx, erx) = mpsc::channel();
        self.stats.queued.fetch_add(1, Ordering::SeqCst);
        match self.tx.try_send((job, etx)) {
            Ok(()) => Ok(erx),
            Err(e) => {
                self.stats.queued.fetch_sub(1, Ordering::SeqCst);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::QueueFull,
                    TrySendError::Disconnected(_) => SubmitError::Stopped,
                })
            }
        }
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }
}

/// The shortest shared prefix worth branching from a kept sequence for. Branching deep-copies
/// the kept cache, which costs about what prefilling a few dozen tokens does (E2B q8_0 on
/// 2 cores: a fresh 128-token prompt's first token came 0.15 s later when it branched
/// from a kept sequence for its one shared `<bos>`, while a prompt token costs ~6.5 ms).
const MIN_REUSE: usize = 32;

/// Finished sequences kept for their caches, least recently used first.
struct Kept {
    seqs: Vec<Sequence>,
    max_bytes: usize,
}

impl Kept {
    fn bytes(&self) -> usize {
        self.seqs.iter().map(|s| s.cache().bytes()).sum()
    }

    fn keep(&mut self, seq: Sequence, stats: &EngineStats) {
        if self.max_bytes > 0 && seq.cache().bytes() <= self.max_bytes {
            self.seqs.push(seq);
            while self.bytes() > self.max_bytes {
                self.seqs.remove(0);
            }
        }
        stats
            .prefix_cache_bytes
            .store(self.bytes() as u64, Ordering::Relaxed);
    }

    /// A sequence for `job`, from the kept one sharing the longest prefix when any does.
    fn start(
        &mut self,
        model: &TextModel,
        job: &Job,
        stats: &EngineStats,
    ) -> crate::Result<Sequence> {
        let best = self
            .seqs
            .iter()
            .enumerate()
            // A cache computed with other adapters holds other keys and values.
            .filter(|(_, s)| s.adapters() == job.options.adapters)
            .map(|(i, s)| (i, s.shared_prefix(model, &job.prompt).unwrap_or(0)))
            .max_by_key(|&(i, n)| (n, i));
        let held = |i: usize| self.seqs[i].cache().seq_len();
        let seq = match best {
            // Within the rollback the ring allows: the conversation goes on (no copy).
            Some((i, n)) if n > 0 && n + 32 >= held(i) => {
                let prev = self.seqs.remove(i);
                Sequence::continue_from(model, job.prompt.clone(), &job.options, prev)?
            }
            // An earlier departure (a shared system prompt) copies the kept cache.
            Some((i, n)) if n >= MIN_REUSE => {
                let prev = self.seqs.remove(i);
                let seq = Sequence::branch_from(model, job.prompt.clone(), &job.options, &prev);
                self.seqs.push(prev);
                seq?
            }
            _ => Sequence::new(model, job.prompt.clone(), &job.options)?,
        };
        if seq.fed() > 0 {
            stats.prefix_cache_hits.fetch_add(1, Ordering::Relaxed);
            stats
                .prefix_cache_tokens
                .fetch_add(seq.fed() as u64, Ordering::Relaxed);
        }
        stats
            .prefix_cache_bytes
            .store(self.bytes() as u64, Ordering::Relaxed);
        Ok(seq)
    }
}

fn admit(
    model: &TextModel,
    job: Job,
    events: Sender<Event>,
    running: &mut Vec<Running>,
    kept: &mut Kept,
    stats: &EngineStats,
) {
    let total = job.prompt.ids.len();
    match kept.start(model, &job, stats) {
        Ok(seq) => running.push(Running {
            seq,
            events,
            top_logprobs: job.top_logprobs,
            total,
            counted: DraftStats::default(),
        }),
        Err(e) => {
            let _ = events.send(Event::Failed(e.to_string()));
        }
    }
}

fn run(
    model: &TextModel,
    rx: Receiver<(Job, Sender<Event>)>,
    opts: EngineOptions,
    stats: &EngineStats,
) {
    let mut running: Vec<Running> = Vec::new();
    let mut kept = Kept {
        seqs: Vec::new(),
        max_bytes: opts.cache_bytes,
    };
    let mut open = true;
    let mut last_set = None;
    loop {
        while open && running.len() < opts.parallel.max(1) {
            match rx.try_recv() {
                Ok((job, events)) => {
                    stats.queued.fetch_sub(1, Ordering::SeqCst);
                    admit(model, job, events, &mut running, &mut kept, stats);
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => open = false,
            }
        }
        if running.is_empty() {
            if !open {
                return;
            }
            match rx.recv() {
                Ok((job, events)) => {
                    stats.queued.fetch_sub(1, Ordering::SeqCst);
                    admit(model, job, events, &mut running, &mut kept, stats);
                }
                Err(_) => return,
            }
            continue;
        }
        stats.running.store(running.len(), Ordering::SeqCst);
        let prefilling = running.iter().any(|r| !r.seq.is_prefilled());
        let fed_before: usize = running.iter().map(|r| r.seq.fed()).sum();
        let t = Instant::now();
        // Sequences with different adapters never share a step: each step runs one
        // adapter set's sequences, the sets taking turns.
        let set = next_set(&running, &mut last_set);
        let outs = {
            let mut seqs: Vec<&mut Sequence> = running
                .iter_mut()
                .filter(|r| r.seq.adapters() == set)
                .map(|r| &mut r.seq)
                .collect();
            step(model, &mut seqs, opts.prefill_chunk)
        };
        let micros = t.elapsed().as_micros() as u64;
        let outs = match outs {
            Ok(o) => o,
            Err(e) => {
                running.retain(|r| {
                    let in_step = r.seq.adapters() == set;
                    if in_step {
                        let _ = r.events.send(Event::Failed(e.to_string()));
                    }
                    !in_step
                });
                continue;
            }
        };
        let mut outs = outs.into_iter();
        let fed_after: usize = running.iter().map(|r| r.seq.fed()).sum();
        let mut made = 0u64;
        // Keep the sequences whose client still listens and that have not finished.
        let mut keep = Vec::with_capacity(running.len());
        for mut r in running.drain(..) {
            let out = match r.seq.adapters() == set {
                true => outs.next().flatten(),
                false => None,
            };
            let mut alive = true;
            if let Some(why) = r.seq.failure() {
                let _ = r.events.send(Event::Failed(why.to_string()));
                continue;
            }
            if let Some(out) = out {
                if out.tokens.is_empty() {
                    let event = Event::Prefill {
                        done: r.seq.fed(),
                        total: r.total,
                    };
                    alive = r.events.send(event).is_ok();
                }
                for (i, &id) in out.tokens.iter().enumerate() {
                    made += 1;
                    let logprobs = r
                        .top_logprobs
                        .zip(out.logits.get(i))
                        .map(|(k, row)| logprobs_of(row, id, k));
                    alive = alive && r.events.send(Event::Token { id, logprobs }).is_ok();
                }
                if let Some(now) = r.seq.draft_stats() {
                    let before = std::mem::replace(&mut r.counted, now);
                    stats
                        .draft_rounds
                        .fetch_add((now.rounds - before.rounds) as u64, Ordering::Relaxed);
                    stats
                        .drafted_tokens
                        .fetch_add((now.drafted - before.drafted) as u64, Ordering::Relaxed);
                    stats
                        .accepted_tokens
                        .fetch_add((now.accepted - before.accepted) as u64, Ordering::Relaxed);
                }
            }
            match (alive, r.seq.stop_reason()) {
                (true, None) => keep.push(r),
                (true, Some(reason)) => {
                    let _ = r.events.send(Event::Finished {
                        reason,
                        prompt_tokens: r.seq.prompt_ids().len(),
                        generated_tokens: r.seq.generated().len(),
                    });
                    kept.keep(r.seq, stats);
                }
                // Cancelled: what it ran may still serve the client's retry.
                (false, _) => kept.keep(r.seq, stats),
            }
        }
        running = keep;
        stats.prompt_tokens.fetch_add(
            (fed_after.saturating_sub(fed_before)) as u64,
            Ordering::Relaxed,
        );
        stats.generated_tokens.fetch_add(made, Ordering::Relaxed);
        if prefilling {
            stats.prefill_micros.fetch_add(micros, Ordering::Relaxed);
            stats.prefill_step_tokens.fetch_add(
                fed_after.saturating_sub(fed_before) as u64,
                Ordering::Relaxed,
            );
        } else {
            stats.decode_micros.fetch_add(micros, Ordering::Relaxed);
            stats.decode_step_tokens.fetch_add(made, Ordering::Relaxed);
        }
        stats.running.store(running.len(), Ordering::SeqCst);
        stats.kv_cache_bytes.store(
            running.iter().map(|r| r.seq.cache().bytes() as u64).sum(),
            Ordering::Relaxed,
        );
    }
}

/// The adapter set whose sequences run this step: the next one after `last` among the
/// running sequences' sets, in order, wrapping around.
fn next_set(running: &[Running], last: &mut Option<AdapterSet>) -> AdapterSet {
    let sets: std::collections::BTreeSet<AdapterSet> =
        running.iter().map(|r| r.seq.adapters()).collect();
    let set = match *last {
        Some(l) => sets.range(l..).find(|&&s| s != l).or_else(|| sets.first()),
        None => sets.first(),
    }
    .copied()
    .unwrap_or_default();
    *last = Some(set);
    set
}

/// Log-softmax of `row` at `id`, and the `k` largest.
pub fn logprobs_of(row: &[f32], id: u32, k: usize) -> Logprobs {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let log_z = max as f64 + sum.ln();
    let lp = |x: f32| (x as f64 - log_z) as f32;
    let mut top: Vec<(u32, f32)> = Vec::new();
    if k > 0 {
        let mut idx: Vec<u32> = (0..row.len() as u32).collect();
        let k = k.min(idx.len());
        idx.select_nth_unstable_by(k - 1, |&a, &b| row[b as usize].total_cmp(&row[a as usize]));
        idx.truncate(k);
        idx.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
        top = idx.into_iter().map(|i| (i, lp(row[i as usize]))).collect();
    }
    Logprobs {
        logprob: lp(row[id as usize]),
        top,
    }
}
