//! Q8_0 weights repacked at load for this CPU's kernel; the same numbers as GGML's Q8_0
//! blocks (32 signed bytes and one f16 scale per block) in one of two layouts:
//!
//! - with AVX-512 VNNI, interleaved sixteen rows at a time ([`crate::backend::cpu::q8_tiles`]),
//!   whose kernel takes any number of input rows, prefill included;
//! - with AVX2 only, split into a 64-byte-aligned array of all the quantized bytes,
//!   row-major, and a separate array of the scales, for the decode kernel below.
//!
//! Why the split rows: GGML's 34-byte blocks straddle cache lines every other block, and
//! each block's scale is a separate 2-byte load and conversion. Split, every 32-byte load
//! is aligned and eight scales convert with one F16C instruction. The bytes held are the
//! same (34 per 32 weights). (`gemma4 quantize` loads its weights with GGML's layout kept, so
//! nothing needs the layout back.)
//!
//! The AVX2 kernel computes what candle's `vec_dot_q8_0_q8_0` computes (the activation quantized
//! to Q8_0 as candle's `from_float` does, [`crate::backend::cpu::act_quant`], the same integer products and f32 scale products),
//! adding the blocks in four interleaved sums instead of one; the tests hold it to the
//! GGML-layout path within f32 rounding. With it E2B Q8_0 decode streams ~16 GB/s per
//! two cores against ~12 for the same kernel on GGML's layout, four rows at a time.

use candle_core::quantized::k_quants::BlockQ8_0;
use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use rayon::prelude::*;

use crate::backend::cpu::act_quant::Q8Blocks;
use crate::backend::cpu::q8_tiles::{self, Tiles};
use crate::error::Result;

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 32;

/// 64 bytes on a 64-byte boundary: one cache line, one aligned AVX-512 load.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line(pub [i8; 64]);

/// A `[rows, cols]` Q8_0 matrix, `cols` a multiple of 32.
pub struct PackedQ8 {
    rows: usize,
    cols: usize,
    layout: Layout,
}

enum Layout {
    /// Row-major values in 64-byte lines (`rows * cols` of them, the tail zero-padded)
    /// and the `rows * cols / 32` scales, row-major: the AVX2 kernel's.
    Rows { lines: Vec<Line>, scales: Vec<f16> },
    /// Sixteen rows interleaved: the AVX-512 VNNI kernel's.
    Tiles(Tiles),
}

impl std::fmt::Debug for PackedQ8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let layout = match self.layout {
            Layout::Rows { .. } => "rows",
            Layout::Tiles(_) => "tiles",
        };
        write!(f, "PackedQ8 {{ {}×{}, {layout} }}", self.rows, self.cols)
    }
}

impl std::fmt::Debug for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Line")
    }
}

/// GGML's Q8_0 block (candle's `BlockQ8_0`, whose fields are private; the layout is
/// GGML's and fixed).
#[repr(C)]
pub(crate) struct Block {
    pub d: u16,
    pub qs: [i8; 32],
}
const _: () = assert!(std::mem::size_of::<Block>() == std::mem::size_of::<BlockQ8_0>());
const _: () = assert!(std::mem::align_of::<Block>() == std::mem::align_of::<BlockQ8_0>());

impl PackedQ8 {
    /// Whether this machine runs the packed kernel (AVX2, FMA and F16C).
    pub fn available() -> bool {
        crate::backend::cpu::has_avx2_fma_f16c()
    }

