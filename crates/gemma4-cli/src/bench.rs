//! `gemma4 bench`: load time, prefill and decode throughput (median of several runs after
//! warm-up) and peak RSS for a checkpoint's text decoder, on a deterministic random prompt.
//! Greedy decoding with no stop ids, so every run does the same work.

use std::time::Instant;

use anyhow::{bail, Result};
use gemma4::generate::sampling::SamplingParams;
use gemma4::generate::sequence::{step, Sequence};
use gemma4::generate::GenerateOptions;
use gemma4::text::model::PromptInput;
use gemma4::{Gemma4, LoadOptions};
use serde_json::json;

use clap::Args;

use crate::args::{DraftArgs, ModelArgs};
use gemma4::generate::speculative::{DraftOptions, DraftStats};

/// Peak resident set size of this process in bytes (`VmHWM`), where the OS reports it.
pub(crate) fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A fixed pseudo-random prompt of `n` ids in `[3, vocab)` (no pad/eos/bos); `seed`
/// tells the prompts of a batch apart.
fn prompt_ids(n: usize, vocab: usize, bos: u32, seed: u64) -> Vec<u32> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut ids = vec![bos];
    while ids.len() < n {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ids.push(3 + (state % (vocab as u64 - 3)) as u32);
    }
    ids.truncate(n);
    ids
}

