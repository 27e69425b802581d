//! Dense weights (bf16, f32) interleaved sixteen rows at a time for AVX-512, and their
//! product with any number of input rows of the same dtype: decode batches and prefill
//! alike, one kernel, so a row's result is the same whatever batch it is in.
//!
//! Layout: rows in tiles of sixteen; per tile, one 64-byte line per group of columns that
//! fills it (two bf16 columns, one f32 column), holding the group for each of the sixteen
//! rows. Each line is read once for up to [`GROUP`] inputs, and nothing is packed per call
//! (candle's GEMM packs both operands on every product, and widened bf16 to f32 first).
//!
//! - bf16 (AVX512-BF16): `vdpbf16ps` of a line against one pair of input values,
//!   broadcast, adds both products into each row's f32 lane: 32 multiply–adds per
//!   instruction. The numbers are torch's bf16 linear on the CPU: products of bf16 values
//!   are exact in f32, summed in f32, and the sum rounded to bf16 once (by the caller).
//!   The instruction flushes subnormal inputs and sums to zero, which does not reach
//!   weights and activations of normal magnitude.
//! - f32 (AVX-512F): `vfmadd231ps` of a line against one input value, broadcast: each
//!   product rounded into its f32 sum, as in every f32 GEMM.
//!
//! Only the order of the f32 additions differs from a GEMM's: two interleaved sums per
//! row (even and odd lines, in column order), added at the end.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use half::bf16;

#[cfg(target_arch = "x86_64")]
use crate::backend::cpu::gemv::by_input_count;
use crate::backend::cpu::gemv::{tiled_product, TILE};
use crate::backend::cpu::q8_packed::Line;

/// Tiles per parallel task.
const TILES_PER_TASK: usize = 2;
/// Inputs per kernel call, at most (each takes two accumulators).
const GROUP: usize = 8;

/// An element type with a tiled kernel.
pub(crate) trait TileElem: Copy + Default + Send + Sync + 'static {
    /// Columns per 64-byte line (sixteen rows of them).
    const PER_LINE: usize;
    /// The value in f32 (exact for both element types).
    fn widen(self) -> f32;
    /// Whether this CPU runs the kernel.
    fn available() -> bool;
    /// One tile (its lines) against 1–[`GROUP`] inputs: each input's sixteen sums.
    ///
    /// # Safety
    /// [`Self::available`] holds, and every input has `lines.len() · PER_LINE` values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn tile(lines: &[Line], xs: &[&[Self]]) -> [[f32; TILE]; GROUP];
}

impl TileElem for bf16 {
    const PER_LINE: usize = 2;
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn tile(lines: &[Line], xs: &[&[bf16]]) -> [[f32; TILE]; GROUP] {
        by_input_count!(xs.len(), GROUP, [1, 2, 3, 4, 5, 6, 7, 8], J => tile_bf16::<J>(lines, std::array::from_fn(|i| xs[i])))
    }
}

impl TileElem for f32 {
    const PER_LINE: usize = 1;
    fn widen(self) -> f32 {
        self
    }
    fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn tile(lines: &[Line], xs: &[&[f32]]) -> [[f32; TILE]; GROUP] {
        by_input_count!(xs.len(), GROUP, [1, 2, 3, 4, 5, 6, 7, 8], J => tile_f32::<J>(lines, std::array::from_fn(|i| xs[i])))
    }
}

/// A `[rows, cols]` matrix in tiles, `cols` a multiple of `T::PER_LINE`.
pub struct DenseTiles<T> {
    rows: usize,
    cols: usize,
    /// Per tile, `cols / T::PER_LINE` lines.
    lines: Vec<Line>,
    _elem: std::marker::PhantomData<T>,
}

impl<T> std::fmt::Debug for DenseTiles<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = std::any::type_name::<T>()
            .rsplit("::")
            .next()
            .unwrap_or("?");
        write!(f, "DenseTiles<{name}> {{ {}×{} }}", self.rows, self.cols)
    }
}

impl<T: TileElem> DenseTiles<T> {
    /// Lines per tile.
    fn per_tile(&self) -> usize {
        self.cols / T::PER_LINE
    }

    /// Where row `r`, column `c` sits among the elements of [`Self::lines`].
    fn at(&self, r: usize, c: usize) -> usize {
        let (t, lane) = (r / TILE, r % TILE);
        let (line, k) = (c / T::PER_LINE, c % T::PER_LINE);
        (t * self.per_tile() + line) * TILE * T::PER_LINE + lane * T::PER_LINE + k
    }

