//! The one trait behind every projection: a `[out, in]` matrix held in some format, with
//! the product `x Wᵀ` that [`crate::nn::linear::Linear`] calls and the row lookup of a
//! tied embedding. Each format brings its kernels:
//!
//! - [`DenseMatrix`]: a tensor at the compute dtype on any device: candle's matmul, and
//!   on the CPU the matrix–vector kernels of `cpu::gemv` for decode batches;
//! - [`GgmlMatrix`]: GGML's blocks as stored: `cpu::qmatmul`'s decode kernels, the
//!   dequantized f32 GEMM or candle's quantized matmul for batches;
//! - the CPU repacks: [`PackedQ8`] (Q8_0), [`KTiles`] (Q4_K/Q6_K), [`NibbleTiles`]
//!   (Q4_0/Q5_0), [`DenseTiles`] (bf16, f32),
//!   whose kernels take decode batches and prefill alike where the CPU has them.
//!
//! A GPU backend adds its formats beside these; nothing above this trait changes.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Storage, Tensor, D};
use half::bf16;

use crate::backend::cpu::dense_tiles::{DenseTiles, TileElem};
use crate::backend::cpu::gemv::{gemv_bf16, gemv_f32, widen_bf16};
use crate::backend::cpu::kquant_tiles::KTiles;
use crate::backend::cpu::q4_tiles::NibbleTiles;
use crate::backend::cpu::q8_packed::PackedQ8;
use crate::backend::cpu::qmatmul;
use crate::error::Result;

/// The most input rows the matrix–vector kernels take (decode batches); more rows go
/// through a GEMM. Up to here the kernels stay bound by reading the weights.
pub(crate) const SMALL_BATCH: usize = 16;

/// A `[out, in]` matrix and its products (see the module comment).
pub(crate) trait Matrix: std::fmt::Debug + Send + Sync {
    /// `[out, in]`.
    fn shape(&self) -> (usize, usize);
    /// Bytes held (what decoding streams per token).
    fn size_in_bytes(&self) -> usize;
    /// The dtype it computes in (f32 for the integer kernels).
    fn dtype(&self) -> DType;
    fn device(&self) -> Device;
    /// Rows `ids` (each `< out`, checked by the caller) as `[ids.len(), in]`.
    fn rows(&self, ids: &[u32]) -> Result<Tensor>;
    /// `x Wᵀ`: `x` `[.., in]` → `[.., out]` in `x`'s dtype.
    fn matmul_t(&self, x: &Tensor) -> Result<Tensor>;
    /// Rows `start..start + n` as f32 `[n, in]` (dequantized, widened): what a training
    /// product multiplies with, a block of rows at a time.
    fn rows_f32(&self, start: usize, n: usize) -> Result<Tensor> {
        let ids: Vec<u32> = (start as u32..(start + n) as u32).collect();
        Ok(self.rows(&ids)?.to_dtype(DType::F32)?)
    }
    /// GGML's blocks, for a matrix held as stored.
    fn ggml(&self) -> Option<&Arc<QTensor>> {
        None
    }
    /// Whether the weights are block-quantized (their kernels also quantize the input
    /// rows, so a product is not a smooth function of the input).
    fn quantized(&self) -> bool {
        false
    }
}

/// `f` on the elements of a CPU tensor's own view, when it is contiguous (a weight split
/// from an expert stack is a view into the whole stack's storage).
pub(crate) fn with_elements<T: candle_core::WithDType, R>(
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

/// `kernel(rows, n)` on the rows of a CPU `x` `[.., n]` as `T` values, `[.., out]` back
/// in `x`'s dtype; `None` when `x` is elsewhere or empty, or the kernel declines.
fn by_rows<T: candle_core::WithDType>(
    x: &Tensor,
    out: usize,
    kernel: impl FnOnce(&[T], usize) -> Option<Vec<f32>>,
) -> Result<Option<Tensor>> {
    let n = x.dim(D::Minus1)?;
    let nx = x.elem_count() / n.max(1);
    if n == 0 || nx == 0 || !x.device().is_cpu() {
        return Ok(None);
    }
    let xs: Vec<T> = x.to_dtype(T::DTYPE)?.flatten_all()?.to_vec1()?;
    let Some(y) = kernel(&xs, nx) else {
        return Ok(None);
    };
    let mut shape = x.dims().to_vec();
    *shape.last_mut().expect("rank ≥ 1") = out;
    Ok(Some(
        Tensor::from_vec(y, shape, x.device())?.to_dtype(x.dtype())?,
    ))
}

/// `x Wᵀ` for `x` `[.., in]` and a dense `W` `[out, in]`.
fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let w = w.t()?;
    Ok(match x.rank() {
        2 => x.matmul(&w)?,
        _ => x.broadcast_matmul(&w)?,
    })
}

