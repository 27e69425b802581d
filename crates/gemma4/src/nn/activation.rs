//! The two element-wise functions of the text decoder that need `tanh`: the feed-forward
//! activation `gelu_pytorch_tanh`, `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, and the
//! final logit soft-cap `cap·tanh(x / cap)`. Same formulas as torch's CPU kernels, in f32
//! (bf16/f16 inputs are widened and the result rounded back, as torch does).
//!
//! Why not candle's ops: they call libm's `tanhf` once per value (the soft-cap alone runs
//! over 262,144 logits per token); moving these two to the kernels here cut the time an
//! E2B q4_k decode step spends outside its projections from ~22 ms to ~13 ms. Here `tanh`
//! is evaluated eight lanes at a time with AVX2 (Cephes' `tanhf`: an odd polynomial below
//! 0.625, `1 − 2/(e^{2|x|} + 1)` above, `exp` by Cephes' `expf`), within a few ulp of
//! libm, as torch's own vectorised `tanh` is. Without AVX2, or for
//! tensors off the CPU, candle's ops run.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use candle_core::{DType, Tensor};

use crate::error::Result;

/// `gelu_pytorch_tanh(x)`.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if crate::nn::autograd::tracked(x) {
        return Ok(x.gelu()?);
    }
    match map_f32(x, Kernel::Gelu)? {
        Some(y) => Ok(y),
        None => Ok(x.gelu()?),
    }
}

/// `gelu_pytorch_tanh(gate) · up` (the gated feed-forward's product); in a training
/// forward one fused operation with its own backward (`nn::fused`).
pub fn gelu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if crate::nn::autograd::tracked(gate) || crate::nn::autograd::tracked(up) {
        if let Some(y) = crate::nn::fused::gelu_mul(gate, up)? {
            return Ok(y);
        }
    }
    Ok((gelu_tanh(gate)? * up)?)
}

/// `cap · tanh(x / cap)`.
pub fn soft_cap(x: &Tensor, cap: f64) -> Result<Tensor> {
    if crate::nn::autograd::tracked(x) {
        return Ok(((x / cap)?.tanh()? * cap)?);
    }
    match map_f32(x, Kernel::SoftCap(cap as f32))? {
        Some(y) => Ok(y),
        None => Ok(((x / cap)?.tanh()? * cap)?),
    }
}

#[derive(Clone, Copy)]
enum Kernel {
    Gelu,
    SoftCap(f32),
    Tanh,
    Exp,
}

/// `tanh` of every value in place (eight lanes at a time with AVX2, libm's otherwise): for
/// the fused training operations (`nn::fused`).
pub(crate) fn tanh_in_place(v: &mut [f32]) {
    in_place(v, Kernel::Tanh, f32::tanh)
}

/// `e^x` of every value in place (as [`tanh_in_place`]); `−∞` gives `0`, as libm's.
pub(crate) fn exp_in_place(v: &mut [f32]) {
    in_place(v, Kernel::Exp, f32::exp)
}

fn in_place(v: &mut [f32], k: Kernel, scalar: fn(f32) -> f32) {
    #[cfg(target_arch = "x86_64")]
    if crate::backend::cpu::has_avx2_fma() {
        // SAFETY: AVX2 and FMA were checked.
        unsafe { apply_avx2(v, k) };
        return;
    }
    let _ = k;
    v.iter_mut().for_each(|x| *x = scalar(*x));
}

/// Applies `k` on the CPU with AVX2; `None` when that is not possible here.
fn map_f32(x: &Tensor, k: Kernel) -> Result<Option<Tensor>> {
    if !x.device().is_cpu() || !crate::backend::cpu::has_avx2_fma() {
        return Ok(None);
    }
    let mut v: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2 and FMA were checked.
    unsafe {
        apply_avx2(&mut v, k)
    };
    Ok(Some(
        Tensor::from_vec(v, x.shape(), x.device())?.to_dtype(x.dtype())?,
    ))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn apply_avx2(v: &mut [f32], k: Kernel) {
    let mut chunks = v.chunks_exact_mut(8);
    for c in &mut chunks {
        let x = _mm256_loadu_ps(c.as_ptr());
        _mm256_storeu_ps(c.as_mut_ptr(), apply8(x, k));
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let mut buf = [0f32; 8];
        buf[..rest.len()].copy_from_slice(rest);
        let y = apply8(_mm256_loadu_ps(buf.as_ptr()), k);
        _mm256_storeu_ps(buf.as_mut_ptr(), y);
        rest.copy_from_slice(&buf[..rest.len()]);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn apply8(x: __m256, k: Kernel) -> __m256 {
    match k {
        Kernel::Gelu => {
            // torch: 0.5 · x · (1 + tanh(β · (x + κ · x³))).
            let beta =
                _mm256_set1_ps(std::f32::consts::FRAC_2_SQRT_PI * std::f32::consts::FRAC_1_SQRT_2);
            let kappa = _mm256_set1_ps(0.044715);
            let x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
            let inner = _mm256_mul_ps(beta, _mm256_add_ps(x, _mm256_mul_ps(kappa, x3)));
            let half_x = _mm256_mul_ps(_mm256_set1_ps(0.5), x);
            _mm256_mul_ps(half_x, _mm256_add_ps(_mm256_set1_ps(1.0), tanh8(inner)))
        }
        Kernel::SoftCap(cap) => {
            let c = _mm256_set1_ps(cap);
            _mm256_mul_ps(tanh8(_mm256_div_ps(x, c)), c)
        }
        Kernel::Tanh => tanh8(x),
        Kernel::Exp => {
            // exp8 clamps its input, which would give −∞ a tiny positive value.
            let neg_inf = _mm256_cmp_ps(x, _mm256_set1_ps(f32::NEG_INFINITY), _CMP_EQ_OQ);
            _mm256_andnot_ps(neg_inf, exp8(x))
        }
    }
}

/// `e^x` for eight lanes (Cephes `expf`: `x = n·ln2 + r`, a degree-7 polynomial for
/// `e^r`, then `2^n` into the exponent), inputs clamped to where f32 `e^x` is finite.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp8(x: __m256) -> __m256 {
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
        _mm256_set1_ps(88.3),
    );
    let n = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    // ln 2 in two parts, so that n·ln2 is subtracted without rounding error.
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_2e-4);
    for c in [
        1.398_2e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let r2 = _mm256_mul_ps(r, r);
    let e = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
    let pow2n = _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
        23,
    ));
    _mm256_mul_ps(e, pow2n)
}

