//! `gemma4 logits`: every prompt position's f32 logits to a .npy file.

use std::path::PathBuf;

use crate::args::{load, media_of, prompt_of, MediaArgs, ModelArgs, PromptArgs};
use anyhow::Result;
use clap::Args;
use gemma4::text::model::LogitsFor;

#[derive(Args)]
pub(crate) struct LogitsArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[command(flatten)]
    pub(crate) prompt: PromptArgs,
    #[command(flatten)]
    pub(crate) media: MediaArgs,
    /// Output .npy file.
    #[arg(long)]
    pub(crate) out: PathBuf,
}

pub(crate) fn cmd_logits(a: LogitsArgs) -> Result<()> {
    let mut model = load(&a.model, &a.media)?;
    let media = media_of(&a.media, &mut model)?;
    let input = model.prepare_with(&prompt_of(&a.prompt, None)?, &media, model.all_adapters())?;
    let logits = gemma4::lora::with_adapters(model.all_adapters(), || {
        model
            .text
            .forward_input(&input, &mut model.text.new_cache(), LogitsFor::All)
    })?;
    let (s, v) = logits.dims2()?;
    let data: Vec<f32> = logits.flatten_all()?.to_vec1()?;
    gemma4::loading::npy::write_f32(&a.out, &[s, v], &data)?;
    eprintln!("wrote {} ([{s}, {v}] f32)", a.out.display());
    Ok(())
}
