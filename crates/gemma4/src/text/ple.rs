//! Per-layer embeddings (PLE) of E2B/E4B (`get_per_layer_inputs` and
//! `project_per_layer_inputs` of `Gemma4TextModel`).
//!
//! token branch: `embed_tokens_per_layer[ids] · √P` (the scale cast to the activation dtype);
//! context branch: `per_layer_projection_norm(per_layer_model_projection(h0) · hidden^-½)`;
//! combined `(context + token) · 2^-½`, shaped `[S, L, P]`; layer ℓ reads `[:, ℓ, :]`.
//! The `[vocab, L·P]` table stays memory-mapped: only looked-up rows are read.

use candle_core::Tensor;

use crate::error::Result;
use crate::loading::weights::{RowTable, Weights};
use crate::nn::linear::Linear;
use crate::nn::norm::RmsNorm;

pub struct PerLayerEmbeddings {
    table: RowTable,
    projection: Linear,
    norm: RmsNorm,
    num_layers: usize,
    width: usize,
    token_scale: f64,
    projection_scale: f64,
}

impl PerLayerEmbeddings {
    /// The projection of the token embedding into every layer's input.
    pub fn linear(&self) -> &Linear {
        &self.projection
    }

    /// `w` is the text model root (tensors `embed_tokens_per_layer`, `per_layer_model_projection`,
    /// `per_layer_projection_norm`).
    pub fn new(
        vocab: usize,
        hidden: usize,
        num_layers: usize,
        width: usize,
        eps: f64,
        w: &Weights,
    ) -> Result<Self> {
        Ok(PerLayerEmbeddings {
            table: w.row_table([vocab, num_layers * width], "embed_tokens_per_layer.weight")?,
            projection: Linear::new(hidden, num_layers * width, w, "per_layer_model_projection")?,
            norm: RmsNorm::new(width, eps, w, "per_layer_projection_norm")?,
            num_layers,
            width,
            token_scale: crate::text::model::round_to(w.dtype, (width as f64).sqrt()),
            projection_scale: (hidden as f64).powf(-0.5),
        })
    }

    /// Per-layer inputs `[S, L, P]` for token ids `ids` (placeholders already replaced by the
    /// pad id) and scaled input embeddings `h0` `[S, hidden]`.
    pub fn forward(&self, ids: &[u32], h0: &Tensor) -> Result<Tensor> {
        let s = ids.len();
        let shape = (s, self.num_layers, self.width);
        let token = self
            .table
            .lookup(ids, h0.dtype(), h0.device())?
            .affine(self.token_scale, 0.0)?
            .reshape(shape)?;
        let ctx = self
            .projection
            .forward(h0)?
            .affine(self.projection_scale, 0.0)?
            .reshape(shape)?;
        let ctx = self.norm.forward(&ctx)?;
        Ok(((ctx + token)?.affine(std::f64::consts::FRAC_1_SQRT_2, 0.0))?)
    }
}
