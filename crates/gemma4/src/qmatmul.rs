//! Products with block-quantized weights ([`crate::quant`]) on the CPU where candle's own
//! path is slow: `W` a `[m, n]` [`QTensor`] in Q8_0, Q4_0, Q4_K or Q6_K.
//!
//! Decoding one token ([`gemv`]), the arithmetic is llama.cpp's (and candle's): `x` is quantized once to the format's
//! activation blocks (Q8_0 for the 32-wide formats, Q8_K for the k-quants) and each row is
//! an integer dot product scaled per block, computed by candle's SIMD block kernels
//! (`GgmlType::vec_dot_4`, four rows sharing one activation load). What this module adds
//! is the threading: rows are split across the rayon pool (`--threads`), like
//! [`crate::gemv`]. candle's own decode path hands the same kernels to a second, spinning
//! thread pool pinned to the cores, which contended with rayon's workers between
//! projections and ran E2B Q8_0 decode at about a third of the memory-bandwidth bound.
//!
//! Prefill ([`dequantize`]): candle has no fast AVX2 kernel for Q8_0 or Q4_0 batches
//! (~18 GFLOP/s here, against ~120 for its repacked Q4_K/Q6_K), so those are dequantized
//! to f32 in parallel and multiplied with the f32 GEMM; the activations then stay f32,
//! which is closer to the unquantized model than llama.cpp's 8-bit activations.

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ4_0, BlockQ6K, BlockQ8_0};
use candle_core::quantized::{GgmlDType, GgmlType, QTensor};
use rayon::prelude::*;

use crate::error::Result;

/// Rows per parallel task (a multiple of 4, the kernels' row group).
const ROWS_PER_TASK: usize = 32;

/// `W x` for a 2-D CPU `QTensor` in one of the supported formats and `x.len()` equal to
/// its width; `None` when the format, rank or width does not fit (the caller falls back to
/// candle's matmul, which reports shape errors).
pub fn gemv(w: &QTensor, x: &[f32]) -> Result<Option<Vec<f32>>> {
    let dims = w.shape().dims();
    if dims.len() != 2 || dims[1] != x.len() || !w.device().is_cpu() {
        return Ok(None);
    }
    let (m, n) = (dims[0], dims[1]);
    let data = w.data()?;
    Ok(match w.dtype() {
        #[cfg(target_arch = "x86_64")]
        GgmlDType::Q8_0 if avx2_available() => q8_0_avx2(&data, m, n, x),
        GgmlDType::Q8_0 => run::<BlockQ8_0>(&data, m, n, x),
        GgmlDType::Q4_0 => run::<BlockQ4_0>(&data, m, n, x),
        GgmlDType::Q4K => run::<BlockQ4K>(&data, m, n, x),
        GgmlDType::Q6K => run::<BlockQ6K>(&data, m, n, x),
        _ => None,
    })
}

/// The blocks of `bytes` as `&[T]`, when the length and alignment allow it.
fn blocks<T>(bytes: &[u8], count: usize) -> Option<&[T]> {
    let size = std::mem::size_of::<T>();
    if bytes.len() != count * size || !(bytes.as_ptr() as usize).is_multiple_of(align_of::<T>()) {
        return None;
    }
    // SAFETY: the length and alignment were checked; the block types are plain `repr(C)`
    // structs of integers and f16s, valid for any bit pattern, and the bytes are the
    // tensor's storage, laid out as `[T]` by candle.
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, count) })
}

/// The formats whose prefill goes through [`dequantize`] (see the module comment).
pub fn prefill_dequantizes(w: &QTensor) -> bool {
    cfg!(target_arch = "x86_64")
        && w.device().is_cpu()
        && matches!(w.dtype(), GgmlDType::Q8_0 | GgmlDType::Q4_0)
}

/// `w` as a `[m, n]` f32 row-major buffer, rows dequantized in parallel; `None` for a
/// format or rank it does not handle.
pub fn dequantize(w: &QTensor) -> Result<Option<Vec<f32>>> {
    let dims = w.shape().dims();
    if dims.len() != 2 || !w.device().is_cpu() {
        return Ok(None);
    }
    let (m, n) = (dims[0], dims[1]);
    let data = w.data()?;
    Ok(match w.dtype() {
        GgmlDType::Q8_0 => dequantize_as::<BlockQ8_0>(&data, m, n),
        GgmlDType::Q4_0 => dequantize_as::<BlockQ4_0>(&data, m, n),
        GgmlDType::Q4K => dequantize_as::<BlockQ4K>(&data, m, n),
        GgmlDType::Q6K => dequantize_as::<BlockQ6K>(&data, m, n),
        _ => None,
    })
}

