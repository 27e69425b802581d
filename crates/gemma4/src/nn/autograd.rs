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
//! - A frozen projection with the one adapter being trained ([`lora_product`]) is one
//!   operation: its graph keeps the input and output only, not the base product, the
//!   update and their sum (16 → 11 GiB at E2B's shapes, 512 tokens, without
//!   recomputation).
//! - RMSNorm, `gelu(gate) · up` and the softmax run as fused operations with their own
//!   backward (`nn::fused`); RoPE and the soft cap take candle's composed
//!   (differentiable) forms, as do the others on inputs the fused ones do not take.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Tensor};

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
        let x = cpu_f32(s, l, "frozen product")?;
        let (y, shape) = frozen_forward(&self.0, x, l.shape()).map_err(candle_err)?;
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        transposed_product(&self.0, dy)
            .map(Some)
            .map_err(candle_err)
    }
}

/// The f32 elements of a contiguous CPU operand of a custom operation.
fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: strided input")))?;
    match s {
        CpuStorage::F32(v) => Ok(&v[start..end]),
        _ => Err(candle_core::Error::Msg(format!(
            "{op}: training computes activations in f32"
        ))),
    }
}

/// The CPU storage under a tensor's storage guard.
fn cpu(s: &candle_core::Storage) -> candle_core::Result<&CpuStorage> {
    match s {
        candle_core::Storage::Cpu(c) => Ok(c),
        _ => Err(candle_core::Error::Msg(
            "training products take CPU tensors".into(),
        )),
    }
}

/// `x Wᵀ` for `x` of `shape` (`[.., in]`, f32) → `([.., out]` values, shape`)`.
fn frozen_forward(
    w: &LinearWeight,
    x: &[f32],
    shape: &Shape,
) -> crate::error::Result<(Vec<f32>, Shape)> {
    let (out, inp) = w.shape();
    let mut dims = shape.dims().to_vec();
    *dims.last_mut().expect("rank ≥ 1") = out;
    // The quantized kernels also quantize the input rows: trained through, the product
    // would be a step function of the input, which its backward (the dequantized
    // weight) does not describe. Training multiplies its f32 inputs with the weight
    // widened to f32 instead (as QLoRA dequantizes), also for a bf16 weight, whose
    // kernels take bf16 rows.
    if w.is_quantized() || w.dtype() != DType::F32 {
        let m = x.len() / inp.max(1);
        return Ok((dequantized_product(w, x, m)?, Shape::from(dims)));
    }
    let x = Tensor::from_slice(x, shape, &candle_core::Device::Cpu)?;
    let y = w.matmul_t(&x)?.to_dtype(DType::F32)?;
    Ok((y.flatten_all()?.to_vec1()?, Shape::from(dims)))
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

/// A matrix operand of [`gemm_into`]: its elements and its row and column strides.
type Operand<'a> = (&'a [f32], (usize, usize));

/// `dst ← (read ? dst : 0) + scale · lhs · rhs` for `m×k` `lhs` and `k×n` `rhs` given by
/// their strides, into row-major `m×n` `dst` (row stride `dst_rs`): the `gemm` crate's
/// product (candle's own), written in place, so that no block of a widened weight costs
/// a copy of its product, a concatenation or an addition.
fn gemm_into(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (&mut [f32], usize),
    read: bool,
    (lhs, (lhs_rs, lhs_cs)): Operand,
    (rhs, (rhs_rs, rhs_cs)): Operand,
    scale: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    // Every element the product touches lies inside the slices.
    assert!((m - 1) * dst_rs + n <= dst.len());
    assert!(k == 0 || (m - 1) * lhs_rs + (k - 1) * lhs_cs < lhs.len());
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
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            scale,
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
                (&mut y[start..], out),
                false,
                (x, (inp, 1)),
                (b, (1, inp)),
                1.0,
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
    let dx = with_f32(dy, |g| transposed_values(w, g, m))??;
    *dims.last_mut().expect("rank ≥ 1") = inp;
    Ok(Tensor::from_vec(dx, dims, &w.device())?)
}

/// `g · W` for `m` rows `g` of `out` values: `m` rows of `in`.
fn transposed_values(w: &LinearWeight, g: &[f32], m: usize) -> crate::error::Result<Vec<f32>> {
    let (out, inp) = w.shape();
    let mut dx = vec![0f32; m * inp];
    w.row_blocks(block_rows(w), |start, rows| {
        let nb = rows.dim(0)?;
        with_f32(&rows, |b| {
            gemm_into(
                (m, inp, nb),
                (&mut dx, inp),
                start > 0,
                (&g[start..], (out, 1)),
                (b, (inp, 1)),
                1.0,
            )
        })
    })?;
    Ok(dx)
}

/// `x Wᵀ` with the frozen weight `w`, differentiable in `x` (f32).
pub(crate) fn frozen_product(w: &LinearWeight, x: &Tensor) -> crate::error::Result<Tensor> {
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    Ok(x.apply_op1(FrozenProduct(w.clone()))?)
}

