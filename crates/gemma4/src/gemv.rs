//! Matrix–vector products for decoding one token: `y = W x`, `W` bf16 or f32 `[m, n]`
//! row-major (a `Linear` weight), `x` and `y` f32. Batch-1 decode streams every
//! weight once per token, so this is a memory-bandwidth problem: each row is read once,
//! widened to f32 in registers (bf16 is the top half of an f32) and accumulated in f32, as
//! torch's bf16 linear does before rounding its output. Rows are split across the rayon
//! pool (the `--threads` setting).
//!
//! candle's CPU matmul has no bf16 kernel of its own and was ~20× slower here. The AVX2+FMA
//! kernel is picked at run time; the plain loop is the portable fallback and the reference
//! the tests compare it with.

use half::bf16;
use rayon::prelude::*;

/// Rows per parallel task: large enough to amortise scheduling, small enough to balance.
const ROWS_PER_TASK: usize = 64;

/// `[row(0), …, row(m − 1)]`, computed in parallel in tasks of `per_task` consecutive rows
/// (every decode kernel's row loop: each output is one row's dot product).
pub(crate) fn par_rows(m: usize, per_task: usize, row: impl Fn(usize) -> f32 + Sync) -> Vec<f32> {
    let mut y = vec![0f32; m];
    y.par_chunks_mut(per_task).enumerate().for_each(|(c, ys)| {
        for (k, out) in ys.iter_mut().enumerate() {
            *out = row(c * per_task + k);
        }
    });
    y
}

/// `w` widened to f32 (exact: bf16 is the top half of an f32), in parallel.
pub(crate) fn widen_bf16(w: &[bf16]) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let mut out = vec![0f32; w.len()];
    out.par_chunks_mut(CHUNK)
        .zip(w.par_chunks(CHUNK))
        .for_each(|(o, w)| {
            for (o, w) in o.iter_mut().zip(w) {
                *o = w.to_f32();
            }
        });
    out
}

/// Rows of `w` (each `x.len()` long) dotted with `x`, in parallel, with `dot`.
fn gemv<T: Sync>(w: &[T], x: &[f32], dot: impl Fn(&[T], &[f32]) -> f32 + Sync) -> Vec<f32> {
    let n = x.len();
    assert!(
        n > 0 && w.len().is_multiple_of(n),
        "weight length is not a multiple of the input length"
    );
    par_rows(w.len() / n, ROWS_PER_TASK, |o| {
        dot(&w[o * n..(o + 1) * n], x)
    })
}

/// `y[o] = Σ_i w[o·n + i] · x[i]` for `o < w.len() / n`, bf16 weights.
pub fn gemv_bf16(w: &[bf16], x: &[f32]) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA.
        return gemv(w, x, |r, x| unsafe { dot_bf16_avx2(r, x) });
    }
    gemv(w, x, dot_bf16_plain)
}

/// The same with f32 weights.
pub fn gemv_f32(w: &[f32], x: &[f32]) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA.
        return gemv(w, x, |r, x| unsafe { dot_f32_avx2(r, x) });
    }
    gemv(w, x, dot_f32_plain)
}

/// How far ahead of the row being read the decode kernels ask for weights. The hardware
/// prefetchers alone left two cores streaming a Q4_K matrix at 17–19 GB/s; asking for
/// the lines 4 KiB ahead gave 22–24 GB/s on the same runs (the gain was about the same
/// at 2 KiB; it is a latency hider, so the exact distance matters little).
#[cfg(target_arch = "x86_64")]
pub(crate) const PREFETCH_AHEAD: usize = 4096;

/// Asks for the `lines` cache lines that start [`PREFETCH_AHEAD`] bytes after `p`. A
/// hint only: addresses past the end of the weights are not touched (`prefetcht0` never
/// faults), so callers need no bounds check.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_ahead(p: *const u8, lines: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let p = p.wrapping_add(PREFETCH_AHEAD) as *const i8;
    for k in 0..lines {
        // SAFETY: a prefetch hint on any address is safe (SSE, part of x86_64).
        unsafe { _mm_prefetch(p.wrapping_add(64 * k), _MM_HINT_T0) };
    }
}

