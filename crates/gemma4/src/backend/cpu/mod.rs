//! What this CPU can run, detected once at run time: every SIMD kernel of the crate asks
//! here before taking its fast path, and falls back to portable code when the answer is
//! no (the default build targets plain x86-64, so nothing beyond SSE2 is assumed).

pub(crate) mod act_quant;
pub(crate) mod dense_tiles;
pub(crate) mod gemv;
pub(crate) mod kquant_gemv;
pub(crate) mod kquant_tiles;
pub(crate) mod q4_tiles;
pub(crate) mod q8_packed;
pub(crate) mod q8_tiles;
pub(crate) mod qmatmul;

/// AVX2 and FMA: the f32/bf16 matrix–vector kernels, activation quantization, GELU.
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// AVX2, FMA and F16C: the quantized decode kernels, which widen f16 block scales.
pub fn has_avx2_fma_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx2_fma() && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// AVX-512 (F, BW) with VNNI, and F16C: the Q8_0 kernel of [`q8_tiles`], which takes
/// every batch size, prefill included.
pub fn has_avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx2_fma_f16c()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}
