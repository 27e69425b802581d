//! Decode kernels for the k-quants (Q4_K and Q6_K weights in GGML's block layout) with
//! AVX2: one row at a time against the input quantized once to Q8_K blocks
//! ([`crate::backend::cpu::act_quant`]), rows split across the rayon pool.
//!
//! The arithmetic is llama.cpp's `ggml_vec_dot_q4_K_q8_K`/`q6_K_q8_K` (as ported in candle):
//! integer dot products per 32 (Q4_K) or 16 (Q6_K) values, multiplied by the 6- or 8-bit
//! sub-block scales in integers and by the f32 block scales once per 256. What changes
//! leaves every integer the same and costs fewer instructions per weight:
//!
//! - What depends only on the input is done once per product, not once per row: the
//!   per-32 sums that Q4_K's minimums multiply (`sums32`), and Q6_K's `−32` offset, which
//!   is `32 · Σ scale · (sum of 16 inputs)` from the Q8_K block sums instead of sixteen
//!   extra multiplies per 256 weights.
//! - Q4_K's packed 6-bit scales are unpacked in vector registers (no scalar shifts and
//!   lane inserts), and block scales are widened with F16C inline instead of a call.
//! - The weights 4 KiB ahead are prefetched ([`crate::backend::cpu::gemv::prefetch_ahead`]).
//!
//! Measured with `--example kernels` (E2B-sized matrices, two threads, same runs): Q4_K
//! decode streamed 7.5–9.4 GB/s through candle's kernel, which was compute-bound (one
//! core: 6.7 GB/s against ~9 for the bf16 kernel), and 12.5–14.9 GB/s here; Q6_K, which
//! was already near the memory bound, about the same as candle's.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use crate::backend::cpu::act_quant::Q8KBlocks;
#[cfg(target_arch = "x86_64")]
use crate::backend::cpu::gemv::{hsum8, par_rows_all, prefetch_ahead};

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 16;

/// GGML's Q4_K block (candle's `BlockQ4K`, whose fields are private; the layout is fixed).
#[repr(C)]
pub(crate) struct BlockQ4K {
    pub d: u16,
    pub dmin: u16,
    pub scales: [u8; 12],
    pub qs: [u8; 128],
}

/// GGML's Q6_K block.
#[repr(C)]
pub(crate) struct BlockQ6K {
    pub ql: [u8; 128],
    pub qh: [u8; 64],
    pub scales: [i8; 16],
    pub d: u16,
}

const _: () = {
    use candle_core::quantized::k_quants as k;
    assert!(std::mem::size_of::<BlockQ4K>() == std::mem::size_of::<k::BlockQ4K>());
    assert!(std::mem::align_of::<BlockQ4K>() == std::mem::align_of::<k::BlockQ4K>());
    assert!(std::mem::size_of::<BlockQ6K>() == std::mem::size_of::<k::BlockQ6K>());
    assert!(std::mem::align_of::<BlockQ6K>() == std::mem::align_of::<k::BlockQ6K>());
};

/// Whether this CPU runs these kernels (AVX2, FMA, F16C).
pub fn available() -> bool {
    crate::backend::cpu::has_avx2_fma_f16c()
}

