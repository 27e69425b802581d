//! The linear layer, `y = x Wᵀ (+ b)` with `W` stored `[out, in]` as in PyTorch. Every
//! projection of the model goes through this one type, which picks the kernel:
//!
//! - up to [`SMALL_BATCH`] rows (decoding one or a few sequences): the matrix–vector
//!   kernels of `backend::cpu::gemv` (bf16/f32), `q8_packed`, `kquant_gemv` and
//!   `qmatmul` (quantized), which read each weight row once for all the rows;
//! - any number of rows, where the CPU has AVX-512 VNNI: Q8_0, Q4_K and Q6_K repacked
//!   in tiles of sixteen rows (`backend::cpu::q8_tiles`, `kquant_tiles`), one integer
//!   kernel for decode batches and prefill; likewise bf16 with AVX512-BF16
//!   (`bf16_tiles`);
//! - otherwise candle's matmul (dense, or block-quantized), Q8_0/Q4_0/Q5_0 batches on
//!   weights dequantized to f32.
//!
//! It also covers `Gemma4ClippableLinear` (vision and audio towers): with
//! `use_clipped_linears` the input is clamped to `[input_min, input_max]` and the output to
//! `[output_min, output_max]`, bounds read from the checkpoint's 0-d buffers (±∞ = off).

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Storage, Tensor, D};
use half::bf16;

use crate::backend::cpu::bf16_tiles::Bf16Tiles;
use crate::backend::cpu::gemv::{gemv_bf16, gemv_f32, widen_bf16};
use crate::backend::cpu::kquant_tiles::KTiles;
use crate::backend::cpu::q8_packed::PackedQ8;
use crate::backend::cpu::qmatmul;
use crate::error::Result;
use crate::loading::weights::Weights;
use crate::text::model::round_to;

/// The most input rows the matrix–vector kernels take (decode batches); more rows go
/// through a GEMM. Up to here the kernels stay bound by reading the weights.
pub(crate) const SMALL_BATCH: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq)]
struct Clip {
    input: (f64, f64),
    output: (f64, f64),
}

/// A projection's `[out, in]` weight: a tensor at the compute dtype, or block-quantized
/// (GGML's layout, or repacked for this CPU's kernels: Q8_0, and Q4_K/Q6_K in tiles).
#[derive(Debug, Clone)]
pub enum LinearWeight {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
    PackedQ8(Arc<PackedQ8>),
    Tiled(Arc<KTiles>),
    /// bf16, tiled for AVX512-BF16 (`backend::cpu::bf16_tiles`).
    Bf16Tiled(Arc<Bf16Tiles>),
}

impl LinearWeight {
    /// A dense weight at the compute dtype: bf16 `[out, in]` matrices are tiled where the
    /// CPU has AVX512-BF16 (one kernel for decode batches and prefill), others kept as
    /// they are.
    pub fn dense(t: Tensor) -> Result<Self> {
        if t.dtype() == DType::BF16
            && t.rank() == 2
            && t.device().is_cpu()
            && crate::backend::cpu::bf16_tiles::available()
        {
            let (rows, cols) = t.dims2()?;
            if let Some(Some(tiles)) =
                with_elements(&t, |w: &[bf16]| Bf16Tiles::new(w, rows, cols))?
            {
                return Ok(LinearWeight::Bf16Tiled(Arc::new(tiles)));
            }
        }
        Ok(LinearWeight::Dense(t))
    }

    /// A block-quantized weight, repacked when this machine has a faster kernel for the
    /// repacked form (Q8_0 with AVX2, `backend::cpu::q8_packed`; Q4_K and Q6_K with
    /// AVX-512 VNNI, `backend::cpu::kquant_tiles`).
    pub fn quantized(q: Arc<QTensor>) -> Result<Self> {
        if PackedQ8::available() {
            if let Some(p) = PackedQ8::from_qtensor(&q)? {
                return Ok(LinearWeight::PackedQ8(Arc::new(p)));
            }
        }
        if let Some(t) = KTiles::from_qtensor(&q)? {
            return Ok(LinearWeight::Tiled(Arc::new(t)));
        }
        Ok(LinearWeight::Quantized(q))
    }

    /// Bytes the weight occupies (what decoding streams per token).
    pub fn size_in_bytes(&self) -> usize {
        match self {
            LinearWeight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            LinearWeight::Quantized(q) => q.storage_size_in_bytes(),
            LinearWeight::PackedQ8(p) => p.size_in_bytes(),
            LinearWeight::Tiled(t) => t.size_in_bytes(),
            LinearWeight::Bf16Tiled(t) => t.size_in_bytes(),
        }
    }

