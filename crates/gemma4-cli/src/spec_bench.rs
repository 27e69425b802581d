//! `gemma4 bench --verify-max K`: what speculative decoding can gain on this machine. One
//! target pass over `k + 1` tokens (the last kept token and `k` drafts) against one
//! decode step, at the same context, for k = 1..K; one drafter step when `--draft` is
//! given; and the speedup those costs allow at a given acceptance rate.

use std::time::Instant;

use anyhow::Result;
use gemma4::draft::Drafter;
use gemma4::generate::speculative::draft_kv;
use gemma4::text::model::{LogitsFor, StepInput, TextModel};
use serde_json::{json, Value};

use crate::bench::median;

/// Median seconds of the passes this machine runs for speculative decoding.
pub(crate) struct VerifyCosts {
    /// One decode step (one token).
    pub(crate) decode_s: f64,
    /// One pass over `k + 1` tokens, for k = 1..=K (index k − 1).
    pub(crate) verify_s: Vec<f64>,
    /// One drafter step.
    pub(crate) draft_s: Option<f64>,
}

/// Times each pass `runs` times after `warmup`, after a prefill of `prompt`; the cache
/// is cut back to the prompt after every pass, so each sees the same context.
pub(crate) fn verify_costs(
    tm: &TextModel,
    prompt: &[u32],
    kmax: usize,
    runs: usize,
    warmup: usize,
    drafter: Option<&Drafter>,
) -> Result<VerifyCosts> {
    let plen = prompt.len();
    let mut cache = tm.new_cache().with_spare(kmax + 1);
    cache.reserve(plen + kmax + 1)?;
    let mut batch = [StepInput {
        embeds: tm.embed(prompt)?,
        ple_ids: prompt,
        spans: None,
        cache: &mut cache,
        which: LogitsFor::Last,
    }];
    let hidden = tm
        .forward_batch_hidden(&mut batch)?
        .pop()
        .flatten()
        .map(|(_, h)| h)
        .ok_or_else(|| anyhow::anyhow!("the prefill returned no hidden state"))?;
    // What a first round reads, taken before the timed passes move the sliding rings.
    let kv = drafter
        .map(|d| draft_kv(d, &cache, 0, plen, plen + 1))
        .transpose()?;
    // Ids after the prompt: any in-vocabulary tokens do the same work.
    let ids: Vec<u32> = (0..=kmax as u32).map(|i| 3 + i).collect();
    let mut time = |n: usize| -> Result<f64> {
        let mut v = Vec::new();
        for i in 0..warmup + runs {
            let which = if n == 1 {
                LogitsFor::Last
            } else {
                LogitsFor::All
            };
            let t = Instant::now();
            let logits = tm.forward(&ids[..n], &mut cache, which)?;
            // Verification reads every row's logits back.
            std::hint::black_box(logits.to_vec2::<f32>()?);
            let s = t.elapsed().as_secs_f64();
            cache.truncate(plen)?;
            if i >= warmup {
                v.push(s);
            }
        }
        Ok(median(v))
    };
    let decode_s = time(1)?;
    let verify_s = (1..=kmax)
        .map(|k| time(k + 1))
        .collect::<Result<Vec<_>>>()?;
    let draft_s = match drafter.zip(kv) {
        None => None,
        Some((d, kv)) => {
            let embed = tm.embed(&ids[..1])?;
            let mut v = Vec::new();
            for i in 0..warmup + runs {
                let t = Instant::now();
                let step = d.step(&embed, &hidden, plen, &kv)?;
                std::hint::black_box(step.logits.to_vec2::<f32>()?);
                if i >= warmup {
                    v.push(t.elapsed().as_secs_f64());
                }
            }
            Some(median(v))
        }
    };
    Ok(VerifyCosts {
        decode_s,
        verify_s,
        draft_s,
    })
}

/// Expected tokens per round with `k` drafts when each is kept with probability `a`
/// (independently, up to the first rejection), the target's own token included.
pub(crate) fn tokens_per_round(a: f64, k: usize) -> f64 {
    (0..=k).map(|i| a.powi(i as i32)).sum()
}

/// The speedup over plain decoding for acceptance `a` with `k` drafts per round.
pub(crate) fn speedup(c: &VerifyCosts, a: f64, k: usize) -> f64 {
    let round = c.verify_s[k - 1] + k as f64 * c.draft_s.unwrap_or(0.0);
    tokens_per_round(a, k) * c.decode_s / round
}

pub(crate) const ACCEPTANCE: [f64; 3] = [0.5, 0.7, 0.9];

pub(crate) fn to_json(c: &VerifyCosts) -> Value {
    let verify: Vec<Value> = c
        .verify_s
        .iter()
        .enumerate()
        .map(|(i, s)| json!({"k": i + 1, "verify_s": s, "over_decode": s / c.decode_s}))
        .collect();
    let expected: serde_json::Map<String, Value> = ACCEPTANCE
        .iter()
        .map(|&a| {
            let by_k: Vec<f64> = (1..=c.verify_s.len()).map(|k| speedup(c, a, k)).collect();
            let best = (1..=by_k.len())
                .max_by(|&x, &y| by_k[x - 1].total_cmp(&by_k[y - 1]))
                .unwrap_or(1);
            (
                format!("{a}"),
                json!({"best_k": best, "speedup": by_k[best - 1], "by_k": by_k}),
            )
        })
        .collect();
    json!({
        "decode_step_s": c.decode_s,
        "draft_step_s": c.draft_s,
        "verify": verify,
        "expected_speedup": expected,
    })
}

/// The human-readable lines of [`to_json`].
pub(crate) fn print(c: &VerifyCosts) {
    println!(
        "  verify   one decode step {:.1} ms{}",
        c.decode_s * 1e3,
        c.draft_s
            .map(|d| format!(", one drafter step {:.2} ms", d * 1e3))
            .unwrap_or_default()
    );
    for (i, s) in c.verify_s.iter().enumerate() {
        println!(
            "           k={:<2} {} tokens in {:.1} ms ({:.2}× a decode step)",
            i + 1,
            i + 2,
            s * 1e3,
            s / c.decode_s
        );
    }
    for a in ACCEPTANCE {
        let (k, s) = (1..=c.verify_s.len())
            .map(|k| (k, speedup(c, a, k)))
            .max_by(|x, y| x.1.total_cmp(&y.1))
            .unwrap_or((1, 1.0));
        println!("  expected at acceptance {a}: {s:.2}× decode with k={k}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_speedup_counts_kept_drafts_and_the_round_cost() {
        assert!((tokens_per_round(0.5, 2) - 1.75).abs() < 1e-12);
        assert_eq!(tokens_per_round(1.0, 4), 5.0);
        let c = VerifyCosts {
            decode_s: 1.0,
            verify_s: vec![1.0, 1.2],
            draft_s: Some(0.1),
        };
        // k=2 at a=0.5: 1.75 tokens for 1.2 + 0.2 s.
        assert!((speedup(&c, 0.5, 2) - 1.25).abs() < 1e-12);
        assert!((speedup(&c, 0.0, 1) - 1.0 / 1.1).abs() < 1e-12);
    }
}
