//! `gemma4 info`: a checkpoint's sizes, layer plan and parameter counts.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use gemma4::config::{KvSource, ModelConfig};
use gemma4::loading::weights::Checkpoint;
use gemma4::model::ParameterCounts;
use serde_json::json;

#[derive(Args)]
pub(crate) struct InfoArgs {
    #[arg(long, value_parser = crate::args::model_dir)]
    pub(crate) model: PathBuf,
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn cmd_info(a: InfoArgs) -> Result<()> {
    let ckpt = Checkpoint::open(&a.model)?;
    let cfg = ModelConfig::for_checkpoint(&a.model, &ckpt)?;
    let counts = ParameterCounts::of(&ckpt, cfg.architecture);
    let t = &cfg.text;
    let layers: Vec<_> = t
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            json!({
                "layer": i,
                "type": l.layer_type.as_str(),
                "head_dim": l.head_dim,
                "kv_heads": l.num_kv_heads,
                "mlp_width": l.intermediate_size,
                "k_eq_v": l.k_eq_v,
                "kv_from": match l.kv_source { KvSource::Own => json!(i), KvSource::Shared { producer } => json!(producer) },
            })
        })
        .collect();
    let info = json!({
        "model": a.model.display().to_string(),
        "architecture": format!("{:?}", cfg.architecture),
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "num_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "sliding_window": t.sliding_window,
        "max_position_embeddings": t.max_position_embeddings,
        "final_logit_softcapping": t.final_logit_softcapping,
        "per_layer_embedding_width": t.hidden_size_per_layer_input,
        "num_kv_shared_layers": t.num_kv_shared_layers,
        "moe": t.moe.as_ref().map(|m| json!({"experts": m.num_experts, "top_k": m.top_k, "width": m.intermediate_size})),
        "has_vision": cfg.vision.is_some(),
        "has_audio": cfg.audio.is_some(),
        "audio": audio_summary(&cfg).map(|(kind, detail)| json!({"encoder": kind, "detail": detail})),
        "parameters": {"text": counts.text, "vision": counts.vision, "audio": counts.audio, "other": counts.other, "total": counts.total()},
        "layers": layers,
    });
    if a.json {
        println!("{info}");
        return Ok(());
    }
    print_info(&a.model, &cfg, &counts);
    Ok(())
}

/// (kind, one-line description) of the checkpoint's audio encoder.
fn audio_summary(cfg: &ModelConfig) -> Option<(&'static str, String)> {
    use gemma4::config::audio::AudioSpec;
    Some(match cfg.audio.as_ref()? {
        AudioSpec::Tower(a) => (
            "conformer",
            format!(
                "{} layers, width {}, {} heads, chunks of {} frames with {} left / {} right context, output {}",
                a.num_hidden_layers,
                a.hidden_size,
                a.num_attention_heads,
                a.attention_chunk_size,
                a.attention_context_left,
                a.attention_context_right,
                a.output_proj_dims
            ),
        ),
        AudioSpec::Unified(a) => (
            "frames",
            format!("raw frames of {} samples, no tower", a.audio_embed_dim),
        ),
    })
}

fn print_info(dir: &Path, cfg: &ModelConfig, c: &ParameterCounts) {
    let t = &cfg.text;
    println!("{}: {:?}", dir.display(), cfg.architecture);
    println!(
        "  hidden {}  layers {}  heads {}  vocab {}  window {}  context {}",
        t.hidden_size,
        t.num_hidden_layers,
        t.num_attention_heads,
        t.vocab_size,
        t.sliding_window,
        t.max_position_embeddings
    );
    if t.hidden_size_per_layer_input > 0 {
        println!(
            "  per-layer embeddings: {} per layer",
            t.hidden_size_per_layer_input
        );
    }
    if let Some(m) = &t.moe {
        println!(
            "  MoE: {} experts, top-{}, width {}",
            m.num_experts, m.top_k, m.intermediate_size
        );
    }
    if let Some((kind, detail)) = audio_summary(cfg) {
        println!("  audio ({kind}): {detail}");
    }
    println!(
        "  parameters: text {}  vision {}  audio {}  other {}  total {}",
        c.text,
        c.vision,
        c.audio,
        c.other,
        c.total()
    );
    println!("  layer  type     head_dim  kv_heads  mlp     kv");
    for (i, l) in t.layers.iter().enumerate() {
        let kv = match l.kv_source {
            KvSource::Own if l.k_eq_v => "own (k=v)".to_string(),
            KvSource::Own => "own".to_string(),
            KvSource::Shared { producer } => format!("from {producer}"),
        };
        let ty = if l.layer_type == gemma4::config::LayerType::Full {
            "full"
        } else {
            "sliding"
        };
        println!(
            "  {i:>5}  {ty:<8} {:>8}  {:>8}  {:<6}  {kv}",
            l.head_dim, l.num_kv_heads, l.intermediate_size
        );
    }
}
