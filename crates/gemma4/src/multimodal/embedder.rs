//! The projector from a tower's width into the text width (`Gemma4MultimodalEmbedder`,
//! checkpoint prefix `model.embed_vision.` / `model.embed_audio.`): an RMSNorm without
//! weight, then `embedding_projection` (no bias). Its output is spliced into the prompt
//! as is — unlike token embeddings it is not multiplied by √hidden.

use candle_core::Tensor;

use crate::error::Result;
use crate::loading::weights::Weights;
use crate::nn::linear::Linear;
use crate::nn::norm::RmsNorm;

#[derive(Debug, Clone)]
pub struct MultimodalEmbedder {
    norm: RmsNorm,
    projection: Linear,
}

impl MultimodalEmbedder {
    /// `w` is rooted at `model.embed_vision.` (or `embed_audio.`).
    pub fn new(in_dim: usize, text_hidden: usize, eps: f64, w: &Weights) -> Result<Self> {
        Ok(MultimodalEmbedder {
            norm: RmsNorm::without_scale(eps),
            projection: Linear::new(in_dim, text_hidden, w, "embedding_projection")?,
        })
    }

    pub fn linears(&self) -> Vec<&Linear> {
        vec![&self.projection]
    }

    pub fn device(&self) -> candle_core::Device {
        self.projection.device()
    }

    /// `[N, in_dim]` soft tokens → `[N, text_hidden]`, in the weights' dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(self.projection.dtype())?;
        self.projection.forward(&self.norm.forward(&x)?)
    }
}
