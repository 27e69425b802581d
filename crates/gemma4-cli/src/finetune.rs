//! `gemma4 finetune`: LoRA fine-tuning of the text decoder on JSONL data, writing a peft
//! adapter (`OUT/adapter_config.json`, `OUT/adapter_model.safetensors`), a resumable
//! checkpoint (`OUT/checkpoint/`), a JSONL log of every step (`OUT/train_log.jsonl`) and
//! the loss curve drawn from it (`OUT/loss.png`).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use gemma4::train::data::{load_jsonl_with, media_kinds};
use gemma4::train::{TrainConfig, Trainer};
use serde_json::json;

use crate::args::ModelArgs;

#[derive(Args)]
pub(crate) struct FinetuneArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Training data: JSONL rows of `messages`, `prompt` + `completion`, or `text`.
    #[arg(long)]
    pub(crate) data: PathBuf,
    /// Evaluation data (same shapes): its loss is reported every --eval-every steps.
    #[arg(long)]
    pub(crate) eval: Option<PathBuf>,
    /// Output directory: the adapter, the checkpoint, the log.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    pub(crate) r: usize,
    /// LoRA alpha (scaling alpha/r, or alpha/√r with --rslora).
    #[arg(long, default_value_t = 32.0)]
    pub(crate) alpha: f64,
    /// LoRA dropout: the probability of zeroing each input of an adapter (peft's
    /// `lora_dropout`; the masks are seeded, so --resume continues exactly).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) dropout: f64,
    /// rsLoRA scaling (alpha/√r).
    #[arg(long)]
    pub(crate) rslora: bool,
    /// Projections to adapt: module names (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,
    /// down_proj,per_layer_input_gate,...) or all-linear; on the MoE model, add `experts`
    /// (or experts.gate_up_proj / experts.down_proj) to adapt the fused experts, as peft's
    /// target_parameters.
    #[arg(long, value_delimiter = ',', default_value = "all-linear")]
    pub(crate) targets: Vec<String>,
    /// Encoders whose projections the targets also adapt: `vision`, `audio` (a tower and
    /// its projector; peft wraps a tower's clippable linears at their inner `.linear`).
    /// By default the encoders stay frozen.
    #[arg(long, value_delimiter = ',')]
    pub(crate) towers: Vec<String>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    pub(crate) lr: f64,
    /// Learning-rate decay after warmup: linear, cosine or constant.
    #[arg(long, default_value = "linear")]
    pub(crate) schedule: String,
    /// Warmup steps (linear from 0).
    #[arg(long, default_value_t = 0)]
    pub(crate) warmup: u64,
    /// Passes over the data.
    #[arg(long, default_value_t = 1)]
    pub(crate) epochs: usize,
    /// Optimizer steps to run (overrides --epochs).
    #[arg(long)]
    pub(crate) steps: Option<u64>,
    /// Examples per optimizer step (gradient accumulation; each runs as its own sequence).
    #[arg(long, default_value_t = 1)]
    pub(crate) batch: usize,
    /// Clip the gradients' global norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) clip: f64,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) weight_decay: f64,
    /// Rows longer than this many tokens are skipped (and counted).
    #[arg(long, default_value_t = 1024)]
    pub(crate) max_len: usize,
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
    /// Write the resumable checkpoint every K steps (and at the end).
    #[arg(long, value_name = "K")]
    pub(crate) save_every: Option<u64>,
    /// Report the --eval loss every K steps (and at the end).
    #[arg(long, value_name = "K")]
    pub(crate) eval_every: Option<u64>,
    /// Stop after K steps of this run, saving the checkpoint (the schedule still spans the
    /// whole run; continue it later with --resume).
    #[arg(long, value_name = "K")]
    pub(crate) stop_after: Option<u64>,
    /// Continue the run saved in OUT/checkpoint.
    #[arg(long)]
    pub(crate) resume: bool,
    /// Keep every layer's activations instead of recomputing them in backward (faster,
    /// more memory).
    #[arg(long)]
    pub(crate) no_recompute: bool,
    /// Pack each step's examples into sequences of up to --max-len tokens, each attending
    /// only within itself (padding-free batches): the same gradients, in fewer and larger
    /// products, which is faster for short rows.
    #[arg(long)]
    pub(crate) pack: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Training allocates and frees the same large activations in every layer. glibc hands
/// freed memory at the top of its heap back to the kernel, and serves blocks over its
/// (dynamic) mmap threshold with fresh mappings: the next allocation then faults in and
/// zeroes new pages, on one thread while the other waits (a tenth of a step at E2B
/// shapes). So the heap keeps what it frees, and blocks up to glibc's largest threshold
/// (32 MiB: every activation of E2B at 512 tokens) come from it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only changes the allocator's tunables; it is called before the
    // training allocates anything large.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

