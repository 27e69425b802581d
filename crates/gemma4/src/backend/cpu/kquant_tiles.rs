//! Q4_K and Q6_K weights interleaved sixteen rows at a time for AVX-512 VNNI, and their
//! product with any number of input rows: decode batches and prefill alike.
//!
//! As for Q8_0 ([`crate::backend::cpu::q8_tiles`]), each 32-bit lane of a vector belongs
//! to one of sixteen rows and holds four of its values, so one instruction works on four
//! values of sixteen rows and a block's sums need no horizontal adds. The input is
//! quantized to Q8_K blocks ([`crate::backend::cpu::act_quant`]), as for the one-row
//! kernels. Q4_K: `vpdpbusd` (unsigned 4-bit weight × signed input, four products added
//! into the row's i32 lane) per sub-block of 32, then times the sub-block's scale.
//! Q6_K: `vpmaddubsw` (adjacent pairs of products into i16, which cannot saturate at six
//! bits) and `vpdpwssd` (the two pairs times the 16-value sub-block's scale, added into
//! the i32 lane). The integer sums are llama.cpp's (and candle's) `Σ_s scale_s · Σ q·y`
//! exactly; Q4_K's minimums (`Σ_s min_s · Σ y`) and Q6_K's `−32` offset
//! (`32 Σ_s scale_s · Σ y`) come from the Q8_K block sums by `vpdpwssd`. Each block's
//! integer sum is scaled by `d_w · d_x` in f32 and accumulated, as there; only the order
//! of the f32 additions differs. A row's result is the same whatever batch it is in.
//!
//! Per sixteen rows and 256 values the tile holds the bytes GGML does, plus for Q4_K the
//! scales and minimums unpacked from their 6-bit fields (+64 bytes, 2.8%) and for Q6_K
//! the alignment of the tile (+32 bytes, 1%); rows padding the last tile are zeros.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use half::f16;

use crate::backend::cpu::act_quant::Q8KBlocks;
#[cfg(target_arch = "x86_64")]
use crate::backend::cpu::gemv::by_input_count;
use crate::backend::cpu::gemv::{tiled_product, TILE};
use crate::backend::cpu::kquant_gemv::{BlockQ4K, BlockQ6K};

/// Tiles per parallel task.
const TILES_PER_TASK: usize = 2;
/// Inputs per kernel call, at most (each takes three or four vector registers).
const GROUP: usize = 4;

/// Whether this CPU runs the kernels.
pub fn available() -> bool {
    crate::backend::cpu::has_avx512_vnni()
}

/// Sixteen rows' 256 values of Q4_K. `nib[8j + g]` holds, for each row, values `4g..4g+4`
/// of sub-block `2j` in its low nibbles and of sub-block `2j + 1` in its high ones;
/// `mins[k]` holds each row's minimums of sub-blocks `2k` and `2k + 1` side by side.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Q4KTile {
    nib: [[u8; 64]; 32],
    scales: [[u8; TILE]; 8],
    mins: [[u8; 2 * TILE]; 4],
    d: [f16; TILE],
    dmin: [f16; TILE],
}

/// Sixteen rows' 256 values of Q6_K (stored as `q + 32`, 0–63). Values `4G..4G+4` of a
/// row are group `G`: its low four bits are in `nib[G % 32]` (low nibbles for `G < 32`),
/// its top two bits in `high[G % 16]` at bits `2 (G / 16)`. `scales[k]` holds each row's
/// scales of sub-blocks (16 values) `2k` and `2k + 1` side by side.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Q6KTile {
    nib: [[u8; 64]; 32],
    high: [[u8; 64]; 16],
    scales: [[i8; 2 * TILE]; 8],
    d: [f16; TILE],
}

const _: () = assert!(std::mem::size_of::<Q4KTile>() == 2368);
const _: () = assert!(std::mem::size_of::<Q6KTile>() == 3392);

enum Data {
    Q4K(Vec<Q4KTile>),
    Q6K(Vec<Q6KTile>),
}

/// A `[rows, cols]` Q4_K or Q6_K matrix in tiles; `tiles[t * nsb + b]` is super-block
/// `b` of rows `16t..16t + 16`.
pub struct KTiles {
    rows: usize,
    cols: usize,
    data: Data,
}

