//! Speculative decoding with an assistant drafter ([`crate::draft`]), as the reference's
//! `generate(..., assistant_model=...)` runs it with `SinglePositionMultiTokenCandidateGenerator`.
//!
//! After the prefill, each round:
//! 1. The drafter proposes `k` tokens (argmax), all from the same position (the last
//!    accepted token's), fed the target's embedding of its previous token and its own
//!    recurrent state.
//! 2. The target runs the last accepted token and the `k` drafts in one forward pass.
//! 3. Greedy: the drafts are kept up to the first one that differs from the target's
//!    argmax, and the target's own token after them is kept too ("bonus"), so every
//!    round yields 1 to `k + 1` tokens, exactly those greedy decoding would have.
//! 4. The target's cache is truncated past the last kept token.
//!
//! What the drafter sees is the reference's, quirks included: after a verification, the
//! target's keys and values are cut by count to the new sequence length, so the drafter
//! also reads the K/V the target computed for rejected drafts (at the positions the
//! accepted tokens now occupy, and for sliding layers past them), and a sliding layer
//! reads the last `W + 1` entries ([`draft_kv_ranges`]). The drafter's proposals are then
//! those of the reference, and its acceptance rate with them.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Instant;

use candle_core::Tensor;

use crate::config::LayerType;
use crate::draft::{DraftKv, DraftStep, Drafter};
use crate::error::{Error, Result};
use crate::generate::sampling::{argmax, Choice, Sampler};
use crate::generate::{GenerateOptions, GenerationOutput, StopReason};
use crate::text::kv_cache::KvCache;
use crate::text::model::{LogitsFor, PromptInput, StepInput, TextModel};

/// The most tokens one round may draft (the cache keeps this many spare ring slots).
pub const MAX_DRAFT_TOKENS: usize = 64;

/// How a speculative generation went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DraftStats {
    /// Verification passes of the target (rounds that drafted at least one token).
    pub rounds: usize,
    /// Tokens the drafter proposed.
    pub drafted: usize,
    /// Proposed tokens the target kept.
    pub accepted: usize,
}

impl DraftStats {
    /// Accepted over drafted tokens (0 when nothing was drafted).
    pub fn acceptance_rate(&self) -> f64 {
        self.accepted as f64 / self.drafted.max(1) as f64
    }

    /// Drafts kept per round: the mean accepted length (tokens per target pass is one
    /// more).
    pub fn mean_accepted(&self) -> f64 {
        self.accepted as f64 / self.rounds.max(1) as f64
    }

    pub fn add(&mut self, other: &DraftStats) {
        self.rounds += other.rounds;
        self.drafted += other.drafted;
        self.accepted += other.accepted;
    }
}

/// One drafter call, for tests and tracing.
pub struct DraftCall<'a> {
    /// The position id of the call (the last accepted token's position).
    pub position: usize,
    /// How many target K/V entries each layer type attended over.
    pub kv_len: BTreeMap<LayerType, usize>,
    pub step: &'a DraftStep,
}

/// The target positions a drafting round reads per layer type, after a target forward
/// that ran `ran` tokens on a cache of `past` positions, when the sequence (prompt and
/// kept tokens, the new bonus token included) is `seq_len` long. Mirrors the reference:
/// the producer layers return every position for full layers and, for sliding layers,
/// the `min(past, W − 1)` cached ones plus the step's; the candidate generator keeps the
/// first `seq_len` of those; the drafter's sliding mask keeps the last `W + 1`.
pub fn draft_kv_ranges(
    past: usize,
    ran: usize,
    seq_len: usize,
    window: usize,
) -> BTreeMap<LayerType, Range<usize>> {
    let end = past + ran;
    let full = 0..end.min(seq_len);
    let start = past - past.min(window - 1);
    let cut = end.min(start + seq_len);
    let sliding = cut.saturating_sub(window + 1).max(start)..cut;
    BTreeMap::from([(LayerType::Full, full), (LayerType::Sliding, sliding)])
}

fn gather_kv(
    drafter: &Drafter,
    cache: &KvCache,
    ranges: &BTreeMap<LayerType, Range<usize>>,
) -> Result<DraftKv> {
    let mut kv = BTreeMap::new();
    for (t, &layer) in drafter.sources() {
        kv.insert(*t, cache.gather(layer, ranges[t].clone())?);
    }
    Ok(kv)
}

