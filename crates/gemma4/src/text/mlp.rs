//! The gated feed-forward block `down(gelu_mul(gate(x)) · up(x))` (`Gemma4TextMLP`).
//! Its width comes from the layer's [`crate::config::LayerSpec`], which already doubles it
//! on KV-shared layers of `use_double_wide_mlp` models.

use candle_core::Tensor;

use crate::error::Result;
use crate::loading::weights::Weights;
use crate::nn::activation::gelu_mul;
use crate::nn::linear::Linear;

#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    /// The projections.
    pub fn linears(&self) -> Vec<&Linear> {
        vec![&self.gate_proj, &self.up_proj, &self.down_proj]
    }

    pub fn new(hidden: usize, intermediate: usize, w: &Weights) -> Result<Self> {
        Ok(Mlp {
            gate_proj: Linear::new(hidden, intermediate, w, "gate_proj")?,
            up_proj: Linear::new(hidden, intermediate, w, "up_proj")?,
            down_proj: Linear::new(intermediate, hidden, w, "down_proj")?,
        })
    }

    /// From already-built projections (the vision tower's clippable ones).
    pub fn from_parts(gate_proj: Linear, up_proj: Linear, down_proj: Linear) -> Self {
        Mlp {
            gate_proj,
            up_proj,
            down_proj,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = gelu_mul(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?;
        self.down_proj.forward(&h)
    }
}