    /// Rows `ids` as a `[ids.len(), in]` tensor of `dtype` (a tied embedding table).
    pub fn rows(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        Ok(match self {
            LinearWeight::Dense(t) => t.index_select(ids, 0)?.to_dtype(dtype)?,
            LinearWeight::Quantized(q) => q.embedding(ids)?.to_dtype(dtype)?,
            LinearWeight::PackedQ8(_) | LinearWeight::Tiled(_) | LinearWeight::Bf16Tiled(_) => {
                let ids: Vec<u32> = ids.flatten_all()?.to_vec1()?;
                let (rows, cols) = self.shape();
                if let Some(&bad) = ids.iter().find(|&&i| i as usize >= rows) {
                    return Err(crate::error::Error::invalid_argument(
                        "token id",
                        format!("{bad} is outside the {rows} rows of the embedding"),
                    ));
                }
                let v = match self {
                    LinearWeight::PackedQ8(p) => p.dequantize_rows(Some(&ids)),
                    LinearWeight::Tiled(t) => t.dequantize_rows(&ids),
                    LinearWeight::Bf16Tiled(t) => {
                        let v = t.rows(&ids);
                        return Ok(Tensor::from_vec(v, (ids.len(), cols), &Device::Cpu)?
                            .to_dtype(dtype)?);
                    }
                    _ => unreachable!("matched above"),
                };
                Tensor::from_vec(v, (ids.len(), cols), &Device::Cpu)?.to_dtype(dtype)?
            }
        })
    }

    /// `[out, in]`.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            LinearWeight::Dense(t) => (t.dim(0).unwrap_or(0), t.dim(1).unwrap_or(0)),
            LinearWeight::Quantized(q) => q.shape().dims2().unwrap_or((0, 0)),
            LinearWeight::PackedQ8(p) => p.shape(),
            LinearWeight::Tiled(t) => t.shape(),
            LinearWeight::Bf16Tiled(t) => t.shape(),
        }
    }
}

/// The checkpoint tensor a projection's weight was loaded from: its full name and, for
/// one matrix of a stacked tensor (an MoE expert of `[E, out, in]`), its index.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorSource {
    pub name: String,
    pub index: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    clip: Option<Clip>,
    source: Option<TensorSource>,
}

/// `x Wᵀ` for `x` `[.., in]` and a dense `W` `[out, in]`.
fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let w = w.t()?;
    Ok(match x.rank() {
        2 => x.matmul(&w)?,
        _ => x.broadcast_matmul(&w)?,
    })
}

/// `f` on the elements of a CPU tensor's own view, when it is contiguous (a weight split
/// from an expert stack is a view into the whole stack's storage).
fn with_elements<T: candle_core::WithDType, R>(
    w: &Tensor,
    f: impl FnOnce(&[T]) -> R,
) -> Result<Option<R>> {
    let (storage, layout) = w.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    if !layout.is_contiguous() {
        return Ok(None);
    }
    let range = layout.start_offset()..layout.start_offset() + w.elem_count();
    Ok(Some(f(&cpu.as_slice::<T>()?[range])))
}

/// `x Wᵀ` with `w` an f32 copy of the weight made for this product (widened or
/// dequantized): the f32 GEMM, the result in `x`'s dtype.
fn matmul_t_f32(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(matmul_t(&x.to_dtype(DType::F32)?, w)?.to_dtype(x.dtype())?)
}

/// A bf16 weight widened to f32 for a batch with bf16 `x`, only `W`'s own elements and in
/// parallel; `None` where candle's matmul is left to run. candle 0.11 multiplies bf16 the
/// same way (both operands widened, the f32 GEMM, the result rounded to bf16), so the
/// numbers are its own, but it widens the whole storage behind each operand on one
/// thread: for an MoE expert that is its whole `[E, 2I, H]` stack, per expert and per
/// call (minutes per prompt at the 26B-A4B's shapes), and for a dense weight it held bf16
/// prefill to ~39 GFLOP/s.
fn widened_bf16(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    if x.dtype() != DType::BF16 || w.dtype() != DType::BF16 || !w.device().is_cpu() {
        return Ok(None);
    }
    match with_elements(w, |v: &[bf16]| widen_bf16(v))? {
        Some(wide) => Ok(Some(Tensor::from_vec(wide, w.shape(), w.device())?)),
        None => Ok(None),
    }
}