/// Generation from `prompt` with `drafter` proposing up to `draft_tokens` tokens per
/// round. Greedy, the tokens are exactly those of [`crate::generate::generate_from`] with
/// the same options; sampling, each token follows the same distribution ([`verify`]),
/// though a seed draws other tokens than without a drafter. `on_token` sees each kept
/// token, `on_draft` each drafter call. A grammar constraint is not supported yet.
pub fn generate_speculative(
    model: &TextModel,
    drafter: &Drafter,
    prompt: &PromptInput,
    opts: &GenerateOptions,
    draft_tokens: usize,
    mut on_token: impl FnMut(u32) -> Result<()>,
    mut on_draft: impl FnMut(&DraftCall<'_>),
) -> Result<(GenerationOutput, DraftStats)> {
    if opts.constraint.is_some() {
        return Err(Error::invalid_argument(
            "draft",
            "speculative decoding does not take a grammar constraint yet",
        ));
    }
    if !(1..=MAX_DRAFT_TOKENS).contains(&draft_tokens) {
        return Err(Error::invalid_argument(
            "draft-tokens",
            format!("must be between 1 and {MAX_DRAFT_TOKENS}, got {draft_tokens}"),
        ));
    }
    let max_pos = model.config().max_position_embeddings;
    let plen = prompt.ids.len();
    if plen == 0 {
        return Err(Error::invalid_argument("prompt", "is empty"));
    }
    if plen > max_pos {
        return Err(Error::ContextTooLong {
            prompt: plen,
            new: opts.max_new_tokens,
            max: max_pos,
        });
    }
    let mut sampler = Sampler::new(opts.sampling.clone())?;
    let mut stats = DraftStats::default();
    let mut generated: Vec<u32> = Vec::new();
    let t0 = Instant::now();
    if opts.max_new_tokens == 0 {
        return Ok((
            output(prompt, generated, StopReason::MaxTokens, 0.0, 0.0),
            stats,
        ));
    }
    let mut cache = model.new_cache().with_spare(draft_tokens);
    cache.reserve(max_pos.min(plen + opts.max_new_tokens + draft_tokens))?;
    // One target pass over `rows` (input embeddings and the ids the per-layer
    // embeddings read): f32 logits and final hidden states of the wanted rows.
    let run = |cache: &mut KvCache,
               embeds: Tensor,
               ple_ids: &[u32],
               spans: Option<&[i64]>,
               which: LogitsFor|
     -> Result<(Tensor, Tensor)> {
        let mut batch = [StepInput {
            embeds,
            ple_ids,
            spans,
            cache,
            which,
        }];
        crate::lora::with_adapters(opts.adapters, || model.forward_batch_hidden(&mut batch))?
            .pop()
            .flatten()
            .ok_or_else(|| Error::invalid_argument("logits", "none were returned"))
    };

    // The prefill: one greedy token, the final hidden state of the last prompt row.
    let embeds = match &prompt.embeds {
        Some(e) => e.clone(),
        None => model.embed(&prompt.ids)?,
    };
    let (logits, hidden) = run(
        &mut cache,
        embeds,
        &prompt.ple_ids,
        prompt.spans.as_deref(),
        LogitsFor::Last,
    )?;
    let prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut last = argmax(&logits.squeeze(0)?.to_vec1::<f32>()?);
    let mut h_prev = hidden;
    // The K/V the next round reads: after the prefill, every prompt position.
    let mut kv = gather_kv(
        drafter,
        &cache,
        &draft_kv_ranges(0, plen, plen + 1, cache.window()),
    )?;
    let mut kv_len: BTreeMap<LayerType, usize> = BTreeMap::new();
    let stop = loop {
        generated.push(last);
        on_token(last)?;
        if opts.stop_ids.contains(&last) {
            break StopReason::StopToken;
        }
        if generated.len() >= opts.max_new_tokens {
            break StopReason::MaxTokens;
        }
        let past = cache.seq_len(); // the last token is not in the cache yet
        if past >= max_pos {
            break StopReason::ContextFull;
        }
        // As many drafts as the remaining budget and the context allow.
        let k = draft_tokens
            .min(opts.max_new_tokens - generated.len() - 1)
            .min(max_pos - past - 1);
        let mut drafts = Vec::with_capacity(k);
        if k > 0 {
            for (t, (kk, _)) in &kv {
                kv_len.insert(*t, kk.dim(1)?);
            }
            let mut token = last;
            let mut h = h_prev.clone();
            for _ in 0..k {
                let step = drafter.step(&model.embed(&[token])?, &h, past, &kv)?;
                on_draft(&DraftCall {
                    position: past,
                    kv_len: kv_len.clone(),
                    step: &step,
                });
                token = argmax(&step.logits.squeeze(0)?.to_vec1::<f32>()?);
                drafts.push(token);
                h = step.hidden;
            }
            stats.rounds += 1;
            stats.drafted += k;
        }
        // Verify: the last kept token and the drafts in one pass.
        let mut ids = vec![last];
        ids.extend(&drafts);
        let (logits, hidden) = run(&mut cache, model.embed(&ids)?, &ids, None, LogitsFor::All)?;
        let rows: Vec<Vec<f32>> = logits.to_vec2()?;
        let mut history = prompt.ids.clone();
        history.extend(&generated);
        let (n, bonus) = verify(&mut sampler, &rows, &drafts, history, generated.clone());
        // Kept tokens: the n matching drafts, then the target's own; cut at a stop id
        // or the budget, as the reference does.
        let mut kept: Vec<u32> = drafts[..n].to_vec();
        kept.push(bonus);
        let budget = opts.max_new_tokens - generated.len();
        kept.truncate(budget);
        if let Some(i) = kept.iter().position(|t| opts.stop_ids.contains(t)) {
            kept.truncate(i + 1);
        }
        let n = kept.len() - 1;
        stats.accepted += n;
        let seq_len = plen + generated.len() + n + 1;
        kv = gather_kv(
            drafter,
            &cache,
            &draft_kv_ranges(past, ids.len(), seq_len, cache.window()),
        )?;
        h_prev = hidden.narrow(0, n, 1)?;
        cache.truncate(past + 1 + n)?;
        for &t in &kept[..n] {
            generated.push(t);
            on_token(t)?;
        }
        last = kept[n];
        // `last` is pushed and checked at the top of the loop; the drafts kept before it
        // hold no stop id (the cut above) and fit the budget.
    };
    let decode_secs = t1.elapsed().as_secs_f64();
    Ok((
        output(prompt, generated, stop, prefill_secs, decode_secs),
        stats,
    ))
}

/// Checks `drafts` against the target's logits `rows` (row `i` follows the `i`-th
/// token of the pass: the last kept token, then each draft) and returns how many drafts
/// are kept and the token that follows them. `history` and `generated` are the sequence
/// before the pass, for the penalties.
///
/// Greedy (penalties included): drafts are kept while they equal the target's choice.
/// Sampling: draft `d` is kept with probability `p(d)` under the target's distribution
/// after the penalties and warpers; at the first rejection the token is drawn from `p`
/// without `d`, renormalised; with every draft kept, from the last row's `p`. Each token
/// is then distributed exactly as `p`, since the drafter proposes its argmax, a
/// deterministic proposal. (The reference instead accepts with `p(d)/q(d)`, `q` the
/// softmax of the drafter's logits, and draws from `max(p − q, 0)`: Leviathan et al.'s
/// rule for a sampled proposal, which with the argmax proposal it actually makes skews
/// the output towards the drafter. The issue asks for the target's distribution, so
/// this follows the rule for the proposal made.)
pub(crate) fn verify(
    sampler: &mut Sampler,
    rows: &[Vec<f32>],
    drafts: &[u32],
    mut history: Vec<u32>,
    mut generated: Vec<u32>,
) -> (usize, u32) {
    for (i, row) in rows.iter().enumerate() {
        let choice = sampler.distribution(row, &history, &generated);
        let Some(&d) = drafts.get(i) else {
            // Every draft kept: the last row gives the next token.
            return match choice {
                Choice::Greedy(t) => (i, t),
                Choice::Sample(p) => (i, sampler.draw(&p)),
            };
        };
        match choice {
            Choice::Greedy(t) if t == d => {}
            Choice::Greedy(t) => return (i, t),
            Choice::Sample(mut p) => {
                let pd = p[d as usize];
                if sampler.uniform() >= pd {
                    p[d as usize] = 0.0;
                    let z: f32 = p.iter().sum();
                    if z > 0.0 {
                        p.iter_mut().for_each(|x| *x /= z);
                        return (i, sampler.draw(&p));
                    }
                    // `d` held all the mass yet was rejected by rounding: keep it.
                }
            }
        }
        history.push(d);
        generated.push(d);
    }
    unreachable!("rows has one more entry than drafts")
}

fn output(
    prompt: &PromptInput,
    generated_ids: Vec<u32>,
    stop_reason: StopReason,
    prefill_secs: f64,
    decode_secs: f64,
) -> GenerationOutput {
    GenerationOutput {
        prompt_ids: prompt.ids.clone(),
        generated_ids,
        stop_reason,
        prefill_secs,
        decode_secs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::generate::sampling::SamplingParams;

    /// The verification rule keeps the target's distribution: on a 4-token vocabulary,
    /// over many seeded draws, each output position's frequencies match `p` within five
    /// standard errors, whichever token was drafted (likely, unlikely, impossible).
    #[test]
    fn speculative_sampling_keeps_the_target_distribution() {
        let logits = [vec![2.0f32, 1.0, 0.0, -1.0], vec![-1.0f32, 0.5, 1.5, 0.0]];
        let params = SamplingParams {
            temperature: Some(1.0),
            seed: 11,
            ..Default::default()
        };
        let softmax = |x: &[f32]| {
            let z: f32 = x.iter().map(|v| v.exp()).sum();
            x.iter().map(|v| v.exp() / z).collect::<Vec<f32>>()
        };
        let n = 40_000;
        for drafts in [[0u32, 2], [3, 1], [1, 3]] {
            let mut sampler = Sampler::new(params.clone()).unwrap();
            let mut first = [0usize; 4];
            let mut second = [0usize; 4];
            let mut second_n = 0;
            for _ in 0..n {
                let rows = vec![logits[0].clone(), logits[1].clone(), logits[1].clone()];
                let (kept, next) = verify(&mut sampler, &rows, &drafts, vec![], vec![]);
                let out: Vec<u32> = drafts[..kept].iter().copied().chain([next]).collect();
                first[out[0] as usize] += 1;
                // Given a first token, the second follows row 1's distribution.
                if out.len() > 1 {
                    second[out[1] as usize] += 1;
                    second_n += 1;
                }
            }
            for (counts, total, p) in [
                (first, n, softmax(&logits[0])),
                (second, second_n, softmax(&logits[1])),
            ] {
                if total < 1000 {
                    continue;
                }
                for t in 0..4 {
                    let f = counts[t] as f64 / total as f64;
                    let se = (p[t] as f64 * (1.0 - p[t] as f64) / total as f64).sqrt();
                    assert!(
                        (f - p[t] as f64).abs() <= 5.0 * se + 1e-9,
                        "drafts {drafts:?}: token {t} drawn {f:.4}, target {:.4}",
                        p[t]
                    );
                }
            }
        }
    }

    #[test]
    fn greedy_verification_keeps_drafts_up_to_the_first_miss() {
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        let rows = vec![
            vec![0.0f32, 1.0, 0.0],
            vec![1.0, 0.0, 0.0],
            vec![0.0, 0.0, 1.0],
        ];
        assert_eq!(verify(&mut s, &rows, &[1, 0], vec![], vec![]), (2, 2));
        assert_eq!(verify(&mut s, &rows, &[1, 2], vec![], vec![]), (1, 0));
        assert_eq!(verify(&mut s, &rows, &[0, 0], vec![], vec![]), (0, 1));
    }

    #[test]
    fn draft_kv_ranges_follow_the_reference_cut() {
        let w = 8;
        // After a prefill of 27: every position, the last W + 1 for sliding layers.
        let r = draft_kv_ranges(0, 27, 28, w);
        assert_eq!(r[&LayerType::Full], 0..27);
        assert_eq!(r[&LayerType::Sliding], 18..27);
        // Round from 27 cached (last token at 27) with 4 drafts, none kept: the new
        // sequence is 29 long; full entries 0..29 include the first rejected draft's at
        // 28, sliding entries 20..32 are 12 (not cut), the last 9 of them read.
        let r = draft_kv_ranges(27, 5, 29, w);
        assert_eq!(r[&LayerType::Full], 0..29);
        assert_eq!(r[&LayerType::Sliding], 23..32);
        // All kept: nothing cut, the bonus token's position not yet computed.
        let r = draft_kv_ranges(27, 5, 33, w);
        assert_eq!(r[&LayerType::Full], 0..32);
        // A short sequence: the sliding entries start at 0 and are cut by count.
        let r = draft_kv_ranges(3, 5, 5, w);
        assert_eq!(r[&LayerType::Full], 0..5);
        assert_eq!(r[&LayerType::Sliding], 0..5);
    }
}
