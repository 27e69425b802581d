//! A native Rust engine for Google's Gemma 4 models, exact to Hugging Face `transformers`'
//! reference implementation (`transformers/models/gemma4/`, version 5.23.0).
//!
//! Start with [`Gemma4::load`] (a checkpoint directory: config, tokenizer, chat template,
//! the text decoder and the image and audio encoders it has), [`Gemma4::prepare`] (a
//! prompt with its media, ready for the decoder) and [`generate()`] (one sequence), or
//! [`Sequence`] and [`step`] to run many sequences through one forward pass at a time.
//!
//! Layout, by concern:
//! - [`config`]: `config.json` and the per-layer plan (text, [`config::vision`],
//!   [`config::audio`]).
//! - [`loading`]: safetensors and GGUF files memory-mapped ([`loading::weights`]),
//!   llama.cpp's GGUF naming and metadata, `.npy` files.
//! - [`nn`]: the building blocks every tower uses: [`nn::linear`] (every projection, which
//!   picks the kernel), RMSNorm, RoPE, activations.
//! - [`text`]: the decoder ([`text::model`], [`text::decoder_layer`], attention, MLP, MoE,
//!   per-layer embeddings) and its per-sequence [`KvCache`].
//! - [`vision`] and [`audio`]: processors and towers, usable alone; [`multimodal`]
//!   expands a prompt's markers and splices the soft tokens in.
//! - [`prompt`]: tokenizer and chat template.
//! - [`limits`]: bounds on what untrusted input may cost (pixels, frames, audio, template
//!   work, prompt bytes), carried by [`LoadOptions`].
//! - [`mod@generate`]: sampling, sequences, the batched step, the one-sequence loop.
//! - [`draft`]: assistant drafters for speculative decoding
//!   ([`generate::speculative`]).
//! - [`lora`]: LoRA adapters in peft's format, attached unmerged or merged into a checkpoint.
//! - [`quant`]: the block formats, the quantization policy and `gemma4 quantize`.
//! - [`train`]: LoRA fine-tuning (loss, layer-wise backprop through the frozen decoder,
//!   AdamW, schedules).
//! - `backend` (crate-private): the CPU kernels behind [`nn::linear`], runtime-detected
//!   with portable fallbacks. They split their rows over rayon's pool: call the model from
//!   a worker of that pool (`rayon::ThreadPool::install`, as the CLI does); called from
//!   outside, each projection is injected into the pool and the caller sleeps until it
//!   finishes, two thread wake-ups per projection, which cost the CLI 6–13% of its q4_k
//!   decode speed.

pub mod audio;
mod backend;
pub mod config;
pub mod draft;
pub mod error;
pub mod generate;
pub mod limits;
pub mod loading;
pub mod lora;
pub mod model;
pub mod multimodal;
pub mod nn;
pub mod prompt;
pub mod quant;
pub mod text;
pub mod train;
pub mod vision;

pub use error::{Error, Result};
pub use generate::sampling::SamplingParams;
pub use generate::sequence::{step, Sequence, StepOutput};
pub use generate::{generate, generate_from, GenerateOptions, GenerationOutput, StopReason};
pub use limits::Limits;
pub use model::{default_dtype, Gemma4, LoadOptions, Media, Prompt};
pub use quant::QuantType;
pub use text::kv_cache::KvCache;
pub use text::model::{LogitsFor, PromptInput, StepInput, TextModel};
