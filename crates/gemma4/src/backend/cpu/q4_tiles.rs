//! Q4_0 and Q5_0 weights interleaved sixteen rows at a time for AVX-512 VNNI, and their
//! product with any number of input rows, as [`crate::backend::cpu::q8_tiles`] does for
//! Q8_0: decode batches and prefill (an integer GEMM with 8-bit activations, where these
//! formats' batches used to multiply weights dequantized to f32).
//!
//! Layout, per tile and 32-value block: four lines of nibbles, line `g` holding for each
//! row values `4g..4g+4` in its low nibbles and `16+4g..16+4g+4` in its high ones; for
//! Q5_0 one more line with their fifth bits (byte `k` of a row: bit `g` for value
//! `4g+k`, bit `4+g` for value `16+4g+k`); and the sixteen rows' f16 scales. The bytes
//! are GGML's (18 or 22 per 32 weights), plus the rows padding the last tile.
//!
//! Arithmetic: GGML stores `q + 8` (Q4_0) or `q + 16` (Q5_0) unsigned; `vpdpbusd` of the
//! unpacked values against four broadcast input bytes adds into each row's lane, the
//! offset comes back out as `8 · Σ x` (or `16 · Σ x`) per input block, and each block's
//! integer sum is scaled by `d_w · d_x` in f32: candle's `vec_dot_q4_0_q8_0` /
//! `vec_dot_q5_0_q8_0` (llama.cpp's) per block, the f32 additions in another order. A
//! row's result is the same whatever batch it is in.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use half::f16;

#[cfg(target_arch = "x86_64")]
use crate::backend::cpu::gemv::by_input_count;
use crate::backend::cpu::gemv::{tiled_product, TILE};
use crate::backend::cpu::q8_packed::Line;
use crate::backend::cpu::q8_tiles::Input;

/// Tiles per parallel task.
const TILES_PER_TASK: usize = 2;
/// Inputs per kernel call, at most.
const GROUP: usize = 4;

/// Whether this CPU runs the kernels.
pub fn available() -> bool {
    crate::backend::cpu::has_avx512_vnni()
}

/// GGML's Q4_0 block.
#[repr(C)]
struct BlockQ4_0 {
    d: u16,
    qs: [u8; 16],
}

/// GGML's Q5_0 block.
#[repr(C)]
struct BlockQ5_0 {
    d: u16,
    qh: [u8; 4],
    qs: [u8; 16],
}

const _: () = {
    use candle_core::quantized::k_quants as k;
    assert!(std::mem::size_of::<BlockQ4_0>() == std::mem::size_of::<k::BlockQ4_0>());
    assert!(std::mem::size_of::<BlockQ5_0>() == std::mem::size_of::<k::BlockQ5_0>());
    assert!(std::mem::align_of::<BlockQ5_0>() == std::mem::align_of::<k::BlockQ5_0>());
};

/// A `[rows, cols]` Q4_0 or Q5_0 matrix in tiles.
pub struct NibbleTiles {
    rows: usize,
    cols: usize,
    /// Q5_0 (fifth bits in `high`) or Q4_0.
    five: bool,
    /// Per tile and block, four lines.
    nib: Vec<Line>,
    /// Per tile and block, one line (Q5_0 only).
    high: Vec<Line>,
    /// Per tile and block, the sixteen rows' scales.
    d: Vec<[f16; TILE]>,
}

impl std::fmt::Debug for NibbleTiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let format = if self.five { "q5_0" } else { "q4_0" };
        write!(f, "NibbleTiles {{ {}×{}, {format} }}", self.rows, self.cols)
    }
}