pub(crate) fn cmd_finetune(a: FinetuneArgs) -> Result<()> {
    keep_freed_memory();
    if !(0.0..1.0).contains(&a.dropout) {
        bail!("--dropout: {} is not a probability below 1", a.dropout);
    }
    if !a.model.lora.is_empty() {
        bail!("--lora: finetune trains a new adapter (use --resume to continue one)");
    }
    // The base stays frozen in the format it loads in (the checkpoint's own dtype, bf16
    // for the released ones, --dtype, or --quant); activations are f32 whatever it is.
    // The towers (frozen) are loaded only when the rows have media for them.
    let (mut vision, mut audio) = media_kinds(&a.data).context("--data")?;
    if let Some(p) = &a.eval {
        let (v, au) = media_kinds(p).context("--eval")?;
        (vision, audio) = (vision || v, audio || au);
    }
    let mut model = crate::args::load_with(&a.model, vision, audio)?;
    // Trained encoders encode each example's media again at every step.
    let keep = !a.towers.is_empty();
    let data = load_jsonl_with(&a.data, &model, a.max_len, keep).context("--data")?;
    for (line, why) in &data.skipped {
        eprintln!("warning: --data line {line} skipped: {why}");
    }
    let eval = a
        .eval
        .as_ref()
        .map(|p| load_jsonl_with(p, &model, a.max_len, keep).context("--eval"))
        .transpose()?;
    let config = TrainConfig {
        r: a.r,
        alpha: a.alpha,
        use_rslora: a.rslora,
        targets: a.targets.clone(),
        lr: a.lr,
        decay: a.schedule.clone(),
        warmup_steps: a.warmup,
        epochs: a.epochs,
        max_steps: a.steps,
        batch: a.batch,
        clip: (a.clip > 0.0).then_some(a.clip),
        weight_decay: a.weight_decay,
        seed: a.seed,
        recompute: !a.no_recompute,
        dropout: a.dropout,
        pack: a.pack.then_some(a.max_len),
        towers: a.towers.clone(),
    };
    let checkpoint = a.out.join("checkpoint");
    if a.resume && !checkpoint.is_dir() {
        bail!("--resume: {} does not exist", checkpoint.display());
    }
    if !a.resume && checkpoint.exists() {
        bail!(
            "--out {}: holds a checkpoint; pass --resume to continue it, or another --out",
            a.out.display()
        );
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("--out {}", a.out.display()))?;
    let mut trainer = Trainer::new(
        &mut model,
        config,
        data.examples.len(),
        a.resume.then_some(checkpoint.as_path()),
    )
    .map_err(|e| match a.resume {
        true => anyhow::anyhow!("--resume: {e}"),
        false => e.into(),
    })?;
    let base = a.model.model.display().to_string();
    let log_path = a.out.join("train_log.jsonl");
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| log_path.display().to_string())?;
    let total = trainer.total_steps();
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "training {bar:30} {pos}/{len} steps, eta {eta} {msg}",
            )
            .expect("static template"),
        );
        bar.set_position(trainer.step);
        bar
    });
    let first = trainer.step;
    let mut last = None;
    let mut eval_loss = None;
    let stop = a.stop_after.map(|k| first + k);
    while !trainer.is_done() && stop.is_none_or(|s| trainer.step < s) {
        let s = trainer.train_step(&model, &data.examples)?;
        writeln!(log, "{}", serde_json::to_string(&s)?)?;
        if let Some(b) = &bar {
            b.set_position(s.step);
            b.set_message(format!("loss {:.4}, {:.0} tok/s", s.loss, s.tokens_per_s));
        }
        let at = |k: Option<u64>| k.is_some_and(|k| k > 0 && s.step % k == 0);
        if let (Some(ev), true) = (&eval, at(a.eval_every)) {
            let l = trainer.eval_loss(&model, &ev.examples)?;
            writeln!(log, "{}", json!({"step": s.step, "eval_loss": l}))?;
            eval_loss = Some(l);
        }
        if at(a.save_every) {
            trainer.save_checkpoint(&model, &a.out, &base)?;
        }
        last = Some(s);
    }
    if let Some(ev) = &eval {
        let l = trainer.eval_loss(&model, &ev.examples)?;
        writeln!(log, "{}", json!({"step": trainer.step, "eval_loss": l}))?;
        eval_loss = Some(l);
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    trainer.save_checkpoint(&model, &a.out, &base)?;
    trainer.save_adapter(&a.out, &base)?;
    // The curve is a convenience: failing to draw it does not fail the run.
    let png = a.out.join("loss.png");
    let loss_curve = match crate::loss_plot::write_loss_plot(&log_path, &png) {
        Ok(drawn) => drawn.then(|| png.display().to_string()),
        Err(e) => {
            eprintln!("warning: {e:#}");
            None
        }
    };
    let summary = json!({
        "out": a.out.display().to_string(),
        "steps": trainer.step,
        "steps_this_run": trainer.step - first,
        "examples": data.examples.len(),
        "skipped": data.skipped.len(),
        "supervised_tokens": data.supervised(),
        "modules": trainer.adapter.modules.len(),
        "loss": last.as_ref().map(|s| s.loss),
        "eval_loss": eval_loss,
        "loss_curve": loss_curve,
    });
    if a.json {
        println!("{summary}");
    } else {
        eprintln!(
            "trained {} steps ({} examples, {} skipped) on {} projections; last loss {}; adapter in {}",
            trainer.step,
            data.examples.len(),
            data.skipped.len(),
            trainer.adapter.modules.len(),
            last.map_or("-".to_string(), |s| format!("{:.4}", s.loss)),
            a.out.display()
        );
    }
    Ok(())
}
