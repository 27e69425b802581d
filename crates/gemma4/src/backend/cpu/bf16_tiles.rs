//! bf16 weights interleaved sixteen rows at a time for AVX512-BF16, and their product
//! with any number of bf16 input rows: decode batches and prefill alike.
//!
//! Layout: rows in tiles of sixteen; per tile, one 64-byte line per pair of columns,
//! holding that pair for each of the sixteen rows. `vdpbf16ps` of a line against one
//! pair of input values, broadcast, adds both products into each row's f32 lane: 32
//! multiply–adds per instruction, where widening bf16 to f32 for an f32 GEMM (candle's
//! way, and this crate's before) did 16 per instruction after the widening itself.
//!
//! The numbers are torch's bf16 linear on the CPU: products of bf16 values are exact in
//! f32, summed in f32, and the sum rounded to bf16 once (by the caller). Only the order of
//! the f32 additions differs from the widened GEMM (two interleaved sums per row here,
//! column pairs in order), and the instruction flushes subnormal inputs and sums to zero,
//! which does not reach weights and activations of normal magnitude. A row's result is
//! the same whatever batch it is in.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use half::bf16;

use crate::backend::cpu::gemv::{tiled_product, TILE};
use crate::backend::cpu::q8_packed::Line;

/// Tiles per parallel task.
const TILES_PER_TASK: usize = 2;
/// Inputs per kernel call, at most (each takes two accumulators).
const GROUP: usize = 8;

/// Whether this CPU runs the kernel (AVX-512 F/BW with BF16).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A `[rows, cols]` bf16 matrix in tiles, `cols` even.
pub struct Bf16Tiles {
    rows: usize,
    cols: usize,
    /// Per tile, `cols / 2` lines.
    lines: Vec<Line>,
}

impl std::fmt::Debug for Bf16Tiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bf16Tiles {{ {}×{} }}", self.rows, self.cols)
    }
}

