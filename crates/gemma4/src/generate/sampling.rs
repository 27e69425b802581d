//! Next-token selection with transformers' processors and warpers, in its order:
//! repetition penalty (also under greedy decoding), then OpenAI's presence and frequency
//! penalties (on generated tokens only, as vLLM applies them; transformers has none),
//! then, when sampling, temperature →
//! top-k → top-p → min-p on f32 logits, then a draw from a seeded RNG. Greedy decoding is
//! the arg-max (first index among equal maxima, as `torch.argmax`).

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingParams {
    /// `None` or 0 = greedy.
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    /// Subtracted once from the logit of every token generated so far (OpenAI's
    /// `presence_penalty`, in [-2, 2]).
    pub presence_penalty: Option<f64>,
    /// Subtracted from a token's logit once per time it was generated
    /// (`frequency_penalty`, in [-2, 2]).
    pub frequency_penalty: Option<f64>,
    pub seed: u64,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature.is_none_or(|t| t == 0.0)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |arg: &str, msg: &str| Err(Error::invalid_argument(arg, msg));
        if self
            .temperature
            .is_some_and(|t| !(t >= 0.0 && t.is_finite()))
        {
            return bad("temperature", "must be a finite number >= 0");
        }
        if self.top_k == Some(0) {
            return bad("top_k", "must be at least 1");
        }
        if self.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
            return bad("top_p", "must be in (0, 1]");
        }
        if self.min_p.is_some_and(|p| !(0.0..=1.0).contains(&p)) {
            return bad("min_p", "must be in [0, 1]");
        }
        if self
            .repetition_penalty
            .is_some_and(|p| !(p > 0.0 && p.is_finite()))
        {
            return bad("repetition_penalty", "must be a positive number");
        }
        if self
            .presence_penalty
            .is_some_and(|p| !(-2.0..=2.0).contains(&p))
        {
            return bad("presence_penalty", "must be in [-2, 2]");
        }
        if self
            .frequency_penalty
            .is_some_and(|p| !(-2.0..=2.0).contains(&p))
        {
            return bad("frequency_penalty", "must be in [-2, 2]");
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        Ok(Sampler {
            rng: StdRng::seed_from_u64(params.seed),
            params,
        })
    }

    /// Picks the next token from `logits` given every token so far (`history`, prompt
    /// included, for the repetition penalty).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        self.sample_after(logits, history, &[])
    }

    /// [`Self::sample`], `generated` (the end of `history` the model produced) bearing the
    /// presence and frequency penalties.
    pub fn sample_after(&mut self, logits: &[f32], history: &[u32], generated: &[u32]) -> u32 {
        match self.distribution(logits, history, generated) {
            Choice::Greedy(id) => id,
            Choice::Sample(probs) => self.draw(&probs),
        }
    }

    /// What [`Self::sample_after`] picks from, without drawing: the argmax after the
    /// penalties when greedy, else the probabilities after the penalties and warpers.
    pub fn distribution(&self, logits: &[f32], history: &[u32], generated: &[u32]) -> Choice {
        let mut scores = logits.to_vec();
        if let Some(p) = self.params.repetition_penalty {
            apply_repetition_penalty(&mut scores, history, p as f32);
        }
        let presence = self.params.presence_penalty.unwrap_or(0.0) as f32;
        let frequency = self.params.frequency_penalty.unwrap_or(0.0) as f32;
        if presence != 0.0 || frequency != 0.0 {
            apply_openai_penalties(&mut scores, generated, presence, frequency);
        }
        if self.params.is_greedy() {
            return Choice::Greedy(argmax(&scores));
        }
        let t = self.params.temperature.unwrap_or(1.0) as f32;
        scores.iter_mut().for_each(|s| *s /= t);
        if let Some(k) = self.params.top_k {
            top_k(&mut scores, k);
        }
        if let Some(p) = self.params.top_p {
            top_p(&mut scores, p as f32);
        }
        if let Some(p) = self.params.min_p {
            min_p(&mut scores, p as f32);
        }
        Choice::Sample(softmax(&scores))
    }

    /// A token drawn from `probs` (which sum to 1, up to rounding).
    pub fn draw(&mut self, probs: &[f32]) -> u32 {
        let r = self.uniform();
        let mut acc = 0.0f32;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if r < acc {
                return i as u32;
            }
        }
        // Rounding left r ≥ Σp: the last token with non-zero probability.
        probs.iter().rposition(|&p| p > 0.0).unwrap_or(0) as u32
    }

    /// A uniform number in [0, 1) from this sampler's seeded stream.
    pub fn uniform(&mut self) -> f32 {
        self.rng.random()
    }
}

/// What a sampler chooses the next token from ([`Sampler::distribution`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    Greedy(u32),
    Sample(Vec<f32>),
}

pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

