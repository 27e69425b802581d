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
        let x = Tensor::from_slice(&v[start..end], l.shape(), &candle_core::Device::Cpu)?;
        let y = match self.0.is_quantized() || self.0.dtype() != DType::F32 {
            // The quantized kernels also quantize the input rows: trained through, the
            // product would be a step function of the input, which its backward (the
            // dequantized weight) does not describe. Training multiplies its f32 inputs
            // with the weight widened to f32 instead (as QLoRA dequantizes), also for a
            // bf16 weight, whose kernels take bf16 rows.
            true => dequantized_product(&self.0, &x),
            false => self.0.matmul_t(&x),
        }
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

/// `x Wᵀ` with `W` dequantized to f32 block by block: `x` `[.., in]` → `[.., out]`.
fn dequantized_product(w: &LinearWeight, x: &Tensor) -> crate::error::Result<Tensor> {
    let (out, inp) = w.shape();
    let mut dims = x.dims().to_vec();
    let x2 = x.to_dtype(DType::F32)?.reshape(((), inp))?;
    let mut parts = Vec::new();
    w.row_blocks(block_rows(w), |_, rows| {
        parts.push(x2.matmul(&rows.t()?)?);
        Ok(())
    })?;
    *dims.last_mut().expect("rank ≥ 1") = out;
    Ok(Tensor::cat(&parts, 1)?.reshape(dims)?)
}

/// `dy · W`: `dy` `[.., out]` → `[.., in]` in f32. The weight is widened to f32 a block of
/// rows at a time (see [`block_rows`]), so a quantized weight is never held dense.
pub(crate) fn transposed_product(w: &LinearWeight, dy: &Tensor) -> crate::error::Result<Tensor> {
    let (out, inp) = w.shape();
    let mut dims = dy.dims().to_vec();
    let g = dy.to_dtype(DType::F32)?.reshape(((), out))?;
    let mut acc: Option<Tensor> = None;
    w.row_blocks(block_rows(w), |start, rows| {
        let part = g
            .narrow(1, start, rows.dim(0)?)?
            .contiguous()?
            .matmul(&rows)?;
        acc = Some(match acc.take() {
            None => part,
            Some(a) => (a + part)?,
        });
        Ok(())
    })?;
    let acc = match acc {
        Some(a) => a,
        None => Tensor::zeros((g.dim(0)?, inp), DType::F32, &w.device())?,
    };
    *dims.last_mut().expect("rank ≥ 1") = inp;
    Ok(acc.reshape(dims)?)
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