/// Read bandwidth of this machine in bytes/s: `threads` threads summing a 1 GiB buffer
/// (16 independent lanes each, so the sum vectorises), median of 5 passes.
pub(crate) fn read_bandwidth(threads: usize) -> f64 {
    const N: usize = 1 << 28;
    let buf = vec![1.0f32; N];
    let chunk = N.div_ceil(threads.max(1));
    let mut rates = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let sum: f32 = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(chunk)
                .map(|c| {
                    s.spawn(move || {
                        let mut acc = [0f32; 16];
                        for block in c.chunks_exact(16) {
                            for (a, &x) in acc.iter_mut().zip(block) {
                                *a += x;
                            }
                        }
                        acc.iter().sum::<f32>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        std::hint::black_box(sum);
        rates.push((N * 4) as f64 / t.elapsed().as_secs_f64());
    }
    median(rates)
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

struct Run {
    prefill_s: f64,
    decode_s: f64,
}

/// One run: every prompt prefilled in one step (each sequence then chooses its first
/// token), then decode steps over all the sequences together until each has `gen` more
/// (`gen` steps, or fewer with a drafter).
fn one_run(
    model: &Gemma4,
    prompts: &[Vec<u32>],
    gen: usize,
    draft: Option<&DraftOptions>,
) -> Result<(Run, Option<DraftStats>)> {
    let tm = &model.text;
    let opts = GenerateOptions {
        max_new_tokens: gen + 1,
        sampling: SamplingParams::greedy(),
        stop_ids: vec![],
        adapters: model.all_adapters(),
        constraint: None,
        draft: draft.cloned(),
    };
    let mut seqs = prompts
        .iter()
        .map(|p| Sequence::new(tm, PromptInput::text(p.clone()), &opts))
        .collect::<gemma4::Result<Vec<_>>>()?;
    let mut batch: Vec<&mut Sequence> = seqs.iter_mut().collect();
    let t = Instant::now();
    step(tm, &mut batch, usize::MAX)?;
    let prefill_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    while batch.iter().any(|s| !s.is_finished()) {
        step(tm, &mut batch, usize::MAX)?;
    }
    let decode_s = t.elapsed().as_secs_f64();
    let mut stats: Option<DraftStats> = None;
    for s in &batch {
        if let Some(d) = s.draft_stats() {
            stats.get_or_insert_with(DraftStats::default).add(&d);
        }
    }
    Ok((
        Run {
            prefill_s,
            decode_s,
        },
        stats,
    ))
}

#[derive(Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Prompt length in tokens (a fixed pseudo-random prompt).
    #[arg(long, default_value_t = 128)]
    pub(crate) prompt_len: usize,
    /// Tokens generated per run (greedy, no stop).
    #[arg(long, default_value_t = 32)]
    pub(crate) gen: usize,
    /// Measured runs; the medians are reported.
    #[arg(long, default_value_t = 5)]
    pub(crate) runs: usize,
    /// Unmeasured runs first.
    #[arg(long, default_value_t = 1)]
    pub(crate) warmup: usize,
    /// Sequences decoded together, each with its own prompt and cache: every step is
    /// one forward pass over all of them. Reports aggregate and per-sequence tok/s.
    #[arg(long, default_value_t = 1)]
    pub(crate) batch: usize,
    /// Speculative decoding in the timed runs (on random weights nearly every draft is
    /// rejected: measure acceptance on a trained pair).
    #[command(flatten)]
    pub(crate) draft: DraftArgs,
    /// Also time one pass over k + 1 tokens against one decode step, k = 1..K (and one
    /// drafter step with --draft), and report the speedup those costs allow at
    /// acceptance rates 0.5, 0.7 and 0.9.
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub(crate) verify_max: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn cmd_bench(a: BenchArgs) -> Result<()> {
    if a.prompt_len == 0 || a.gen == 0 || a.runs == 0 || a.batch == 0 {
        bail!("--prompt-len, --gen, --runs and --batch must be at least 1");
    }
    let threads = candle_core::utils::get_num_threads();
    let compute = a.model.dtype()?;
    let t = Instant::now();
    let mut model = Gemma4::load(
        &a.model.model,
        LoadOptions {
            dtype: compute,
            vision: false,
            audio: false,
            quant: a.model.quant,
            limits: a.model.limits.limits(),
            ..Default::default()
        },
    )?;
    crate::args::attach_loras(&mut model, &a.model.lora)?;
    let load_s = t.elapsed().as_secs_f64();
    // Bytes a decode step streams: every text weight once as it is held in memory, less
    // what a step does not read (the experts a token is not routed to; an embedding table
    // beside a separate head). The per-layer-embedding table, one row per token, stays on
    // disk and is not in `text_bytes`.
    let held = model.text_bytes;
    let streamed = held.saturating_sub(model.text.unread_bytes_per_token());
    let cfg = model.text.config();
    let ctx = a.prompt_len + a.gen;
    if ctx > cfg.max_position_embeddings {
        bail!(
            "--prompt-len {} + --gen {} exceeds the model's context of {}",
            a.prompt_len,
            a.gen,
            cfg.max_position_embeddings
        );
    }
    let prompts: Vec<Vec<u32>> = (0..a.batch as u64)
        .map(|i| prompt_ids(a.prompt_len, cfg.vocab_size, cfg.bos_token_id, i))
        .collect();
    let n = a.batch as f64;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr()) && !a.json;
    let bar = tty.then(|| {
        let b = indicatif::ProgressBar::new((a.warmup + a.runs) as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("bench {bar:30} run {pos}/{len} {msg}")
                .expect("static template"),
        );
        b
    });
    let draft = a.draft.options(&model)?;
    if a.verify_max > gemma4::generate::speculative::MAX_DRAFT_TOKENS {
        bail!(
            "--verify-max is at most {}",
            gemma4::generate::speculative::MAX_DRAFT_TOKENS
        );
    }
    let mut runs = Vec::new();
    let mut draft_stats: Option<DraftStats> = None;
    for i in 0..a.warmup + a.runs {
        let (r, st) = one_run(&model, &prompts, a.gen, draft.as_ref())?;
        if let (Some(st), true) = (st, i >= a.warmup) {
            draft_stats.get_or_insert_with(DraftStats::default).add(&st);
        }
        if let Some(b) = &bar {
            b.set_message(format!(
                "prefill {:.1} tok/s, decode {:.2} tok/s",
                n * a.prompt_len as f64 / r.prefill_s,
                n * a.gen as f64 / r.decode_s
            ));
            b.inc(1);
        }
        if i >= a.warmup {
            runs.push(r);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let verify = match a.verify_max {
        0 => None,
        k => Some(crate::spec_bench::verify_costs(
            &model.text,
            &prompts[0],
            k,
            a.runs,
            a.warmup,
            draft.as_ref().map(|d| d.drafter.as_ref()),
        )?),
    };
    // Aggregate over the batch: tokens of every sequence per second.
    let prefill: Vec<f64> = runs
        .iter()
        .map(|r| n * a.prompt_len as f64 / r.prefill_s)
        .collect();
    let decode: Vec<f64> = runs.iter().map(|r| n * a.gen as f64 / r.decode_s).collect();
    let (p, d) = (median(prefill.clone()), median(decode.clone()));
    let rss = peak_rss_bytes();
    let bandwidth = read_bandwidth(threads);
    // One sequence's decode can at best run at bandwidth / bytes per token.
    let bound = bandwidth / streamed as f64;
    let per_seq = d / n;
    let dtype = match a.model.quant {
        Some(q) => q.to_string(),
        None => format!("{compute:?}").to_lowercase(),
    };
    if a.json {
        println!(
            "{}",
            json!({
                "model": a.model.model.display().to_string(),
                "dtype": dtype,
                "threads": threads,
                "prompt_len": a.prompt_len,
                "gen": a.gen,
                "batch": a.batch,
                "runs": a.runs,
                "warmup": a.warmup,
                "load_s": load_s,
                "prefill_tok_s": p,
                "decode_tok_s": d,
                "decode_tok_s_per_seq": per_seq,
                "prefill_tok_s_runs": prefill,
                "decode_tok_s_runs": decode,
                "peak_rss_bytes": rss,
                // The weights held in memory by design (the per-layer-embedding table
                // stays in the map, a row per token).
                "weight_bytes_held": held,
                "peak_rss_over_weights": rss.map(|b| b as f64 / held as f64),
                "streamed_bytes_per_token": streamed,
                "read_bandwidth_bytes_s": bandwidth,
                "decode_bound_tok_s": bound,
                "decode_fraction_of_bound": per_seq / bound,
                "draft": draft_stats.map(|s| crate::generate::draft_json(
                    &s,
                    draft.as_ref().map_or(0, |d| d.tokens)
                )),
                "speculative": verify.as_ref().map(crate::spec_bench::to_json),
            })
        );
    } else {
        println!(
            "{}: {dtype}, {threads} threads, {} sequence(s) of prompt {} + {} generated, median of {} runs after {} warm-up",
            a.model.model.display(),
            a.batch,
            a.prompt_len,
            a.gen,
            a.runs,
            a.warmup
        );
        println!("  load     {load_s:.2} s");
        println!("  prefill  {p:.1} tok/s");
        if a.batch > 1 {
            println!("  decode   {d:.2} tok/s in all, {per_seq:.2} tok/s per sequence");
        }
        println!(
            "  decode   {per_seq:.2} tok/s per sequence ({:.0}% of one stream's bandwidth bound {bound:.2} tok/s: {:.2} GB per token at {:.1} GB/s)",
            100.0 * per_seq / bound,
            streamed as f64 / 1e9,
            bandwidth / 1e9
        );
        if let (Some(s), Some(d)) = (draft_stats, &draft) {
            println!(
                "  draft    up to {} per round: {} of {} drafts accepted ({:.0}%), {:.2} per round",
                d.tokens,
                s.accepted,
                s.drafted,
                100.0 * s.acceptance_rate(),
                s.mean_accepted()
            );
        }
        if let Some(c) = &verify {
            crate::spec_bench::print(c);
        }
        if let Some(b) = rss {
            println!(
                "  peak RSS {:.2} GiB ({:.2}× the {:.2} GiB of weights held)",
                b as f64 / (1u64 << 30) as f64,
                b as f64 / held as f64,
                held as f64 / (1u64 << 30) as f64
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_is_deterministic_and_in_range() {
        let a = prompt_ids(50, 512, 2, 0);
        assert_eq!(a, prompt_ids(50, 512, 2, 0));
        assert_ne!(a, prompt_ids(50, 512, 2, 1));
        assert_eq!(a[0], 2);
        assert!(a[1..].iter().all(|&i| (3..512).contains(&i)));
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