fn softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = x.iter().map(|&v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

fn apply_repetition_penalty(scores: &mut [f32], history: &[u32], penalty: f32) {
    let mut seen = vec![false; scores.len()];
    for &id in history {
        let i = id as usize;
        if i < scores.len() && !seen[i] {
            seen[i] = true;
            scores[i] = if scores[i] < 0.0 {
                scores[i] * penalty
            } else {
                scores[i] / penalty
            };
        }
    }
}

fn apply_openai_penalties(scores: &mut [f32], generated: &[u32], presence: f32, frequency: f32) {
    let mut counts = std::collections::HashMap::<u32, u32>::new();
    for &id in generated {
        *counts.entry(id).or_default() += 1;
    }
    for (id, n) in counts {
        if let Some(s) = scores.get_mut(id as usize) {
            *s -= presence + frequency * n as f32;
        }
    }
}

/// Keeps every score ≥ the k-th largest (ties at the boundary survive, as the reference).
fn top_k(scores: &mut [f32], k: usize) {
    if k >= scores.len() {
        return;
    }
    let mut sorted = scores.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let kth = sorted[k - 1];
    scores
        .iter_mut()
        .filter(|s| **s < kth)
        .for_each(|s| *s = f32::NEG_INFINITY);
}

/// Removes the low tail whose cumulative probability is ≤ 1 − p (at least one token kept).
fn top_p(scores: &mut [f32], p: f32) {
    let probs = softmax(scores);
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut cum = 0.0f32;
    for (rank, &i) in order.iter().enumerate() {
        cum += probs[i];
        if cum <= 1.0 - p && rank + 1 < order.len() {
            scores[i] = f32::NEG_INFINITY;
        }
    }
}

fn min_p(scores: &mut [f32], p: f32) {
    let probs = softmax(scores);
    let top = probs.iter().cloned().fold(0.0f32, f32::max);
    let best = argmax(scores) as usize;
    for (i, s) in scores.iter_mut().enumerate() {
        if probs[i] < p * top && i != best {
            *s = f32::NEG_INFINITY;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_max_and_penalty_applies() {
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        assert_eq!(s.sample(&[1.0, 3.0, 3.0, -1.0], &[]), 1);
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: Some(2.0),
            ..Default::default()
        })
        .unwrap();
        // 3.0 / 2 = 1.5 < 2.0: the penalised token loses.
        assert_eq!(s.sample(&[1.0, 3.0, 2.0], &[1, 1]), 2);
        let mut v = vec![-1.0f32, 2.0];
        apply_repetition_penalty(&mut v, &[0, 1], 2.0);
        assert_eq!(v, [-2.0, 1.0]);
        // Presence once per generated token, frequency per occurrence; the prompt is free.
        let mut v = vec![0.0f32; 4];
        apply_openai_penalties(&mut v, &[1, 2, 2], 0.5, 0.25);
        assert_eq!(v, [0.0, -0.75, -1.0, 0.0]);
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: Some(2.0),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.sample_after(&[0.0, 3.0, 2.0], &[1, 1], &[1]), 2);
        assert_eq!(s.sample_after(&[0.0, 3.0, 2.0], &[1, 1], &[]), 1);
    }

    #[test]
    fn warpers_remove_the_right_tokens() {
        let mut v = vec![1.0f32, 4.0, 3.0, 2.0];
        top_k(&mut v, 2);
        assert_eq!(v, [f32::NEG_INFINITY, 4.0, 3.0, f32::NEG_INFINITY]);
        // probs of [ln .5, ln .3, ln .2]: top-p 0.7 keeps .5 and .3 (tail .2 ≤ .3).
        let mut v = vec![0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        top_p(&mut v, 0.7);
        assert!(v[0].is_finite() && v[1].is_finite() && v[2] == f32::NEG_INFINITY);
        let mut v = vec![0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        min_p(&mut v, 0.5); // threshold 0.25
        assert!(v[0].is_finite() && v[1].is_finite() && v[2] == f32::NEG_INFINITY);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_follows_distribution() {
        let params = SamplingParams {
            temperature: Some(1.0),
            seed: 42,
            ..Default::default()
        };
        let logits = [0.0f32, 1.0, 2.0];
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone()).unwrap();
            (0..3000)
                .map(|_| s.sample(&logits, &[]))
                .collect::<Vec<_>>()
        };
        let a = draw(&params);
        assert_eq!(a, draw(&params));
        assert_ne!(
            a,
            draw(&SamplingParams {
                seed: 43,
                ..params.clone()
            })
        );
        let frac2 = a.iter().filter(|&&t| t == 2).count() as f32 / a.len() as f32;
        let want = 2f32.exp() / (1.0 + 1f32.exp() + 2f32.exp());
        assert!((frac2 - want).abs() < 0.04, "{frac2} vs {want}");
        // top-k 1 makes sampling deterministic.
        let mut s = Sampler::new(SamplingParams {
            top_k: Some(1),
            ..params
        })
        .unwrap();
        assert!((0..50).all(|_| s.sample(&logits, &[]) == 2));
    }

    #[test]
    fn invalid_parameters_name_the_argument() {
        let e = Sampler::new(SamplingParams {
            top_p: Some(1.5),
            ..Default::default()
        })
        .err()
        .unwrap();
        assert!(e.to_string().contains("top_p"));
        let e = Sampler::new(SamplingParams {
            temperature: Some(-1.0),
            ..Default::default()
        })
        .err()
        .unwrap();
        assert!(e.to_string().contains("temperature"));
    }
}