/// `x Wᵀ` with `w` an f32 copy of the weight made for this product (widened or
/// dequantized): the f32 GEMM, the result in `x`'s dtype.
fn matmul_t_f32(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(matmul_t(&x.to_dtype(DType::F32)?, w)?.to_dtype(x.dtype())?)
}

/// The number of input rows of `x` `[.., n]`.
fn input_rows(x: &Tensor) -> Result<usize> {
    let n = x.dim(D::Minus1)?;
    Ok(x.elem_count() / n.max(1))
}

/// A tensor at the compute dtype.
#[derive(Debug)]
pub(crate) struct DenseMatrix(pub Tensor);

impl DenseMatrix {
    /// A bf16 weight widened to f32 for a batch with bf16 `x`, only `W`'s own elements
    /// and in parallel; `None` where candle's matmul is left to run. candle 0.11
    /// multiplies bf16 the same way (both operands widened, the f32 GEMM, the result
    /// rounded to bf16), so the numbers are its own, but it widens the whole storage
    /// behind each operand on one thread: for an MoE expert that is its whole
    /// `[E, 2I, H]` stack, per expert and per call (minutes per prompt at the 26B-A4B's
    /// shapes), and for a dense weight it held bf16 prefill to ~39 GFLOP/s.
    fn widened_bf16(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let w = &self.0;
        if x.dtype() != DType::BF16 || w.dtype() != DType::BF16 || !w.device().is_cpu() {
            return Ok(None);
        }
        match with_elements(w, |v: &[bf16]| widen_bf16(v))? {
            Some(wide) => Ok(Some(Tensor::from_vec(wide, w.shape(), w.device())?)),
            None => Ok(None),
        }
    }

    /// Up to [`SMALL_BATCH`] rows through the bf16/f32 matrix–vector kernels, which read
    /// each weight row once for all the rows and give each row what it gets alone.
    fn gemv(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let w = &self.0;
        if input_rows(x)? > SMALL_BATCH
            || !matches!(w.dtype(), DType::BF16 | DType::F32)
            || !w.device().is_cpu()
            || x.dtype() != w.dtype()
            || w.rank() != 2
            || w.dim(1)? != x.dim(D::Minus1)?
        {
            return Ok(None);
        }
        let out = w.dim(0)?;
        match w.dtype() {
            DType::BF16 => by_rows(x, out, |x: &[f32], nx| {
                with_elements(w, |w: &[bf16]| gemv_bf16(w, x, nx))
                    .ok()
                    .flatten()
            }),
            _ => by_rows(x, out, |x: &[f32], nx| {
                with_elements(w, |w: &[f32]| gemv_f32(w, x, nx))
                    .ok()
                    .flatten()
            }),
        }
    }
}

impl Matrix for DenseMatrix {
    fn shape(&self) -> (usize, usize) {
        self.0.dims2().unwrap_or((0, 0))
    }
    fn size_in_bytes(&self) -> usize {
        self.0.elem_count() * self.0.dtype().size_in_bytes()
    }
    fn dtype(&self) -> DType {
        self.0.dtype()
    }
    fn device(&self) -> Device {
        self.0.device().clone()
    }
    fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        let ids = Tensor::from_slice(ids, ids.len(), self.0.device())?;
        Ok(self.0.index_select(&ids, 0)?)
    }
    fn rows_f32(&self, start: usize, n: usize) -> Result<Tensor> {
        let rows = self.0.narrow(0, start, n)?;
        match rows.dtype() {
            // A view: the f32 product reads the weight itself.
            DType::F32 => Ok(rows),
            DType::BF16 => match with_elements(&rows, |v: &[bf16]| widen_bf16(v))? {
                Some(wide) => Ok(Tensor::from_vec(wide, rows.shape(), rows.device())?),
                None => Ok(rows.to_dtype(DType::F32)?),
            },
            _ => Ok(rows.to_dtype(DType::F32)?),
        }
    }
    fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.gemv(x)? {
            return Ok(y);
        }
        match self.widened_bf16(x)? {
            Some(wide) => matmul_t_f32(x, &wide),
            None => matmul_t(x, &self.0),
        }
    }
}