/// `W x` for `W` `[m, n]` in Q4_K blocks (`bytes`, GGML layout); `None` when the
/// blocks do not fit `m`, `n` or the CPU lacks the instructions.
pub fn gemv_q4k(bytes: &[u8], m: usize, x: &[f32], nx: usize) -> Option<Vec<f32>> {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY (of the kernel): `available` checked; each row is `n / 256` blocks and
        // the activation has as many.
        gemv_with::<BlockQ4K>(bytes, m, x, nx, |r, a, out| unsafe {
            in_groups(
                a,
                out,
                |a, o| o[0] = dot_q4k(r, &a[0]),
                |a, o| dot_q4k_n::<2>(r, refs(a), o),
                |a, o| dot_q4k_n::<3>(r, refs(a), o),
                |a, o| dot_q4k_n::<4>(r, refs(a), o),
            )
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// The same for Q6_K blocks.
pub fn gemv_q6k(bytes: &[u8], m: usize, x: &[f32], nx: usize) -> Option<Vec<f32>> {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: as for `gemv_q4k`.
        gemv_with::<BlockQ6K>(bytes, m, x, nx, |r, a, out| unsafe {
            in_groups(
                a,
                out,
                |a, o| o[0] = dot_q6k(r, &a[0]),
                |a, o| dot_q6k_n::<2>(r, refs(a), o),
                |a, o| dot_q6k_n::<3>(r, refs(a), o),
                |a, o| dot_q6k_n::<4>(r, refs(a), o),
            )
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

#[cfg(target_arch = "x86_64")]
fn gemv_with<T: Sync>(
    bytes: &[u8],
    m: usize,
    x: &[f32],
    nx: usize,
    dot: impl Fn(&[T], &[Q8KBlocks], &mut [f32]) + Sync,
) -> Option<Vec<f32>> {
    if nx == 0 || !x.len().is_multiple_of(nx) {
        return None;
    }
    let n = x.len() / nx;
    if n == 0 || !n.is_multiple_of(256) || !available() {
        return None;
    }
    let nb = n / 256;
    let w = crate::backend::cpu::qmatmul::blocks::<T>(bytes, m * nb)?;
    let a: Vec<Q8KBlocks> = x.chunks_exact(n).map(Q8KBlocks::new).collect();
    Some(par_rows_all(m, nx, ROWS_PER_TASK, |r, out| {
        dot(&w[r * nb..(r + 1) * nb], &a, out)
    }))
}

/// The first `G` inputs of `a`.
#[cfg(target_arch = "x86_64")]
fn refs<const G: usize>(a: &[Q8KBlocks]) -> [&Q8KBlocks; G] {
    std::array::from_fn(|i| &a[i])
}

/// The inputs `a` (and their outputs `out`) in groups of up to four, each group through
/// the kernel instance for its size: a weight block is unpacked once per group, and
/// each input's arithmetic is what it is alone. A single input takes the one-input
/// kernel, which the compiler schedules better (the const-generic one at `G = 1` decoded
/// E2B q4_k ~20% slower).
#[cfg(target_arch = "x86_64")]
fn in_groups(
    a: &[Q8KBlocks],
    out: &mut [f32],
    one: impl Fn(&[Q8KBlocks], &mut [f32]),
    two: impl Fn(&[Q8KBlocks], &mut [f32]),
    three: impl Fn(&[Q8KBlocks], &mut [f32]),
    four: impl Fn(&[Q8KBlocks], &mut [f32]),
) {
    if a.len() == 1 {
        return one(a, out);
    }
    for (a, o) in a.chunks(4).zip(out.chunks_mut(4)) {
        match a.len() {
            1 => one(a, o),
            2 => two(a, o),
            3 => three(a, o),
            _ => four(a, o),
        }
    }
}

/// A Q4_K block's twelve bytes of 6-bit scales and minimums, unpacked to eight of each
/// as i16 (scales in the low lane, minimums in the high): llama.cpp's `utmp` shuffle, on
/// the four u32 lanes of one load (the four bytes read past the scales are the first
/// quantized values, masked out).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q4k_mins_scales(x: &BlockQ4K) -> __m256i {
    // Lanes 0 and 2 keep the low six bits, lanes 1 and 3 the low four plus two from `hi`.
    let k12 = _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f);
    let k3 = _mm_set1_epi32(0x03030303);
    let odd = _mm_setr_epi32(0, -1, 0, -1);
    let v = _mm_loadu_si128(x.scales.as_ptr() as *const __m128i);
    let lo = _mm_srlv_epi32(
        _mm_shuffle_epi32(v, 0b10_01_10_00),
        _mm_setr_epi32(0, 0, 0, 4),
    );
    let hi = _mm_slli_epi32(
        _mm_and_si128(_mm_srli_epi32(_mm_shuffle_epi32(v, 0b01_01_00_00), 6), k3),
        4,
    );
    let u = _mm_or_si128(_mm_and_si128(lo, k12), _mm_and_si128(hi, odd));
    _mm256_cvtepu8_epi16(u)
}

/// Scales of Q4_K sub-blocks 2j and 2j+1 (`sc`: the eight scales broadcast to both
/// lanes), each broadcast over sixteen i16 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q4k_scale_pair(sc: __m256i, j: usize) -> (__m256i, __m256i) {
    let lo = (2 * j) as i8 * 2;
    let scale_l = _mm256_shuffle_epi8(
        sc,
        _mm256_set1_epi16(i16::from_le_bytes([lo as u8, lo as u8 + 1])),
    );
    let scale_h = _mm256_shuffle_epi8(
        sc,
        _mm256_set1_epi16(i16::from_le_bytes([lo as u8 + 2, lo as u8 + 3])),
    );
    (scale_l, scale_h)
}

/// The 128 6-bit values (stored as q + 32) of half a Q6_K block, from its 64 low-nibble
/// bytes (`bits1`, `bits2`) and 32 high-bit bytes, as four vectors of 32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q6k_values(bits1: __m256i, bits2: __m256i, hbits: __m256i) -> [__m256i; 4] {
    let m4 = _mm256_set1_epi8(0xF);
    let m2 = _mm256_set1_epi8(3);
    let m30 = _mm256_set1_epi8(0x30);
    [
        _mm256_or_si256(
            _mm256_and_si256(bits1, m4),
            _mm256_slli_epi16(_mm256_and_si256(hbits, m2), 4),
        ),
        _mm256_or_si256(
            _mm256_and_si256(bits2, m4),
            _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hbits, 2), m2), 4),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16(bits1, 4), m4),
            _mm256_and_si256(hbits, m30),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16(bits2, 4), m4),
            _mm256_and_si256(_mm256_srli_epi16(hbits, 2), m30),
        ),
    ]
}