fn clamp(x: Tensor, (lo, hi): (f64, f64)) -> Result<Tensor> {
    Ok(match (lo.is_finite(), hi.is_finite()) {
        (false, false) => x,
        _ => x.clamp(lo, hi)?,
    })
}

impl Linear {
    /// Loads `{name}.weight` with shape `[out_dim, in_dim]`.
    /// The weight is block-quantized when the view `w` carries a quantization scheme.
    pub fn new(in_dim: usize, out_dim: usize, w: &Weights, name: &str) -> Result<Self> {
        let name = format!("{name}.weight");
        Ok(
            Linear::from_linear_weight(w.matrix(out_dim, in_dim, &name)?)
                .with_source(w.name(&name), None),
        )
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
        Self::from_linear_weight(LinearWeight::Dense(weight))
    }

    pub fn from_linear_weight(weight: LinearWeight) -> Self {
        Linear {
            weight,
            bias: None,
            clip: None,
            source: None,
        }
    }

    /// Records the checkpoint tensor the weight came from (`index`: which matrix of a
    /// stacked tensor).
    pub fn with_source(mut self, name: String, index: Option<usize>) -> Self {
        self.source = Some(TensorSource { name, index });
        self
    }

    /// The checkpoint tensor the weight came from, when loaded from one.
    pub fn source(&self) -> Option<&TensorSource> {
        self.source.as_ref()
    }

    pub fn weight(&self) -> &LinearWeight {
        &self.weight
    }

    /// The dense weight's dtype, or f32 for quantized weights (their kernels compute in f32).
    pub fn dtype(&self) -> DType {
        match &self.weight {
            LinearWeight::Dense(t) => t.dtype(),
            LinearWeight::Bf16Tiled(_) => DType::BF16,
            LinearWeight::Quantized(_) | LinearWeight::PackedQ8(_) | LinearWeight::Tiled(_) => {
                DType::F32
            }
        }
    }

    pub fn device(&self) -> Device {
        match &self.weight {
            LinearWeight::Dense(t) => t.device().clone(),
            LinearWeight::Quantized(q) => q.device(),
            LinearWeight::PackedQ8(_) | LinearWeight::Tiled(_) | LinearWeight::Bf16Tiled(_) => {
                Device::Cpu
            }
        }
    }