/// GGML's blocks as stored (formats and CPUs without a repacked kernel, and
/// `gemma4 quantize`, which writes them out).
#[derive(Debug)]
pub(crate) struct GgmlMatrix(pub Arc<QTensor>);

impl Matrix for GgmlMatrix {
    fn quantized(&self) -> bool {
        true
    }
    fn shape(&self) -> (usize, usize) {
        self.0.shape().dims2().unwrap_or((0, 0))
    }
    fn size_in_bytes(&self) -> usize {
        self.0.storage_size_in_bytes()
    }
    fn dtype(&self) -> DType {
        DType::F32
    }
    fn device(&self) -> Device {
        self.0.device()
    }
    fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        let ids = Tensor::from_slice(ids, ids.len(), &self.0.device())?;
        Ok(self.0.embedding(&ids)?)
    }
    fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        let q = &self.0;
        if input_rows(x)? <= SMALL_BATCH {
            let out = self.shape().0;
            if let Some(y) = by_rows(x, out, |x: &[f32], nx| {
                qmatmul::gemv(q, x, nx).ok().flatten()
            })? {
                return Ok(y);
            }
        }
        if qmatmul::prefill_dequantizes(q) {
            // Q8_0/Q4_0/Q5_0 batches: dequantized to f32 for the GEMM (see
            // `cpu::qmatmul`); the activations stay f32.
            let w = match qmatmul::dequantize(q)? {
                Some(w) => Tensor::from_vec(w, q.shape().dims2()?, &q.device())?,
                None => q.dequantize(&q.device())?,
            };
            return matmul_t_f32(x, &w);
        }
        // candle's kernels take f32 rows (at least 2-D) and quantize them on the fly.
        let xf = x.to_dtype(DType::F32)?.contiguous()?;
        let y = match xf.rank() {
            1 => QMatMul::QTensor(q.clone())
                .forward(&xf.unsqueeze(0)?)?
                .squeeze(0)?,
            _ => QMatMul::QTensor(q.clone()).forward(&xf)?,
        };
        Ok(y.to_dtype(x.dtype())?)
    }
    fn ggml(&self) -> Option<&Arc<QTensor>> {
        Some(&self.0)
    }
}

/// The product through a repack's own kernel, or where it declines (another width: the
/// shape error's message), candle's on the dequantized rows.
fn repacked_matmul_t(
    m: &dyn Matrix,
    x: &Tensor,
    kernel: impl FnOnce(&Tensor) -> Result<Option<Tensor>>,
) -> Result<Tensor> {
    if let Some(y) = kernel(x)? {
        return Ok(y);
    }
    let all: Vec<u32> = (0..m.shape().0 as u32).collect();
    matmul_t_f32(x, &m.rows(&all)?.to_dtype(DType::F32)?)
}

impl Matrix for PackedQ8 {
    fn quantized(&self) -> bool {
        true
    }
    fn shape(&self) -> (usize, usize) {
        PackedQ8::shape(self)
    }
    fn size_in_bytes(&self) -> usize {
        PackedQ8::size_in_bytes(self)
    }
    fn dtype(&self) -> DType {
        DType::F32
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        let v = self.dequantize_rows(Some(ids));
        Ok(Tensor::from_vec(
            v,
            (ids.len(), self.shape().1),
            &Device::Cpu,
        )?)
    }
    fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        // The row layout's kernel is for decode batches; larger ones multiply the
        // dequantized rows (f32 activations).
        if !self.takes_any_batch() && input_rows(x)? > SMALL_BATCH {
            let w = Tensor::from_vec(self.dequantize_rows(None), self.shape(), &Device::Cpu)?;
            return matmul_t_f32(x, &w);
        }
        let out = self.shape().0;
        repacked_matmul_t(self, x, |x| {
            by_rows(x, out, |x: &[f32], nx| self.gemv(x, nx))
        })
    }
}