/// The portable dot product (8 partial sums, so it vectorises and matches the SIMD
/// kernel's rounding closely).
pub fn dot_bf16_plain(w: &[bf16], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut wc = w.chunks_exact(8);
    let mut xc = x.chunks_exact(8);
    for (a, b) in (&mut wc).zip(&mut xc) {
        for k in 0..8 {
            acc[k] += a[k].to_f32() * b[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (a, b) in wc.remainder().iter().zip(xc.remainder()) {
        s += a.to_f32() * b;
    }
    s
}

pub fn dot_f32_plain(w: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut wc = w.chunks_exact(8);
    let mut xc = x.chunks_exact(8);
    for (a, b) in (&mut wc).zip(&mut xc) {
        for k in 0..8 {
            acc[k] += a[k] * b[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (a, b) in wc.remainder().iter().zip(xc.remainder()) {
        s += a * b;
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f32_avx2(w: &[f32], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = w.len().min(x.len());
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        prefetch_ahead(wp.add(i) as *const u8, 1);
        for (k, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(
                _mm256_loadu_ps(wp.add(i + 8 * k)),
                _mm256_loadu_ps(xp.add(i + 8 * k)),
                *a,
            );
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(
            _mm256_loadu_ps(wp.add(i)),
            _mm256_loadu_ps(xp.add(i)),
            acc[0],
        );
        i += 8;
    }
    let mut total = hsum4(acc);
    while i < n {
        total += w[i] * x[i];
        i += 1;
    }
    total
}

/// Sum of eight lanes, in candle's `hsum_float_8` order (high half + low half, then
/// pairs, then the two left): the quantized kernels' final reduction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn hsum8(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let r = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)))
}

/// The sum of the lanes of four accumulators, in the order both kernels have always used
/// (pairwise across accumulators, then the eight lanes left to right).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn hsum4(acc: [std::arch::x86_64::__m256; 4]) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), s);
    lanes.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_bf16_avx2(w: &[bf16], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = w.len().min(x.len());
    let wp = w.as_ptr() as *const u16;
    let xp = x.as_ptr();
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // 32 weights per step in four independent accumulators (FMA latency).
    while i + 32 <= n {
        for (k, a) in acc.iter_mut().enumerate() {
            let raw = _mm_loadu_si128(wp.add(i + 8 * k) as *const __m128i);
            let wf = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
            *a = _mm256_fmadd_ps(wf, _mm256_loadu_ps(xp.add(i + 8 * k)), *a);
        }
        i += 32;
    }
    while i + 8 <= n {
        let raw = _mm_loadu_si128(wp.add(i) as *const __m128i);
        let wf = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
        acc[0] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(xp.add(i)), acc[0]);
        i += 8;
    }
    let mut total = hsum4(acc);
    while i < n {
        total += w[i].to_f32() * x[i];
        i += 1;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(m: usize, n: usize) -> (Vec<bf16>, Vec<f32>) {
        let w = (0..m * n)
            .map(|i| bf16::from_f32(((i * 7919 % 1013) as f32 / 1013.0) - 0.5))
            .collect();
        let x = (0..n)
            .map(|i| ((i * 31 % 97) as f32 / 97.0) - 0.5)
            .collect();
        (w, x)
    }

    #[test]
    fn matches_the_f64_product_for_odd_shapes() {
        for (m, n) in [(1, 1), (3, 7), (65, 40), (130, 1536), (7, 33)] {
            let (w, x) = data(m, n);
            let y = gemv_bf16(&w, &x);
            for o in 0..m {
                let exact: f64 = (0..n).map(|i| w[o * n + i].to_f64() * x[i] as f64).sum();
                let tol = 1e-5 * (n as f64).sqrt().max(1.0);
                assert!(
                    (y[o] as f64 - exact).abs() < tol,
                    "{m}×{n} row {o}: {} vs {exact}",
                    y[o]
                );
                let plain = dot_bf16_plain(&w[o * n..(o + 1) * n], &x);
                assert!((y[o] - plain).abs() < 1e-4, "simd vs plain");
            }
            let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            let yf = gemv_f32(&wf, &x);
            for o in 0..m {
                assert!(
                    (yf[o] - y[o]).abs() < 1e-4,
                    "f32 vs bf16 weights, same values"
                );
                let plain = dot_f32_plain(&wf[o * n..(o + 1) * n], &x);
                assert!((yf[o] - plain).abs() < 1e-4, "f32 simd vs plain");
            }
        }
    }
}
