//! What the building blocks do when an input takes part in a gradient computation
//! (candle's [`Tensor::track_op`]): training runs the very modules inference runs, and
//! each block picks a differentiable path only then, so inference keeps its kernels.
//!
//! - A frozen projection ([`frozen_product`]) multiplies with the same kernels as
//!   inference for f32 weights (GGML blocks and bf16 weights are widened to f32 a block
//!   of rows at a time: the quantized kernels also quantize the input, the bf16 ones take
//!   bf16 rows) and gives back only its input's
//!   gradient, `dx = dy · W`, never one for the weight: candle's matmul backward would
//!   compute `dW` for a constant weight too, as many elements as the weight, for nothing.
//! - RMSNorm, `gelu(gate) · up` and the softmax run as fused operations with their own
//!   backward (`nn::fused`); RoPE and the soft cap take candle's composed
//!   (differentiable) forms, as do the others on inputs the fused ones do not take.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use crate::nn::linear::LinearWeight;

/// Whether `x` takes part in a gradient computation.
pub(crate) fn tracked(x: &Tensor) -> bool {
    x.track_op()
}

fn candle_err(e: crate::error::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// `x Wᵀ` for a weight that is not trained: forward with the inference kernels, backward
/// `dx = dy · W` only.
struct FrozenProduct(LinearWeight);

impl CustomOp1 for FrozenProduct {
    fn name(&self) -> &'static str {
        "frozen-product"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("frozen product: strided input".into()))?;
        let CpuStorage::F32(v) = s else {
            return Err(candle_core::Error::Msg(
                "frozen product: training computes activations in f32".into(),
            ));
        };
        // The quantized kernels also quantize the input rows: trained through, the product
        // would be a step function of the input, which its backward (the dequantized
        // weight) does not describe. Training multiplies its f32 inputs with the weight
        // widened to f32 instead (as QLoRA dequantizes), also for a bf16 weight, whose
        // kernels take bf16 rows.
        if self.0.is_quantized() || self.0.dtype() != DType::F32 {
            let (out, inp) = self.0.shape();
            let mut dims = l.dims().to_vec();
            let m = l.shape().elem_count() / inp.max(1);
            let y = dequantized_product(&self.0, &v[start..end], m).map_err(candle_err)?;
            *dims.last_mut().expect("rank ≥ 1") = out;
            return Ok((CpuStorage::F32(y), Shape::from(dims)));
        }
        let x = Tensor::from_slice(&v[start..end], l.shape(), &candle_core::Device::Cpu)?;
        let y = self
            .0
            .matmul_t(&x)
            .map_err(candle_err)?
            .to_dtype(DType::F32)?;
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1()?), shape))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        transposed_product(&self.0, dy)
            .map(Some)
            .map_err(candle_err)
    }
}

/// Rows per block when a weight is widened for a product: at most 4 Mi elements (16 MB).
/// Blocks stay below glibc's largest mmap threshold (32 MB), so their buffers are reused
/// from the heap; a larger block is a fresh mapping every time, whose pages the kernel
/// faults in and zeroes (a tenth of a training step's time at 16 Mi elements).
fn block_rows(w: &LinearWeight) -> usize {
    // Whole tiles of sixteen rows (`backend::cpu::dense_tiles`), widened a tile at a time.
    ((4usize << 20) / w.shape().1.max(1)).max(16) / 16 * 16
}

/// The f32 values of contiguous f32 tensor `t` (no copy).
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> crate::error::Result<R> {
    let t = t.to_dtype(DType::F32)?.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(CpuStorage::F32(v)) = &*storage else {
        return Err(crate::error::Error::invalid_argument(
            "tensor",
            "a product of training reads f32 CPU tensors",
        ));
    };
    let start = layout.start_offset();
    Ok(f(&v[start..start + t.elem_count()]))
}

/// `dst ← (read ? dst : 0) + lhs · rhs` for row-major `m×k` `lhs` (row stride `lhs_rs`),
/// `k×n` `rhs` given by its strides, into `m×n` `dst` (row stride `dst_rs`): the `gemm`
/// crate's product (candle's own), written in place, so that no block of a widened
/// weight costs a copy of its product, a concatenation or an addition.
#[allow(clippy::too_many_arguments)]
fn gemm_into(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    read: bool,
    lhs: &[f32],
    lhs_rs: usize,
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    // Every element the product touches lies inside the slices.
    assert!((m - 1) * dst_rs + n <= dst.len());
    assert!(k == 0 || (m - 1) * lhs_rs + k <= lhs.len());
    assert!(k == 0 || (k - 1) * rhs_rs + (n - 1) * rhs_cs < rhs.len());
    let threads = match m * n * k >= 1 << 20 {
        true => gemm::Parallelism::Rayon(rayon::current_num_threads()),
        false => gemm::Parallelism::None,
    };
    // SAFETY: the asserts above keep every index the strides reach inside the slices,
    // `dst` does not alias the inputs (it is borrowed mutably), and with `read` false
    // `gemm` writes `dst` without reading it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            read,
            lhs.as_ptr(),
            1,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            threads,
        )
    }
}

