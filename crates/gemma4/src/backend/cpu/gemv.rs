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

/// `y[j·m + o] = row(o, j)`: weight row `o < m` dotted with input row `j < nx`,
/// computed in parallel in tasks of `per_task` consecutive weight rows (every decode
/// kernel's row loop). Each weight row is dotted with all `nx` inputs while it is in the
/// L1 cache, so a batch of a few rows streams the weights from memory once, as one row
/// does: decoding is bandwidth-bound, and the extra arithmetic is nearly free up to
/// [`crate::backend::matrix::SMALL_BATCH`] rows.
pub(crate) fn par_rows(
    m: usize,
    nx: usize,
    per_task: usize,
    row: impl Fn(usize, usize) -> f32 + Sync,
) -> Vec<f32> {
    par_rows_all(m, nx, per_task, |o, out| {
        for (j, y) in out.iter_mut().enumerate() {
            *y = row(o, j);
        }
    })
}

/// [`par_rows`] where `row(o, out)` fills weight row `o`'s outputs for all `nx` inputs
/// at once (kernels that unpack a weight block once for several inputs).
pub(crate) fn par_rows_all(
    m: usize,
    nx: usize,
    per_task: usize,
    row: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    if nx == 1 {
        // One input (every single-sequence decode step): no per-row scatter.
        let mut y = vec![0f32; m];
        y.par_chunks_mut(per_task).enumerate().for_each(|(c, ys)| {
            for (k, out) in ys.iter_mut().enumerate() {
                row(c * per_task + k, std::slice::from_mut(out));
            }
        });
        return y;
    }
    par_row_tiles(m, nx, per_task, |rows, part| {
        let width = rows.len();
        let mut out = vec![0f32; nx];
        for (k, o) in rows.enumerate() {
            row(o, &mut out);
            for (j, v) in out.iter().enumerate() {
                part[j * width + k] = *v;
            }
        }
    })
}

/// `[nx, m]` outputs computed in parallel tasks of `per_task` consecutive weight rows:
/// `tile(rows, part)` fills `part` (`[nx, rows.len()]`, an input's outputs together)
/// for the weight rows `rows` and every input. For kernels that block over rows and
/// inputs at once (a register tile); the others go through [`par_rows_all`].
pub(crate) fn par_row_tiles(
    m: usize,
    nx: usize,
    per_task: usize,
    tile: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
) -> Vec<f32> {
    let tasks = m.div_ceil(per_task);
    let parts: Vec<Vec<f32>> = (0..tasks)
        .into_par_iter()
        .map(|c| {
            let rows = c * per_task..((c + 1) * per_task).min(m);
            let mut part = vec![0f32; nx * rows.len()];
            tile(rows, &mut part);
            part
        })
        .collect();
    let mut y = vec![0f32; m * nx];
    for (c, part) in parts.iter().enumerate() {
        let (lo, width) = (c * per_task, part.len() / nx);
        for (j, p) in part.chunks_exact(width).enumerate() {
            y[j * m + lo..][..width].copy_from_slice(p);
        }
    }
    y
}

/// Rows per tile of the tiled kernels (`q8_tiles`, `kquant_tiles`, `q4_tiles`, `dense_tiles`): the
/// sixteen f32/i32 lanes of an AVX-512 vector, one per weight row.
pub(crate) const TILE: usize = 16;

/// `[nx, rows]` outputs of a tiled kernel: `tile(t, xs)` gives tile `t`'s sixteen rows
/// dotted with each input of `xs` (at most `G` of them; entries past `xs.len()` unused).
/// Tasks of `tiles_per_task` tiles run in parallel; within one, the inputs go by `G` at
/// a time (outer loop), so that the task's tiles stay in the cache while they do.
pub(crate) fn tiled_product<I: Sync, const G: usize>(
    rows: usize,
    inputs: &[I],
    tiles_per_task: usize,
    tile: impl Fn(usize, &[I]) -> [[f32; TILE]; G] + Sync,
) -> Vec<f32> {
    par_row_tiles(rows, inputs.len(), tiles_per_task * TILE, |range, part| {
        let width = range.len();
        for (g, xs) in inputs.chunks(G).enumerate() {
            for r0 in range.clone().step_by(TILE) {
                let sums = tile(r0 / TILE, xs);
                let live = (rows - r0).min(TILE);
                for (j, s) in sums.iter().enumerate().take(xs.len()) {
                    part[(G * g + j) * width + r0 - range.start..][..live]
                        .copy_from_slice(&s[..live]);
                }
            }
        }
    })
}

