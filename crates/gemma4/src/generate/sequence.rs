//! Many sequences through one model: a [`Sequence`] is one generation (its prompt, its
//! own KV cache, sampler and stop state) and [`step`] advances any set of them by one
//! forward pass ([`TextModel::forward_batch`]): sequences still in their prompt run the
//! next chunk of it, the others decode one token, and every weight is read once for all
//! of them. Sequences join and leave between steps; each gets exactly the tokens it
//! would get alone (its logits within f32 rounding: a batched product may sum in
//! another order than a one-row one).
//!
//! [`crate::generate::generate_from`] is this loop with one sequence; a server keeps a
//! set of sequences and calls [`step`] while any is unfinished.

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::generate::constraint::Constraint;
use crate::generate::sampling::Sampler;
use crate::generate::speculative::{verify, DraftRecord, DraftStats, Speculation};
use crate::generate::{GenerateOptions, StopReason};
use crate::lora::AdapterSet;
use crate::text::kv_cache::KvCache;
use crate::text::model::{LogitsFor, PromptInput, StepInput, TextModel};

/// Generated tokens the cache is allocated for up front; a longer generation grows it
/// (doubling), so a huge `max_new_tokens` does not reserve the whole context.
const RESERVED_NEW_TOKENS: usize = 1024;

/// Sliding-window positions a cache keeps beyond its window, so the next turn of a
/// conversation can roll back the end of this one (the template writes an answer's last
/// tokens differently from how the model generated them; see
/// [`Sequence::continue_from`]).
const ROLLBACK_SPARE: usize = 32;

/// One generation in progress.
pub struct Sequence {
    prompt: PromptInput,
    cache: KvCache,
    sampler: Sampler,
    max_new_tokens: usize,
    stop_ids: Vec<u32>,
    constraint: Option<Constraint>,
    /// The adapters its steps run with.
    adapters: AdapterSet,
    /// Why the sequence failed ([`StopReason::Failed`]).
    failure: Option<String>,
    /// Prompt tokens already run.
    fed: usize,
    /// Prompt and generated ids (the repetition penalty reads them).
    history: Vec<u32>,
    generated: Vec<u32>,
    stop: Option<StopReason>,
    /// Speculative decoding, when the options carry a drafter and no constraint.
    spec: Option<Speculation>,
    /// The ids of a decode step under way (the last token and its drafts).
    step_ids: Vec<u32>,
}

/// What one [`step`] did for one sequence.
#[derive(Debug, Clone, Default)]
pub struct StepOutput {
    /// The tokens kept this step, in order: none while the prompt is still being run, one
    /// when decoding, up to the drafted tokens plus one with speculative decoding.
    pub tokens: Vec<u32>,
    /// The logits each was chosen from (f32, the vocabulary wide).
    pub logits: Vec<Vec<f32>>,
}

impl Sequence {
    /// A sequence for `prompt` (text or multimodal, see [`crate::Gemma4::prepare`]). Its
    /// cache is reserved for the prompt plus `max_new_tokens` (up to
    /// `RESERVED_NEW_TOKENS` (1024) of them), within the model's context.
    pub fn new(model: &TextModel, prompt: PromptInput, opts: &GenerateOptions) -> Result<Self> {
        let max = model.config().max_position_embeddings;
        if prompt.ids.is_empty() {
            return Err(Error::invalid_argument("prompt", "is empty"));
        }
        if prompt.ids.len() > max {
            return Err(Error::ContextTooLong {
                prompt: prompt.ids.len(),
                new: opts.max_new_tokens,
                max,
            });
        }
        if prompt.ple_ids.len() != prompt.ids.len()
            || prompt
                .spans
                .as_ref()
                .is_some_and(|s| s.len() != prompt.ids.len())
            || prompt
                .embeds
                .as_ref()
                .is_some_and(|e| e.dim(0).ok() != Some(prompt.ids.len()))
        {
            return Err(Error::invalid_argument(
                "prompt",
                "its ids, per-layer ids, spans and embeddings differ in length",
            ));
        }
        // A grammar constraint decides token by token: such a sequence does not draft.
        let spec = match (&opts.draft, &opts.constraint) {
            (Some(d), None) => Some(Speculation::new(d.clone())),
            _ => None,
        };
        let spare = ROLLBACK_SPARE.max(spec.as_ref().map_or(0, Speculation::spare));
        let mut cache = model.new_cache().with_spare(spare);
        let new = opts.max_new_tokens.min(RESERVED_NEW_TOKENS);
        cache.reserve(max.min(prompt.ids.len() + new))?;
        Ok(Sequence {
            history: prompt.ids.clone(),
            sampler: Sampler::new(opts.sampling.clone())?,
            cache,
            max_new_tokens: opts.max_new_tokens,
            stop_ids: opts.stop_ids.clone(),
            constraint: opts.constraint.clone(),
            adapters: opts.adapters,
            failure: None,
            fed: 0,
            generated: Vec::new(),
            stop: (opts.max_new_tokens == 0).then_some(StopReason::MaxTokens),
            prompt,
            spec,
            step_ids: Vec::new(),
        })
    }

