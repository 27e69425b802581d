//! Q8_0 weights interleaved sixteen rows at a time for AVX-512 VNNI, and their product
//! with any number of input rows: decode batches and prefill alike.
//!
//! Layout: rows in tiles of sixteen; for each tile and each 32-value block, the sixteen
//! rows' f16 scales, then eight 64-byte lines, line `g` holding values `4g..4g + 4` of
//! each of the sixteen rows. The values are stored plus 128 (unsigned), GGML's signed
//! byte `q` as `q ^ 0x80`. One `vpdpbusd` of a line against four bytes of the input,
//! broadcast, adds four products into each of sixteen i32 lanes, one per row: a block's
//! integer sum for sixteen rows takes eight instructions, with no horizontal sums and no
//! per-row scale shuffles. The `+128` comes back out as `128 · Σ x` per input block, the
//! same for every row.
//!
//! The arithmetic per block is candle's `vec_dot_q8_0_q8_0` (llama.cpp's): the input
//! quantized to Q8_0 blocks ([`crate::backend::cpu::act_quant`]), the exact integer sum
//! of products, scaled by `d_w · d_x` in f32 and added. Only the order of the f32
//! additions differs (block after block, in one accumulator per row); a row's result is
//! the same whatever batch it is in, and prefill is this product with 8-bit activations,
//! as llama.cpp's.
//!
//! The bytes held are GGML's (34 per 32 weights) plus the rows padding the last tile.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use half::f16;

use crate::backend::cpu::act_quant::Q8Blocks;
#[cfg(target_arch = "x86_64")]
use crate::backend::cpu::gemv::by_input_count;
use crate::backend::cpu::gemv::{tiled_product, TILE};
use crate::backend::cpu::q8_packed::{Block, Line};

/// Inputs per kernel call, at most.
const GROUP: usize = 8;
/// Tiles per parallel task.
const TILES_PER_TASK: usize = 2;

/// Whether this CPU runs the kernel.
pub fn available() -> bool {
    crate::backend::cpu::has_avx512_vnni()
}

/// A `[rows, cols]` Q8_0 matrix in tiles (see the module comment).
pub(crate) struct Tiles {
    rows: usize,
    cols: usize,
    /// Per tile and block, eight lines.
    qs: Vec<Line>,
    /// Per tile and block, the sixteen rows' scales.
    d: Vec<[f16; TILE]>,
}

/// One input row as the tiled Q8_0/Q4_0/Q5_0 kernels read it: its Q8_0 values and
/// scales, and per block the sum of its values (what an offset in the stored weights,
/// `+128` here, multiplies).
pub(crate) struct Input {
    pub q: Q8Blocks,
    pub sums: Vec<i32>,
}

impl Input {
    pub fn new(x: &[f32]) -> Self {
        let q = Q8Blocks::new(x);
        let sums =
            q.qs.chunks_exact(32)
                .map(|b| b.iter().map(|&v| v as i32).sum::<i32>())
                .collect();
        Input { q, sums }
    }
}

impl Tiles {
    /// GGML's blocks of a `[rows, cols]` matrix (`cols` a multiple of 32), interleaved.
    pub fn from_blocks(blocks: &[Block], rows: usize, cols: usize) -> Self {
        use rayon::prelude::*;
        let nb = cols / 32;
        assert_eq!(blocks.len(), rows * nb, "whole blocks");
        let tiles = rows.div_ceil(TILE);
        let mut qs = vec![Line([0; 64]); tiles * nb * 8];
        let mut d = vec![[f16::ZERO; TILE]; tiles * nb];
        qs.par_chunks_mut(nb * 8)
            .zip(d.par_chunks_mut(nb))
            .enumerate()
            .for_each(|(t, (qs, d))| {
                for (b, db) in d.iter_mut().enumerate() {
                    for (lane, dl) in db.iter_mut().enumerate() {
                        let r = t * TILE + lane;
                        let Some(blk) = (r < rows).then(|| &blocks[r * nb + b]) else {
                            // Padding rows: zero weights (stored as 128), zero scales.
                            for g in 0..8 {
                                qs[b * 8 + g].0[4 * lane..][..4].fill(0x80u8 as i8);
                            }
                            continue;
                        };
                        *dl = f16::from_bits(blk.d);
                        for g in 0..8 {
                            for k in 0..4 {
                                qs[b * 8 + g].0[4 * lane + k] =
                                    ((blk.qs[4 * g + k] as u8) ^ 0x80) as i8;
                            }
                        }
                    }
                }
            });
        Tiles { rows, cols, qs, d }
    }

    /// Bytes held.
    pub fn size_in_bytes(&self) -> usize {
        self.qs.len() * 64 + self.d.len() * 2 * TILE
    }

    /// Row `r` as f32 into `out` (`cols` values).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let nb = self.cols / 32;
        let (t, lane) = (r / TILE, r % TILE);
        for (b, o) in out.chunks_exact_mut(32).enumerate() {
            let d = self.d[t * nb + b][lane].to_f32();
            for (g, o) in o.chunks_exact_mut(4).enumerate() {
                let line = &self.qs[(t * nb + b) * 8 + g].0[4 * lane..][..4];
                for (v, q) in o.iter_mut().zip(line) {
                    *v = ((*q as u8 ^ 0x80) as i8) as f32 * d;
                }
            }
        }
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
            let rows = self.rows;
            Some(tiled_product::<_, GROUP>(
                rows,
                &inputs,
                TILES_PER_TASK,
                |t, xs| {
                    let qs = &self.qs[t * nb * 8..(t + 1) * nb * 8];
                    let d = &self.d[t * nb..(t + 1) * nb];
                    // SAFETY: the CPU has the instructions (`available`); the tile has `nb`
                    // blocks and each input as many.
                    unsafe {
                        by_input_count!(xs.len(), GROUP, [1, 2, 3, 4, 5, 6, 7, 8], J => tile::<J>(qs, d, std::array::from_fn(|i| &xs[i])))
                    }
                },
            ))
        }
        #[cfg(not(target_arch = "x86_64"))]
        None
    }
}

/// One tile (sixteen rows, `d.len()` blocks) dotted with each of the inputs `x`. Each
/// (row, input) pair's arithmetic is the same in every instance.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn tile<const J: usize>(qs: &[Line], d: &[[f16; TILE]], x: [&Input; J]) -> [[f32; TILE]; J] {
    let nb = d.len();
    assert!(qs.len() == nb * 8);
    for x in x {
        assert!(x.q.qs.len() == nb * 32 && x.q.d.len() == nb && x.sums.len() == nb);
    }
    let mut acc = [_mm512_setzero_ps(); J];
    for b in 0..nb {
        let lines = qs.as_ptr().add(b * 8) as *const u8;
        crate::backend::cpu::gemv::prefetch_ahead(lines, 8);
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(d.as_ptr().add(b) as *const __m256i));
        let mut isum: [__m512i; J] =
            std::array::from_fn(|j| _mm512_set1_epi32(-128 * x[j].sums[b]));
        for g in 0..8 {
            let w = _mm512_load_si512(lines.add(64 * g) as *const _);
            for j in 0..J {
                let four =
                    std::ptr::read_unaligned(x[j].q.qs.as_ptr().add(32 * b + 4 * g) as *const i32);
                isum[j] = _mm512_dpbusd_epi32(isum[j], w, _mm512_set1_epi32(four));
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
