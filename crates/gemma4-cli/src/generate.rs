//! `gemma4 generate`: streams a prompt's continuation.

use std::io::Write;

use crate::args::{
    load, media_of, prompt_of, DraftArgs, MediaArgs, ModelArgs, PromptArgs, SamplingArgs,
};
use anyhow::Result;
use clap::Args;
use gemma4::generate::speculative::DraftStats;
use gemma4::generate::{generate_from, GenerateOptions};
use gemma4::prompt::tokenizer::StreamDecoder;

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
    #[command(flatten)]
    pub(crate) sampling: SamplingArgs,
    #[command(flatten)]
    pub(crate) draft: DraftArgs,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let mut model = load(&a.model, &a.media)?;
    let prompt = prompt_of(&a.prompt, a.system.as_deref())?;
    let media = media_of(&a.media, &mut model)?;
    let input = model.prepare_with(&prompt, &media, model.all_adapters())?;
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling: a.sampling.params(&model),
        stop_ids: model.stop_ids(),
        adapters: model.all_adapters(),
        constraint: None,
        draft: a.draft.options(&model)?,
    };
    let tok = model.tokenizer.as_ref();
    let mut stream = StreamDecoder::new();
    let mut stdout = std::io::stdout();
    let on_token = |id| {
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
    };
    let out = generate_from(&model.text, &input, &opts, on_token)?;
    let stats = out.draft.zip(opts.draft.as_ref().map(|d| d.tokens));
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
            "draft": stats.map(|(s, k)| draft_json(&s, k)),
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
        if let Some((s, k)) = stats {
            eprintln!(
                "[draft: {} rounds of up to {k}, {} of {} drafts accepted ({:.0}%), {:.2} per round]",
                s.rounds,
                s.accepted,
                s.drafted,
                100.0 * s.acceptance_rate(),
                s.mean_accepted()
            );
        }
    }
    Ok(())
}

/// Speculative decoding's statistics as the JSON outputs report them.
pub(crate) fn draft_json(s: &DraftStats, draft_tokens: usize) -> serde_json::Value {
    json!({
        "draft_tokens": draft_tokens,
        "rounds": s.rounds,
        "drafted": s.drafted,
        "accepted": s.accepted,
        "acceptance_rate": s.acceptance_rate(),
        "mean_accepted_length": s.mean_accepted(),
    })
}