/// Scales of Q6_K sub-blocks `is` and `is + 1` (the two 16-value halves of a 32), widened
/// to i16, the first over the low eight lanes and the second over the high eight.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q6k_scale_pair(scales: __m128i, is: usize) -> __m256i {
    let (a, b) = (is as i8, is as i8 + 1);
    let sh = _mm_set_epi8(b, b, b, b, b, b, b, b, a, a, a, a, a, a, a, a);
    _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, sh))
}

/// One Q4_K row (`row.len()` blocks) dotted with the Q8_K input.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4k(row: &[BlockQ4K], a: &Q8KBlocks) -> f32 {
    assert!(a.d.len() == row.len() && a.qs.len() == 256 * row.len());
    let m4 = _mm256_set1_epi8(0xF);
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = _mm_setzero_ps();
    for (b, x) in row.iter().enumerate() {
        prefetch_ahead(x as *const BlockQ4K as *const u8, 3);
        // d and dmin, widened together.
        let dd = _mm_cvtph_ps(_mm_cvtsi32_si128(
            (x.d as u32 | (x.dmin as u32) << 16) as i32,
        ));
        let dy = a.d[b];
        let d = dy * _mm_cvtss_f32(dd);
        let dmin = -dy * _mm_cvtss_f32(_mm_movehdup_ps(dd));

        // The twelve bytes of 6-bit scales and minimums, unpacked to eight of each
        // (llama.cpp's `utmp` shuffle, on the four u32 lanes of one load: the four bytes
        // read past the scales are the first quantized values, masked out).
        let mins_scales = q4k_mins_scales(x);
        // Σ min_j · (sum of input sub-block j), all eight at once.
        let sums = _mm_loadu_si128(a.sums32.as_ptr().add(b) as *const __m128i);
        let prod = _mm_madd_epi16(_mm256_extracti128_si256(mins_scales, 1), sums);
        acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m);

        let sc = _mm256_broadcastsi128_si256(_mm256_castsi256_si128(mins_scales));
        let mut q4 = x.qs.as_ptr();
        let mut q8 = a.qs.as_ptr().add(256 * b);
        let mut sumi = _mm256_setzero_si256();
        for j in 0..4 {
            // Scales of sub-blocks 2j and 2j+1, each broadcast over sixteen i16 lanes.
            let (scale_l, scale_h) = q4k_scale_pair(sc, j);
            let bits = _mm256_loadu_si256(q4 as *const __m256i);
            q4 = q4.add(32);
            let q4l = _mm256_and_si256(bits, m4);
            let q4h = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
            let q8l = _mm256_loadu_si256(q8 as *const __m256i);
            let q8h = _mm256_loadu_si256(q8.add(32) as *const __m256i);
            q8 = q8.add(64);
            let pl = _mm256_madd_epi16(scale_l, _mm256_maddubs_epi16(q4l, q8l));
            let ph = _mm256_madd_epi16(scale_h, _mm256_maddubs_epi16(q4h, q8h));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    let m = _mm_add_ps(acc_m, _mm_movehl_ps(acc_m, acc_m));
    let m = _mm_add_ss(m, _mm_movehdup_ps(m));
    hsum8(acc) + _mm_cvtss_f32(m)
}

