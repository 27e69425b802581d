//! A bias-free linear layer, `y = x Wᵀ` with `W` stored `[out, in]` as in PyTorch. Every
//! projection of the model goes through this one type, so faster kernels (quantized,
//! SIMD) can later be swapped in behind the same interface.

use candle_core::Tensor;

use crate::error::Result;
use crate::weights::Weights;

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
}

impl Linear {
    /// Loads `{name}.weight` with shape `[out_dim, in_dim]`.
    pub fn new(in_dim: usize, out_dim: usize, w: &Weights, name: &str) -> Result<Self> {
        Ok(Linear {
            weight: w.get(&[out_dim, in_dim], &format!("{name}.weight"))?,
        })
    }

    pub fn from_weight(weight: Tensor) -> Self {
        Linear { weight }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `x`: `[.., in]` → `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.t()?;
        Ok(match x.rank() {
            2 => x.matmul(&w)?,
            _ => x.broadcast_matmul(&w)?,
        })
    }
}
