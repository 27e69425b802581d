//! Resampling to the feature extractor's rate, as two of the reference's `load_audio`
//! backends do (they disagree with each other, see the README):
//!
//! - [`Resampler::Torchaudio`] (default, pure Rust): `torchaudio.functional.resample` with
//!   its defaults (`sinc_interp_hann`, `lowpass_filter_width=6`, `rolloff=0.99`), the
//!   `backend="torchaudio"` path, reproduced exactly (below).
//! - [`Resampler::Soxr`] (cargo feature `soxr`): libsoxr's `soxr_hq`, the
//!   `backend="soundfile"` path (librosa's), output padded or cut to `⌈n · new / orig⌉`.
//!
//! With `g = gcd(orig, new)`, `o = orig/g`, `n = new/g`, output sample `m·n + j` is
//! `Σ_k K[j][k] · x[m·o + k − w]` where `w = ⌈6·o / (0.99·min(o, n))⌉` and
//! `K[j][k] = sinc(π t) · cos²(π t / 12) · 0.99·min(o,n)/o`, `t = clamp((k − w)/o − j/n, ±6)
//! · 0.99·min(o,n)`; the input is zero outside the clip and the output has
//! `⌈n · len / o⌉` samples. The kernel is built in f32 with torch's operation order. Taps
//! where `t` is clamped (|t| = 6, whose weight is below 1e-22) are skipped, so odd rate
//! pairs with a large `o` stay cheap.

use crate::error::{Error, Result};

const WIDTH: f64 = 6.0;
const ROLLOFF: f64 = 0.99;

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// One output phase: taps `values[i]` apply to padded input index `start + i`.
struct Phase {
    start: usize,
    values: Vec<f32>,
}

/// The non-negligible taps of `K[j][·]`, computed as torch does in f32.
fn phase(j: usize, o: usize, n: usize, width: usize, base: f64) -> Phase {
    let (of, nf, bf) = (o as f32, n as f32, base as f32);
    let pi = std::f32::consts::PI;
    let scale = (base / o as f64) as f32;
    // |t| < 6 ⇔ k within 6·o/base of j·o/n + width; a margin of 2 covers rounding.
    let centre = j as f64 * o as f64 / n as f64 + width as f64;
    let half = WIDTH * o as f64 / base;
    let lo = (centre - half - 2.0).floor().max(0.0) as usize;
    let hi = ((centre + half + 2.0).ceil() as usize).min(2 * width + o - 1);
    let mut start = usize::MAX;
    let mut values = Vec::new();
    for k in lo..=hi {
        let idx = (k as f32 - width as f32) / of;
        let mut t = (-(j as f32)) / nf + idx;
        t *= bf;
        if t.abs() >= WIDTH as f32 {
            continue;
        }
        let c = (t * pi / WIDTH as f32 / 2.0).cos();
        let window = c * c;
        let tp = t * pi;
        let sinc = if tp == 0.0 { 1.0 } else { tp.sin() / tp };
        if start == usize::MAX {
            start = k;
        }
        // Taps are contiguous: fill any skipped gap (none in practice) with zeros.
        values.resize(k - start, 0.0);
        values.push(sinc * (window * scale));
    }
    Phase {
        start: if start == usize::MAX { 0 } else { start },
        values,
    }
}

/// Which resampling to reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resampler {
    #[default]
    Torchaudio,
    Soxr,
}

impl std::str::FromStr for Resampler {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "torchaudio" => Ok(Resampler::Torchaudio),
            "soxr" | "soxr_hq" => Ok(Resampler::Soxr),
            other => Err(format!(
                "unknown resampler `{other}` (expected torchaudio or soxr)"
            )),
        }
    }
}

/// `x` at `orig` Hz → `new` Hz with `which`.
pub fn resample_with(x: &[f32], orig: u32, new: u32, which: Resampler) -> Result<Vec<f32>> {
    match which {
        Resampler::Torchaudio => resample(x, orig, new),
        Resampler::Soxr => soxr_hq(x, orig, new),
    }
}

#[cfg(not(feature = "soxr"))]
fn soxr_hq(_: &[f32], _: u32, _: u32) -> Result<Vec<f32>> {
    Err(Error::invalid_argument(
        "resampler",
        "soxr needs a build with the `soxr` cargo feature",
    ))
}