    /// The row-major `[rows, cols]` matrix `w`, tiled; `None` for a width the lines do not
    /// divide.
    pub fn new(w: &[T], rows: usize, cols: usize) -> Option<Self> {
        use rayon::prelude::*;
        if cols == 0 || !cols.is_multiple_of(T::PER_LINE) || w.len() != rows * cols {
            return None;
        }
        let mut tiles = DenseTiles {
            rows,
            cols,
            lines: vec![Line([0; 64]); rows.div_ceil(TILE) * (cols / T::PER_LINE)],
            _elem: std::marker::PhantomData,
        };
        let per_tile = tiles.per_tile();
        let mut lines = std::mem::take(&mut tiles.lines);
        lines
            .par_chunks_mut(per_tile)
            .enumerate()
            .for_each(|(t, lines)| {
                let elems = elements_mut::<T>(lines);
                for lane in 0..TILE.min(rows - t * TILE) {
                    let row = &w[(t * TILE + lane) * cols..][..cols];
                    for (c, &v) in row.iter().enumerate() {
                        // The tile's own lines: `at` without the tile offset.
                        let (line, k) = (c / T::PER_LINE, c % T::PER_LINE);
                        elems[line * TILE * T::PER_LINE + lane * T::PER_LINE + k] = v;
                    }
                }
            });
        tiles.lines = lines;
        Some(tiles)
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes held: the matrix's, plus the rows padding the last tile.
    pub fn size_in_bytes(&self) -> usize {
        self.lines.len() * 64
    }

    /// Rows `ids` (checked against the row count by the caller), row-major.
    pub fn rows(&self, ids: &[u32]) -> Vec<T> {
        let elems = elements::<T>(&self.lines);
        let mut out = Vec::with_capacity(ids.len() * self.cols);
        for &r in ids {
            out.extend((0..self.cols).map(|c| elems[self.at(r as usize, c)]));
        }
        out
    }

    /// Rows `start..start + n` widened to f32, row-major, in parallel (what training
    /// multiplies with: `nn::autograd`).
    pub fn rows_f32(&self, start: usize, n: usize) -> Vec<f32> {
        use rayon::prelude::*;
        let elems = elements::<T>(&self.lines);
        let (per_tile, k, cols) = (self.per_tile(), T::PER_LINE, self.cols.max(1));
        let mut out = vec![0f32; n * cols];
        if start.is_multiple_of(TILE) {
            // A tile at a time: each of its lines (one group of columns for its sixteen
            // rows) is read once and spread over the rows.
            out.par_chunks_mut(TILE * cols)
                .enumerate()
                .for_each(|(i, rows)| {
                    let tile =
                        &elems[(start / TILE + i) * per_tile * TILE * k..][..per_tile * TILE * k];
                    for (l, line) in tile.chunks_exact(TILE * k).enumerate() {
                        for (lane, row) in rows.chunks_exact_mut(cols).enumerate() {
                            for j in 0..k {
                                row[l * k + j] = line[lane * k + j].widen();
                            }
                        }
                    }
                });
            return out;
        }
        out.par_chunks_mut(cols).enumerate().for_each(|(i, row)| {
            for (c, v) in row.iter_mut().enumerate() {
                *v = elems[self.at(start + i, c)].widen();
            }
        });
        out
    }

    /// `W x` for `nx` input rows of `cols` values (`[nx, rows]` f32 sums out); `None`
    /// where the CPU lacks the instructions or the width does not match.
    pub fn gemm(&self, x: &[T], nx: usize) -> Option<Vec<f32>> {
        if !T::available() || nx == 0 || x.len() != nx * self.cols {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let per_tile = self.per_tile();
            let inputs: Vec<&[T]> = x.chunks_exact(self.cols).collect();
            Some(tiled_product::<_, GROUP>(
                self.rows,
                &inputs,
                TILES_PER_TASK,
                |t, xs| {
                    // SAFETY: the CPU has the instructions (`available`); every input has
                    // `cols` values.
                    unsafe { T::tile(&self.lines[t * per_tile..(t + 1) * per_tile], xs) }
                },
            ))
        }
        #[cfg(not(target_arch = "x86_64"))]
        None
    }
}

/// The lines' bytes as elements (bf16 and f32 are plain data; a line's alignment exceeds
/// theirs and its size is a multiple of theirs).
fn elements<T: TileElem>(lines: &[Line]) -> &[T] {
    // SAFETY: see above; the length covers exactly the lines' bytes.
    unsafe {
        std::slice::from_raw_parts(
            lines.as_ptr() as *const T,
            lines.len() * 64 / std::mem::size_of::<T>(),
        )
    }
}

fn elements_mut<T: TileElem>(lines: &mut [Line]) -> &mut [T] {
    // SAFETY: as in `elements`, and every bit pattern is a valid bf16/f32.
    unsafe {
        std::slice::from_raw_parts_mut(
            lines.as_mut_ptr() as *mut T,
            lines.len() * 64 / std::mem::size_of::<T>(),
        )
    }
}

/// One bf16 tile against `J` inputs: even column pairs into one sum, odd ones into
/// another, added at the end. Each (row, input) pair's arithmetic is the same in every
/// instance.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn tile_bf16<const J: usize>(lines: &[Line], x: [&[bf16]; J]) -> [[f32; TILE]; J] {
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

/// One f32 tile against `J` inputs: even columns into one sum, odd ones into another,
/// added at the end. Each (row, input) pair's arithmetic is the same in every instance.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_f32<const J: usize>(lines: &[Line], x: [&[f32]; J]) -> [[f32; TILE]; J] {
    let cols = lines.len();
    for x in x {
        assert!(x.len() == cols);
    }
    let mut acc = [[_mm512_setzero_ps(); 2]; J];
    let mut c = 0;
    while c < cols {
        crate::backend::cpu::gemv::prefetch_ahead(lines.as_ptr().add(c) as *const u8, 2);
        let w0 = _mm512_load_ps(lines.as_ptr().add(c) as *const f32);
        for (j, a) in acc.iter_mut().enumerate() {
            a[0] = _mm512_fmadd_ps(w0, _mm512_set1_ps(*x[j].get_unchecked(c)), a[0]);
        }
        if c + 1 < cols {
            let w1 = _mm512_load_ps(lines.as_ptr().add(c + 1) as *const f32);
            for (j, a) in acc.iter_mut().enumerate() {
                a[1] = _mm512_fmadd_ps(w1, _mm512_set1_ps(*x[j].get_unchecked(c + 1)), a[1]);
            }
        }
        c += 2;
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

    fn value(i: usize, seed: usize) -> f32 {
        (((i * 7919 + seed) % 1013) as f32 / 1013.0) - 0.5
    }

    /// Against the f64 product of the same values within f32 rounding's bound, for row counts that
    /// leave a partial tile, odd and even line counts and 1–9 inputs; every input's
    /// outputs equal, bit for bit, that input alone; rows read back exactly.
    fn matches_the_exact_product_and_each_input_alone<T: TileElem + PartialEq + std::fmt::Debug>(
        from_f32: impl Fn(f32) -> T,
        to_f64: impl Fn(T) -> f64,
        widths: &[usize],
    ) {
        let data = |len: usize, seed: usize| -> Vec<T> {
            (0..len).map(|i| from_f32(value(i, seed))).collect()
        };
        for (m, n) in [1, 5, 37, 70].into_iter().zip(widths.iter().copied()) {
            let w = data(m * n, 0);
            let t = DenseTiles::new(&w, m, n).unwrap();
            let ids = [m as u32 - 1, 0];
            assert_eq!(t.rows(&ids)[..n], w[(m - 1) * n..]);
            assert_eq!(t.rows(&ids)[n..], w[..n]);
            if !T::available() {
                continue;
            }
            for nx in [1, 2, 5, 9] {
                let xs = data(nx * n, 17);
                let y = t.gemm(&xs, nx).unwrap();
                for j in 0..nx {
                    for r in 0..m {
                        let prods = (0..n).map(|i| to_f64(w[r * n + i]) * to_f64(xs[j * n + i]));
                        let exact: f64 = prods.clone().sum();
                        let terms: f64 = prods.map(f64::abs).sum();
                        let got = y[j * m + r] as f64;
                        // Two chains of n/2 additions, plus products rounded (f32): a
                        // rounding bound, while one term missing or wrong is ~terms/n.
                        let bound = (n as f64 / 2.0 + 2.0) * f64::from(f32::EPSILON) / 2.0;
                        assert!(
                            (got - exact).abs() <= bound * terms,
                            "{m}×{n}, {nx} inputs, row {r}: {got} vs {exact}"
                        );
                    }
                    let alone = t.gemm(&xs[j * n..(j + 1) * n], 1).unwrap();
                    assert_eq!(&y[j * m..(j + 1) * m], alone.as_slice(), "input {j}");
                }
            }
        }
    }

    #[test]
    fn bf16_tiles_match_the_exact_product_and_each_input_alone() {
        matches_the_exact_product_and_each_input_alone(
            bf16::from_f32,
            bf16::to_f64,
            &[2, 6, 64, 1536],
        );
        let odd: Vec<bf16> = (0..15).map(|i| bf16::from_f32(value(i, 0))).collect();
        assert!(DenseTiles::new(&odd, 5, 3).is_none(), "odd width");
    }

    /// Training's widened row blocks are the stored rows, whole tiles at a time or from
    /// any row, up to a last tile that is not full.
    #[test]
    fn widened_row_blocks_are_the_rows() {
        let (rows, cols) = (53, 6);
        let w: Vec<bf16> = (0..rows * cols)
            .map(|i| bf16::from_f32(i as f32 * 0.25 - 7.0))
            .collect();
        let t = DenseTiles::new(&w, rows, cols).unwrap();
        for (start, n) in [(0, 53), (16, 37), (32, 5), (3, 20), (50, 3)] {
            let want: Vec<f32> = w[start * cols..(start + n) * cols]
                .iter()
                .map(|v| v.to_f32())
                .collect();
            assert_eq!(t.rows_f32(start, n), want, "rows {start}..{}", start + n);
        }
    }

    #[test]
    fn f32_tiles_match_the_exact_product_and_each_input_alone() {
        matches_the_exact_product_and_each_input_alone(|v| v, |v| v as f64, &[1, 7, 64, 1535]);
    }
}