fn dequantize_as<T: GgmlType>(bytes: &[u8], m: usize, n: usize) -> Option<Vec<f32>> {
    if n == 0 || !n.is_multiple_of(T::BLCK_SIZE) {
        return None;
    }
    let nb = n / T::BLCK_SIZE;
    let w = blocks::<T>(bytes, m * nb)?;
    let mut out = vec![0f32; m * n];
    out.par_chunks_mut(ROWS_PER_TASK * n)
        .zip(w.par_chunks(ROWS_PER_TASK * nb))
        .for_each(|(o, b)| T::to_float(b, o));
    Some(out)
}

fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `m` rows of `n` elements in blocks `T`, each dotted with `x` by `dot4` (four rows at a
/// time, sharing the activation blocks) and `dot1` (the 0–3 rows left), in parallel.
fn par_rows<T: Sync>(
    w: &[T],
    m: usize,
    nb: usize,
    dot4: impl Fn([&[T]; 4]) -> [f32; 4] + Sync,
    dot1: impl Fn(&[T]) -> f32 + Sync,
) -> Vec<f32> {
    let row = |o: usize| &w[o * nb..(o + 1) * nb];
    let mut y = vec![0f32; m];
    y.par_chunks_mut(ROWS_PER_TASK)
        .enumerate()
        .for_each(|(c, ys)| {
            let mut o = c * ROWS_PER_TASK;
            let mut quads = ys.chunks_exact_mut(4);
            for q in &mut quads {
                q.copy_from_slice(&dot4([row(o), row(o + 1), row(o + 2), row(o + 3)]));
                o += 4;
            }
            for out in quads.into_remainder() {
                *out = dot1(row(o));
                o += 1;
            }
        });
    y
}

fn run<T: GgmlType>(bytes: &[u8], m: usize, n: usize, x: &[f32]) -> Option<Vec<f32>> {
    if n == 0 || !n.is_multiple_of(T::BLCK_SIZE) {
        return None;
    }
    let nb = n / T::BLCK_SIZE;
    let w = blocks::<T>(bytes, m * nb)?;
    let mut xq = vec![T::VecDotType::zeros(); n / T::VecDotType::BLCK_SIZE];
    T::VecDotType::from_float(x, &mut xq);
    Some(par_rows(
        w,
        m,
        nb,
        |r| {
            let (a, b, c, d) = T::vec_dot_4(n, r[0], r[1], r[2], r[3], &xq);
            [a, b, c, d]
        },
        |r| T::vec_dot(n, r, &xq),
    ))
}

/// GGML's Q8_0 block: an f16 scale and 32 signed bytes (candle's `BlockQ8_0`, whose fields
/// are private; the layout is GGML's and fixed).
#[repr(C)]
struct Q8_0 {
    d: u16,
    qs: [i8; 32],
}
const _: () = assert!(std::mem::size_of::<Q8_0>() == std::mem::size_of::<BlockQ8_0>());
const _: () = assert!(std::mem::align_of::<Q8_0>() == std::mem::align_of::<BlockQ8_0>());

/// Q8_0 weights × Q8_0 activations with AVX2: the same products and the same order of
/// additions as candle's `vec_dot_q8_0_q8_0` (so the same numbers), but four rows per
/// activation load, the f16 scales converted inline with F16C, no bounds checks in the
/// loop and a software prefetch 16 blocks ahead (34-byte blocks straddle cache lines).
/// candle converts each scale through a function call, which made its kernel
/// compute-bound: E2B Q8_0 decode went from 3.1 to 4.7 tokens/s with this kernel.
#[cfg(target_arch = "x86_64")]
fn q8_0_avx2(bytes: &[u8], m: usize, n: usize, x: &[f32]) -> Option<Vec<f32>> {
    if n == 0 || !n.is_multiple_of(32) {
        return None;
    }
    let nb = n / 32;
    let w = blocks::<Q8_0>(bytes, m * nb)?;
    let mut xq = vec![BlockQ8_0::zeros(); nb];
    BlockQ8_0::from_float(x, &mut xq);
    // SAFETY: `Q8_0` has `BlockQ8_0`'s size and alignment (checked at compile time).
    let xq: &[Q8_0] = unsafe { std::slice::from_raw_parts(xq.as_ptr() as *const Q8_0, nb) };
    let dx: Vec<f32> = xq
        .iter()
        .map(|b| half::f16::from_bits(b.d).to_f32())
        .collect();
    // SAFETY (both closures): `avx2_available()` was checked by the caller.
    Some(par_rows(
        w,
        m,
        nb,
        |r| unsafe { dot4_q8_0_avx2(r, xq, &dx) },
        |r| unsafe { dot4_q8_0_avx2([r; 4], xq, &dx)[0] },
    ))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot4_q8_0_avx2(rows: [&[Q8_0]; 4], x: &[Q8_0], dx: &[f32]) -> [f32; 4] {
    use std::arch::x86_64::*;
    // The unchecked reads below stay within all five slices.
    let nb = rows
        .iter()
        .fold(x.len().min(dx.len()), |n, r| n.min(r.len()));
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); 4];
    let rp = rows.map(|r| r.as_ptr());
    for b in 0..nb {
        let xv = _mm256_loadu_si256((*x.as_ptr().add(b)).qs.as_ptr() as *const __m256i);
        let dxb = *dx.as_ptr().add(b);
        for r in 0..4 {
            let blk = &*rp[r].add(b);
            // A prefetch past the end of the slice is harmless (it never faults).
            _mm_prefetch::<_MM_HINT_T0>((blk as *const Q8_0 as *const i8).add(34 * 16));
            let wv = _mm256_loadu_si256(blk.qs.as_ptr() as *const __m256i);
            let p = _mm256_madd_epi16(
                ones,
                _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv)),
            );
            let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(blk.d as i32)));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * dxb), _mm256_cvtepi32_ps(p), acc[r]);
        }
    }
    acc.map(|a| hsum8(a))
}

