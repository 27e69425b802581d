//! The linear layer, `y = x Wᵀ (+ b)` with `W` stored `[out, in]` as in PyTorch. Every
//! projection of the model goes through this one type, so faster kernels (quantized,
//! SIMD) can later be swapped in behind the same interface.
//!
//! It also covers `Gemma4ClippableLinear` (vision and audio towers): with
//! `use_clipped_linears` the input is clamped to `[input_min, input_max]` and the output to
//! `[output_min, output_max]`, bounds read from the checkpoint's 0-d buffers (±∞ = off).

use candle_core::{DType, Storage, Tensor, D};
use half::bf16;

use crate::error::Result;
use crate::gemv::{gemv_bf16, gemv_f32};
use crate::text_model::round_to;
use crate::weights::Weights;

#[derive(Debug, Clone, Copy, PartialEq)]
struct Clip {
    input: (f64, f64),
    output: (f64, f64),
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    clip: Option<Clip>,
}

fn clamp(x: Tensor, (lo, hi): (f64, f64)) -> Result<Tensor> {
    Ok(match (lo.is_finite(), hi.is_finite()) {
        (false, false) => x,
        _ => x.clamp(lo, hi)?,
    })
}

impl Linear {
    /// Loads `{name}.weight` with shape `[out_dim, in_dim]`.
    pub fn new(in_dim: usize, out_dim: usize, w: &Weights, name: &str) -> Result<Self> {
        Ok(Linear {
            weight: w.get(&[out_dim, in_dim], &format!("{name}.weight"))?,
            bias: None,
            clip: None,
        })
    }

    /// Loads `{name}.weight` and `{name}.bias`.
    pub fn with_bias(in_dim: usize, out_dim: usize, w: &Weights, name: &str) -> Result<Self> {
        let mut l = Self::new(in_dim, out_dim, w, name)?;
        l.bias = Some(w.get(&[out_dim], &format!("{name}.bias"))?);
        Ok(l)
    }

    /// A `Gemma4ClippableLinear`: `{name}.linear.weight`, plus the four bounds
    /// `{name}.{input,output}_{min,max}` when `clipped`. Bounds are rounded to the compute
    /// dtype, as the reference casts its buffers with the model.
    pub fn clippable(
        in_dim: usize,
        out_dim: usize,
        w: &Weights,
        name: &str,
        clipped: bool,
    ) -> Result<Self> {
        let mut l = Self::new(in_dim, out_dim, w, &format!("{name}.linear"))?;
        if clipped {
            let bound = |b: &str| -> Result<f64> {
                let v = w.get_f32(&[], &format!("{name}.{b}"))?.to_scalar::<f32>()? as f64;
                Ok(if v.is_finite() {
                    round_to(w.dtype, v)
                } else {
                    v
                })
            };
            l.clip = Some(Clip {
                input: (bound("input_min")?, bound("input_max")?),
                output: (bound("output_min")?, bound("output_max")?),
            });
        }
        Ok(l)
    }

    pub fn from_weight(weight: Tensor) -> Self {
        Linear {
            weight,
            bias: None,
            clip: None,
        }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// One row of input with bf16 or f32 weights on the CPU (decoding): the matrix–vector
    /// kernels of [`crate::gemv`] instead of candle's matmul. `None` when they do not apply.
    fn gemv(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let w = &self.weight;
        if !matches!(w.dtype(), DType::BF16 | DType::F32)
            || !w.device().is_cpu()
            || x.dtype() != w.dtype()
        {
            return Ok(None);
        }
        let n = x.dim(D::Minus1)?;
        // One row only, and a matching width (a mismatch is left to matmul's shape error).
        if x.elem_count() != n || w.rank() != 2 || w.dim(1)? != n {
            return Ok(None);
        }
        let (storage, layout) = w.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            return Ok(None);
        };
        if !layout.is_contiguous() {
            return Ok(None);
        }
        let range = layout.start_offset()..layout.start_offset() + w.elem_count();
        let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let y = match w.dtype() {
            DType::BF16 => gemv_bf16(&cpu.as_slice::<bf16>()?[range], &xs),
            _ => gemv_f32(&cpu.as_slice::<f32>()?[range], &xs),
        };
        let mut shape = x.dims().to_vec();
        *shape.last_mut().expect("rank ≥ 1") = w.dim(0)?;
        Ok(Some(
            Tensor::from_vec(y, shape, x.device())?.to_dtype(x.dtype())?,
        ))
    }

    /// `x`: `[.., in]` → `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = match &self.clip {
            Some(c) => clamp(x.clone(), c.input)?,
            None => x.clone(),
        };
        let mut y = match self.gemv(&x)? {
            Some(y) => y,
            None => {
                let w = self.weight.t()?;
                match x.rank() {
                    2 => x.matmul(&w)?,
                    _ => x.broadcast_matmul(&w)?,
                }
            }
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        match &self.clip {
            Some(c) => clamp(y, c.output),
            None => Ok(y),
        }
    }
}