/// `x Wᵀ` with `W` dequantized to f32 block by block: `x` `m` rows of `in` → `[m, out]`
/// row-major, each block's product written straight into its columns.
fn dequantized_product(w: &LinearWeight, x: &[f32], m: usize) -> crate::error::Result<Vec<f32>> {
    let (out, inp) = w.shape();
    let mut y = vec![0f32; m * out];
    w.row_blocks(block_rows(w), |start, rows| {
        let nb = rows.dim(0)?;
        with_f32(&rows, |b| {
            // Bᵀ `[in, nb]` read from B `[nb, in]`: row stride 1, column stride `in`.
            gemm_into(
                (m, nb, inp),
                &mut y[start..],
                out,
                false,
                x,
                inp,
                b,
                (1, inp),
            )
        })
    })?;
    Ok(y)
}

/// `dy · W`: `dy` `[.., out]` → `[.., in]` in f32. The weight is widened to f32 a block of
/// rows at a time (see [`block_rows`]), so a quantized weight is never held dense; each
/// block's product accumulates in place.
pub(crate) fn transposed_product(w: &LinearWeight, dy: &Tensor) -> crate::error::Result<Tensor> {
    let (out, inp) = w.shape();
    let mut dims = dy.dims().to_vec();
    let m = dy.elem_count() / out.max(1);
    let mut dx = vec![0f32; m * inp];
    with_f32(dy, |g| -> crate::error::Result<()> {
        w.row_blocks(block_rows(w), |start, rows| {
            let nb = rows.dim(0)?;
            with_f32(&rows, |b| {
                gemm_into(
                    (m, inp, nb),
                    &mut dx,
                    inp,
                    start > 0,
                    &g[start..],
                    out,
                    b,
                    (inp, 1),
                )
            })
        })
    })??;
    *dims.last_mut().expect("rank ≥ 1") = inp;
    Ok(Tensor::from_vec(dx, dims, &w.device())?)
}

/// `x Wᵀ` with the frozen weight `w`, differentiable in `x` (f32).
pub(crate) fn frozen_product(w: &LinearWeight, x: &Tensor) -> crate::error::Result<Tensor> {
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    Ok(x.apply_op1(FrozenProduct(w.clone()))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn frozen_product_gives_the_input_gradient_only() {
        let d = Device::Cpu;
        let w = Tensor::new(&[[1f32, 2., 3.], [-1., 0., 2.]], &d).unwrap(); // [out 2, in 3]
        let lw = LinearWeight::plain(w.clone());
        let x = Var::new(&[[0.5f32, -1., 2.], [1., 1., 1.]], &d).unwrap();
        let y = frozen_product(&lw, x.as_tensor()).unwrap();
        let want: Vec<Vec<f32>> = x
            .as_tensor()
            .matmul(&w.t().unwrap())
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), want);
        // L = Σ y ⊙ c  ⇒  dL/dx = c W.
        let c = Tensor::new(&[[1f32, 2.], [3., -1.]], &d).unwrap();
        let grads = (y * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let gx: Vec<Vec<f32>> = grads.get(x.as_tensor()).unwrap().to_vec2().unwrap();
        assert_eq!(gx, c.matmul(&w).unwrap().to_vec2::<f32>().unwrap());
        // The weight, a constant, got no gradient.
        assert!(grads.get(&w).is_none());
    }

    #[test]
    fn a_quantized_weight_trains_through_its_dequantized_values() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let d = Device::Cpu;
        let w = Tensor::rand(-1f32, 1f32, (48, 256), &d).unwrap();
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4K] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let deq = q.dequantize(&d).unwrap();
            let lw = LinearWeight::quantized(std::sync::Arc::new(q)).unwrap();
            assert!(lw.is_quantized());
            let x = Var::from_tensor(&Tensor::rand(-1f32, 1f32, (5, 256), &d).unwrap()).unwrap();
            let y = frozen_product(&lw, x.as_tensor()).unwrap();
            let want = x.as_tensor().matmul(&deq.t().unwrap()).unwrap();
            assert!(max_diff(&y, &want) < 1e-4, "{dtype:?} forward");
            let c = Tensor::rand(-1f32, 1f32, (5, 48), &d).unwrap();
            let grads = (y * &c).unwrap().sum_all().unwrap().backward().unwrap();
            let gx = grads.get(x.as_tensor()).unwrap();
            assert!(
                max_diff(gx, &c.matmul(&deq).unwrap()) < 1e-4,
                "{dtype:?} backward"
            );
        }
    }

    #[test]
    fn transposed_product_works_in_row_blocks() {
        let d = Device::Cpu;
        // 40 × 600 000 elements: two blocks of rows.
        let (out, inp) = (40, 600_000);
        let w = Tensor::rand(-1f32, 1f32, (out, inp), &d).unwrap();
        let dy = Tensor::rand(-1f32, 1f32, (3, out), &d).unwrap();
        let got = transposed_product(&LinearWeight::plain(w.clone()), &dy).unwrap();
        let want = dy.matmul(&w).unwrap();
        let diff = max_diff(&got, &want);
        assert!(diff < 1e-4, "{diff}");
    }
}