impl std::fmt::Debug for KTiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let format = match self.data {
            Data::Q4K(_) => "q4_k",
            Data::Q6K(_) => "q6_k",
        };
        write!(f, "KTiles {{ {}×{}, {format} }}", self.rows, self.cols)
    }
}

/// Q4_K's 6-bit scale and minimum of sub-block `j` (GGML's `get_scale_min_k4`).
fn q4k_scale_min(j: usize, s: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// A Q4_K block's 256 values (0–15), in order.
fn q4k_values(b: &BlockQ4K) -> [u8; 256] {
    let mut v = [0u8; 256];
    for j in 0..4 {
        for l in 0..32 {
            let q = b.qs[32 * j + l];
            v[64 * j + l] = q & 0xF;
            v[64 * j + 32 + l] = q >> 4;
        }
    }
    v
}

/// A Q6_K block's 256 values, stored as `q + 32` (0–63), in order.
fn q6k_values(b: &BlockQ6K) -> [u8; 256] {
    let mut v = [0u8; 256];
    for n in 0..2 {
        let (ql, qh) = (&b.ql[64 * n..], &b.qh[32 * n..]);
        for l in 0..32 {
            let y = &mut v[128 * n..];
            y[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
            y[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
            y[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            y[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
    v
}

/// The tiles of `rows` rows of `nsb` blocks each, `fill(tile, row in tile, block row)`
/// writing one row into a tile (rows past `rows` stay zero), in parallel.
fn build<B: Sync, T: Copy + Send>(
    blocks: &[B],
    rows: usize,
    nsb: usize,
    zero: T,
    fill: impl Fn(&mut T, usize, &B) + Sync,
) -> Vec<T> {
    use rayon::prelude::*;
    let mut tiles = vec![zero; rows.div_ceil(TILE) * nsb];
    tiles
        .par_chunks_mut(nsb)
        .enumerate()
        .for_each(|(t, tiles)| {
            for lane in 0..TILE.min(rows - t * TILE) {
                let r = t * TILE + lane;
                for (tile, b) in tiles.iter_mut().zip(&blocks[r * nsb..(r + 1) * nsb]) {
                    fill(tile, lane, b);
                }
            }
        });
    tiles
}

impl KTiles {
    /// GGML's Q4_K blocks of a `[rows, cols]` matrix (`cols` a multiple of 256), tiled.
    pub(crate) fn from_q4k(blocks: &[BlockQ4K], rows: usize, cols: usize) -> Self {
        let nsb = cols / 256;
        assert_eq!(blocks.len(), rows * nsb, "whole blocks");
        let zero = Q4KTile {
            nib: [[0; 64]; 32],
            scales: [[0; TILE]; 8],
            mins: [[0; 2 * TILE]; 4],
            d: [f16::ZERO; TILE],
            dmin: [f16::ZERO; TILE],
        };
        let tiles = build(blocks, rows, nsb, zero, |t, lane, b| {
            let v = q4k_values(b);
            for j in 0..4 {
                for g in 0..8 {
                    for k in 0..4 {
                        let (lo, hi) = (v[64 * j + 4 * g + k], v[64 * j + 32 + 4 * g + k]);
                        t.nib[8 * j + g][4 * lane + k] = lo | (hi << 4);
                    }
                }
            }
            for s in 0..8 {
                let (sc, m) = q4k_scale_min(s, &b.scales);
                t.scales[s][lane] = sc;
                t.mins[s / 2][2 * lane + s % 2] = m;
            }
            t.d[lane] = f16::from_bits(b.d);
            t.dmin[lane] = f16::from_bits(b.dmin);
        });
        KTiles {
            rows,
            cols,
            data: Data::Q4K(tiles),
        }
    }

    /// GGML's Q6_K blocks of a `[rows, cols]` matrix (`cols` a multiple of 256), tiled.
    pub(crate) fn from_q6k(blocks: &[BlockQ6K], rows: usize, cols: usize) -> Self {
        let nsb = cols / 256;
        assert_eq!(blocks.len(), rows * nsb, "whole blocks");
        let zero = Q6KTile {
            nib: [[0; 64]; 32],
            high: [[0; 64]; 16],
            scales: [[0; 2 * TILE]; 8],
            d: [f16::ZERO; TILE],
        };
        let tiles = build(blocks, rows, nsb, zero, |t, lane, b| {
            let v = q6k_values(b);
            for (i, q) in v.iter().enumerate() {
                let (g, k) = (i / 4, i % 4);
                t.nib[g % 32][4 * lane + k] |= (q & 0xF) << (4 * (g / 32));
                t.high[g % 16][4 * lane + k] |= (q >> 4) << (2 * (g / 16));
            }
            for s in 0..16 {
                t.scales[s / 2][2 * lane + s % 2] = b.scales[s];
            }
            t.d[lane] = f16::from_bits(b.d);
        });
        KTiles {
            rows,
            cols,
            data: Data::Q6K(tiles),
        }
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes held.
    pub fn size_in_bytes(&self) -> usize {
        match &self.data {
            Data::Q4K(t) => std::mem::size_of_val(t.as_slice()),
            Data::Q6K(t) => std::mem::size_of_val(t.as_slice()),
        }
    }

    /// Row `r` as f32 into `out` (`cols` values), as candle's `to_float` computes it.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let nsb = self.cols / 256;
        let (t, lane) = (r / TILE, r % TILE);
        for (b, o) in out.chunks_exact_mut(256).enumerate() {
            match &self.data {
                Data::Q4K(tiles) => {
                    let tile = &tiles[t * nsb + b];
                    let (d, dmin) = (tile.d[lane].to_f32(), tile.dmin[lane].to_f32());
                    for (i, y) in o.iter_mut().enumerate() {
                        let (j, l) = (i / 64, i % 64);
                        let (s, g, k) = (2 * j + l / 32, (l % 32) / 4, l % 4);
                        let q = tile.nib[8 * j + g][4 * lane + k] >> (4 * (l / 32)) & 0xF;
                        let d1 = d * tile.scales[s][lane] as f32;
                        let m1 = dmin * tile.mins[s / 2][2 * lane + s % 2] as f32;
                        *y = d1 * q as f32 - m1;
                    }
                }
                Data::Q6K(tiles) => {
                    let tile = &tiles[t * nsb + b];
                    let d = tile.d[lane].to_f32();
                    for (i, y) in o.iter_mut().enumerate() {
                        let (g, k, s) = (i / 4, i % 4, i / 16);
                        let lo = (tile.nib[g % 32][4 * lane + k] >> (4 * (g / 32))) & 0xF;
                        let hi = (tile.high[g % 16][4 * lane + k] >> (2 * (g / 16))) & 3;
                        let q = (lo | (hi << 4)) as i8 - 32;
                        *y = d * tile.scales[s / 2][2 * lane + s % 2] as f32 * q as f32;
                    }
                }
            }
        }
    }

    /// Rows `ids` as f32, row-major (ids checked against the row count by the caller).
    pub fn dequantize_rows(&self, ids: &[u32]) -> Vec<f32> {
        use rayon::prelude::*;
        let mut out = vec![0f32; ids.len() * self.cols];
        out.par_chunks_mut(self.cols)
            .zip(ids.par_iter())
            .for_each(|(o, &r)| self.dequantize_row(r as usize, o));
        out
    }

    /// Tiles a 2-D CPU Q4_K or Q6_K tensor whose width is whole blocks; `None` for
    /// anything else or where the CPU lacks the kernels' instructions.
    pub fn from_qtensor(q: &candle_core::quantized::QTensor) -> crate::error::Result<Option<Self>> {
        use candle_core::quantized::GgmlDType;
        let dims = q.shape().dims();
        if !available() || dims.len() != 2 || !q.device().is_cpu() {
            return Ok(None);
        }
        let (rows, cols) = (dims[0], dims[1]);
        if cols == 0 || !cols.is_multiple_of(256) {
            return Ok(None);
        }
        let data = q.data()?;
        let count = rows * cols / 256;
        use crate::backend::cpu::qmatmul::blocks;
        Ok(match q.dtype() {
            GgmlDType::Q4K => blocks(&data, count).map(|b| Self::from_q4k(b, rows, cols)),
            GgmlDType::Q6K => blocks(&data, count).map(|b| Self::from_q6k(b, rows, cols)),
            _ => None,
        })
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
            let inputs: Vec<Q8KBlocks> =
                x.par_chunks_exact(self.cols).map(Q8KBlocks::new).collect();
            let (rows, nsb) = (self.rows, self.cols / 256);
            Some(tiled_product::<_, GROUP>(
                rows,
                &inputs,
                TILES_PER_TASK,
                |t, xs| {
                    // SAFETY: the CPU has the instructions (`available`); the tiles have
                    // `nsb` blocks and each input as many.
                    unsafe {
                        match &self.data {
                            Data::Q4K(tiles) => {
                                by_input_count!(xs.len(), GROUP, [1, 2, 3, 4], J => q4k_kernel::<J>(&tiles[t * nsb..(t + 1) * nsb], std::array::from_fn(|i| &xs[i])))
                            }
                            Data::Q6K(tiles) => {
                                by_input_count!(xs.len(), GROUP, [1, 2, 3, 4], J => q6k_kernel::<J>(&tiles[t * nsb..(t + 1) * nsb], std::array::from_fn(|i| &xs[i])))
                            }
                        }
                    }
                },
            ))
        }
        #[cfg(not(target_arch = "x86_64"))]
        None
    }
}

/// Four bytes of `p` at `off`, broadcast to every 32-bit lane.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn bcast4<T>(p: *const T, off: usize) -> __m512i {
    _mm512_set1_epi32(std::ptr::read_unaligned(
        (p as *const u8).add(off) as *const i32
    ))
}

/// Q4_K: one row of tiles (`tiles.len()` super-blocks of sixteen rows) against `J`
/// inputs. Each (row, input) pair's arithmetic is the same in every instance.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn q4k_kernel<const J: usize>(tiles: &[Q4KTile], x: [&Q8KBlocks; J]) -> [[f32; TILE]; J] {
    let nsb = tiles.len();
    for x in x {
        assert!(x.d.len() == nsb && x.qs.len() == 256 * nsb && x.sums32.len() == nsb);
    }
    let m4 = _mm512_set1_epi8(0xF);
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); J];
    let mut acc_m = [_mm512_setzero_ps(); J];
    for (b, t) in tiles.iter().enumerate() {
        crate::backend::cpu::gemv::prefetch_ahead(t as *const Q4KTile as *const u8, 37);
        let mut sumi = [zero; J];
        for j in 0..4 {
            // Sub-blocks 2j (low nibbles) and 2j+1 (high): each one's sum of products,
            // then times its scale.
            let mut lo_sum = [zero; J];
            let mut hi_sum = [zero; J];
            for g in 0..8 {
                let line = _mm512_load_si512(t.nib[8 * j + g].as_ptr() as *const _);
                let lo = _mm512_and_si512(line, m4);
                let hi = _mm512_and_si512(_mm512_srli_epi16(line, 4), m4);
                for i in 0..J {
                    let q = x[i].qs.as_ptr().add(256 * b + 64 * j + 4 * g);
                    lo_sum[i] = _mm512_dpbusd_epi32(lo_sum[i], lo, bcast4(q, 0));
                    hi_sum[i] = _mm512_dpbusd_epi32(hi_sum[i], hi, bcast4(q, 32));
                }
            }
            let sc = |s: usize| {
                _mm512_cvtepu8_epi32(_mm_load_si128(t.scales[s].as_ptr() as *const __m128i))
            };
            let (sc_lo, sc_hi) = (sc(2 * j), sc(2 * j + 1));
            for i in 0..J {
                let p = _mm512_add_epi32(
                    _mm512_mullo_epi32(lo_sum[i], sc_lo),
                    _mm512_mullo_epi32(hi_sum[i], sc_hi),
                );
                sumi[i] = _mm512_add_epi32(sumi[i], p);
            }
        }
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(t.d.as_ptr() as *const __m256i));
        let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(t.dmin.as_ptr() as *const __m256i));
        for i in 0..J {
            // Σ_s min_s · (sum of input sub-block s), two sub-blocks per instruction.
            let mut m = zero;
            for k in 0..4 {
                let mins =
                    _mm512_cvtepu8_epi16(_mm256_loadu_si256(t.mins[k].as_ptr() as *const __m256i));
                m = _mm512_dpwssd_epi32(m, mins, bcast4(x[i].sums32[b].as_ptr(), 4 * k));
            }
            let dy = x[i].d[b];
            acc[i] = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(sumi[i]),
                _mm512_mul_ps(d, _mm512_set1_ps(dy)),
                acc[i],
            );
            acc_m[i] = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(m),
                _mm512_mul_ps(dmin, _mm512_set1_ps(-dy)),
                acc_m[i],
            );
        }
    }
    let mut out = [[0f32; TILE]; J];
    for i in 0..J {
        _mm512_storeu_ps(out[i].as_mut_ptr(), _mm512_add_ps(acc[i], acc_m[i]));
    }
    out
}

