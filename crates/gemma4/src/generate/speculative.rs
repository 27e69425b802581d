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
use std::sync::Arc;

use candle_core::Tensor;

use crate::config::LayerType;
use crate::draft::{DraftKv, Drafter};
use crate::error::{Error, Result};
use crate::generate::sampling::{argmax, Choice, Sampler};
use crate::text::kv_cache::KvCache;
use crate::text::model::TextModel;

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

/// The target K/V a drafting round reads from `cache` after a target pass that ran
/// `ran` tokens on `past` cached positions, the sequence then `seq_len` long
/// ([`draft_kv_ranges`]). Call before the cache is truncated.
pub fn draft_kv(
    drafter: &Drafter,
    cache: &KvCache,
    past: usize,
    ran: usize,
    seq_len: usize,
) -> Result<DraftKv> {
    let ranges = draft_kv_ranges(past, ran, seq_len, cache.window());
    let mut kv = BTreeMap::new();
    for (t, &layer) in drafter.sources() {
        kv.insert(*t, cache.gather(layer, ranges[t].clone())?);
    }
    Ok(kv)
}

/// Speculative decoding for a [`crate::generate::GenerateOptions`]: the drafter and the
/// tokens it drafts per round.
#[derive(Clone)]
pub struct DraftOptions {
    pub drafter: Arc<Drafter>,
    /// Tokens drafted per round, 1 to [`MAX_DRAFT_TOKENS`].
    pub tokens: usize,
    /// Record every drafter call ([`crate::Sequence::draft_trace`]), for tests.
    pub trace: bool,
}

impl std::fmt::Debug for DraftOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DraftOptions")
            .field("tokens", &self.tokens)
            .field("trace", &self.trace)
            .finish_non_exhaustive()
    }
}

impl DraftOptions {
    pub fn new(drafter: Arc<Drafter>, tokens: usize) -> Result<Self> {
        if !(1..=MAX_DRAFT_TOKENS).contains(&tokens) {
            return Err(Error::invalid_argument(
                "draft-tokens",
                format!("must be between 1 and {MAX_DRAFT_TOKENS}, got {tokens}"),
            ));
        }
        Ok(DraftOptions {
            drafter,
            tokens,
            trace: false,
        })
    }
}

/// One recorded drafter call ([`DraftOptions::trace`]).
#[derive(Debug, Clone)]
pub struct DraftRecord {
    /// The position id of the call (the last kept token's position).
    pub position: usize,
    /// How many target K/V entries each layer type attended over.
    pub kv_len: BTreeMap<LayerType, usize>,
    /// The drafter's f32 logits and next recurrent state.
    pub logits: Vec<f32>,
    pub hidden: Vec<f32>,
}

/// A sequence's speculative state between steps.
pub(crate) struct Speculation {
    opts: DraftOptions,
    /// The target K/V and recurrent state the next round starts from (`None` before the
    /// prompt has run).
    next: Option<(DraftKv, Tensor)>,
    /// The drafts of the step under way.
    pub(crate) drafts: Vec<u32>,
    pub(crate) stats: DraftStats,
    pub(crate) trace: Vec<DraftRecord>,
}

impl Speculation {
    pub(crate) fn new(opts: DraftOptions) -> Self {
        Speculation {
            opts,
            next: None,
            drafts: Vec::new(),
            stats: DraftStats::default(),
            trace: Vec::new(),
        }
    }

    /// Drafts up to `k` tokens after `last`, which sits at `position` (the cache holds
    /// everything before it); a no-op before the prompt has run or when `k` is 0.
    pub(crate) fn propose(
        &mut self,
        model: &TextModel,
        last: u32,
        position: usize,
        k: usize,
    ) -> Result<()> {
        self.drafts.clear();
        let k = k.min(self.opts.tokens);
        let Some((kv, h0)) = &self.next else {
            return Ok(());
        };
        if k == 0 {
            return Ok(());
        }
        let kv_len: BTreeMap<LayerType, usize> = kv
            .iter()
            .map(|(t, (kk, _))| Ok((*t, kk.dim(1)?)))
            .collect::<Result<_>>()?;
        let (mut token, mut h) = (last, h0.clone());
        for _ in 0..k {
            let step = self
                .opts
                .drafter
                .step(&model.embed(&[token])?, &h, position, kv)?;
            let logits: Vec<f32> = step.logits.squeeze(0)?.to_vec1()?;
            token = argmax(&logits);
            if self.opts.trace {
                self.trace.push(DraftRecord {
                    position,
                    kv_len: kv_len.clone(),
                    logits,
                    hidden: step
                        .hidden
                        .to_dtype(candle_core::DType::F32)?
                        .flatten_all()?
                        .to_vec1()?,
                });
            }
            self.drafts.push(token);
            h = step.hidden;
        }
        self.stats.rounds += 1;
        self.stats.drafted += k;
        Ok(())
    }

    /// After a target pass that ran `ran` tokens on a cache of `past` positions, leaving a
    /// sequence (prompt and kept tokens) of `seq_len`: the next round reads the target's
    /// K/V as the reference cuts them and starts from `hidden` `[1, H]`, the target's final
    /// hidden state at the last token whose prediction was kept. Call before the cache is
    /// truncated.
    pub(crate) fn prepare(
        &mut self,
        cache: &KvCache,
        past: usize,
        ran: usize,
        seq_len: usize,
        hidden: Tensor,
    ) -> Result<()> {
        let kv = draft_kv(&self.opts.drafter, cache, past, ran, seq_len)?;
        self.next = Some((kv, hidden));
        Ok(())
    }

    /// Spare sliding-window slots the cache must keep to roll back a round's drafts.
    pub(crate) fn spare(&self) -> usize {
        self.opts.tokens
    }
}

/// Checks `drafts` against the target's logits `rows` (row `i` follows the `i`-th
/// token of the pass: the last kept token, then each draft) and returns how many drafts
/// are kept and the token that follows them. `history` and `generated` are the sequence
/// before the pass, for the penalties (left as they were).
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
    history: &mut Vec<u32>,
    generated: &mut Vec<u32>,
) -> (usize, u32) {
    // The drafts join the history while they are checked, and leave it after.
    let (h, g) = (history.len(), generated.len());
    let out = verify_rows(sampler, rows, drafts, history, generated);
    history.truncate(h);
    generated.truncate(g);
    out
}

fn verify_rows(
    sampler: &mut Sampler,
    rows: &[Vec<f32>],
    drafts: &[u32],
    history: &mut Vec<u32>,
    generated: &mut Vec<u32>,
) -> (usize, u32) {
    for (i, row) in rows.iter().enumerate() {
        let choice = sampler.distribution(row, history, generated);
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
                let (kept, next) = verify(&mut sampler, &rows, &drafts, &mut vec![], &mut vec![]);
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
        assert_eq!(
            verify(&mut s, &rows, &[1, 0], &mut vec![], &mut vec![]),
            (2, 2)
        );
        assert_eq!(
            verify(&mut s, &rows, &[1, 2], &mut vec![], &mut vec![]),
            (1, 0)
        );
        assert_eq!(
            verify(&mut s, &rows, &[0, 0], &mut vec![], &mut vec![]),
            (0, 1)
        );
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
