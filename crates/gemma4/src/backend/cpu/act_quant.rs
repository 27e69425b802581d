//! The activation side of the integer decode kernels: the input row `x` quantized to
//! 8-bit blocks once per product, as llama.cpp (and candle) do before a quantized
//! matrix–vector product. Two block shapes:
//!
//! - [`Q8Blocks`]: 32 values and an f16 scale per block (GGML's Q8_0), for Q8_0 and Q4_0
//!   weights;
//! - [`Q8KBlocks`]: 256 values, an f32 scale and sixteen 16-value sums per block (GGML's
//!   Q8_K), for the k-quants.
//!
//! The numbers are exactly those of candle's `BlockQ8_0::from_float` and
//! `BlockQ8K::from_float` (the tests compare every byte): the same scale, the same
//! rounding (half away from zero), the same choice of the largest-magnitude element. What
//! differs is the speed and the layout. candle's loops are scalar with a libm `roundf`
//! call per value, which took more time than the dot products on small matrices; here the
//! blocks are quantized eight values at a time with AVX2, and the values, scales and sums
//! sit in separate arrays the kernels read directly.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use half::f16;

/// `x` in GGML's Q8_0 blocks: `qs[i]` the quantized values, `d[b]` block `b`'s scale
/// (the f16 candle stores, widened).
pub struct Q8Blocks {
    pub qs: Vec<i8>,
    pub d: Vec<f32>,
}

/// `x` in GGML's Q8_K blocks: values, the f32 scale per 256, and per block the sums of
/// each 16 values (`bsums`) and of each 32 (`sums32`, what Q4_K's minimums multiply).
pub struct Q8KBlocks {
    pub qs: Vec<i8>,
    pub d: Vec<f32>,
    pub bsums: Vec<[i16; 16]>,
    pub sums32: Vec<[i16; 8]>,
}

/// Writes one block's values and scale.
type BlockFn = fn(&[f32], &mut [i8], &mut f32);
/// The same with SIMD; `false` (nothing written) for a block it leaves to the plain one.
type SimdBlockFn = unsafe fn(&[f32], &mut [i8], &mut f32) -> bool;

/// `x` quantized block by block (`size` values each): the values and the scales. Each
/// block goes to `simd` when given (only where this CPU runs it), else or when it
/// declines, to `plain`.
fn quantize_blocks(
    x: &[f32],
    size: usize,
    simd: Option<SimdBlockFn>,
    plain: BlockFn,
) -> (Vec<i8>, Vec<f32>) {
    assert!(x.len().is_multiple_of(size), "rows are whole blocks");
    let mut qs = vec![0i8; x.len()];
    let mut d = vec![0f32; x.len() / size];
    for ((xb, qb), db) in x
        .chunks_exact(size)
        .zip(qs.chunks_exact_mut(size))
        .zip(&mut d)
    {
        // SAFETY: `simd` is only given where this CPU has its instructions; the chunks
        // are `size` long, the length it asserts.
        if simd.is_some_and(|f| unsafe { f(xb, qb, db) }) {
            continue;
        }
        plain(xb, qb, db);
    }
    (qs, d)
}

/// `f` where this CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
fn with_avx2(f: SimdBlockFn) -> Option<SimdBlockFn> {
    crate::backend::cpu::has_avx2_fma().then_some(f)
}

impl Q8Blocks {
    /// Quantizes `x` (`x.len()` a multiple of 32).
    pub fn new(x: &[f32]) -> Self {
        #[cfg(target_arch = "x86_64")]
        let simd = with_avx2(q8_0_block_avx2);
        #[cfg(not(target_arch = "x86_64"))]
        let simd = None;
        let (qs, d) = quantize_blocks(x, 32, simd, q8_0_block);
        Q8Blocks { qs, d }
    }
}

/// candle's `BlockQ8_0::from_float` for one block.
fn q8_0_block(x: &[f32], q: &mut [i8], d: &mut f32) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let scale = amax / 127.0;
    let id = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    *d = f16::from_f32(scale).to_f32();
    for (q, &v) in q.iter_mut().zip(x) {
        *q = (v * id).round() as i8;
    }
}

