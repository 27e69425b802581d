//! LoRA fine-tuning of the text decoder: the data ([`data`]: JSONL rows, loss masks), the
//! adapter being trained ([`adapter`], written in peft's format), the loss ([`loss`]), gradients by backprop through the frozen decoder
//! one layer at a time ([`gradients`]), torch's AdamW ([`adamw`]) and the learning-rate
//! [`schedule`]s.
//!
//! The base model is frozen in whatever format it was loaded (f32 or GGML blocks):
//! frozen projections give back only their input's gradient
//! (`crate::nn::autograd`). Activations are f32.

pub mod adamw;
pub mod adapter;
pub mod data;
pub mod gradients;
pub mod loss;
pub mod schedule;
pub mod trainer;

pub use adamw::{clip_grad_norm, AdamW, AdamWConfig};
pub use adapter::{LoraSpec, TrainableAdapter};
pub use gradients::{
    media_sequence_gradients, media_sequence_loss, sequence_gradients, sequence_loss, Example,
    GradientOptions, SequenceGradients,
};
pub use schedule::{Decay, Schedule};
pub use trainer::{Cursor, StepLog, TrainConfig, Trainer};