/// libsoxr's one-shot `soxr_hq` (20-bit quality, linear phase), mono f32.
#[cfg(feature = "soxr")]
fn soxr_hq(x: &[f32], orig: u32, new: u32) -> Result<Vec<f32>> {
    use soxr_sys as s;
    if orig == new {
        return Ok(x.to_vec());
    }
    // librosa/transformers: ceil(n · new / orig) samples, padded or cut.
    let want = (x.len() as f64 * new as f64 / orig as f64).ceil() as usize;
    let mut out = vec![0.0f32; want + 64];
    let (mut idone, mut odone) = (0usize, 0usize);
    // SAFETY: the buffers outlive the call and their lengths are passed alongside.
    let err = unsafe {
        let io = s::soxr_io_spec(
            s::soxr_datatype_t_SOXR_FLOAT32_I,
            s::soxr_datatype_t_SOXR_FLOAT32_I,
        );
        let q = s::soxr_quality_spec(s::SOXR_20_BITQ as _, 0);
        let rt = s::soxr_runtime_spec(1);
        s::soxr_oneshot(
            orig as f64,
            new as f64,
            1,
            x.as_ptr() as s::soxr_in_t,
            x.len(),
            &mut idone,
            out.as_mut_ptr() as s::soxr_out_t,
            out.len(),
            &mut odone,
            &io,
            &q,
            &rt,
        )
    };
    if !err.is_null() {
        // SAFETY: libsoxr returns a static NUL-terminated message.
        let msg = unsafe { std::ffi::CStr::from_ptr(err) }.to_string_lossy();
        return Err(Error::invalid_argument(
            "resampler",
            format!("libsoxr: {msg}"),
        ));
    }
    out.truncate(odone.min(want));
    out.resize(want, 0.0);
    Ok(out)
}

/// `x` at `orig` Hz → `new` Hz, as `torchaudio.functional.resample`.
pub fn resample(x: &[f32], orig: u32, new: u32) -> Result<Vec<f32>> {
    if orig == 0 || new == 0 {
        return Err(Error::invalid_argument(
            "sample_rate",
            format!("cannot resample from {orig} Hz to {new} Hz"),
        ));
    }
    if orig == new {
        return Ok(x.to_vec());
    }
    let g = gcd(orig as u64, new as u64);
    let (o, n) = ((orig as u64 / g) as usize, (new as u64 / g) as usize);
    let base = o.min(n) as f64 * ROLLOFF;
    let width = (WIDTH * o as f64 / base).ceil() as usize;
    let phases: Vec<Phase> = (0..n).map(|j| phase(j, o, n, width, base)).collect();
    let len = x.len();
    let out_len = (n as u128 * len as u128).div_ceil(o as u128) as usize;
    // Padded input: `width` zeros, the clip, `width + o` zeros.
    let at = |i: usize| -> f64 {
        if i < width || i - width >= len {
            0.0
        } else {
            x[i - width] as f64
        }
    };
    let mut out = Vec::with_capacity(out_len);
    for s in 0..out_len {
        let (m, j) = (s / n, s % n);
        let p = &phases[j];
        let base_i = m * o + p.start;
        let acc: f64 = p
            .values
            .iter()
            .enumerate()
            .map(|(i, &v)| v as f64 * at(base_i + i))
            .sum();
        out.push(acc as f32);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_is_ceil_of_ratio() {
        let x = vec![0.0f32; 44_100];
        assert_eq!(resample(&x, 44_100, 16_000).unwrap().len(), 16_000);
        assert_eq!(resample(&x[..1001], 48_000, 16_000).unwrap().len(), 334);
        assert_eq!(resample(&x[..7], 8_000, 16_000).unwrap().len(), 14);
    }

    #[test]
    fn keeps_a_low_tone_and_removes_one_above_nyquist() {
        let tone = |f: f64, rate: f64, n: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (2.0 * std::f64::consts::PI * f * i as f64 / rate).sin() as f32)
                .collect()
        };
        let y = resample(&tone(440.0, 48_000.0, 48_000), 48_000, 16_000).unwrap();
        let want = tone(440.0, 16_000.0, 16_000);
        // Away from the edges the tone passes with < 1% error.
        let err = y[100..15_900]
            .iter()
            .zip(&want[100..15_900])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(err < 0.01, "{err}");
        // 12 kHz is above the new Nyquist (8 kHz): it must be filtered out.
        let y = resample(&tone(12_000.0, 48_000.0, 48_000), 48_000, 16_000).unwrap();
        let rms = (y[100..15_900].iter().map(|v| v * v).sum::<f32>() / 15_800.0).sqrt();
        assert!(rms < 0.01, "{rms}");
    }

    #[test]
    fn odd_rates_are_cheap_and_sane() {
        let x: Vec<f32> = (0..44_101)
            .map(|i| ((i % 100) as f32 / 100.0) - 0.5)
            .collect();
        let y = resample(&x, 44_101, 16_000).unwrap();
        assert_eq!(y.len(), 16_000);
        assert!(y.iter().all(|v| v.is_finite() && v.abs() < 1.0));
    }
}