impl NibbleTiles {
    /// Tiles a 2-D CPU Q4_0 or Q5_0 tensor whose width is whole blocks; `None` for
    /// anything else or where the CPU lacks the kernel's instructions.
    pub fn from_qtensor(q: &candle_core::quantized::QTensor) -> crate::error::Result<Option<Self>> {
        use crate::backend::cpu::qmatmul::blocks;
        use candle_core::quantized::GgmlDType;
        let dims = q.shape().dims();
        if !available() || dims.len() != 2 || !q.device().is_cpu() {
            return Ok(None);
        }
        let (rows, cols) = (dims[0], dims[1]);
        if cols == 0 || !cols.is_multiple_of(32) {
            return Ok(None);
        }
        let data = q.data()?;
        let count = rows * cols / 32;
        Ok(match q.dtype() {
            GgmlDType::Q4_0 => blocks::<BlockQ4_0>(&data, count).map(|b| {
                Self::build(rows, cols, false, |i, _| {
                    let x = &b[i];
                    let mut v = [0u8; 32];
                    for j in 0..16 {
                        v[j] = x.qs[j] & 0xF;
                        v[j + 16] = x.qs[j] >> 4;
                    }
                    (x.d, v)
                })
            }),
            GgmlDType::Q5_0 => blocks::<BlockQ5_0>(&data, count).map(|b| {
                Self::build(rows, cols, true, |i, _| {
                    let x = &b[i];
                    let qh = u32::from_le_bytes(x.qh);
                    let mut v = [0u8; 32];
                    for j in 0..16 {
                        v[j] = (x.qs[j] & 0xF) | ((((qh >> j) << 4) & 0x10) as u8);
                        v[j + 16] = (x.qs[j] >> 4) | (((qh >> (j + 12)) & 0x10) as u8);
                    }
                    (x.d, v)
                })
            }),
            _ => None,
        })
    }

