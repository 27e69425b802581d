//! `gemma4 quantize`: a checkpoint with the text decoder block-quantized.

use std::path::PathBuf;

use crate::args::load_progress;
use anyhow::Result;
use clap::Args;
use gemma4::quant::QuantType;
use serde_json::json;

#[derive(Args)]
pub(crate) struct QuantizeArgs {
    /// Source checkpoint directory (safetensors).
    #[arg(long, value_parser = crate::args::model_dir)]
    pub(crate) model: PathBuf,
    /// q8_0, q4_k, q6_k, q4_0 or q5_0.
    #[arg(long, value_name = "FORMAT")]
    pub(crate) quant: QuantType,
    /// Output directory.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Print the summary as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn cmd_quantize(a: QuantizeArgs) -> Result<()> {
    let report = gemma4::quant::checkpoint::quantize_checkpoint(
        &a.model,
        &a.out,
        a.quant,
        load_progress("quantizing"),
    )?;
    let size = |b: u64| match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
    };
    if a.json {
        let quantized: serde_json::Map<String, serde_json::Value> = report
            .quantized
            .iter()
            .map(|(q, n)| (q.to_string(), json!(n)))
            .collect();
        println!(
            "{}",
            json!({
                "out": a.out.join("model.gguf").display().to_string(),
                "quant": a.quant.to_string(),
                "tensors": report.tensors,
                "quantized": quantized,
                "bytes_in": report.bytes_in,
                "bytes_out": report.bytes_out,
            })
        );
    } else {
        let q: Vec<String> = report
            .quantized
            .iter()
            .map(|(q, n)| format!("{n} in {q}"))
            .collect();
        println!(
            "wrote {}: {} tensors ({}; the rest as stored), {} -> {}",
            a.out.join("model.gguf").display(),
            report.tensors,
            q.join(", "),
            size(report.bytes_in),
            size(report.bytes_out)
        );
    }
    Ok(())
}