    /// Repacks a 2-D CPU Q8_0 tensor for this CPU's kernel; `None` for another format
    /// or shape.
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        Self::from_qtensor_as(q, q8_tiles::available())
    }

    /// The same in the tiled layout (`tiled`) or the row layout.
    pub(crate) fn from_qtensor_as(q: &QTensor, tiled: bool) -> Result<Option<Self>> {
        let dims = q.shape().dims();
        if q.dtype() != GgmlDType::Q8_0 || dims.len() != 2 || !q.device().is_cpu() {
            return Ok(None);
        }
        let (rows, cols) = (dims[0], dims[1]);
        if cols == 0 || !cols.is_multiple_of(32) {
            return Ok(None);
        }
        let data = q.data()?;
        let Some(blocks) = crate::backend::cpu::qmatmul::blocks::<Block>(&data, rows * cols / 32)
        else {
            return Ok(None);
        };
        let layout = if tiled {
            Layout::Tiles(Tiles::from_blocks(blocks, rows, cols))
        } else {
            let mut lines = vec![Line([0; 64]); (rows * cols).div_ceil(64)];
            // SAFETY: `lines` holds at least `rows * cols` bytes.
            let qs: &mut [i8] = unsafe {
                std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut i8, rows * cols)
            };
            qs.par_chunks_mut(32 * 1024)
                .zip(blocks.par_chunks(1024))
                .for_each(|(out, bs)| {
                    for (o, b) in out.chunks_exact_mut(32).zip(bs) {
                        o.copy_from_slice(&b.qs);
                    }
                });
            let scales = blocks.iter().map(|b| f16::from_bits(b.d)).collect();
            Layout::Rows { lines, scales }
        };
        Ok(Some(PackedQ8 { rows, cols, layout }))
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The row layout's values and scales.
    fn row_layout(&self) -> Option<(&[i8], &[f16])> {
        match &self.layout {
            // SAFETY: `lines` holds at least `rows * cols` bytes.
            Layout::Rows { lines, scales } => Some((
                unsafe {
                    std::slice::from_raw_parts(lines.as_ptr() as *const i8, self.rows * self.cols)
                },
                scales,
            )),
            Layout::Tiles(_) => None,
        }
    }

    /// Bytes held (what decoding streams per token): GGML's, and in the tiled layout the
    /// rows padding its last tile.
    pub fn size_in_bytes(&self) -> usize {
        match &self.layout {
            Layout::Rows { scales, .. } => self.rows * self.cols + scales.len() * 2,
            Layout::Tiles(t) => t.size_in_bytes(),
        }
    }

    /// Rows `ids` (or all rows) as f32, row-major.
    pub fn dequantize_rows(&self, ids: Option<&[u32]>) -> Vec<f32> {
        let (nb, cols) = (self.cols / 32, self.cols);
        let row = |r: usize, out: &mut [f32]| match (&self.layout, self.row_layout()) {
            (Layout::Tiles(t), _) => t.dequantize_row(r, out),
            (_, Some((qs, scales))) => {
                for (b, o) in out.chunks_exact_mut(32).enumerate() {
                    let d = scales[r * nb + b].to_f32();
                    for (v, q) in o.iter_mut().zip(&qs[r * cols + b * 32..][..32]) {
                        *v = *q as f32 * d;
                    }
                }
            }
            _ => unreachable!("one of the two layouts"),
        };
        let picked: Vec<usize> = match ids {
            Some(ids) => ids.iter().map(|&i| i as usize).collect(),
            None => (0..self.rows).collect(),
        };
        let mut out = vec![0f32; picked.len() * cols];
        out.par_chunks_mut(cols)
            .zip(picked.par_iter())
            .for_each(|(o, &r)| row(r, o));
        out
    }

    /// Whether [`Self::gemv`] takes batches of any size (prefill too), as the tiled
    /// layout's kernel does; the row layout's is for decode batches.
    pub fn takes_any_batch(&self) -> bool {
        matches!(self.layout, Layout::Tiles(_))
    }

    /// `W x` for `nx` rows `x` of `cols` values each (`[nx, rows]` out); `None` when the
    /// width does not match or the CPU lacks the layout's instructions.
    pub fn gemv(&self, x: &[f32], nx: usize) -> Option<Vec<f32>> {
        if nx == 0 || x.len() != nx * self.cols || !Self::available() {
            return None;
        }
        let (qs, scales) = match &self.layout {
            Layout::Tiles(t) => return t.gemm(x, nx),
            Layout::Rows { .. } => self.row_layout()?,
        };
        #[cfg(target_arch = "x86_64")]
        {
            let a: Vec<Q8Blocks> = x.chunks_exact(self.cols).map(Q8Blocks::new).collect();
            // SAFETY: AVX2/FMA/F16C checked above; `par_rows` asks for rows < `self.rows`.
            Some(crate::backend::cpu::gemv::par_rows(
                self.rows,
                nx,
                ROWS_PER_TASK,
                |r, j| unsafe { self.dot(qs, scales, r, &a[j].qs, &a[j].d) },
            ))
        }
        #[cfg(not(target_arch = "x86_64"))]
        None
    }

    /// Row `row` dotted with the quantized activation `xs` (block scales `dx`): one row
    /// at a time, four accumulators over consecutive blocks. (Four rows sharing each
    /// activation load, as candle's `vec_dot_4`, streamed 15–20% slower here: four
    /// interleaved streams per core against one.)
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot(&self, qs: &[i8], scales: &[f16], row: usize, xs: &[i8], dx: &[f32]) -> f32 {
        use std::arch::x86_64::*;
        let (cols, nb) = (self.cols, self.cols / 32);
        assert!(row < self.rows && xs.len() == cols && dx.len() == nb);
        assert!(qs.len() == self.rows * cols && scales.len() == self.rows * nb);
        let rq = qs.as_ptr().add(row * cols);
        let rd = scales.as_ptr().add(row * nb) as *const u16;
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut s = [0f32; 8];
        let mut b = 0;
        while b < nb {
            let group = (nb - b).min(8);
            crate::backend::cpu::gemv::prefetch_ahead(rq.add(b * 32) as *const u8, 4);
            crate::backend::cpu::gemv::prefetch_ahead(rd.add(b) as *const u8, 1);
            if group == 8 {
                // Eight scales in one conversion, times the activation's eight.
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(rd.add(b).cast()));
                let dxv = _mm256_loadu_ps(dx.as_ptr().add(b));
                _mm256_storeu_ps(s.as_mut_ptr(), _mm256_mul_ps(dw, dxv));
            } else {
                for (j, sj) in s.iter_mut().enumerate().take(group) {
                    let d = _mm_cvtph_ps(_mm_cvtsi32_si128(*rd.add(b + j) as i32));
                    *sj = _mm_cvtss_f32(d) * dx[b + j];
                }
            }
            for (j, sj) in s.iter().enumerate().take(group) {
                let off = (b + j) * 32;
                let xv = _mm256_loadu_si256(xs.as_ptr().add(off) as *const __m256i);
                let wv = _mm256_load_si256(rq.add(off) as *const __m256i);
                // |w| · sign(w)·x as unsigned × signed byte pairs, summed to i32 lanes.
                let p = _mm256_madd_epi16(
                    ones,
                    _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv)),
                );
                acc[j & 3] =
                    _mm256_fmadd_ps(_mm256_broadcast_ss(sj), _mm256_cvtepi32_ps(p), acc[j & 3]);
            }
            b += group;
        }
        crate::backend::cpu::gemv::hsum8(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::qmatmul::tests::{data, dequantized};
    use crate::quant::{quantize, QuantType};

    /// Both layouts: the GGML-layout path (candle's `vec_dot`) within f32 rounding, for
    /// widths with and without a partial group of eight blocks (and an odd block count),
    /// row counts that leave a partial tile, and 1–9 inputs; every input's outputs equal,
    /// bit for bit, that input alone; dequantized rows equal candle's.
    #[test]
    fn matches_the_ggml_layout_path() {
        for tiled in [false, true] {
            if tiled && !q8_tiles::available() {
                continue;
            }
            for (m, n) in [(1, 32), (5, 96), (37, 256), (70, 1536), (9, 544)] {
                let (w, _) = data(m, n);
                let q = quantize(&w, QuantType::Q8_0).unwrap();
                let p = PackedQ8::from_qtensor_as(&q, tiled).unwrap().expect("q8_0");
                if !tiled {
                    assert_eq!(p.size_in_bytes(), q.storage_size_in_bytes());
                }
                let want = dequantized(&q);
                assert_eq!(p.dequantize_rows(None), want);
                let r = [m as u32 - 1, 0];
                assert_eq!(p.dequantize_rows(Some(&r))[..n], want[(m - 1) * n..]);
                for nx in [1, 2, 5, 9] {
                    let xs: Vec<f32> = (0..nx * n)
                        .map(|i| ((i * 37 % 101) as f32 / 101.0) - 0.5)
                        .collect();
                    let Some(y) = p.gemv(&xs, nx) else { continue };
                    let plain = crate::backend::cpu::qmatmul::gemv(&q, &xs, nx)
                        .unwrap()
                        .unwrap();
                    for (a, b) in y.iter().zip(&plain) {
                        assert!(
                            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                            "tiled {tiled}, {m}×{n}, {nx} inputs: {a} vs {b}"
                        );
                    }
                    for j in 0..nx {
                        let alone = p.gemv(&xs[j * n..(j + 1) * n], 1).unwrap();
                        assert_eq!(&y[j * m..(j + 1) * m], alone.as_slice(), "input {j}");
                    }
                }
            }
        }
    }

    #[test]
    fn declines_other_formats_and_widths() {
        let (w, x) = data(4, 256);
        let q = quantize(&w, QuantType::Q4K).unwrap();
        assert!(PackedQ8::from_qtensor(&q).unwrap().is_none());
        let q = quantize(&w, QuantType::Q8_0).unwrap();
        for tiled in [false, true] {
            let p = PackedQ8::from_qtensor_as(&q, tiled).unwrap().unwrap();
            assert!(p.gemv(&x[..128], 1).is_none());
            assert!(p.gemv(&x, 0).is_none());
        }
    }
}