    /// A sequence for `prompt` that reuses `previous`'s KV cache for the longest prefix the
    /// two share (the next turn of a conversation: the turns before it are not run again).
    /// Shared means the same ids, per-layer ids and, where either prompt carries image or
    /// audio embeddings, the same embedding rows, so a new image behind the same
    /// placeholder ids is never mistaken for the old one. At least the last prompt token
    /// is run (its logits choose the first new token). When a sliding-window layer's ring
    /// no longer holds what the prefix needs, the prompt is run from the start.
    pub fn continue_from(
        model: &TextModel,
        prompt: PromptInput,
        opts: &GenerateOptions,
        previous: Sequence,
    ) -> Result<Self> {
        let reuse = match previous.adapters == opts.adapters {
            true => previous.shared_prefix(model, &prompt)?,
            false => 0,
        };
        Self::resume(model, prompt, opts, previous.cache, reuse)
    }

    /// [`Self::continue_from`] leaving `previous` as it is: its cache is copied (for a
    /// prefix many requests share, such as a system prompt).
    pub fn branch_from(
        model: &TextModel,
        prompt: PromptInput,
        opts: &GenerateOptions,
        previous: &Sequence,
    ) -> Result<Self> {
        let reuse = match previous.adapters == opts.adapters {
            true => previous.shared_prefix(model, &prompt)?,
            false => 0,
        };
        if reuse == 0 {
            return Sequence::new(model, prompt, opts);
        }
        Self::resume(model, prompt, opts, previous.cache.fork()?, reuse)
    }

    /// A sequence for `prompt` whose first `reuse` positions `cache` holds (it may hold
    /// more, which are dropped).
    fn resume(
        model: &TextModel,
        prompt: PromptInput,
        opts: &GenerateOptions,
        mut cache: KvCache,
        reuse: usize,
    ) -> Result<Self> {
        let mut seq = Sequence::new(model, prompt, opts)?;
        if reuse > 0 && cache.truncate(reuse).is_ok() {
            let total = seq.prompt.ids.len() + opts.max_new_tokens.min(RESERVED_NEW_TOKENS);
            cache.reserve(model.config().max_position_embeddings.min(total))?;
            let spare = seq.cache.spare().max(cache.spare());
            seq.cache = cache.with_spare(spare);
            seq.fed = reuse;
        }
        Ok(seq)
    }

    /// Positions of `prompt` this sequence's cache holds already (what
    /// [`Self::continue_from`] reuses, when the sliding rings can roll back to it).
    pub fn shared_prefix(&self, model: &TextModel, prompt: &PromptInput) -> Result<usize> {
        // The cache holds the prompt and every generated token but the last one.
        let cached: Vec<u32> = self
            .prompt
            .ids
            .iter()
            .chain(&self.generated)
            .copied()
            .take(self.cache.seq_len())
            .collect();
        let ple_old = |i: usize| {
            self.prompt
                .ple_ids
                .get(i)
                .copied()
                .unwrap_or_else(|| cached[i])
        };
        let limit = cached.len().min(prompt.ids.len().saturating_sub(1));
        let mut n = (0..limit)
            .find(|&i| cached[i] != prompt.ids[i] || ple_old(i) != prompt.ple_ids[i])
            .unwrap_or(limit);
        if n > 0 && (self.prompt.embeds.is_some() || prompt.embeds.is_some()) {
            let rows = |p: &PromptInput, ids: &[u32], len: usize| -> Result<candle_core::Tensor> {
                match &p.embeds {
                    Some(e) => Ok(e.narrow(0, 0, len)?),
                    None => model.embed(&ids[..len]),
                }
            };
            let old_prompt = self.prompt.ids.len().min(n);
            let mut old = rows(&self.prompt, &cached, old_prompt)?;
            if old_prompt < n {
                // Generated positions are plain token embeddings.
                let tail = model.embed(&cached[old_prompt..n])?.to_dtype(old.dtype())?;
                old = candle_core::Tensor::cat(&[old, tail], 0)?;
            }
            let new = rows(prompt, &prompt.ids, n)?;
            let diff: Vec<f32> = (old.to_dtype(candle_core::DType::F32)?
                - new.to_dtype(candle_core::DType::F32)?)?
            .abs()?
            .max(1)?
            .to_vec1()?;
            n = diff.iter().position(|&d| d != 0.0).unwrap_or(n);
        }
        Ok(n)
    }