/// One Q6_K row dotted with the Q8_K input.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q6k(row: &[BlockQ6K], a: &Q8KBlocks) -> f32 {
    assert!(a.d.len() == row.len() && a.qs.len() == 256 * row.len());
    let mut acc = _mm256_setzero_ps();
    for (b, x) in row.iter().enumerate() {
        prefetch_ahead(x as *const BlockQ6K as *const u8, 4);
        let d = a.d[b] * _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(x.d as i32)));
        let scales = _mm_loadu_si128(x.scales.as_ptr() as *const __m128i);
        // The stored values are q + 32: Σ s·(q−32)·y = Σ s·q·y − 32 Σ s·(sum of 16 y).
        let offset = _mm256_madd_epi16(
            _mm256_cvtepi8_epi16(scales),
            _mm256_loadu_si256(a.bsums.as_ptr().add(b) as *const __m256i),
        );
        let mut sumi = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(offset, 5));
        let mut ql = x.ql.as_ptr();
        let mut qh = x.qh.as_ptr();
        let mut q8 = a.qs.as_ptr().add(256 * b);
        for j in 0..2 {
            let bits1 = _mm256_loadu_si256(ql as *const __m256i);
            let bits2 = _mm256_loadu_si256(ql.add(32) as *const __m256i);
            let hbits = _mm256_loadu_si256(qh as *const __m256i);
            ql = ql.add(64);
            qh = qh.add(32);
            let q = q6k_values(bits1, bits2, hbits);
            for (k, qk) in q.iter().enumerate() {
                // Scales of the two 16-value halves of this 32: sub-blocks 8j+2k, 8j+2k+1.
                let s16 = q6k_scale_pair(scales, 8 * j + 2 * k);
                let y = _mm256_loadu_si256(q8 as *const __m256i);
                q8 = q8.add(32);
                let p = _mm256_madd_epi16(s16, _mm256_maddubs_epi16(*qk, y));
                sumi = _mm256_add_epi32(sumi, p);
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum8(acc)
}

/// One Q4_K row (`row.len()` blocks) dotted with each of `G` Q8_K inputs, into `out`:
/// the weights' scales and nibbles are unpacked once per block for all the inputs, and
/// each input's arithmetic is exactly what it is alone.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4k_n<const G: usize>(row: &[BlockQ4K], a: [&Q8KBlocks; G], out: &mut [f32]) {
    for a in a {
        assert!(a.d.len() == row.len() && a.qs.len() == 256 * row.len());
    }
    assert!(out.len() == G);
    let m4 = _mm256_set1_epi8(0xF);
    let mut acc = [_mm256_setzero_ps(); G];
    let mut acc_m = [_mm_setzero_ps(); G];
    for (b, x) in row.iter().enumerate() {
        prefetch_ahead(x as *const BlockQ4K as *const u8, 3);
        // d and dmin, widened together.
        let dd = _mm_cvtph_ps(_mm_cvtsi32_si128(
            (x.d as u32 | (x.dmin as u32) << 16) as i32,
        ));
        let (dw, dminw) = (_mm_cvtss_f32(dd), _mm_cvtss_f32(_mm_movehdup_ps(dd)));

        // The twelve bytes of 6-bit scales and minimums, unpacked to eight of each
        // (llama.cpp's `utmp` shuffle, on the four u32 lanes of one load: the four bytes
        // read past the scales are the first quantized values, masked out).
        let mins_scales = q4k_mins_scales(x);
        let mins = _mm256_extracti128_si256(mins_scales, 1);
        for g in 0..G {
            // Σ min_j · (sum of input sub-block j), all eight at once.
            let dmin = -a[g].d[b] * dminw;
            let sums = _mm_loadu_si128(a[g].sums32.as_ptr().add(b) as *const __m128i);
            let prod = _mm_madd_epi16(mins, sums);
            acc_m[g] = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m[g]);
        }

        let sc = _mm256_broadcastsi128_si256(_mm256_castsi256_si128(mins_scales));
        let mut q4 = x.qs.as_ptr();
        let mut sumi = [_mm256_setzero_si256(); G];
        for j in 0..4 {
            // Scales of sub-blocks 2j and 2j+1, each broadcast over sixteen i16 lanes.
            let (scale_l, scale_h) = q4k_scale_pair(sc, j);
            let bits = _mm256_loadu_si256(q4 as *const __m256i);
            q4 = q4.add(32);
            let q4l = _mm256_and_si256(bits, m4);
            let q4h = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
            for g in 0..G {
                let q8 = a[g].qs.as_ptr().add(256 * b + 64 * j);
                let q8l = _mm256_loadu_si256(q8 as *const __m256i);
                let q8h = _mm256_loadu_si256(q8.add(32) as *const __m256i);
                let pl = _mm256_madd_epi16(scale_l, _mm256_maddubs_epi16(q4l, q8l));
                let ph = _mm256_madd_epi16(scale_h, _mm256_maddubs_epi16(q4h, q8h));
                sumi[g] = _mm256_add_epi32(sumi[g], _mm256_add_epi32(pl, ph));
            }
        }
        for g in 0..G {
            let d = a[g].d[b] * dw;
            acc[g] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi[g]), acc[g]);
        }
    }
    for g in 0..G {
        let m = _mm_add_ps(acc_m[g], _mm_movehl_ps(acc_m[g], acc_m[g]));
        let m = _mm_add_ss(m, _mm_movehdup_ps(m));
        out[g] = hsum8(acc[g]) + _mm_cvtss_f32(m);
    }
}

