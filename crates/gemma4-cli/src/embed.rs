//! `embed-image` and `embed-audio`: a modality's encoder on its own, soft tokens to .npy.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use serde_json::json;

use clap::Args;
use std::path::PathBuf;

use crate::args::{load, media_of, MediaArgs, ModelArgs};

/// Writes `[n, h]` f32 rows to `out` and returns `(n, h)`.
fn write_rows(rows: &[Tensor], out: &std::path::Path) -> Result<(usize, usize)> {
    let all = Tensor::cat(rows, 0)?;
    let (n, h) = all.dims2()?;
    gemma4::loading::npy::write_f32(out, &[n, h], &all.flatten_all()?.to_vec1()?)?;
    Ok((n, h))
}

#[derive(Args)]
pub(crate) struct EmbedImageArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[command(flatten)]
    pub(crate) media: MediaArgs,
    /// Output .npy file: the soft tokens of all images, concatenated ([tokens, hidden]).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Print a JSON summary (tokens per image, shape) instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub(crate) struct EmbedAudioArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[command(flatten)]
    pub(crate) media: MediaArgs,
    /// Output .npy file: the soft tokens of all clips, concatenated ([tokens, width]).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Write the encoder's output before `embed_audio` (the tower's soft tokens, or the
    /// 12B's raw frames) instead of the text-width soft tokens.
    #[arg(long)]
    pub(crate) before_projection: bool,
    /// Print a JSON summary (tokens per clip, shape) instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn cmd_embed_image(a: EmbedImageArgs) -> Result<()> {
    let mut model = load(&a.model, &a.media)?;
    let media = media_of(&a.media, &mut model)?;
    if media.images.is_empty() {
        bail!("--image is required");
    }
    let Some(enc) = model.vision.as_ref() else {
        bail!(
            "{}: this checkpoint has no vision encoder",
            a.model.model.display()
        );
    };
    let processed = model.process_images(&media.images)?;
    let mut rows = Vec::new();
    let mut per_image = Vec::new();
    for (p, path) in processed.iter().zip(&a.media.image) {
        let t = enc.embed(p)?.to_dtype(DType::F32)?;
        per_image.push(json!({
            "image": path.display().to_string(),
            "resized": [p.height, p.width],
            "soft_tokens": t.dim(0)?,
        }));
        rows.push(t);
    }
    let (n, h) = write_rows(&rows, &a.out)?;
    if a.json {
        println!(
            "{}",
            json!({"out": a.out.display().to_string(), "shape": [n, h], "images": per_image})
        );
    } else {
        for i in &per_image {
            eprintln!(
                "{}: resized to {}x{}, {} soft tokens",
                i["image"].as_str().unwrap_or(""),
                i["resized"][0],
                i["resized"][1],
                i["soft_tokens"]
            );
        }
        eprintln!("wrote {} ([{n}, {h}] f32)", a.out.display());
    }
    Ok(())
}

pub(crate) fn cmd_embed_audio(a: EmbedAudioArgs) -> Result<()> {
    if a.media.audio.is_empty() {
        bail!("--audio is required");
    }
    let mut model = load(&a.model, &a.media)?;
    let media = media_of(&a.media, &mut model)?;
    let Some(enc) = model.audio.as_ref() else {
        bail!(
            "{}: this checkpoint has no audio encoder",
            a.model.model.display()
        );
    };
    let features = model.process_audio(&media.audio)?;
    let mut rows = Vec::new();
    let mut per_clip = Vec::new();
    for ((f, clip), path) in features.iter().zip(&media.audio).zip(&a.media.audio) {
        let t = if a.before_projection {
            enc.encode(f)?
        } else {
            enc.embed(f)?
        };
        let t = t.to_dtype(DType::F32)?;
        per_clip.push(json!({
            "audio": path.display().to_string(),
            "sample_rate": clip.sample_rate,
            "seconds": clip.duration_s(),
            "soft_tokens": t.dim(0)?,
        }));
        rows.push(t);
    }
    let (n, h) = write_rows(&rows, &a.out)?;
    if a.json {
        println!(
            "{}",
            json!({"out": a.out.display().to_string(), "shape": [n, h], "audio": per_clip})
        );
    } else {
        for c in &per_clip {
            eprintln!(
                "{}: {:.2} s at {} Hz, {} soft tokens",
                c["audio"].as_str().unwrap_or(""),
                c["seconds"].as_f64().unwrap_or(0.0),
                c["sample_rate"],
                c["soft_tokens"]
            );
        }
        eprintln!("wrote {} ([{n}, {h}] f32)", a.out.display());
    }
    Ok(())
}