impl Bf16Tiles {
    /// The row-major `[rows, cols]` matrix `w`, tiled; `None` for an odd width.
    pub fn new(w: &[bf16], rows: usize, cols: usize) -> Option<Self> {
        use rayon::prelude::*;
        if cols == 0 || !cols.is_multiple_of(2) || w.len() != rows * cols {
            return None;
        }
        let pairs = cols / 2;
        let mut lines = vec![Line([0; 64]); rows.div_ceil(TILE) * pairs];
        lines
            .par_chunks_mut(pairs)
            .enumerate()
            .for_each(|(t, lines)| {
                for lane in 0..TILE.min(rows - t * TILE) {
                    let row = &w[(t * TILE + lane) * cols..][..cols];
                    for (line, pair) in lines.iter_mut().zip(row.chunks_exact(2)) {
                        for (k, v) in pair.iter().enumerate() {
                            let b = v.to_bits().to_le_bytes();
                            line.0[4 * lane + 2 * k] = b[0] as i8;
                            line.0[4 * lane + 2 * k + 1] = b[1] as i8;
                        }
                    }
                }
            });
        Some(Bf16Tiles { rows, cols, lines })
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes held: the matrix's, plus the rows padding the last tile.
    pub fn size_in_bytes(&self) -> usize {
        self.lines.len() * 64
    }

    /// Rows `ids` (checked against the row count by the caller), row-major.
    pub fn rows(&self, ids: &[u32]) -> Vec<bf16> {
        let pairs = self.cols / 2;
        let mut out = Vec::with_capacity(ids.len() * self.cols);
        for &r in ids {
            let (t, lane) = (r as usize / TILE, r as usize % TILE);
            for line in &self.lines[t * pairs..(t + 1) * pairs] {
                for k in 0..2 {
                    let b = &line.0[4 * lane + 2 * k..][..2];
                    out.push(bf16::from_bits(u16::from_le_bytes([
                        b[0] as u8, b[1] as u8,
                    ])));
                }
            }
        }
        out
    }

    /// `W x` for `nx` bf16 input rows of `cols` values (`[nx, rows]` f32 sums out);
    /// `None` where the CPU lacks the instructions or the width does not match.
    pub fn gemm(&self, x: &[bf16], nx: usize) -> Option<Vec<f32>> {
        if !available() || nx == 0 || x.len() != nx * self.cols {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let (rows, pairs) = (self.rows, self.cols / 2);
            let inputs: Vec<&[bf16]> = x.chunks_exact(self.cols).collect();
            Some(tiled_product::<_, GROUP>(
                rows,
                &inputs,
                TILES_PER_TASK,
                |t, xs| {
                    // SAFETY: the CPU has the instructions (`available`); every input has
                    // `2 · pairs` values.
                    unsafe { dispatch(&self.lines[t * pairs..(t + 1) * pairs], xs) }
                },
            ))
        }
        #[cfg(not(target_arch = "x86_64"))]
        None
    }
}

/// The kernel instance for `xs.len()` (1–[`GROUP`]) inputs.
#[cfg(target_arch = "x86_64")]
unsafe fn dispatch(lines: &[Line], xs: &[&[bf16]]) -> [[f32; TILE]; GROUP] {
    let mut out = [[0f32; TILE]; GROUP];
    match xs.len() {
        1 => out[..1].copy_from_slice(&tile::<1>(lines, [xs[0]])),
        2 => out[..2].copy_from_slice(&tile::<2>(lines, std::array::from_fn(|i| xs[i]))),
        3 => out[..3].copy_from_slice(&tile::<3>(lines, std::array::from_fn(|i| xs[i]))),
        4 => out[..4].copy_from_slice(&tile::<4>(lines, std::array::from_fn(|i| xs[i]))),
        5 => out[..5].copy_from_slice(&tile::<5>(lines, std::array::from_fn(|i| xs[i]))),
        6 => out[..6].copy_from_slice(&tile::<6>(lines, std::array::from_fn(|i| xs[i]))),
        7 => out[..7].copy_from_slice(&tile::<7>(lines, std::array::from_fn(|i| xs[i]))),
        _ => out.copy_from_slice(&tile::<8>(lines, std::array::from_fn(|i| xs[i]))),
    }
    out
}

/// One tile (sixteen rows) against `J` inputs: even column pairs into one sum, odd ones
/// into another, added at the end. Each (row, input) pair's arithmetic is the same in
/// every instance.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn tile<const J: usize>(lines: &[Line], x: [&[bf16]; J]) -> [[f32; TILE]; J] {
    let pairs = lines.len();
    for x in x {
        assert!(x.len() == 2 * pairs);
    }
    let pair = |j: usize, p: usize| -> __m512bh {
        let v = std::ptr::read_unaligned(x[j].as_ptr().add(2 * p) as *const i32);
        std::mem::transmute(_mm512_set1_epi32(v))
    };
    let mut acc = [[_mm512_setzero_ps(); 2]; J];
    let mut p = 0;
    while p < pairs {
        crate::backend::cpu::gemv::prefetch_ahead(lines.as_ptr().add(p) as *const u8, 2);
        let w0: __m512bh =
            std::mem::transmute(_mm512_load_si512(lines.as_ptr().add(p) as *const _));
        for (j, a) in acc.iter_mut().enumerate() {
            a[0] = _mm512_dpbf16_ps(a[0], w0, pair(j, p));
        }
        if p + 1 < pairs {
            let w1: __m512bh =
                std::mem::transmute(_mm512_load_si512(lines.as_ptr().add(p + 1) as *const _));
            for (j, a) in acc.iter_mut().enumerate() {
                a[1] = _mm512_dpbf16_ps(a[1], w1, pair(j, p + 1));
            }
        }
        p += 2;
    }
    let mut out = [[0f32; TILE]; J];
    for j in 0..J {
        _mm512_storeu_ps(out[j].as_mut_ptr(), _mm512_add_ps(acc[j][0], acc[j][1]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: usize) -> Vec<bf16> {
        (0..len)
            .map(|i| bf16::from_f32((((i * 7919 + seed) % 1013) as f32 / 1013.0) - 0.5))
            .collect()
    }

    /// The f64 product of the same bf16 values within f32 rounding, for row counts that
    /// leave a partial tile, odd and even pair counts and 1–9 inputs; every input's
    /// outputs equal, bit for bit, that input alone; rows read back exactly.
    #[test]
    fn matches_the_exact_product_and_each_input_alone() {
        for (m, n) in [(1, 2), (5, 6), (37, 64), (70, 1536)] {
            let w = data(m * n, 0);
            let t = Bf16Tiles::new(&w, m, n).unwrap();
            let ids = [m as u32 - 1, 0];
            assert_eq!(t.rows(&ids)[..n], w[(m - 1) * n..]);
            assert_eq!(t.rows(&ids)[n..], w[..n]);
            if !available() {
                continue;
            }
            for nx in [1, 2, 5, 9] {
                let xs = data(nx * n, 17);
                let y = t.gemm(&xs, nx).unwrap();
                for j in 0..nx {
                    for r in 0..m {
                        let exact: f64 = (0..n)
                            .map(|i| w[r * n + i].to_f64() * xs[j * n + i].to_f64())
                            .sum();
                        let terms: f64 = (0..n)
                            .map(|i| (w[r * n + i].to_f64() * xs[j * n + i].to_f64()).abs())
                            .sum();
                        let got = y[j * m + r] as f64;
                        assert!(
                            (got - exact).abs() <= 1e-6 * terms.max(1.0),
                            "{m}×{n}, {nx} inputs, row {r}: {got} vs {exact}"
                        );
                    }
                    let alone = t.gemm(&xs[j * n..(j + 1) * n], 1).unwrap();
                    assert_eq!(&y[j * m..(j + 1) * m], alone.as_slice(), "input {j}");
                }
            }
        }
        assert!(Bf16Tiles::new(&data(15, 0), 5, 3).is_none(), "odd width");
    }
}