/// candle's `hsum_float_8` order: high half + low half, then pairs, then the two left.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum8(x: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{quantize, QuantType};
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module, Tensor};

    fn data(m: usize, n: usize) -> (Tensor, Vec<f32>) {
        let w: Vec<f32> = (0..m * n)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0) - 0.5)
            .collect();
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 31 % 97) as f32 / 97.0) - 0.5)
            .collect();
        (Tensor::from_vec(w, (m, n), &Device::Cpu).unwrap(), x)
    }

    /// The same numbers as candle's matmul on the same blocks (the plain path), for row
    /// counts that leave 0–3 rows after the groups of four and span several tasks.
    #[test]
    fn matches_candles_quantized_matmul() {
        for q in QuantType::ALL {
            for m in [1, 2, 3, 4, 5, 33, 70, 131] {
                let n = 512;
                let (w, x) = data(m, n);
                let qt = quantize(&w, q).unwrap();
                let y = gemv(&qt, &x).unwrap().expect("supported format");
                let xt = Tensor::from_vec(x.clone(), (1, n), &Device::Cpu).unwrap();
                let want: Vec<f32> = QMatMul::QTensor(std::sync::Arc::new(qt))
                    .forward(&xt)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert_eq!(y.len(), m);
                for o in 0..m {
                    assert!(
                        (y[o] - want[o]).abs() <= 1e-5 * want[o].abs().max(1.0),
                        "{} {m}×{n} row {o}: {} vs {}",
                        q.name(),
                        y[o],
                        want[o]
                    );
                }
                // And close to the dense product (quantization error only).
                let wd: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
                for o in 0..m {
                    let exact: f32 = (0..n).map(|i| wd[o * n + i] * x[i]).sum();
                    assert!((y[o] - exact).abs() < 0.5, "{} row {o}", q.name());
                }
            }
        }
    }

    /// The AVX2 Q8_0 kernel against the portable path (candle's `vec_dot`) on the same
    /// blocks: bit-identical, as both add the same products in the same order.
    #[test]
    fn q8_0_kernel_matches_the_portable_path() {
        if !avx2_available() {
            return;
        }
        for m in [1, 6, 37] {
            let (w, x) = data(m, 1536);
            let qt = quantize(&w, QuantType::Q8_0).unwrap();
            let data = qt.data().unwrap();
            #[cfg(target_arch = "x86_64")]
            {
                let fast = q8_0_avx2(&data, m, 1536, &x).unwrap();
                let plain = run::<BlockQ8_0>(&data, m, 1536, &x).unwrap();
                assert_eq!(fast, plain, "{m} rows");
            }
        }
    }

    #[test]
    fn dequantizes_like_candle() {
        for q in QuantType::ALL {
            let (w, _) = data(70, 512);
            let qt = quantize(&w, q).unwrap();
            let ours = dequantize(&qt).unwrap().expect("supported format");
            let want: Vec<f32> = qt
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(ours, want, "{}", q.name());
        }
    }

    #[test]
    fn declines_what_it_cannot_compute() {
        let (w, x) = data(4, 256);
        let qt = quantize(&w, QuantType::Q8_0).unwrap();
        assert!(gemv(&qt, &x[..128]).unwrap().is_none(), "width mismatch");
    }
}
