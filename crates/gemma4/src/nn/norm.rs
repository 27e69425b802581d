//! RMSNorm as `Gemma4RMSNorm`: computed in f32, `x · (mean(x²) + eps)^-½ · w` (plain `w`,
//! not Gemma 1–3's `1 + w`), cast back to the input dtype at the very end. The
//! `with_scale=False` variant (v_norm, router norm) has no weight at all.
//!
//! [`LayerNorm`] is `torch.nn.LayerNorm` (the 12B's image embedder): centred first, then
//! scaled by `(var + eps)^-½` — two passes in f32, not `E[x²] − E[x]²`, which loses
//! precision on inputs far from zero mean such as [0, 1] pixels.

use candle_core::{DType, Tensor, D};

use crate::error::Result;
use crate::loading::weights::Weights;

#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// f32 weight, or `None` for the scale-free variant.
    weight: Option<Tensor>,
    eps: f64,
}

impl RmsNorm {
    /// Loads `{name}.weight` of shape `[dim]`.
    pub fn new(dim: usize, eps: f64, w: &Weights, name: &str) -> Result<Self> {
        Ok(RmsNorm {
            weight: Some(w.get_f32(&[dim], &format!("{name}.weight"))?),
            eps,
        })
    }

    pub fn without_scale(eps: f64) -> Self {
        RmsNorm { weight: None, eps }
    }

    /// Normalises over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        if crate::nn::autograd::tracked(&xf) {
            if let Some(y) = crate::nn::fused::rms_norm(&xf, self.weight.as_ref(), self.eps)? {
                return Ok(y.to_dtype(dtype)?);
            }
        }
        let inv = xf
            .sqr()?
            .mean_keepdim(D::Minus1)?
            .affine(1.0, self.eps)?
            .powf(-0.5)?;
        let mut y = xf.broadcast_mul(&inv)?;
        if let Some(w) = &self.weight {
            y = y.broadcast_mul(w)?;
        }
        Ok(y.to_dtype(dtype)?)
    }
}

#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
}

impl LayerNorm {
    /// Loads `{name}.weight` and `{name}.bias` of shape `[dim]` (kept in f32).
    pub fn new(dim: usize, eps: f64, w: &Weights, name: &str) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.get_f32(&[dim], &format!("{name}.weight"))?,
            bias: Some(w.get_f32(&[dim], &format!("{name}.bias"))?),
            eps,
        })
    }

    /// `nn.LayerNorm(bias=False)`: loads `{name}.weight` only.
    pub fn without_bias(dim: usize, eps: f64, w: &Weights, name: &str) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.get_f32(&[dim], &format!("{name}.weight"))?,
            bias: None,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let xc = xf.broadcast_sub(&xf.mean_keepdim(D::Minus1)?)?;
        let rstd = xc
            .sqr()?
            .mean_keepdim(D::Minus1)?
            .affine(1.0, self.eps)?
            .sqrt()?
            .recip()?;
        let mut y = xc.broadcast_mul(&rstd)?.broadcast_mul(&self.weight)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        Ok(y.to_dtype(dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_formula_with_plain_weight() {
        let x = Tensor::new(&[[1.0f32, -2.0, 3.0, 0.5]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[0.5f32, 1.0, 2.0, -1.0], &Device::Cpu).unwrap();
        let n = RmsNorm {
            weight: Some(w),
            eps: 1e-6,
        };
        let y: Vec<f32> = n
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let ms = (1.0f32 + 4.0 + 9.0 + 0.25) / 4.0;
        let r = 1.0 / (ms + 1e-6).sqrt();
        let want = [0.5 * r, -2.0 * r, 6.0 * r, -0.5 * r];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn layer_norm_centres_and_scales() {
        let x = Tensor::new(&[[1000.5f32, 1001.5, 999.5, 1000.5]], &Device::Cpu).unwrap();
        let n = LayerNorm {
            weight: Tensor::new(&[1.0f32, 2.0, 1.0, 1.0], &Device::Cpu).unwrap(),
            bias: Some(Tensor::new(&[0.0f32, 0.0, 0.0, 0.5], &Device::Cpu).unwrap()),
            eps: 0.0,
        };
        let y: Vec<f32> = n
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // Centred: [0, 1, -1, 0], variance 0.5.
        let r = 1.0 / 0.5f32.sqrt();
        let want = [0.0, 2.0 * r, -r, 0.5];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{y:?}");
        }
    }

    #[test]
    fn without_scale_has_unit_rms_and_keeps_dtype() {
        let x = Tensor::new(&[[3.0f32, 4.0]], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let y = RmsNorm::without_scale(0.0).forward(&x).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        let y: Vec<f32> = y
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let rms = ((y[0] * y[0] + y[1] * y[1]) / 2.0).sqrt();
        assert!((rms - 1.0).abs() < 1e-2);
    }
}