    /// The adapters this sequence runs with ([`GenerateOptions::adapters`]): sequences
    /// share a [`step`] only when these are equal, and a cache is reused only by a
    /// sequence with the same adapters.
    pub fn adapters(&self) -> AdapterSet {
        self.adapters
    }

    pub fn prompt_ids(&self) -> &[u32] {
        &self.prompt.ids
    }

    pub fn generated(&self) -> &[u32] {
        &self.generated
    }

    /// Why the sequence stopped, once it has.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.stop
    }

    /// Why the sequence stopped with [`StopReason::Failed`].
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    pub fn is_finished(&self) -> bool {
        self.stop.is_some()
    }

    /// Prompt tokens run so far.
    pub fn fed(&self) -> usize {
        self.fed
    }

    /// Whether the prompt has been run through (the sequence is decoding).
    pub fn is_prefilled(&self) -> bool {
        self.fed == self.prompt.ids.len()
    }

    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Speculative decoding's statistics so far (`None` without a drafter).
    pub fn draft_stats(&self) -> Option<DraftStats> {
        self.spec.as_ref().map(|s| s.stats)
    }

    /// Every drafter call so far, when [`crate::generate::speculative::DraftOptions::trace`]
    /// asked for them.
    pub fn draft_trace(&self) -> &[DraftRecord] {
        self.spec.as_ref().map_or(&[], |s| &s.trace)
    }

    /// Rows of this sequence's next step: up to `chunk` prompt tokens, extended so an
    /// image/video span is never cut (its tokens attend to each other both ways), or the
    /// last generated token.
    fn next_rows(&self, chunk: usize) -> std::ops::Range<usize> {
        let len = self.prompt.ids.len();
        if self.fed == len {
            return len..len;
        }
        let mut end = (self.fed + chunk.max(1)).min(len);
        if let Some(spans) = &self.prompt.spans {
            while end < len && spans[end] >= 0 && spans[end] == spans[end - 1] {
                end += 1;
            }
        }
        self.fed..end
    }

    /// This sequence's part of the next forward pass.
    fn input(&mut self, model: &TextModel, chunk: usize) -> Result<StepInput<'_>> {
        let rows = self.next_rows(chunk);
        if rows.is_empty() {
            let last = *self
                .generated
                .last()
                .expect("a decoding sequence has a token");
            self.step_ids.clear();
            self.step_ids.push(last);
            if let Some(spec) = &mut self.spec {
                // As many drafts as the budget (the last kept token's successor is the
                // target's own) and the context allow.
                let past = self.cache.seq_len();
                let max = model.config().max_position_embeddings;
                let k = (self.max_new_tokens - self.generated.len()).saturating_sub(1);
                spec.propose(model, last, past, k.min(max.saturating_sub(past + 1)))?;
                self.step_ids.extend(&spec.drafts);
            }
            let which = match self.step_ids.len() {
                1 => LogitsFor::Last,
                _ => LogitsFor::All,
            };
            return Ok(StepInput {
                embeds: model.embed(&self.step_ids)?,
                ple_ids: &self.step_ids,
                spans: None,
                cache: &mut self.cache,
                which,
            });
        }
        let p = &self.prompt;
        let embeds = match &p.embeds {
            Some(e) => e.narrow(0, rows.start, rows.len())?,
            None => model.embed(&p.ids[rows.clone()])?,
        };
        Ok(StepInput {
            embeds,
            ple_ids: &p.ple_ids[rows.clone()],
            spans: p.spans.as_deref().map(|s| &s[rows.clone()]),
            cache: &mut self.cache,
            which: if rows.end == p.ids.len() {
                LogitsFor::Last
            } else {
                LogitsFor::None
            },
        })
    }

    /// Takes the step's logits (when the step ran the last prompt chunk or decoded):
    /// samples, records and checks the stop conditions, in `generate`'s order.
    fn finish_step(
        &mut self,
        ran: usize,
        out: Option<(Tensor, Tensor)>,
        max_positions: usize,
    ) -> Result<StepOutput> {
        let decoding = self.is_prefilled();
        if !decoding {
            self.fed += ran;
        }
        let Some((logits, hidden)) = out else {
            return Ok(StepOutput::default());
        };
        if self.spec.is_some() && decoding {
            // The step ran the last token and its drafts.
            let ran = self.step_ids.len();
            let past = self.cache.seq_len() - ran;
            return self.finish_speculative_step(past, ran, &logits, &hidden, max_positions);
        }
        if let Some(spec) = &mut self.spec {
            // The prompt has run: the first round reads every prompt position, as after
            // the reference's one-pass prefill.
            let n = self.prompt.ids.len();
            spec.prepare(&self.cache, 0, n, n + 1, hidden)?;
        }
        let row: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
        let next = match self.constraint.take() {
            Some(mut c) => {
                let mut allowed = row.clone();
                let chosen = c.mask(&mut allowed, &self.stop_ids).and_then(|()| {
                    let next = self
                        .sampler
                        .sample_after(&allowed, &self.history, &self.generated);
                    c.accept(next, &self.stop_ids).map(|()| next)
                });
                match chosen {
                    Ok(next) => {
                        self.constraint = Some(c);
                        next
                    }
                    // This sequence ends; the others of the step go on.
                    Err(e) => {
                        self.failure = Some(e.to_string());
                        self.stop = Some(StopReason::Failed);
                        return Ok(StepOutput::default());
                    }
                }
            }
            None => self
                .sampler
                .sample_after(&row, &self.history, &self.generated),
        };
        self.push(next, max_positions);
        Ok(StepOutput {
            tokens: vec![next],
            logits: vec![row],
        })
    }

    /// Records a chosen token and checks the stop conditions.
    fn push(&mut self, next: u32, max_positions: usize) {
        self.generated.push(next);
        self.history.push(next);
        self.stop = if self.stop_ids.contains(&next) {
            Some(StopReason::StopToken)
        } else if self.generated.len() >= self.max_new_tokens {
            Some(StopReason::MaxTokens)
        } else if self.cache.seq_len() >= max_positions {
            Some(StopReason::ContextFull)
        } else {
            None
        };
    }

    /// A decode step that verified drafts ([`verify`]): keeps the drafts the target
    /// agrees with and its token after them, cut at a stop id or the budget as the
    /// reference cuts them; prepares the next round; drops the rest from the cache.
    fn finish_speculative_step(
        &mut self,
        past: usize,
        ran: usize,
        logits: &Tensor,
        hidden: &Tensor,
        max_positions: usize,
    ) -> Result<StepOutput> {
        let spec = self.spec.as_mut().expect("a speculating sequence");
        let rows: Vec<Vec<f32>> = logits.to_vec2()?;
        let drafts = std::mem::take(&mut spec.drafts);
        let (n, next) = verify(
            &mut self.sampler,
            &rows,
            &drafts,
            &mut self.history,
            &mut self.generated,
        );
        let mut kept: Vec<u32> = drafts[..n].to_vec();
        kept.push(next);
        kept.truncate(self.max_new_tokens - self.generated.len());
        if let Some(i) = kept.iter().position(|t| self.stop_ids.contains(t)) {
            kept.truncate(i + 1);
        }
        let n = kept.len() - 1;
        spec.stats.accepted += n;
        let seq_len = self.history.len() + kept.len();
        spec.prepare(&self.cache, past, ran, seq_len, hidden.narrow(0, n, 1)?)?;
        self.cache.truncate(past + 1 + n)?;
        for &t in &kept {
            self.push(t, max_positions);
        }
        Ok(StepOutput {
            logits: rows.into_iter().take(kept.len()).collect(),
            tokens: kept,
        })
    }
}