    /// The tiles, `block(i, b)` giving GGML block `i` (row-major) as its scale and its 32
    /// stored values (`q + 8` or `q + 16`), `b` its index within the row.
    fn build(
        rows: usize,
        cols: usize,
        five: bool,
        block: impl Fn(usize, usize) -> (u16, [u8; 32]) + Sync,
    ) -> Self {
        use rayon::prelude::*;
        let nb = cols / 32;
        let tiles = rows.div_ceil(TILE);
        let mut nib = vec![Line([0; 64]); tiles * nb * 4];
        let mut high = vec![Line([0; 64]); if five { tiles * nb } else { 0 }];
        let mut d = vec![[f16::ZERO; TILE]; tiles * nb];
        let high_chunks: Vec<&mut [Line]> = if five {
            high.chunks_mut(nb).collect()
        } else {
            (0..tiles).map(|_| Default::default()).collect()
        };
        nib.par_chunks_mut(nb * 4)
            .zip(d.par_chunks_mut(nb))
            .zip(high_chunks.into_par_iter())
            .enumerate()
            .for_each(|(t, ((nib, d), high))| {
                for lane in 0..TILE.min(rows - t * TILE) {
                    let r = t * TILE + lane;
                    for (b, db) in d.iter_mut().enumerate() {
                        let (scale, v) = block(r * nb + b, b);
                        db[lane] = f16::from_bits(scale);
                        for g in 0..4 {
                            for k in 0..4 {
                                let (lo, hi) = (v[4 * g + k], v[16 + 4 * g + k]);
                                nib[b * 4 + g].0[4 * lane + k] =
                                    ((lo & 0xF) | ((hi & 0xF) << 4)) as i8;
                                if five {
                                    let bits = ((lo >> 4) << g) | ((hi >> 4) << (4 + g));
                                    high[b].0[4 * lane + k] |= bits as i8;
                                }
                            }
                        }
                    }
                }
            });
        NibbleTiles {
            rows,
            cols,
            five,
            nib,
            high,
            d,
        }
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes held.
    pub fn size_in_bytes(&self) -> usize {
        (self.nib.len() + self.high.len()) * 64 + self.d.len() * 2 * TILE
    }

    /// Rows `ids` (checked by the caller) as f32, as candle's `to_float` computes them.
    pub fn dequantize_rows(&self, ids: &[u32]) -> Vec<f32> {
        let (nb, cols) = (self.cols / 32, self.cols);
        let offset = if self.five { 16 } else { 8 };
        let mut out = vec![0f32; ids.len() * cols];
        for (o, &r) in out.chunks_exact_mut(cols).zip(ids) {
            let (t, lane) = (r as usize / TILE, r as usize % TILE);
            for (b, o) in o.chunks_exact_mut(32).enumerate() {
                let tb = t * nb + b;
                let d = self.d[tb][lane].to_f32();
                for (i, y) in o.iter_mut().enumerate() {
                    let (g, k, upper) = ((i % 16) / 4, i % 4, i >= 16);
                    let byte = self.nib[tb * 4 + g].0[4 * lane + k] as u8;
                    let mut q = if upper { byte >> 4 } else { byte & 0xF };
                    if self.five {
                        let h = self.high[tb].0[4 * lane + k] as u8;
                        q |= ((h >> (g + if upper { 4 } else { 0 })) & 1) << 4;
                    }
                    *y = (q as i32 - offset) as f32 * d;
                }
            }
        }
        out
    }

    /// `W x` for `nx` input rows of `cols` values (`[nx, rows]` out); `None` where the
    /// CPU lacks the instructions or the width does not match.
    pub fn gemm(&self, x: &[f32], nx: usize) -> Option<Vec<f32>> {
        if !available() || nx == 0 || x.len() != nx * self.cols {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        {
            use rayon::prelude::*;
            let inputs: Vec<Input> = x.par_chunks_exact(self.cols).map(Input::new).collect();
            let nb = self.cols / 32;
            Some(tiled_product::<_, GROUP>(
                self.rows,
                &inputs,
                TILES_PER_TASK,
                |t, xs| {
                    let nib = &self.nib[t * nb * 4..(t + 1) * nb * 4];
                    let d = &self.d[t * nb..(t + 1) * nb];
                    // SAFETY: the CPU has the instructions (`available`); the tile has
                    // `nb` blocks and each input as many.
                    unsafe {
                        if self.five {
                            let high = &self.high[t * nb..(t + 1) * nb];
                            by_input_count!(xs.len(), GROUP, [1, 2, 3, 4], J => kernel::<J, true>(nib, high, d, std::array::from_fn(|i| &xs[i])))
                        } else {
                            by_input_count!(xs.len(), GROUP, [1, 2, 3, 4], J => kernel::<J, false>(nib, &[], d, std::array::from_fn(|i| &xs[i])))
                        }
                    }
                },
            ))
        }
        #[cfg(not(target_arch = "x86_64"))]
        None
    }
}

/// One tile (sixteen rows, `d.len()` blocks) against `J` inputs; `FIVE`: Q5_0 (fifth
/// bits in `high`, offset 16), else Q4_0 (offset 8).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn kernel<const J: usize, const FIVE: bool>(
    nib: &[Line],
    high: &[Line],
    d: &[[f16; TILE]],
    x: [&Input; J],
) -> [[f32; TILE]; J] {
    let nb = d.len();
    assert!(nib.len() == 4 * nb && (!FIVE || high.len() == nb));
    for x in x {
        assert!(x.q.qs.len() == nb * 32 && x.q.d.len() == nb && x.sums.len() == nb);
    }
    let offset = if FIVE { 16 } else { 8 };
    let m4 = _mm512_set1_epi8(0xF);
    let m10 = _mm512_set1_epi8(0x10);
    let mut acc = [_mm512_setzero_ps(); J];
    for b in 0..nb {
        let lines = nib.as_ptr().add(4 * b);
        crate::backend::cpu::gemv::prefetch_ahead(lines as *const u8, 4);
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(d.as_ptr().add(b) as *const __m256i));
        let hb = if FIVE {
            _mm512_load_si512(high.as_ptr().add(b) as *const _)
        } else {
            _mm512_setzero_si512()
        };
        let mut isum: [__m512i; J] =
            std::array::from_fn(|j| _mm512_set1_epi32(-offset * x[j].sums[b]));
        for g in 0..4 {
            let line = _mm512_load_si512(lines.add(g) as *const _);
            let mut lo = _mm512_and_si512(line, m4);
            let mut hi = _mm512_and_si512(_mm512_srli_epi16(line, 4), m4);
            if FIVE {
                // Bit g of each byte to bit 4 (low values), bit 4 + g (high values).
                let (l, h) = match g {
                    0 => (_mm512_slli_epi16(hb, 4), hb),
                    1 => (_mm512_slli_epi16(hb, 3), _mm512_srli_epi16(hb, 1)),
                    2 => (_mm512_slli_epi16(hb, 2), _mm512_srli_epi16(hb, 2)),
                    _ => (_mm512_slli_epi16(hb, 1), _mm512_srli_epi16(hb, 3)),
                };
                lo = _mm512_or_si512(lo, _mm512_and_si512(l, m10));
                hi = _mm512_or_si512(hi, _mm512_and_si512(h, m10));
            }
            for j in 0..J {
                let q = x[j].q.qs.as_ptr().add(32 * b + 4 * g);
                let xl = _mm512_set1_epi32(std::ptr::read_unaligned(q as *const i32));
                let xh = _mm512_set1_epi32(std::ptr::read_unaligned(q.add(16) as *const i32));
                isum[j] = _mm512_dpbusd_epi32(isum[j], lo, xl);
                isum[j] = _mm512_dpbusd_epi32(isum[j], hi, xh);
            }
        }
        for j in 0..J {
            let s = _mm512_mul_ps(dw, _mm512_set1_ps(x[j].q.d[b]));
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[j]), s, acc[j]);
        }
    }
    let mut out = [[0f32; TILE]; J];
    for j in 0..J {
        _mm512_storeu_ps(out[j].as_mut_ptr(), acc[j]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::qmatmul::tests::{data, dequantized};
    use crate::quant::{quantize, QuantType};

    /// candle's dequantization row for row; the one-row path (candle's `vec_dot`) within
    /// f32 rounding relative to the terms' magnitude, for partial tiles and 1–9 inputs;
    /// every input's outputs equal, bit for bit, that input alone.
    #[test]
    fn match_candle_and_each_input_alone() {
        if !available() {
            return;
        }
        for q in [QuantType::Q4_0, QuantType::Q5_0] {
            // Even block counts: candle's Q5_0 `vec_dot` asserts them (debug builds).
            for (m, n) in [(1, 64), (5, 192), (37, 256), (70, 1536)] {
                let (w, _) = data(m, n);
                let qt = quantize(&w, q).unwrap();
                let t = NibbleTiles::from_qtensor(&qt).unwrap().expect("tiled");
                let want = dequantized(&qt);
                let all: Vec<u32> = (0..m as u32).collect();
                assert_eq!(t.dequantize_rows(&all), want, "{q} {m}×{n}");
                for nx in [1, 2, 5, 9] {
                    let xs: Vec<f32> = (0..nx * n)
                        .map(|i| (((i * 37 % 101) as f32 / 101.0) - 0.5) * (1 + i % 13) as f32)
                        .collect();
                    let y = t.gemm(&xs, nx).unwrap();
                    let plain = crate::backend::cpu::qmatmul::gemv(&qt, &xs, nx)
                        .unwrap()
                        .unwrap();
                    for (o, (a, b)) in y.iter().zip(&plain).enumerate() {
                        let (j, r) = (o / m, o % m);
                        let terms: f32 = (0..n)
                            .map(|i| (want[r * n + i] * xs[j * n + i]).abs())
                            .sum();
                        assert!(
                            (a - b).abs() <= 1e-6 * terms.max(1.0),
                            "{q} {m}×{n}, {nx} inputs: {a} vs {b}"
                        );
                    }
                    for j in 0..nx {
                        let alone = t.gemm(&xs[j * n..(j + 1) * n], 1).unwrap();
                        assert_eq!(&y[j * m..(j + 1) * m], alone.as_slice(), "{q} input {j}");
                    }
                }
            }
        }
    }
}