/// `x Wᵀ + s · ((x ⊙ mask) Aᵀ) Bᵀ`: a frozen projection and one LoRA update (`A` `[r, in]`,
/// `B` `[out, r]`, trained) as one operation. Composed of candle's operations, the update
/// keeps four `[.., out]` tensors per projection alive until backward (the base output,
/// `(xAᵀ)Bᵀ`, its scaled copy and the sum), and its backward makes as many again; this
/// one keeps only its inputs and output, and its backward recomputes the `[.., r]` factor
/// `xAᵀ`, which costs `r/out` of the base product.
struct LoraProduct {
    w: LinearWeight,
    scaling: f32,
    /// LoRA dropout's mask of the update's input (`0` or `1/(1 − p)`, the shape of `x`).
    mask: Option<Vec<f32>>,
}

impl LoraProduct {
    /// The update's input: `x`, or `x ⊙ mask` under dropout.
    fn update_input<'a>(&self, x: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        match &self.mask {
            Some(m) => x.iter().zip(m).map(|(x, m)| x * m).collect(),
            None => x.into(),
        }
    }

    /// `x Aᵀ`, `[m, r]` (times `scale`).
    fn low(x: &[f32], a: &[f32], (m, r, inp): (usize, usize, usize), scale: f32) -> Vec<f32> {
        let mut low = vec![0f32; m * r];
        gemm_into(
            (m, r, inp),
            (&mut low, r),
            false,
            (x, (inp, 1)),
            (a, (1, inp)),
            scale,
        );
        low
    }
}

impl CustomOp3 for LoraProduct {
    fn name(&self) -> &'static str {
        "lora-product"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (out, inp) = self.w.shape();
        let x = cpu_f32(sx, lx, "LoRA product")?;
        let a = cpu_f32(sa, la, "LoRA product")?;
        let b = cpu_f32(sb, lb, "LoRA product")?;
        let (m, r) = (x.len() / inp.max(1), la.dims()[0]);
        let (mut y, shape) = frozen_forward(&self.w, x, lx.shape()).map_err(candle_err)?;
        let low = Self::low(&self.update_input(x), a, (m, r, inp), self.scaling);
        // y += (s·xAᵀ) Bᵀ, Bᵀ `[r, out]` read from B `[out, r]`.
        gemm_into(
            (m, out, r),
            (&mut y, out),
            true,
            (&low, (r, 1)),
            (b, (1, r)),
            1.0,
        );
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out, inp) = self.w.shape();
        let r = a.dim(0)?;
        let m = x.elem_count() / inp.max(1);
        let (x_t, a_t, b_t) = (x.contiguous()?, a.contiguous()?, b.contiguous()?);
        let dy = dy.to_dtype(DType::F32)?.contiguous()?;
        let (xs, xl) = x_t.storage_and_layout();
        let (as_, al) = a_t.storage_and_layout();
        let (bs, bl) = b_t.storage_and_layout();
        let (gs, gl) = dy.storage_and_layout();
        let xv = cpu_f32(cpu(&xs)?, xl, "LoRA product")?;
        let av = cpu_f32(cpu(&as_)?, al, "LoRA product")?;
        let bv = cpu_f32(cpu(&bs)?, bl, "LoRA product")?;
        let g = cpu_f32(cpu(&gs)?, gl, "LoRA product")?;
        let xm = self.update_input(xv);
        let s = self.scaling;
        // gs = s · dy B  `[m, r]`.
        let mut gsb = vec![0f32; m * r];
        gemm_into(
            (m, r, out),
            (&mut gsb, r),
            false,
            (g, (out, 1)),
            (bv, (r, 1)),
            s,
        );
        // dB = s · dyᵀ (xAᵀ)  `[out, r]`.
        let low = Self::low(&xm, av, (m, r, inp), 1.0);
        let mut db = vec![0f32; out * r];
        gemm_into(
            (out, r, m),
            (&mut db, r),
            false,
            (g, (1, out)),
            (&low, (r, 1)),
            s,
        );
        // dA = gsᵀ (x ⊙ mask)  `[r, in]`.
        let mut da = vec![0f32; r * inp];
        gemm_into(
            (r, inp, m),
            (&mut da, inp),
            false,
            (&gsb, (1, r)),
            (&xm, (inp, 1)),
            1.0,
        );
        // dx = dy W + (gs A) ⊙ mask, only when something upstream trains.
        let dx = match x.track_op() {
            false => None,
            true => {
                let mut dx = transposed_values(&self.w, g, m).map_err(candle_err)?;
                match &self.mask {
                    None => gemm_into(
                        (m, inp, r),
                        (&mut dx, inp),
                        true,
                        (&gsb, (r, 1)),
                        (av, (inp, 1)),
                        1.0,
                    ),
                    Some(mask) => {
                        let mut u = vec![0f32; m * inp];
                        gemm_into(
                            (m, inp, r),
                            (&mut u, inp),
                            false,
                            (&gsb, (r, 1)),
                            (av, (inp, 1)),
                            1.0,
                        );
                        for ((d, u), k) in dx.iter_mut().zip(&u).zip(mask) {
                            *d += u * k;
                        }
                    }
                }
                Some(Tensor::from_vec(dx, x.shape(), x.device())?)
            }
        };
        let da = Tensor::from_vec(da, (r, inp), a.device())?;
        let db = Tensor::from_vec(db, (out, r), b.device())?;
        Ok((dx, Some(da), Some(db)))
    }
}