/// `tanh(x)` for eight lanes (Cephes `tanhf`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tanh8(x: __m256) -> __m256 {
    let sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0));
    let a = _mm256_andnot_ps(_mm256_set1_ps(-0.0), x);
    // |x| ≥ 0.625: 1 − 2 / (e^{2|x|} + 1), the sign put back.
    let e = exp8(_mm256_add_ps(a, a));
    let big = _mm256_sub_ps(
        _mm256_set1_ps(1.0),
        _mm256_div_ps(_mm256_set1_ps(2.0), _mm256_add_ps(e, _mm256_set1_ps(1.0))),
    );
    let big = _mm256_or_ps(big, sign);
    // |x| < 0.625: x + x·z·P(z), z = x².
    let z = _mm256_mul_ps(x, x);
    let mut p = _mm256_set1_ps(-5.704_988_7e-3);
    for c in [2.063_909e-2, -5.373_971_6e-2, 1.333_144_2e-1, -3.333_328e-1] {
        p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(c));
    }
    let small = _mm256_fmadd_ps(_mm256_mul_ps(p, z), x, x);
    let is_small = _mm256_cmp_ps(a, _mm256_set1_ps(0.625), _CMP_LT_OQ);
    _mm256_blendv_ps(big, small, is_small)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn values() -> Vec<f32> {
        let mut v: Vec<f32> = (-4000..=4000).map(|i| i as f32 * 0.005).collect();
        v.extend((-300..=300).map(|i| i as f32 * 0.5)); // to ±150: saturation
        v.extend([
            0.0,
            -0.0,
            0.624_999_9,
            0.625,
            -0.625,
            1e-8,
            -1e-30,
            88.0,
            -100.0,
        ]);
        v
    }

    fn gelu_f64(x: f64) -> f64 {
        let beta = (2.0 / std::f64::consts::PI).sqrt();
        0.5 * x * (1.0 + (beta * (x + 0.044715 * x * x * x)).tanh())
    }

    /// Within a few f32 ulps of the exact function everywhere, and of candle's libm path.
    #[test]
    fn close_to_the_exact_functions() {
        let v = values();
        let t = Tensor::from_vec(v.clone(), v.len(), &Device::Cpu).unwrap();
        let gelu: Vec<f32> = gelu_tanh(&t).unwrap().to_vec1().unwrap();
        let capped: Vec<f32> = soft_cap(&t, 30.0).unwrap().to_vec1().unwrap();
        let candle_gelu: Vec<f32> = t.gelu().unwrap().to_vec1().unwrap();
        for (i, &x) in v.iter().enumerate() {
            let want = gelu_f64(x as f64);
            // The formula's own f32 rounding (1 + tanh loses bits where tanh ≈ −1) is
            // shared with torch and candle; compare on that scale.
            let tol = 4e-7 * (x.abs() as f64).max(1e-30) + 1e-30;
            assert!(
                (gelu[i] as f64 - want).abs() <= tol.max(2.5e-7 * want.abs()),
                "gelu({x}) = {} vs {want}",
                gelu[i]
            );
            assert!(
                (gelu[i] - candle_gelu[i]).abs() <= 4e-7 * x.abs().max(1e-30),
                "gelu({x}): {} vs candle {}",
                gelu[i],
                candle_gelu[i]
            );
            let want = 30.0 * (x as f64 / 30.0).tanh();
            assert!(
                (capped[i] as f64 - want).abs() <= 2.5e-7 * want.abs() + 1e-37,
                "softcap({x}) = {} vs {want}",
                capped[i]
            );
        }
        // Signs of zero and saturation are exact.
        assert_eq!(
            soft_cap(&Tensor::new(&[1e4f32, -1e4], &Device::Cpu).unwrap(), 30.0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            [30.0, -30.0]
        );
    }

    /// A tensor's values as f32, flattened.
    fn f32s(t: candle_core::Result<Tensor>) -> Vec<f32> {
        let t = t.and_then(|t| t.to_dtype(DType::F32)).unwrap();
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// bf16 inputs are computed in f32 and rounded back, and lengths that are not a
    /// multiple of eight are whole.
    #[test]
    fn other_dtypes_and_lengths() {
        let v: Vec<f32> = (0..13).map(|i| i as f32 * 0.37 - 2.0).collect();
        let t = Tensor::from_vec(v.clone(), (1, 13), &Device::Cpu).unwrap();
        let b = t.to_dtype(DType::BF16).unwrap();
        let y = f32s(Ok(gelu_tanh(&b).unwrap()));
        let want = f32s(
            b.to_dtype(DType::F32)
                .and_then(|t| t.gelu()?.to_dtype(DType::BF16)),
        );
        assert_eq!(y, want);
        let y = f32s(Ok(soft_cap(&t, 2.0).unwrap()));
        assert_eq!(y.len(), 13);
        assert!((y[12] - 2.0 * (v[12] / 2.0).tanh()).abs() < 1e-6);
    }
}