    /// Up to [`SMALL_BATCH`] rows of input on the CPU (decoding one or a few sequences):
    /// the matrix–vector kernels of `backend::cpu::gemv` (bf16/f32 weights),
    /// `backend::cpu::q8_packed`, `backend::cpu::kquant_gemv` and `backend::cpu::qmatmul` (quantized
    /// weights) instead of candle's matmul. They read each weight row once for all the
    /// rows and give each row exactly what it gets alone. `None` when they do not apply.
    fn gemv(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let n = x.dim(D::Minus1)?;
        // A width mismatch is left to matmul's shape error.
        let nx = x.elem_count() / n.max(1);
        // The tiled kernels are GEMMs too (prefill); the others are for decode batches.
        let any_batch = match &self.weight {
            LinearWeight::PackedQ8(p) => p.takes_any_batch(),
            LinearWeight::Tiled(_) => true,
            LinearWeight::Bf16Tiled(_) => x.dtype() == DType::BF16,
            _ => false,
        };
        if n == 0 || nx == 0 || (nx > SMALL_BATCH && !any_batch) || !x.device().is_cpu() {
            return Ok(None);
        }
        let xs = || -> Result<Vec<f32>> { Ok(x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?) };
        let y = match &self.weight {
            LinearWeight::Quantized(q) => match qmatmul::gemv(q, &xs()?, nx)? {
                Some(y) => y,
                None => return Ok(None),
            },
            LinearWeight::PackedQ8(p) => match p.gemv(&xs()?, nx) {
                Some(y) => y,
                None => return Ok(None),
            },
            LinearWeight::Tiled(t) => match t.gemm(&xs()?, nx) {
                Some(y) => y,
                None => return Ok(None),
            },
            // bf16 inputs only: their values are the kernel's operands as they are.
            LinearWeight::Bf16Tiled(t) if x.dtype() == DType::BF16 => {
                let xb: Vec<bf16> = x.flatten_all()?.to_vec1()?;
                match t.gemm(&xb, nx) {
                    Some(y) => y,
                    None => return Ok(None),
                }
            }
            LinearWeight::Bf16Tiled(_) => return Ok(None),
            LinearWeight::Dense(w) => {
                if !matches!(w.dtype(), DType::BF16 | DType::F32)
                    || !w.device().is_cpu()
                    || x.dtype() != w.dtype()
                    || w.rank() != 2
                    || w.dim(1)? != n
                {
                    return Ok(None);
                }
                let x = xs()?;
                let y = match w.dtype() {
                    DType::BF16 => with_elements(w, |w: &[bf16]| gemv_bf16(w, &x, nx))?,
                    _ => with_elements(w, |w: &[f32]| gemv_f32(w, &x, nx))?,
                };
                match y {
                    Some(y) => y,
                    None => return Ok(None),
                }
            }
        };
        let mut shape = x.dims().to_vec();
        *shape.last_mut().expect("rank ≥ 1") = y.len() / nx;
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
        let mut y = match (&self.weight, self.gemv(&x)?) {
            (_, Some(y)) => y,
            (LinearWeight::Dense(w), None) => match widened_bf16(&x, w)? {
                Some(wide) => matmul_t_f32(&x, &wide)?,
                None => matmul_t(&x, w)?,
            },
            // Batches with Q8_0/Q4_0/Q5_0 weights: dequantized to f32 for the GEMM (see
            // `backend::cpu::qmatmul`); the activations stay f32.
            (LinearWeight::PackedQ8(p), None) => {
                let w = Tensor::from_vec(p.dequantize_rows(None), p.shape(), &Device::Cpu)?;
                matmul_t_f32(&x, &w)?
            }
            // Other input dtypes, or a width mismatch (the shape error's message).
            (LinearWeight::Bf16Tiled(t), None) => {
                let (rows, cols) = t.shape();
                let all: Vec<u32> = (0..rows as u32).collect();
                let w = Tensor::from_vec(t.rows(&all), (rows, cols), &Device::Cpu)?;
                matmul_t(&x, &w.to_dtype(x.dtype())?)?
            }
            // Only where the width does not match (the shape error's message).
            (LinearWeight::Tiled(t), None) => {
                let (rows, _) = t.shape();
                let all: Vec<u32> = (0..rows as u32).collect();
                let w = Tensor::from_vec(t.dequantize_rows(&all), t.shape(), &Device::Cpu)?;
                matmul_t_f32(&x, &w)?
            }
            (LinearWeight::Quantized(q), None) if qmatmul::prefill_dequantizes(q) => {
                let w = match qmatmul::dequantize(q)? {
                    Some(w) => Tensor::from_vec(w, q.shape().dims2()?, &q.device())?,
                    None => q.dequantize(&q.device())?,
                };
                matmul_t_f32(&x, &w)?
            }
            (LinearWeight::Quantized(q), None) => {
                // The kernels take f32 rows (at least 2-D) and quantize them on the fly.
                let xf = x.to_dtype(DType::F32)?.contiguous()?;
                let y = match xf.rank() {
                    1 => QMatMul::QTensor(q.clone())
                        .forward(&xf.unsqueeze(0)?)?
                        .squeeze(0)?,
                    _ => QMatMul::QTensor(q.clone()).forward(&xf)?,
                };
                y.to_dtype(x.dtype())?
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The batched bf16 product widens only the weight's own view, in parallel, and gives
    /// candle's bf16 matmul bit for bit, for a plain weight and for one split from a stack.
    #[test]
    fn bf16_batches_match_candles_matmul_bit_for_bit() {
        let dev = Device::Cpu;
        let stack = Tensor::randn(0f32, 1.0, (3, 40, 24), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let x = Tensor::randn(0f32, 1.0, (5, 24), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        for w in [
            stack.get(0).unwrap().contiguous().unwrap().copy().unwrap(),
            stack.get(1).unwrap(),
            stack.get(2).unwrap(),
        ] {
            assert!(
                widened_bf16(&x, &w).unwrap().is_some(),
                "took candle's path"
            );
            let ours = Linear::from_weight(w.clone()).forward(&x).unwrap();
            let candle = x.matmul(&w.t().unwrap()).unwrap();
            assert_eq!(ours.dims(), [5, 40]);
            let (a, b) = (
                ours.to_dtype(DType::F32).unwrap().flatten_all().unwrap(),
                candle.to_dtype(DType::F32).unwrap().flatten_all().unwrap(),
            );
            assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
            // And the rank-3 input of the towers.
            let x3 = x.unsqueeze(0).unwrap();
            let y3 = Linear::from_weight(w).forward(&x3).unwrap();
            assert_eq!(y3.dims(), [1, 5, 40]);
        }
    }
}
