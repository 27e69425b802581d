//! The 12B's encoder-free image embedder (`Gemma4UnifiedVisionEmbedder`, checkpoint prefix
//! `model.vision_embedder.`), used instead of a vision tower: one soft token per
//! `k·patch` pixel crop.
//!
//! ```text
//! e = LN₂(patch_dense(LN₁(pixels)))            pixels in [0, 1], no 2x−1
//! e = pos_norm(e + pos_embedding[x, 0] + pos_embedding[y, 1])
//! soft = embed_vision(e)                         RMSNorm without weight → projection
//! ```
//! The three LayerNorms are `torch.nn.LayerNorm` defaults (eps 1e-5, weight and bias);
//! `patch_dense` has a bias. No pooling and no √d scaling.

use candle_core::{Device, Tensor};

use crate::config::vision::UnifiedVisionConfig;
use crate::error::{Error, Result};
use crate::loading::weights::Weights;
use crate::nn::linear::Linear;
use crate::nn::norm::LayerNorm;
use crate::vision::image_processor::ProcessedImage;

const LAYER_NORM_EPS: f64 = 1e-5;

pub struct ImageEmbedder {
    cfg: UnifiedVisionConfig,
    patch_ln1: LayerNorm,
    patch_dense: Linear,
    patch_ln2: LayerNorm,
    /// `[mm_posemb_size, 2, dim]`.
    pos_embedding: Tensor,
    pos_norm: LayerNorm,
    device: Device,
}

impl ImageEmbedder {
    /// Its one projection (`patch_dense`).
    pub fn linears(&self) -> Vec<&Linear> {
        vec![&self.patch_dense]
    }
}

fn layer_norm(dim: usize, w: &Weights, name: &str) -> Result<LayerNorm> {
    LayerNorm::new(dim, LAYER_NORM_EPS, w, name)
}

impl ImageEmbedder {
    /// `w` is rooted at `model.vision_embedder.`.
    pub fn new(cfg: &UnifiedVisionConfig, w: &Weights) -> Result<Self> {
        let mp = cfg.patch_size * cfg.pooling_kernel_size;
        let (patch_dim, d) = (mp * mp * 3, cfg.mm_embed_dim);
        Ok(ImageEmbedder {
            patch_ln1: layer_norm(patch_dim, w, "patch_ln1")?,
            patch_dense: Linear::with_bias(patch_dim, d, w, "patch_dense")?,
            patch_ln2: layer_norm(d, w, "patch_ln2")?,
            pos_embedding: w.get(&[cfg.mm_posemb_size, 2, d], "pos_embedding")?,
            pos_norm: layer_norm(d, w, "pos_norm")?,
            device: w.device.clone(),
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &UnifiedVisionConfig {
        &self.cfg
    }

    /// Embedded patches `[num_patches, mm_embed_dim]` (before the projector).
    pub fn forward(&self, img: &ProcessedImage) -> Result<Tensor> {
        let mp = self.cfg.patch_size * self.cfg.pooling_kernel_size;
        if img.patch_dim != 3 * mp * mp {
            return Err(Error::invalid_argument(
                "image",
                format!(
                    "patches of {} values do not fit the embedder's {mp}-pixel crops",
                    img.patch_dim
                ),
            ));
        }
        let n = img.num_patches();
        let max = img
            .positions
            .iter()
            .map(|p| p[0].max(p[1]))
            .max()
            .unwrap_or(0);
        if max >= self.cfg.mm_posemb_size {
            return Err(Error::invalid_argument(
                "image",
                format!(
                    "patch position {max} exceeds the embedder's position table of {}",
                    self.cfg.mm_posemb_size
                ),
            ));
        }
        let dtype = self.patch_dense.dtype();
        let x = Tensor::from_slice(&img.pixel_values, (n, img.patch_dim), &self.device)?
            .to_dtype(dtype)?;
        let h = self.patch_ln1.forward(&x)?;
        let h = self.patch_ln2.forward(&self.patch_dense.forward(&h)?)?;
        let table = |axis: usize| -> Result<Tensor> {
            let ids: Vec<u32> = img.positions.iter().map(|p| p[axis] as u32).collect();
            let ids = Tensor::new(ids.as_slice(), &self.device)?;
            Ok(self
                .pos_embedding
                .narrow(1, axis, 1)?
                .squeeze(1)?
                .contiguous()?
                .index_select(&ids, 0)?)
        };
        let pos = (table(0)? + table(1)?)?;
        self.pos_norm.forward(&(h + pos)?)
    }
}
