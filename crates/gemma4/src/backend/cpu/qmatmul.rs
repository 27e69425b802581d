//! Products with block-quantized weights ([`crate::quant`]) on the CPU where candle's own
//! path is slow: `W` a `[m, n]` [`QTensor`] in Q8_0, Q4_0, Q5_0, Q4_K or Q6_K.
//!
//! Decoding one token ([`gemv`]), the arithmetic is llama.cpp's (and candle's): `x` is
//! quantized once to the format's activation blocks (Q8_0 for the 32-wide formats, Q8_K
//! for the k-quants) and each row is an integer dot product scaled per block, computed by
//! candle's SIMD block kernels (`GgmlType::vec_dot_4`, four rows sharing one activation
//! load). What this module adds
//! is the threading: rows are split across the rayon pool (`--threads`), like
//! [`crate::backend::cpu::gemv`]. candle's own decode path hands the same kernels to a second, spinning
//! thread pool pinned to the cores, which contended with rayon's workers between
//! projections and ran E2B Q8_0 decode at about a third of the memory-bandwidth bound.
//! (With AVX-512 VNNI every format is repacked at load into the tiles of `q8_tiles`,
//! `q4_tiles` and `kquant_tiles`; with AVX2, Q8_0 takes [`crate::backend::cpu::q8_packed`]
//! and Q4_K/Q6_K [`crate::backend::cpu::kquant_gemv`]. This path is the portable
//! fallback, and the reference the repacked kernels' tests compare with.)
//!
//! Prefill without the tiles ([`dequantize`]): candle has no fast AVX2 kernel for Q8_0,
//! Q4_0 or Q5_0 batches (~18 GFLOP/s on the earlier sessions' machine), so those are
//! dequantized to f32 in parallel and multiplied with the f32 GEMM; the activations then
//! stay f32.

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ4_0, BlockQ5_0, BlockQ6K, BlockQ8_0};
use candle_core::quantized::{GgmlDType, GgmlType, QTensor};
use rayon::prelude::*;

use crate::backend::cpu::kquant_gemv;
use crate::error::Result;

/// Rows per parallel task (a multiple of 4, the kernels' row group).
const ROWS_PER_TASK: usize = 32;

/// `W x` for a 2-D CPU `QTensor` in one of the supported formats and `x.len()` equal to
/// its width; `None` when the format, rank or width does not fit (the caller falls back to
/// candle's matmul, which reports shape errors).
pub fn gemv(w: &QTensor, x: &[f32], nx: usize) -> Result<Option<Vec<f32>>> {
    let dims = w.shape().dims();
    if dims.len() != 2 || nx == 0 || dims[1] * nx != x.len() || !w.device().is_cpu() {
        return Ok(None);
    }
    let (m, n) = (dims[0], dims[1]);
    let data = w.data()?;
    Ok(match w.dtype() {
        GgmlDType::Q8_0 => run::<BlockQ8_0>(&data, m, n, x),
        GgmlDType::Q4_0 => run::<BlockQ4_0>(&data, m, n, x),
        GgmlDType::Q5_0 => run::<BlockQ5_0>(&data, m, n, x),
        GgmlDType::Q4K if kquant_gemv::available() => kquant_gemv::gemv_q4k(&data, m, x, nx),
        GgmlDType::Q6K if kquant_gemv::available() => kquant_gemv::gemv_q6k(&data, m, x, nx),
        GgmlDType::Q4K => run::<BlockQ4K>(&data, m, n, x),
        GgmlDType::Q6K => run::<BlockQ6K>(&data, m, n, x),
        _ => None,
    })
}

