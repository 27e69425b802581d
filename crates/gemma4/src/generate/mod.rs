//! The generation loop for one sequence: one prefill over the prompt, then one token at a
//! time through the KV cache, streaming each token to a callback, stopping at any stop
//! id, at `max_new_tokens`, or when the model's context is full. A thin loop over
//! [`crate::generate::sequence`], which runs many sequences at once.

pub mod constraint;
pub mod engine;
pub mod sampling;
pub mod sequence;
pub mod speculative;

use std::time::Instant;

use crate::error::Result;
use crate::generate::sampling::SamplingParams;
use crate::generate::sequence::{step, Sequence};
use crate::lora::AdapterSet;
use crate::text::model::{PromptInput, TextModel};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Ids that end generation (every EOS id of the checkpoint); the stop id itself is
    /// included in the output.
    pub stop_ids: Vec<u32>,
    /// Holds the answer to a grammar (a JSON schema); `None`: free.
    pub constraint: Option<constraint::Constraint>,
    /// The attached LoRA adapters to run with ([`crate::Gemma4::attach_adapter`]);
    /// [`AdapterSet::NONE`]: the base model.
    pub adapters: AdapterSet,
    /// Speculative decoding with an assistant drafter; `None`: one token per step. Not
    /// used by sequences with a `constraint`.
    pub draft: Option<speculative::DraftOptions>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    StopToken,
    MaxTokens,
    ContextFull,
    /// The sequence could not go on (its constraint failed); [`Sequence::failure`] says why.
    Failed,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::StopToken => "stop_token",
            StopReason::MaxTokens => "max_new_tokens",
            StopReason::ContextFull => "context_full",
            StopReason::Failed => "failed",
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
    /// How speculative decoding went, with a drafter.
    pub draft: Option<speculative::DraftStats>,
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

/// Generates from a prepared (possibly multimodal) prompt: one [`Sequence`] stepped
/// until it stops, the prompt in one prefill. The prefill sees the image spans; decode
/// steps are causal, as the reference drops `mm_token_type_ids` after the first step.
pub fn generate_from(
    model: &TextModel,
    prompt: &PromptInput,
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<GenerationOutput> {
    let mut seq = Sequence::new(model, prompt.clone(), opts)?;
    let t0 = Instant::now();
    let mut prefill_secs = 0.0;
    let mut t1 = Instant::now();
    while !seq.is_finished() {
        let prefilling = !seq.is_prefilled();
        let out = step(model, &mut [&mut seq], usize::MAX)?;
        if prefilling && seq.is_prefilled() {
            prefill_secs = t0.elapsed().as_secs_f64();
            t1 = Instant::now();
        }
        for id in out.into_iter().flatten().flat_map(|o| o.tokens) {
            on_token(id)?;
        }
    }
    if let Some(why) = seq.failure() {
        return Err(crate::Error::Constraint(why.to_string()));
    }
    Ok(GenerationOutput {
        prompt_ids: prompt.ids.clone(),
        generated_ids: seq.generated().to_vec(),
        stop_reason: seq
            .stop_reason()
            .expect("the loop ran until the sequence stopped"),
        prefill_secs,
        decode_secs: t1.elapsed().as_secs_f64(),
        draft: seq.draft_stats(),
    })
}