impl Q8KBlocks {
    /// Quantizes `x` (`x.len()` a multiple of 256).
    pub fn new(x: &[f32]) -> Self {
        #[cfg(target_arch = "x86_64")]
        let simd = with_avx2(q8k_block_avx2);
        #[cfg(not(target_arch = "x86_64"))]
        let simd = None;
        let (qs, d) = quantize_blocks(x, 256, simd, q8k_block);
        let bsums: Vec<[i16; 16]> = qs
            .chunks_exact(256)
            .map(|b| {
                std::array::from_fn(|j| b[j * 16..j * 16 + 16].iter().map(|&v| v as i16).sum())
            })
            .collect();
        let sums32 = bsums
            .iter()
            .map(|s| std::array::from_fn(|j| s[2 * j] + s[2 * j + 1]))
            .collect();
        Q8KBlocks {
            qs,
            d,
            bsums,
            sums32,
        }
    }
}

/// candle's `BlockQ8K::from_float` for one block (without the sums).
fn q8k_block(x: &[f32], q: &mut [i8], d: &mut f32) {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        q.fill(0);
        *d = 0.0;
        return;
    }
    let iscale = -127.0 / max;
    for (q, &v) in q.iter_mut().zip(x) {
        *q = (iscale * v).round().clamp(-128.0, 127.0) as i8;
    }
    *d = 1.0 / iscale;
}

/// Rounds eight values half away from zero (f32::round), exactly: `v − trunc(v)` is exact
/// for these magnitudes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn round_away(v: __m256) -> __m256 {
    let t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    let sign = _mm256_and_ps(v, _mm256_set1_ps(-0.0));
    let frac = _mm256_andnot_ps(_mm256_set1_ps(-0.0), _mm256_sub_ps(v, t));
    let up = _mm256_cmp_ps(frac, _mm256_set1_ps(0.5), _CMP_GE_OQ);
    _mm256_add_ps(
        t,
        _mm256_and_ps(up, _mm256_or_ps(sign, _mm256_set1_ps(1.0))),
    )
}

/// `|v|` lane-wise and its maximum over `x`, ignoring NaNs as `f32::max` does; `None`
/// when `x` holds a NaN (the scalar path then reproduces candle's NaN handling).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn abs_max(x: &[f32]) -> Option<f32> {
    let mut m = _mm256_setzero_ps();
    let mut nan = _mm256_setzero_ps();
    for c in x.chunks_exact(8) {
        let v = _mm256_loadu_ps(c.as_ptr());
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        m = _mm256_max_ps(m, _mm256_andnot_ps(_mm256_set1_ps(-0.0), v));
    }
    if _mm256_movemask_ps(nan) != 0 {
        return None;
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), m);
    Some(lanes.iter().fold(0f32, |a, &b| a.max(b)))
}

/// Scales 32 values by `s`, rounds half away from zero and stores them as i8, saturating
/// (the values are within ±127.0001, so saturation only clips that rounding overshoot).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scale_round_store(x: &[f32], s: f32, q: &mut [i8]) {
    let s = _mm256_set1_ps(s);
    let mut r = [_mm256_setzero_si256(); 4];
    for (k, rk) in r.iter_mut().enumerate() {
        let v = _mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(8 * k)), s);
        *rk = _mm256_cvtps_epi32(round_away(v));
    }
    let (a, b, c, d) = (r[0], r[1], r[2], r[3]);
    let packed = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
    let ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, ordered);
}

/// One Q8_0 block with AVX2; `false` (nothing written) when it holds a NaN.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn q8_0_block_avx2(x: &[f32], q: &mut [i8], d: &mut f32) -> bool {
    assert!(x.len() == 32 && q.len() == 32);
    let Some(amax) = abs_max(x) else {
        return false;
    };
    let scale = amax / 127.0;
    let id = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    *d = f16::from_f32(scale).to_f32();
    scale_round_store(x, id, q);
    true
}