/// One Q6_K row dotted with each of `G` Q8_K inputs, into `out` (the weights unpacked
/// once per block for all of them, as [`dot_q4k_n`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q6k_n<const G: usize>(row: &[BlockQ6K], a: [&Q8KBlocks; G], out: &mut [f32]) {
    for a in a {
        assert!(a.d.len() == row.len() && a.qs.len() == 256 * row.len());
    }
    assert!(out.len() == G);
    let mut acc = [_mm256_setzero_ps(); G];
    for (b, x) in row.iter().enumerate() {
        prefetch_ahead(x as *const BlockQ6K as *const u8, 4);
        let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(x.d as i32)));
        let scales = _mm_loadu_si128(x.scales.as_ptr() as *const __m128i);
        let scales16 = _mm256_cvtepi8_epi16(scales);
        // The stored values are q + 32: Σ s·(q−32)·y = Σ s·q·y − 32 Σ s·(sum of 16 y).
        let mut sumi = [_mm256_setzero_si256(); G];
        for g in 0..G {
            let offset = _mm256_madd_epi16(
                scales16,
                _mm256_loadu_si256(a[g].bsums.as_ptr().add(b) as *const __m256i),
            );
            sumi[g] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(offset, 5));
        }
        let mut ql = x.ql.as_ptr();
        let mut qh = x.qh.as_ptr();
        for j in 0..2 {
            let bits1 = _mm256_loadu_si256(ql as *const __m256i);
            let bits2 = _mm256_loadu_si256(ql.add(32) as *const __m256i);
            let hbits = _mm256_loadu_si256(qh as *const __m256i);
            ql = ql.add(64);
            qh = qh.add(32);
            let q = q6k_values(bits1, bits2, hbits);
            for (k, qk) in q.iter().enumerate() {
                // Scales of the two 16-value halves of this 32: sub-blocks 8j+2k, 8j+2k+1.
                let s16 = q6k_scale_pair(scales, 8 * j + 2 * k);
                for g in 0..G {
                    let y = _mm256_loadu_si256(
                        a[g].qs.as_ptr().add(256 * b + 128 * j + 32 * k) as *const __m256i
                    );
                    let p = _mm256_madd_epi16(s16, _mm256_maddubs_epi16(*qk, y));
                    sumi[g] = _mm256_add_epi32(sumi[g], p);
                }
            }
        }
        for g in 0..G {
            let d = a[g].d[b] * dw;
            acc[g] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi[g]), acc[g]);
        }
    }
    for g in 0..G {
        out[g] = hsum8(acc[g]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::qmatmul::tests::data;
    use crate::quant::{quantize, QuantType};
    use candle_core::quantized::k_quants as k;
    use candle_core::quantized::GgmlType;
    use candle_core::{Device, Tensor};

    /// candle's `vec_dot` of each row of `data` (blocks `T`) with `x` quantized to Q8_K.
    fn candle_rows<T: GgmlType<VecDotType = k::BlockQ8K>>(
        data: &[u8],
        m: usize,
        x: &[f32],
    ) -> Vec<f32> {
        let (n, nb) = (x.len(), x.len() / 256);
        let mut xq = vec![k::BlockQ8K::zeros(); nb];
        k::BlockQ8K::from_float(x, &mut xq);
        let b = crate::backend::cpu::qmatmul::blocks::<T>(data, m * nb).unwrap();
        (0..m)
            .map(|r| T::vec_dot(n, &b[r * nb..(r + 1) * nb], &xq))
            .collect()
    }

    /// candle's `vec_dot` on the same blocks within f32 rounding (the integer sums are
    /// the same; the float sums are ordered differently).
    #[test]
    fn match_candles_block_kernels() {
        if !available() {
            return;
        }
        for (q, m, n) in [
            (QuantType::Q4K, 37, 256),
            (QuantType::Q4K, 70, 1536),
            (QuantType::Q6K, 37, 256),
            (QuantType::Q6K, 70, 1536),
        ] {
            let (w, x) = data(m, n);
            // Sub-blocks of different ranges and offsets, so that every 6-bit scale and
            // minimum differs (uniform data gives them all the same value).
            let w = w
                .broadcast_mul(
                    &Tensor::from_vec(
                        (0..n)
                            .map(|i| 1.0 + (i / 32 % 7) as f32)
                            .collect::<Vec<_>>(),
                        (1, n),
                        &Device::Cpu,
                    )
                    .unwrap(),
                )
                .unwrap();
            let w = w
                .broadcast_add(
                    &Tensor::from_vec(
                        (0..n)
                            .map(|i| 0.3 * (i / 16 % 5) as f32)
                            .collect::<Vec<_>>(),
                        (1, n),
                        &Device::Cpu,
                    )
                    .unwrap(),
                )
                .unwrap();
            // Larger magnitudes and negative values reach the saturating i16 sums.
            let x: Vec<f32> = x
                .iter()
                .enumerate()
                .map(|(i, v)| v * (1.0 + (i % 13) as f32))
                .collect();
            let qt = quantize(&w, q).unwrap();
            let data = qt.data().unwrap();
            let (ours, want) = match q {
                QuantType::Q4K => (
                    gemv_q4k(&data, m, &x, 1).unwrap(),
                    candle_rows::<k::BlockQ4K>(&data, m, &x),
                ),
                _ => (
                    gemv_q6k(&data, m, &x, 1).unwrap(),
                    candle_rows::<k::BlockQ6K>(&data, m, &x),
                ),
            };
            for (r, (a, b)) in ours.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "{} {m}×{n} row {r}: {a} vs {b}",
                    q.name()
                );
            }
        }
    }

    #[test]
    fn decline_widths_that_are_not_whole_blocks() {
        let (w, x) = data(4, 512);
        let qt = quantize(&w, QuantType::Q4K).unwrap();
        assert!(gemv_q4k(&qt.data().unwrap(), 4, &x[..300], 1).is_none());
        assert!(
            gemv_q4k(&qt.data().unwrap(), 5, &x, 1).is_none(),
            "block count"
        );
    }
}