/// The blocks of `bytes` as `&[T]`, when the length and alignment allow it. `T` must be
/// a GGML block type (plain integers and f16s, valid for any bit pattern).
pub(crate) fn blocks<T>(bytes: &[u8], count: usize) -> Option<&[T]> {
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
        && matches!(
            w.dtype(),
            GgmlDType::Q8_0 | GgmlDType::Q4_0 | GgmlDType::Q5_0
        )
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
        GgmlDType::Q5_0 => dequantize_as::<BlockQ5_0>(&data, m, n),
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

/// `m` rows of `n` elements in blocks `T`, each dotted with every activation row of
/// `xq` (`nx` rows of `n / T::VecDotType::BLCK_SIZE` blocks) by `dot4` (four rows at a
/// time, sharing the activation blocks) and `dot1` (the 0–3 rows left), in parallel;
/// `[nx, m]` out. Each group of weight rows is read once for all the activation rows.
fn par_rows<T: Sync, A: Sync>(
    w: &[T],
    m: usize,
    nb: usize,
    xq: &[A],
    nx: usize,
    dot4: impl Fn([&[T]; 4], &[A]) -> [f32; 4] + Sync,
    dot1: impl Fn(&[T], &[A]) -> f32 + Sync,
) -> Vec<f32> {
    let row = |o: usize| &w[o * nb..(o + 1) * nb];
    let per_x = xq.len() / nx;
    let x = |j: usize| &xq[j * per_x..(j + 1) * per_x];
    crate::backend::cpu::gemv::par_row_tiles(m, nx, ROWS_PER_TASK, |rows, part| {
        let (lo, hi) = (rows.start, rows.end);
        let mut o = lo;
        while o + 4 <= hi {
            for j in 0..nx {
                let d = dot4([row(o), row(o + 1), row(o + 2), row(o + 3)], x(j));
                part[j * (hi - lo) + o - lo..][..4].copy_from_slice(&d);
            }
            o += 4;
        }
        for o in o..hi {
            for j in 0..nx {
                part[j * (hi - lo) + o - lo] = dot1(row(o), x(j));
            }
        }
    })
}

fn run<T: GgmlType>(bytes: &[u8], m: usize, n: usize, x: &[f32]) -> Option<Vec<f32>> {
    if n == 0 || !n.is_multiple_of(T::BLCK_SIZE) || !x.len().is_multiple_of(n) {
        return None;
    }
    let (nb, nx) = (n / T::BLCK_SIZE, x.len() / n);
    let w = blocks::<T>(bytes, m * nb)?;
    let per_x = n / T::VecDotType::BLCK_SIZE;
    let mut xq = vec![T::VecDotType::zeros(); nx * per_x];
    for (q, x) in xq.chunks_exact_mut(per_x).zip(x.chunks_exact(n)) {
        T::VecDotType::from_float(x, q);
    }
    Some(par_rows(
        w,
        m,
        nb,
        &xq,
        nx,
        |r, a| {
            let (p, q, s, t) = T::vec_dot_4(n, r[0], r[1], r[2], r[3], a);
            [p, q, s, t]
        },
        |r, a| T::vec_dot(n, r, a),
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::quant::{quantize, QuantType};
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module, Tensor};

    /// A deterministic `[m, n]` weight and an `n`-long input for kernel tests.
    pub(crate) fn data(m: usize, n: usize) -> (Tensor, Vec<f32>) {
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
                let y = gemv(&qt, &x, 1).unwrap().expect("supported format");
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

    /// Several input rows through every format's kernel (this module's, the packed Q8_0
    /// and the k-quant ones) equal each row alone, bit for bit: the small-batch path
    /// reads the weights once and does each row's arithmetic unchanged.
    #[test]
    fn several_rows_equal_each_row_alone() {
        let (m, n) = (37, 512);
        let (w, _) = data(m, n);
        // 2, 3 and 5 rows: the k-quant kernels take inputs in groups of up to four.
        for nx in [2, 3, 5] {
            let xs: Vec<f32> = (0..nx * n)
                .map(|i| ((i * 37 % 101) as f32 / 101.0) - 0.5)
                .collect();
            for q in QuantType::ALL {
                let qt = quantize(&w, q).unwrap();
                let rows = gemv(&qt, &xs, nx).unwrap().expect("supported format");
                let packed = crate::backend::cpu::q8_packed::PackedQ8::from_qtensor(&qt).unwrap();
                for j in 0..nx {
                    let x = &xs[j * n..(j + 1) * n];
                    let alone = gemv(&qt, x, 1).unwrap().unwrap();
                    assert_eq!(
                        &rows[j * m..(j + 1) * m],
                        alone.as_slice(),
                        "{} row {j} of {nx}",
                        q.name()
                    );
                    if let Some(p) = &packed {
                        if let (Some(all), Some(one)) = (p.gemv(&xs, nx), p.gemv(x, 1)) {
                            assert_eq!(&all[j * m..(j + 1) * m], one.as_slice(), "packed q8_0");
                        }
                    }
                }
            }
        }
    }

    /// candle's dequantization of `q`, flattened (what the kernels' tests compare with).
    pub(crate) fn dequantized(q: &QTensor) -> Vec<f32> {
        let t = q.dequantize(&Device::Cpu).unwrap();
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Parallel dequantization gives candle's values, for every format.
    #[test]
    fn dequantizes_like_candle() {
        for q in QuantType::ALL {
            let (w, _) = data(70, 512);
            let qt = quantize(&w, q).unwrap();
            let ours = dequantize(&qt).unwrap().expect("supported format");
            let want = dequantized(&qt);
            assert_eq!(ours, want, "{}", q.name());
        }
    }

    #[test]
    fn declines_what_it_cannot_compute() {
        let (w, x) = data(4, 256);
        let qt = quantize(&w, QuantType::Q8_0).unwrap();
        assert!(gemv(&qt, &x[..128], 1).unwrap().is_none(), "width mismatch");
    }
}