/// `Matrix` for a CPU repack whose kernel takes f32 rows of any count
/// (`gemm(x, nx)`) and whose rows dequantize to f32 (`dequantize_rows(ids)`).
macro_rules! integer_tiles_matrix {
    ($t:ty) => {
        impl Matrix for $t {
            fn shape(&self) -> (usize, usize) {
                <$t>::shape(self)
            }
            fn size_in_bytes(&self) -> usize {
                <$t>::size_in_bytes(self)
            }
            fn dtype(&self) -> DType {
                DType::F32
            }
            fn device(&self) -> Device {
                Device::Cpu
            }
            fn rows(&self, ids: &[u32]) -> Result<Tensor> {
                let v = self.dequantize_rows(ids);
                Ok(Tensor::from_vec(
                    v,
                    (ids.len(), self.shape().1),
                    &Device::Cpu,
                )?)
            }
            fn quantized(&self) -> bool {
                true
            }
            fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
                let out = self.shape().0;
                repacked_matmul_t(self, x, |x| {
                    by_rows(x, out, |x: &[f32], nx| self.gemm(x, nx))
                })
            }
        }
    };
}
integer_tiles_matrix!(KTiles);
integer_tiles_matrix!(NibbleTiles);

impl<T: TileElem + candle_core::WithDType> Matrix for DenseTiles<T> {
    fn shape(&self) -> (usize, usize) {
        DenseTiles::shape(self)
    }
    fn size_in_bytes(&self) -> usize {
        DenseTiles::size_in_bytes(self)
    }
    fn dtype(&self) -> DType {
        T::DTYPE
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn rows_f32(&self, start: usize, n: usize) -> Result<Tensor> {
        let v = DenseTiles::rows_f32(self, start, n);
        Ok(Tensor::from_vec(v, (n, self.shape().1), &Device::Cpu)?)
    }
    fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        let v = DenseTiles::rows(self, ids);
        Ok(Tensor::from_vec(
            v,
            (ids.len(), self.shape().1),
            &Device::Cpu,
        )?)
    }
    fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        let out = self.shape().0;
        repacked_matmul_t(self, x, |x| {
            // Inputs of the weight's dtype only: their values are the kernel's operands
            // as they are.
            if x.dtype() != T::DTYPE {
                return Ok(None);
            }
            by_rows(x, out, |x: &[T], nx| self.gemm(x, nx))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::linear::Linear;

    /// The batched bf16 product widens only the weight's own view, in parallel, and gives
    /// candle's bf16 matmul bit for bit, for a plain weight and for one split from a stack.
    #[test]
    fn bf16_batches_match_candles_matmul_bit_for_bit() {
        let dev = Device::Cpu;
        let stack = Tensor::randn(0f32, 1.0, (3, 40, 24), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        // More rows than the matrix–vector kernels take, so the widened GEMM runs (those
        // kernels sum in another order: equal to candle's only up to bf16 rounding).
        let n = SMALL_BATCH + 4;
        let x = Tensor::randn(0f32, 1.0, (n, 24), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        for w in [
            stack.get(0).unwrap().contiguous().unwrap().copy().unwrap(),
            stack.get(1).unwrap(),
            stack.get(2).unwrap(),
        ] {
            assert!(
                DenseMatrix(w.clone()).widened_bf16(&x).unwrap().is_some(),
                "took candle's path"
            );
            let ours = Linear::from_weight(w.clone()).forward(&x).unwrap();
            let candle = x.matmul(&w.t().unwrap()).unwrap();
            assert_eq!(ours.dims(), [n, 40]);
            let (a, b) = (
                ours.to_dtype(DType::F32).unwrap().flatten_all().unwrap(),
                candle.to_dtype(DType::F32).unwrap().flatten_all().unwrap(),
            );
            assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
            // And the rank-3 input of the towers.
            let x3 = x.unsqueeze(0).unwrap();
            let y3 = Linear::from_weight(w).forward(&x3).unwrap();
            assert_eq!(y3.dims(), [1, n, 40]);
        }
    }
}