/// A tiled kernel's sums for `$n` inputs: `$call` run as the const-generic instance for
/// `J = $n` (one of the counts listed, at most the group `$g`), its sums in the first `J`
/// of `$g` entries. `$J` names the count inside `$call`, as in
/// `by_input_count!(xs.len(), GROUP, [1, 2, 3, 4], J => kernel::<J>(tile, from_fn(|i| &xs[i])))`.
#[cfg(target_arch = "x86_64")]
macro_rules! by_input_count {
    ($n:expr, $g:expr, [$($k:literal),+], $J:ident => $call:expr) => {{
        let mut out = [[0f32; $crate::backend::cpu::gemv::TILE]; $g];
        match $n {
            $($k => {
                const $J: usize = $k;
                out[..$k].copy_from_slice(&$call);
            })+
            n => unreachable!("{n} inputs for a group of {}", $g),
        }
        out
    }};
}
#[cfg(target_arch = "x86_64")]
pub(crate) use by_input_count;

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

/// Rows of `w` dotted with each of the `nx` rows of `x`, in parallel, with `dot`:
/// `[nx, w.len() / n]` for rows of `n = x.len() / nx`.
fn gemv<T: Sync>(
    w: &[T],
    x: &[f32],
    nx: usize,
    dot: impl Fn(&[T], &[f32]) -> f32 + Sync,
) -> Vec<f32> {
    assert!(
        nx > 0 && x.len().is_multiple_of(nx),
        "input rows of unequal length"
    );
    let n = x.len() / nx;
    assert!(
        n > 0 && w.len().is_multiple_of(n),
        "weight length is not a multiple of the input length"
    );
    par_rows(w.len() / n, nx, ROWS_PER_TASK, |o, j| {
        dot(&w[o * n..(o + 1) * n], &x[j * n..(j + 1) * n])
    })
}

/// `y[j·m + o] = Σ_i w[o·n + i] · x[j·n + i]` for `nx` input rows of `n`, bf16 weights.
pub fn gemv_bf16(w: &[bf16], x: &[f32], nx: usize) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if crate::backend::cpu::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA.
        return gemv(w, x, nx, |r, x| unsafe { dot_bf16_avx2(r, x) });
    }
    gemv(w, x, nx, dot_bf16_plain)
}

/// The same with f32 weights.
pub fn gemv_f32(w: &[f32], x: &[f32], nx: usize) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if crate::backend::cpu::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA.
        return gemv(w, x, nx, |r, x| unsafe { dot_f32_avx2(r, x) });
    }
    gemv(w, x, nx, dot_f32_plain)
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
            let y = gemv_bf16(&w, &x, 1);
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
            let yf = gemv_f32(&wf, &x, 1);
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

    /// Several input rows at once give, bit for bit, each row alone (the small-batch path
    /// of every decode kernel is this loop).
    #[test]
    fn several_rows_equal_each_row_alone() {
        let (m, n) = (70, 96);
        let (w, _) = data(m, n);
        let xs: Vec<f32> = (0..5 * n)
            .map(|i| ((i * 13 % 89) as f32 / 89.0) - 0.5)
            .collect();
        let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
        let (yb, yf) = (gemv_bf16(&w, &xs, 5), gemv_f32(&wf, &xs, 5));
        for j in 0..5 {
            let x = &xs[j * n..(j + 1) * n];
            assert_eq!(&yb[j * m..(j + 1) * m], gemv_bf16(&w, x, 1).as_slice());
            assert_eq!(&yf[j * m..(j + 1) * m], gemv_f32(&wf, x, 1).as_slice());
        }
    }
}