/// One Q8_K block with AVX2; `false` (nothing written) when it holds a NaN.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn q8k_block_avx2(x: &[f32], q: &mut [i8], d: &mut f32) -> bool {
    assert!(x.len() == 256 && q.len() == 256);
    let Some(amax) = abs_max(x) else {
        return false;
    };
    if amax == 0.0 {
        q.fill(0);
        *d = 0.0;
        return true;
    }
    // candle keeps the first element of the largest magnitude, with its sign.
    let max = *x
        .iter()
        .find(|v| v.abs() == amax)
        .expect("the maximum is an element");
    let iscale = -127.0 / max;
    for (xc, qc) in x.chunks_exact(32).zip(q.chunks_exact_mut(32)) {
        scale_round_store(xc, iscale, qc);
    }
    *d = 1.0 / iscale;
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::k_quants::{BlockQ8K, BlockQ8_0};
    use candle_core::quantized::GgmlType;

    /// Inputs with exact rounding ties (k + 0.5 after scaling), equal magnitudes of both
    /// signs, zeros, an all-zero block and ordinary values.
    fn inputs(n: usize) -> Vec<Vec<f32>> {
        let mut ties: Vec<f32> = (0..n).map(|i| (i % 255) as f32 - 127.0).collect();
        ties[0] = -127.0; // the maximum is 127 in magnitude, first negative
        ties[5] = 127.0;
        for (i, v) in ties.iter_mut().enumerate().skip(10).step_by(7) {
            *v = (i % 100) as f32 + 0.5 - 50.0;
        }
        let smooth: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin() * 3.1).collect();
        let mut sparse = vec![0f32; n];
        sparse[n - 1] = -2.5;
        sparse[n / 2] = 2.5;
        vec![ties, smooth, sparse, vec![0f32; n]]
    }

    /// Byte for byte candle's Q8_0 blocks (values and the f16 scale).
    #[test]
    fn q8_0_equals_candle() {
        for x in inputs(512) {
            let mut want = vec![BlockQ8_0::zeros(); 16];
            BlockQ8_0::from_float(&x, &mut want);
            let ours = Q8Blocks::new(&x);
            for (b, w) in want.iter().enumerate() {
                // SAFETY: BlockQ8_0 is GGML's {f16 d, [i8; 32] qs}, 34 bytes.
                let raw: [u8; 34] = unsafe { std::mem::transmute_copy(w) };
                let d = f16::from_le_bytes([raw[0], raw[1]]).to_f32();
                assert_eq!(ours.d[b].to_bits(), d.to_bits(), "scale of block {b}");
                let qs: Vec<i8> = raw[2..].iter().map(|&v| v as i8).collect();
                assert_eq!(&ours.qs[b * 32..b * 32 + 32], &qs[..], "block {b}");
            }
        }
    }

    /// Byte for byte candle's Q8_K blocks (values, scale and 16-value sums).
    #[test]
    fn q8k_equals_candle() {
        for x in inputs(1024) {
            let mut want = vec![BlockQ8K::zeros(); 4];
            BlockQ8K::from_float(&x, &mut want);
            let ours = Q8KBlocks::new(&x);
            for (b, w) in want.iter().enumerate() {
                // SAFETY: BlockQ8K is GGML's {f32 d, [i8; 256] qs, [i16; 16] bsums}.
                let raw: [u8; 292] = unsafe { std::mem::transmute_copy(w) };
                let d = f32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
                assert_eq!(ours.d[b].to_bits(), d.to_bits(), "scale of block {b}");
                let qs: Vec<i8> = raw[4..260].iter().map(|&v| v as i8).collect();
                assert_eq!(&ours.qs[b * 256..b * 256 + 256], &qs[..], "block {b}");
                let bsums: Vec<i16> = raw[260..]
                    .chunks_exact(2)
                    .map(|c| i16::from_le_bytes([c[0], c[1]]))
                    .collect();
                assert_eq!(&ours.bsums[b][..], &bsums[..], "sums of block {b}");
                for j in 0..8 {
                    assert_eq!(ours.sums32[b][j], bsums[2 * j] + bsums[2 * j + 1]);
                }
            }
        }
    }

    /// The scalar path (no AVX2, or a NaN in the block) is the same function.
    #[test]
    fn scalar_path_agrees() {
        for x in inputs(256) {
            let (mut q, mut d) = (vec![0i8; 256], 0f32);
            q8k_block(&x, &mut q, &mut d);
            let ours = Q8KBlocks::new(&x);
            assert_eq!((ours.qs, ours.d[0].to_bits()), (q, d.to_bits()));
            let (mut q, mut d) = (vec![0i8; 32], 0f32);
            q8_0_block(&x[..32], &mut q, &mut d);
            let ours = Q8Blocks::new(&x[..32]);
            assert_eq!((ours.qs, ours.d[0].to_bits()), (q, d.to_bits()));
        }
        let mut x = vec![1f32; 256];
        x[3] = f32::NAN;
        let mut want = vec![BlockQ8K::zeros(); 1];
        BlockQ8K::from_float(&x, &mut want);
        let raw: [u8; 292] = unsafe { std::mem::transmute_copy(&want[0]) };
        let ours = Q8KBlocks::new(&x);
        assert_eq!(
            ours.qs.iter().map(|&v| v as u8).collect::<Vec<_>>(),
            raw[4..260]
        );
    }
}
