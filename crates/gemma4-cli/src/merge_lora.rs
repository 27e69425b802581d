//! `gemma4 merge-lora`: a checkpoint with LoRA adapters merged into its weights (as peft's
//! `merge_and_unload`), in the source's safetensors layout; `gemma4 quantize` turns it
//! into a GGUF.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;

use crate::args::{DtypeArg, LoraArg};

#[derive(Args)]
pub(crate) struct MergeLoraArgs {
    /// Source checkpoint directory (safetensors), or a hub id in the local cache.
    #[arg(long, value_parser = crate::args::model_dir)]
    pub(crate) model: PathBuf,
    /// Adapter directory (peft's format); `:SCALE` multiplies its updates. Repeatable:
    /// the updates of all are added.
    #[arg(long, value_name = "DIR[:SCALE]", value_parser = crate::args::lora_arg, required = true)]
    pub(crate) lora: Vec<LoraArg>,
    /// Output directory (the weights, and every other file of the source copied).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Store every tensor in this dtype (default: as the source stores each one).
    #[arg(long, value_enum)]
    pub(crate) dtype: Option<DtypeArg>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn cmd_merge_lora(a: MergeLoraArgs) -> Result<()> {
    if a.out.exists()
        && a.out
            .read_dir()
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        bail!("--out {}: exists and is not empty", a.out.display());
    }
    let adapters = a
        .lora
        .iter()
        .map(LoraArg::load)
        .collect::<Result<Vec<_>>>()?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("merging {bar:40} {pos}/{len} tensors")
                .expect("static template"),
        );
        bar
    });
    let progress = |done: usize, total: usize| {
        if let Some(b) = &bar {
            b.set_length(total as u64);
            b.set_position(done as u64);
        }
    };
    let report = gemma4::lora::merge::merge(
        &a.model,
        &adapters,
        &a.out,
        a.dtype.map(DtypeArg::dtype),
        &progress,
    )?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if a.json {
        println!(
            "{}",
            json!({
                "out": a.out.display().to_string(),
                "adapters": adapters.iter().map(|x| x.name.clone()).collect::<Vec<_>>(),
                "patched": report.patched,
                "tensors": report.tensors,
                "files": report.files,
            })
        );
    } else {
        eprintln!(
            "merged {} into {} of {} tensors; wrote {} ({} files)",
            adapters
                .iter()
                .map(|x| format!("`{}`", x.name))
                .collect::<Vec<_>>()
                .join(", "),
            report.patched,
            report.tensors,
            a.out.display(),
            report.files.len()
        );
    }
    Ok(())
}