/// Q6_K: one row of tiles against `J` inputs, as [`q4k_kernel`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn q6k_kernel<const J: usize>(tiles: &[Q6KTile], x: [&Q8KBlocks; J]) -> [[f32; TILE]; J] {
    let nsb = tiles.len();
    for x in x {
        assert!(x.d.len() == nsb && x.qs.len() == 256 * nsb && x.bsums.len() == nsb);
    }
    let m4 = _mm512_set1_epi8(0xF);
    let m30 = _mm512_set1_epi8(0x30);
    let zero = _mm512_setzero_si512();
    // Within each 32-bit lane, its low i16 twice, or its high one twice (byte indices
    // count from the lane's 128-bit quarter).
    let dup = |word: i32| {
        let idx: [i32; 16] = std::array::from_fn(|l| {
            let b = 4 * (l as i32 % 4) + 2 * word;
            b | (b + 1) << 8 | b << 16 | (b + 1) << 24
        });
        _mm512_loadu_si512(idx.as_ptr() as *const _)
    };
    let (dup_lo, dup_hi) = (dup(0), dup(1));
    let mut acc = [_mm512_setzero_ps(); J];
    for (b, t) in tiles.iter().enumerate() {
        crate::backend::cpu::gemv::prefetch_ahead(t as *const Q6KTile as *const u8, 53);
        let mut sum = [zero; J];
        let mut offset = [zero; J];
        for k in 0..8 {
            // Scales of sub-blocks 2k and 2k+1 (sixteen values each: four groups).
            let pair =
                _mm512_cvtepi8_epi16(_mm256_loadu_si256(t.scales[k].as_ptr() as *const __m256i));
            for i in 0..J {
                offset[i] =
                    _mm512_dpwssd_epi32(offset[i], pair, bcast4(x[i].bsums[b].as_ptr(), 4 * k));
            }
            for half in 0..2 {
                let sc = _mm512_shuffle_epi8(pair, if half == 0 { dup_lo } else { dup_hi });
                for g4 in 0..4 {
                    let g = 8 * k + 4 * half + g4;
                    let nib = _mm512_load_si512(t.nib[g % 32].as_ptr() as *const _);
                    let high = _mm512_load_si512(t.high[g % 16].as_ptr() as *const _);
                    let lo = if g < 32 {
                        _mm512_and_si512(nib, m4)
                    } else {
                        _mm512_and_si512(_mm512_srli_epi16(nib, 4), m4)
                    };
                    // Bits 2(g/16)..+2 of each byte, moved to bits 4–5.
                    let hi = match g / 16 {
                        0 => _mm512_slli_epi16(high, 4),
                        1 => _mm512_slli_epi16(high, 2),
                        2 => high,
                        _ => _mm512_srli_epi16(high, 2),
                    };
                    let q = _mm512_or_si512(lo, _mm512_and_si512(hi, m30));
                    for i in 0..J {
                        let p = _mm512_maddubs_epi16(q, bcast4(x[i].qs.as_ptr(), 256 * b + 4 * g));
                        sum[i] = _mm512_dpwssd_epi32(sum[i], p, sc);
                    }
                }
            }
        }
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(t.d.as_ptr() as *const __m256i));
        for i in 0..J {
            // The stored values are q + 32: Σ s·(q−32)·y = Σ s·q·y − 32 Σ s·(sum of 16 y).
            let sumi = _mm512_sub_epi32(sum[i], _mm512_slli_epi32(offset[i], 5));
            acc[i] = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(sumi),
                _mm512_mul_ps(d, _mm512_set1_ps(x[i].d[b])),
                acc[i],
            );
        }
    }
    let mut out = [[0f32; TILE]; J];
    for i in 0..J {
        _mm512_storeu_ps(out[i].as_mut_ptr(), acc[i]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::qmatmul::tests::{data, dequantized};
    use crate::quant::{quantize, QuantType};
    use candle_core::{Device, Tensor};

    /// Weights whose sub-blocks differ in range and offset, so every 6-bit scale and
    /// minimum differs (uniform data gives them all the same value).
    fn varied(m: usize, n: usize) -> Tensor {
        let (w, _) = data(m, n);
        let col = |f: &dyn Fn(usize) -> f32| {
            Tensor::from_vec((0..n).map(f).collect::<Vec<_>>(), (1, n), &Device::Cpu).unwrap()
        };
        w.broadcast_mul(&col(&|i| 1.0 + (i / 32 % 7) as f32))
            .unwrap()
            .broadcast_add(&col(&|i| 0.3 * (i / 16 % 5) as f32 - 0.4))
            .unwrap()
    }

    fn tiled(q: &candle_core::quantized::QTensor) -> KTiles {
        let (m, n) = q.shape().dims2().unwrap();
        let data = q.data().unwrap();
        use crate::backend::cpu::qmatmul::blocks;
        match q.dtype() {
            candle_core::quantized::GgmlDType::Q4K => {
                KTiles::from_q4k(blocks(&data, m * n / 256).unwrap(), m, n)
            }
            _ => KTiles::from_q6k(blocks(&data, m * n / 256).unwrap(), m, n),
        }
    }

    /// The one-row kernels (candle's arithmetic) within f32 rounding, for row counts
    /// that leave a partial tile and 1–9 inputs (groups of four and a rest); every
    /// input's outputs equal, bit for bit, that input alone; rows dequantize to candle's.
    #[test]
    fn match_the_one_row_kernels_and_each_input_alone() {
        for q in [QuantType::Q4K, QuantType::Q6K] {
            for (m, n) in [(1, 256), (37, 512), (70, 1536)] {
                let qt = quantize(&varied(m, n), q).unwrap();
                let t = tiled(&qt);
                let want = dequantized(&qt);
                let mut row = vec![0f32; n];
                for r in [0, m / 2, m - 1] {
                    t.dequantize_row(r, &mut row);
                    assert_eq!(row, want[r * n..(r + 1) * n], "{q} row {r}");
                }
                if !available() {
                    continue;
                }
                for nx in [1, 2, 5, 9] {
                    // Larger magnitudes and negative values reach the largest i16 sums.
                    let xs: Vec<f32> = (0..nx * n)
                        .map(|i| (((i * 37 % 101) as f32 / 101.0) - 0.5) * (1 + i % 13) as f32)
                        .collect();
                    let y = t.gemm(&xs, nx).unwrap();
                    let plain = crate::backend::cpu::qmatmul::gemv(&qt, &xs, nx)
                        .unwrap()
                        .unwrap();
                    for (o, (a, b)) in y.iter().zip(&plain).enumerate() {
                        // The f32 sums are ordered differently (per block in one lane
                        // here, across eight lanes there): rounding relative to the
                        // magnitude of the terms, which cancel here.
                        let (j, r) = (o / m, o % m);
                        let terms: f32 = (0..n)
                            .map(|i| (want[r * n + i] * xs[j * n + i]).abs())
                            .sum();
                        assert!(
                            (a - b).abs() <= 1e-6 * terms.max(1.0),
                            "{q} {m}×{n}, {nx} inputs: {a} vs {b} (terms {terms})"
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