/// `x Wᵀ + scaling · ((x ⊙ mask) Aᵀ) Bᵀ` with the frozen weight `w` and the adapter factors
/// `a` `[r, in]`, `b` `[out, r]` (f32), differentiable in `x`, `a` and `b`; `mask` is LoRA
/// dropout's, the shape of `x`.
pub(crate) fn lora_product(
    w: &LinearWeight,
    x: &Tensor,
    (a, b, scaling): (&Tensor, &Tensor, f64),
    mask: Option<&Tensor>,
) -> crate::error::Result<Tensor> {
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let mask = match mask {
        Some(m) => Some(m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
        None => None,
    };
    let op = LoraProduct {
        w: w.clone(),
        scaling: scaling as f32,
        mask,
    };
    Ok(x.apply_op3(&a.contiguous()?, &b.contiguous()?, op)?)
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

    /// The fused LoRA product equals its composed form, `x Wᵀ + s · ((x ⊙ m) Aᵀ) Bᵀ`, in
    /// value and in the gradients of `x`, `A` and `B`, with and without a dropout mask, for
    /// a dense and a quantized weight; an input outside the graph gets no gradient.
    #[test]
    fn lora_product_equals_its_composed_form() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let d = Device::Cpu;
        let (m, inp, out, r, s) = (7, 256, 40, 3, 0.75);
        let w = Tensor::rand(-1f32, 1f32, (out, inp), &d).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let deq = q.dequantize(&d).unwrap();
        let weights = [
            (LinearWeight::plain(w.clone()), w.clone()),
            (
                LinearWeight::quantized(std::sync::Arc::new(q)).unwrap(),
                deq,
            ),
        ];
        let keep = Tensor::rand(0f32, 1f32, (m, inp), &d).unwrap();
        let mask = keep
            .ge(0.3)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .affine(1.0 / 0.7, 0.0)
            .unwrap();
        let c = Tensor::rand(-1f32, 1f32, (m, out), &d).unwrap();
        for (lw, dense) in &weights {
            for mask in [None, Some(&mask)] {
                let x =
                    Var::from_tensor(&Tensor::rand(-1f32, 1f32, (m, inp), &d).unwrap()).unwrap();
                let a =
                    Var::from_tensor(&Tensor::rand(-1f32, 1f32, (r, inp), &d).unwrap()).unwrap();
                let b =
                    Var::from_tensor(&Tensor::rand(-1f32, 1f32, (out, r), &d).unwrap()).unwrap();
                let (xt, at, bt) = (x.as_tensor(), a.as_tensor(), b.as_tensor());
                let fused = lora_product(lw, xt, (at, bt, s), mask).unwrap();
                let xm = match mask {
                    Some(k) => (xt * k).unwrap(),
                    None => xt.clone(),
                };
                let upd = xm
                    .matmul(&at.t().unwrap())
                    .unwrap()
                    .matmul(&bt.t().unwrap())
                    .unwrap();
                let composed = (xt.matmul(&dense.t().unwrap()).unwrap()
                    + upd.affine(s, 0.0).unwrap())
                .unwrap();
                assert!(max_diff(&fused, &composed) < 1e-3, "forward");
                let gf = (fused * &c).unwrap().sum_all().unwrap().backward().unwrap();
                let gc = (composed * &c)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                for (t, what) in [(xt, "x"), (at, "A"), (bt, "B")] {
                    let (f, want) = (gf.get(t).unwrap(), gc.get(t).unwrap());
                    let scale = want
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    assert!(
                        max_diff(f, want) < 1e-5 * scale.max(1.0),
                        "d{what}, mask {}",
                        mask.is_some()
                    );
                }
            }
        }
        // An input that nothing upstream trains gets no gradient (its `dy · W` is skipped).
        let x = Tensor::rand(-1f32, 1f32, (m, inp), &d).unwrap();
        let a = Var::from_tensor(&Tensor::rand(-1f32, 1f32, (r, inp), &d).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::rand(-1f32, 1f32, (out, r), &d).unwrap()).unwrap();
        let y = lora_product(&weights[0].0, &x, (a.as_tensor(), b.as_tensor(), s), None).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x).is_none());
        assert!(g.get(a.as_tensor()).is_some() && g.get(b.as_tensor()).is_some());
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
