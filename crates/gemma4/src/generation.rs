//! The generation loop: one prefill over the prompt, then one token at a time through the
//! KV cache, streaming each token to a callback, stopping at any stop id, at
//! `max_new_tokens`, or when the model's context is full.

use std::time::Instant;

use crate::error::{Error, Result};
use crate::sampling::{Sampler, SamplingParams};
use crate::text_model::{LogitsFor, PromptInput, TextModel};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Ids that end generation (every EOS id of the checkpoint); the stop id itself is
    /// included in the output.
    pub stop_ids: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    StopToken,
    MaxTokens,
    ContextFull,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::StopToken => "stop_token",
            StopReason::MaxTokens => "max_new_tokens",
            StopReason::ContextFull => "context_full",
        }
    }
}

#[derive(Debug, Clone)]
pub struct GenerationOutput {
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    pub stop_reason: StopReason,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

impl GenerationOutput {
    pub fn prefill_tok_s(&self) -> f64 {
        self.prompt_ids.len() as f64 / self.prefill_secs.max(1e-9)
    }

    /// Tokens per second over the decode steps (the first token comes from the prefill).
    pub fn decode_tok_s(&self) -> f64 {
        let steps = self.generated_ids.len().saturating_sub(1);
        if steps == 0 {
            0.0
        } else {
            steps as f64 / self.decode_secs.max(1e-9)
        }
    }
}

/// Generates from `prompt_ids`; `on_token` sees each new id as soon as it is chosen.
pub fn generate(
    model: &TextModel,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<GenerationOutput> {
    generate_from(
        model,
        &PromptInput::text(prompt_ids.to_vec()),
        opts,
        on_token,
    )
}

/// Generates from a prepared (possibly multimodal) prompt. The prefill sees the image
/// spans; decode steps are causal, as the reference drops `mm_token_type_ids` after the
/// first step.
pub fn generate_from(
    model: &TextModel,
    prompt: &PromptInput,
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<GenerationOutput> {
    let prompt_ids = &prompt.ids[..];
    let max = model.config().max_position_embeddings;
    if prompt_ids.is_empty() {
        return Err(Error::invalid_argument("prompt", "is empty"));
    }
    if prompt_ids.len() > max {
        return Err(Error::ContextTooLong {
            prompt: prompt_ids.len(),
            new: opts.max_new_tokens,
            max,
        });
    }
    let mut sampler = Sampler::new(opts.sampling.clone())?;
    let mut cache = model.new_cache();
    let mut history = prompt_ids.to_vec();
    let mut generated = Vec::new();

    let t0 = Instant::now();
    let mut logits = model.forward_input(prompt, &mut cache, LogitsFor::Last)?;
    let prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let stop_reason = loop {
        if generated.len() >= opts.max_new_tokens {
            break StopReason::MaxTokens;
        }
        let row: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
        let next = sampler.sample(&row, &history);
        generated.push(next);
        history.push(next);
        on_token(next)?;
        if opts.stop_ids.contains(&next) {
            break StopReason::StopToken;
        }
        if generated.len() >= opts.max_new_tokens {
            break StopReason::MaxTokens;
        }
        if cache.seq_len() >= max {
            break StopReason::ContextFull;
        }
        logits = model.forward(&[next], &mut cache, LogitsFor::Last)?;
    };
    Ok(GenerationOutput {
        prompt_ids: prompt_ids.to_vec(),
        generated_ids: generated,
        stop_reason,
        prefill_secs,
        decode_secs: t1.elapsed().as_secs_f64(),
    })
}
