//! `gemma4 generate`: streams a prompt's continuation.

use std::io::Write;

use crate::args::{load, media_of, prompt_of, MediaArgs, ModelArgs, PromptArgs};
use anyhow::Result;
use clap::Args;
use gemma4::generate::sampling::SamplingParams;
use gemma4::generate::{generate_from, GenerateOptions};
use gemma4::prompt::tokenizer::StreamDecoder;
use gemma4::Gemma4;
use serde_json::json;

#[derive(Args)]
pub(crate) struct GenerateArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[command(flatten)]
    pub(crate) prompt: PromptArgs,
    #[command(flatten)]
    pub(crate) media: MediaArgs,
    /// System message for --chat.
    #[arg(long)]
    pub(crate) system: Option<String>,
    #[arg(long, default_value_t = 128)]
    pub(crate) max_new_tokens: usize,
    /// Always pick the most likely token (overrides the checkpoint's sampling defaults).
    #[arg(long)]
    pub(crate) greedy: bool,
    /// Sampling temperature (0 = greedy). Unset sampling flags take the checkpoint's
    /// generation_config.json values.
    #[arg(long)]
    pub(crate) temperature: Option<f64>,
    #[arg(long)]
    pub(crate) top_k: Option<usize>,
    #[arg(long)]
    pub(crate) top_p: Option<f64>,
    #[arg(long)]
    pub(crate) min_p: Option<f64>,
    #[arg(long)]
    pub(crate) repetition_penalty: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    pub(crate) json: bool,
}

fn sampling_of(a: &GenerateArgs, model: &Gemma4) -> SamplingParams {
    let g = &model.generation_config;
    let any_flag =
        a.temperature.is_some() || a.top_k.is_some() || a.top_p.is_some() || a.min_p.is_some();
    if a.greedy || (!any_flag && !g.do_sample) {
        return SamplingParams {
            repetition_penalty: a.repetition_penalty,
            seed: a.seed,
            ..Default::default()
        };
    }
    SamplingParams {
        temperature: a.temperature.or(g.temperature).or(Some(1.0)),
        top_k: a.top_k.or(g.top_k),
        top_p: a.top_p.or(g.top_p),
        min_p: a.min_p.or(g.min_p),
        repetition_penalty: a.repetition_penalty.or(g.repetition_penalty),
        seed: a.seed,
        ..Default::default()
    }
}

pub(crate) fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let mut model = load(&a.model, &a.media)?;
    let prompt = prompt_of(&a.prompt, a.system.as_deref())?;
    let media = media_of(&a.media, &mut model)?;
    let input = model.prepare(&prompt, &media)?;
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling: sampling_of(&a, &model),
        stop_ids: model.stop_ids(),
    };
    let tok = model.tokenizer.as_ref();
    let mut stream = StreamDecoder::new();
    let mut stdout = std::io::stdout();
    let out = generate_from(&model.text, &input, &opts, |id| {
        if a.json {
            return Ok(());
        }
        match tok {
            Some(t) => {
                if let Some(piece) = stream.push(t, id)? {
                    print!("{piece}");
                }
            }
            None => print!("{id} "),
        }
        let _ = stdout.flush();
        Ok(())
    })?;
    let text = match tok {
        Some(t) => Some(t.decode(&out.generated_ids, true)?),
        None => None,
    };
    if a.json {
        let obj = json!({
            "prompt_ids": out.prompt_ids,
            "generated_ids": out.generated_ids,
            "text": text,
            "stop_reason": out.stop_reason.as_str(),
            "prefill_tok_s": out.prefill_tok_s(),
            "decode_tok_s": out.decode_tok_s(),
            "prefill_secs": out.prefill_secs,
            "decode_secs": out.decode_secs,
        });
        println!("{obj}");
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens, {} generated, stop: {}; prefill {:.1} tok/s, decode {:.1} tok/s]",
            out.prompt_ids.len(),
            out.generated_ids.len(),
            out.stop_reason.as_str(),
            out.prefill_tok_s(),
            out.decode_tok_s()
        );
    }
    Ok(())
}