/// Advances every unfinished sequence of `seqs` by one forward pass: those still in their
/// prompt run up to `prefill_chunk` more prompt tokens (a whole image span at least),
/// the others the token they chose last. Returns what happened to each (`None` for a
/// sequence that had already finished).
pub fn step(
    model: &TextModel,
    seqs: &mut [&mut Sequence],
    prefill_chunk: usize,
) -> Result<Vec<Option<StepOutput>>> {
    let active: Vec<bool> = seqs.iter().map(|s| !s.is_finished()).collect();
    let rows: Vec<usize> = seqs
        .iter()
        .map(|s| s.next_rows(prefill_chunk).len().max(1))
        .collect();
    let adapters = seqs
        .iter()
        .zip(&active)
        .filter(|(_, a)| **a)
        .map(|(s, _)| s.adapters)
        .collect::<std::collections::BTreeSet<_>>();
    if adapters.len() > 1 {
        return Err(Error::invalid_argument(
            "sequences",
            "sequences with different adapters cannot share a step",
        ));
    }
    let set = adapters.into_iter().next().unwrap_or_default();
    let mut inputs = Vec::new();
    for (s, _) in seqs.iter_mut().zip(&active).filter(|(_, a)| **a) {
        inputs.push(s.input(model, prefill_chunk)?);
    }
    let mut logits =
        crate::lora::with_adapters(set, || model.forward_batch_hidden(&mut inputs))?.into_iter();
    drop(inputs);
    let max = model.config().max_position_embeddings;
    let mut out = Vec::with_capacity(seqs.len());
    for ((s, a), n) in seqs.iter_mut().zip(active).zip(rows) {
        out.push(match a {
            true => Some(s.finish_step(n, logits.next().flatten(), max)?),
            false => None,
        });
    }
    Ok(out)
}
