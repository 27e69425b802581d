//! A native Rust engine for Google's Gemma 4 models, exact to Hugging Face `transformers`'
//! reference implementation (`transformers/models/gemma4/`, version 5.23.0).
//!
//! Layout: [`config`] parses checkpoints' `config.json`; [`weights`] memory-maps the
//! safetensors; the text decoder is [`text_model`] built from [`decoder_layer`],
//! [`attention`], [`mlp`], [`moe`], [`ple`], [`rope`] and [`norm`]; [`kv_cache`] and
//! [`generation`] run it incrementally with [`sampling`]; [`tokenizer`] and [`chat`] turn
//! text into ids; [`model`] ties a checkpoint directory together.
//!
//! Images and video: [`image_processor`] (with [`resize`]) and [`video`] turn files into
//! patches, [`vision`] (the tower) or [`image_embedder`] (the 12B's) turn patches into soft
//! tokens, [`multimodal_embedder`] projects them into the text width, and [`multimodal`]
//! expands the prompt's markers and splices the soft tokens in.
//!
//! Audio: [`audio`] decodes files (with [`resample`]), [`audio_features`] makes the
//! log-mel features (or the 12B's raw frames), [`audio_tower`] (with [`audio_attention`])
//! is the conformer, and [`audio_encoder`] ties a checkpoint's tower or embedder to
//! `embed_audio`.
//!
//! Speed: every projection goes through [`linear`], which picks the kernel: [`gemv`]
//! (bf16/f32), [`q8_packed`], [`kquant_gemv`] and [`qmatmul`] for one row (decoding,
//! with the input quantized by [`act_quant`]), candle's f32/quantized matmul for batches
//! (bf16 and Q8_0/Q4_0/Q5_0 weights widened or dequantized to f32 first); [`quant`] and
//! [`quantize`] make the block-quantized weights, [`activation`] has the vectorised GELU
//! and soft-cap. The kernels split their rows over rayon's pool. Call the model from a
//! worker of that pool (`rayon::ThreadPool::install`, as the CLI does): called from
//! outside, each projection is injected into the pool and the caller sleeps until it
//! finishes, two thread wake-ups per projection, which cost the CLI 6–13% of its q4_k
//! decode speed.

pub mod act_quant;
pub mod activation;
pub mod attention;
pub mod audio;
pub mod audio_attention;
pub mod audio_config;
pub mod audio_encoder;
pub mod audio_features;
pub mod audio_tower;
pub mod chat;
pub mod config;
pub mod cpu;
pub mod decoder_layer;
pub mod error;
pub mod gemv;
pub mod generation;
pub mod gguf;
pub mod gguf_metadata;
pub mod gguf_names;
pub mod image_embedder;
pub mod image_processor;
mod input;
pub mod kquant_gemv;
pub mod kv_cache;
pub mod linear;
pub mod mlp;
pub mod model;
pub mod moe;
pub mod multimodal;
pub mod multimodal_embedder;
pub mod norm;
pub mod npy;
pub mod ple;
pub mod q8_packed;
pub mod qmatmul;
pub mod quant;
pub mod quantize;
pub mod resample;
pub mod resize;
pub mod rope;
pub mod sampling;
pub mod sequence;
pub mod text_model;
pub mod tokenizer;
pub mod video;
pub mod vision;
pub mod vision_config;
pub mod weights;

pub use error::{Error, Result};
pub use model::{default_dtype, Gemma4, LoadOptions, Prompt};
