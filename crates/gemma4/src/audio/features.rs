//! Audio features, as the reference's feature extractors.
//!
//! [`MelConfig`] is `Gemma4AudioFeatureExtractor` (checkpoints with the conformer tower):
//! the clip is truncated to `max_length` samples (30 s), right-padded with zeros to a
//! multiple of 128 samples, then `frame_length/2` zeros are put in front (semicausal
//! framing). Frame `i` is the `frame_length + 1` samples from `i·hop`; without
//! pre-emphasis its first `frame_length` samples are used. Each frame is multiplied by a
//! periodic Hann window (f32), zero-padded to `fft_length`, and its magnitude spectrum goes
//! through an HTK mel filterbank without normalisation (f64), then
//! `log(mel + mel_floor)`, optionally `(x − mean) / stddev` per bin. A frame is valid
//! when the last sample of its window is real audio; invalid frames are zeroed.
//! Defaults: 16 kHz, 20 ms frames (320), 10 ms hop (160), FFT 512, 128 mels over
//! 0–8 kHz, floor 1e-3.
//!
//! The 12B's `Gemma4UnifiedAudioFeatureExtractor` ([`AudioFeatureExtractor::Frames`])
//! has no spectrum: the raw clip is cut into frames of 640 samples (40 ms), the last one
//! zero-padded, one soft token each, with no length cap.

use std::sync::Arc;

use realfft::RealFftPlanner;
use serde_json::Value;

use crate::audio::decode::Audio;
use crate::audio::resample::Resampler;
use crate::config::Fields;
use crate::error::{Error, Result};

/// `Gemma4AudioFeatureExtractor`'s settings.
#[derive(Debug, Clone, PartialEq)]
pub struct MelConfig {
    pub feature_size: usize,
    pub sampling_rate: u32,
    pub frame_length_ms: f64,
    pub hop_length_ms: f64,
    pub min_frequency: f64,
    pub max_frequency: f64,
    pub preemphasis: f64,
    pub preemphasis_htk_flavor: bool,
    pub fft_overdrive: bool,
    pub input_scale_factor: f64,
    pub mel_floor: f64,
    pub per_bin_mean: Option<Vec<f64>>,
    pub per_bin_stddev: Option<Vec<f64>>,
    /// Longest clip in samples; longer clips are truncated (`max_length`, 30 s).
    pub max_length: usize,
    pub pad_to_multiple_of: usize,
}

impl Default for MelConfig {
    fn default() -> Self {
        MelConfig {
            feature_size: 128,
            sampling_rate: 16_000,
            frame_length_ms: 20.0,
            hop_length_ms: 10.0,
            min_frequency: 0.0,
            max_frequency: 8000.0,
            preemphasis: 0.0,
            preemphasis_htk_flavor: true,
            fft_overdrive: false,
            input_scale_factor: 1.0,
            mel_floor: 1e-3,
            per_bin_mean: None,
            per_bin_stddev: None,
            max_length: 480_000,
            pad_to_multiple_of: 128,
        }
    }
}

impl MelConfig {
    pub fn frame_length(&self) -> usize {
        (self.sampling_rate as f64 * self.frame_length_ms / 1000.0).round() as usize
    }
    pub fn hop_length(&self) -> usize {
        (self.sampling_rate as f64 * self.hop_length_ms / 1000.0).round() as usize
    }
    pub fn fft_length(&self) -> usize {
        let n = self.frame_length().next_power_of_two();
        if self.fft_overdrive {
            2 * n
        } else {
            n
        }
    }
    /// `max_length` rounded up to `pad_to_multiple_of`, as the reference's `_truncate`.
    pub fn max_samples(&self) -> usize {
        self.max_length.div_ceil(self.pad_to_multiple_of) * self.pad_to_multiple_of
    }
}

/// The feature extractor of a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum AudioFeatureExtractor {
    /// Log-mel spectrogram for the conformer tower.
    Mel(MelConfig),
    /// Raw sample frames for the 12B's embedder.
    Frames {
        sampling_rate: u32,
        samples_per_token: usize,
    },
}

/// What the feature extractor hands to the encoder.
#[derive(Debug, Clone)]
pub struct AudioFeatures {
    /// `[num_frames, dim]` row-major (mel bins, or raw samples per token).
    pub features: Vec<f32>,
    pub num_frames: usize,
    pub dim: usize,
    /// Valid frames (`input_features_mask`).
    pub mask: Vec<bool>,
    /// Number of soft tokens the clip becomes (placeholders in the prompt).
    pub num_soft_tokens: usize,
    /// Samples dropped because the clip was longer than the extractor allows.
    pub truncated_samples: usize,
}

impl AudioFeatureExtractor {
    /// The conformer tower's extractor with the reference's defaults.
    pub fn mel() -> Self {
        AudioFeatureExtractor::Mel(MelConfig::default())
    }

    /// The 12B's extractor with the reference's defaults.
    pub fn frames() -> Self {
        AudioFeatureExtractor::Frames {
            sampling_rate: 16_000,
            samples_per_token: 640,
        }
    }

    pub fn sampling_rate(&self) -> u32 {
        match self {
            AudioFeatureExtractor::Mel(c) => c.sampling_rate,
            AudioFeatureExtractor::Frames { sampling_rate, .. } => *sampling_rate,
        }
    }

    /// Updates the settings from the `feature_extractor` section of `processor_config.json`.
    pub fn update_from(&mut self, section: &Value) -> std::result::Result<(), String> {
        let f = Fields(section.as_object().ok_or("the section is not an object")?);
        let rate = |d: u32| -> std::result::Result<u32, String> {
            let r = f.usize("sampling_rate", d as usize)?;
            let range = crate::audio::decode::SAMPLE_RATES;
            match u32::try_from(r) {
                Ok(r) if range.contains(&r) => Ok(r),
                _ => Err(format!(
                    "`sampling_rate` is {r}; it must be within {}..={} Hz",
                    range.start(),
                    range.end()
                )),
            }
        };
        match self {
            AudioFeatureExtractor::Frames {
                sampling_rate,
                samples_per_token,
            } => {
                *sampling_rate = rate(*sampling_rate)?;
                *samples_per_token = f.usize("audio_samples_per_token", *samples_per_token)?;
                if *samples_per_token == 0 || *samples_per_token > 1 << 20 {
                    return Err(format!(
                        "`audio_samples_per_token` is {samples_per_token}; it must be within 1..={}",
                        1 << 20
                    ));
                }
            }
            AudioFeatureExtractor::Mel(c) => {
                c.feature_size = f.usize("feature_size", c.feature_size)?;
                c.sampling_rate = rate(c.sampling_rate)?;
                c.frame_length_ms = f.f64("frame_length_ms", c.frame_length_ms)?;
                c.hop_length_ms = f.f64("hop_length_ms", c.hop_length_ms)?;
                c.min_frequency = f.f64("min_frequency", c.min_frequency)?;
                c.max_frequency = f.f64("max_frequency", c.max_frequency)?;
                c.preemphasis = f.f64("preemphasis", c.preemphasis)?;
                c.preemphasis_htk_flavor =
                    f.bool("preemphasis_htk_flavor", c.preemphasis_htk_flavor)?;
                c.fft_overdrive = f.bool("fft_overdrive", c.fft_overdrive)?;
                c.input_scale_factor = f.f64("input_scale_factor", c.input_scale_factor)?;
                c.mel_floor = f.f64("mel_floor", c.mel_floor)?;
                if f.f64("dither", 0.0)? != 0.0 {
                    return Err(
                        "`dither` adds random noise to the features; only 0.0 is supported".into(),
                    );
                }
                let bins = |k: &str| -> std::result::Result<Option<Vec<f64>>, String> {
                    match f.get(k) {
                        None => Ok(None),
                        Some(Value::Array(a)) => a
                            .iter()
                            .map(|v| v.as_f64().ok_or_else(|| format!("`{k}` must be numbers")))
                            .collect::<std::result::Result<Vec<_>, _>>()
                            .map(Some),
                        Some(v) => Err(format!("`{k}` must be a list of numbers, found {v}")),
                    }
                };
                c.per_bin_mean = bins("per_bin_mean")?;
                c.per_bin_stddev = bins("per_bin_stddev")?;
                for (k, v) in [
                    ("per_bin_mean", &c.per_bin_mean),
                    ("per_bin_stddev", &c.per_bin_stddev),
                ] {
                    if v.as_ref().is_some_and(|v| v.len() != c.feature_size) {
                        return Err(format!(
                            "`{k}` must have `feature_size` ({}) values",
                            c.feature_size
                        ));
                    }
                }
                // Bounds before the derived lengths are computed (a huge value would
                // overflow them or size the filter bank and FFT without limit).
                for (k, v) in [
                    ("frame_length_ms", c.frame_length_ms),
                    ("hop_length_ms", c.hop_length_ms),
                ] {
                    if !(v > 0.0 && v <= 1000.0) {
                        return Err(format!("`{k}` is {v}; it must be within (0, 1000]"));
                    }
                }
                if c.feature_size > 1024 {
                    return Err(format!(
                        "`feature_size` is {}; at most 1024 mel bins are supported",
                        c.feature_size
                    ));
                }
                if c.mel_floor.is_nan() || c.mel_floor <= 0.0 || !c.input_scale_factor.is_finite() {
                    return Err(
                        "`mel_floor` must be positive and `input_scale_factor` finite".into(),
                    );
                }
                if c.frame_length() < 2 || c.hop_length() == 0 || c.feature_size == 0 {
                    return Err(
                        "frame length, hop length and `feature_size` must be positive".into(),
                    );
                }
                if c.pad_to_multiple_of == 0 || c.max_length == 0 {
                    return Err("`max_length` must be positive".into());
                }
                if c.min_frequency.partial_cmp(&c.max_frequency) != Some(std::cmp::Ordering::Less) {
                    return Err("`min_frequency` must be below `max_frequency`".into());
                }
            }
        }
        Ok(())
    }

    /// Features of a clip (resampled to the extractor's rate first when needed, with the
    /// default resampler).
    pub fn extract(&self, audio: &Audio) -> Result<AudioFeatures> {
        self.extract_with(audio, Resampler::default())
    }

    /// Features of a clip, resampled with `resampler` when its rate differs.
    pub fn extract_with(&self, audio: &Audio, resampler: Resampler) -> Result<AudioFeatures> {
        let rate = self.sampling_rate();
        // The Mel extractor keeps the first `max_samples` at its rate: only the source
        // samples those depend on are resampled (both resamplers are FIR filters whose
        // taps reach far less than a second; one second of margin is kept).
        let trimmed;
        let audio = match self {
            AudioFeatureExtractor::Mel(c) if audio.sample_rate != rate => {
                let src = u64::from(audio.sample_rate);
                let needed = (c.max_samples() as u64 * src).div_ceil(u64::from(rate.max(1))) + src;
                let keep = audio
                    .samples
                    .len()
                    .min(usize::try_from(needed).unwrap_or(usize::MAX));
                trimmed = Audio {
                    samples: audio.samples[..keep].to_vec(),
                    sample_rate: audio.sample_rate,
                };
                &trimmed
            }
            _ => audio,
        };
        let audio = audio.resampled_with(rate, resampler)?;
        match self {
            AudioFeatureExtractor::Mel(c) => MelExtractor::new(c).extract(&audio.samples),
            AudioFeatureExtractor::Frames {
                samples_per_token, ..
            } => frames(&audio.samples, *samples_per_token),
        }
    }
}

fn too_short(n: usize, min: usize) -> Error {
    Error::invalid_argument(
        "audio",
        format!("the clip is too short: {n} samples after resampling, at least {min} are needed"),
    )
}

fn frames(x: &[f32], per_token: usize) -> Result<AudioFeatures> {
    if x.is_empty() {
        return Err(too_short(0, 1));
    }
    let n = x.len().div_ceil(per_token);
    let mut features = x.to_vec();
    features.resize(n * per_token, 0.0);
    Ok(AudioFeatures {
        features,
        num_frames: n,
        dim: per_token,
        mask: vec![true; n],
        num_soft_tokens: n,
        truncated_samples: 0,
    })
}

/// `mel_filter_bank(..., norm=None, mel_scale="htk")`: `[num_bins][num_mels]` in f64.
pub fn mel_filter_bank(
    num_bins: usize,
    num_mels: usize,
    f_min: f64,
    f_max: f64,
    rate: u32,
) -> Vec<Vec<f64>> {
    let to_mel = |f: f64| 2595.0 * (1.0 + f / 700.0).log10();
    let to_hz = |m: f64| 700.0 * (10f64.powf(m / 2595.0) - 1.0);
    let linspace = |a: f64, b: f64, n: usize| -> Vec<f64> {
        let step = (b - a) / (n - 1) as f64;
        let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + a).collect();
        v[n - 1] = b;
        v
    };
    let mels = linspace(to_mel(f_min), to_mel(f_max), num_mels + 2);
    let filter_freqs: Vec<f64> = mels.iter().map(|&m| to_hz(m)).collect();
    let fft_freqs = linspace(0.0, (rate / 2) as f64, num_bins);
    let diff: Vec<f64> = filter_freqs.windows(2).map(|w| w[1] - w[0]).collect();
    fft_freqs
        .iter()
        .map(|&f| {
            (0..num_mels)
                .map(|m| {
                    let down = -(filter_freqs[m] - f) / diff[m];
                    let up = (filter_freqs[m + 2] - f) / diff[m + 1];
                    down.min(up).max(0.0)
                })
                .collect()
        })
        .collect()
}

/// A [`MelConfig`] with its window, filterbank and FFT plan prepared.
pub struct MelExtractor<'a> {
    cfg: &'a MelConfig,
    window: Vec<f32>,
    filters: Vec<Vec<f64>>,
    fft: Arc<dyn realfft::RealToComplex<f64>>,
}

impl<'a> MelExtractor<'a> {
    pub fn new(cfg: &'a MelConfig) -> Self {
        let n = cfg.frame_length();
        // np.hanning(n + 1)[:-1]: the periodic Hann window, cast to f32.
        let window = (0..n)
            .map(|i| (0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n as f64).cos()) as f32)
            .collect();
        let fft_len = cfg.fft_length();
        MelExtractor {
            cfg,
            window,
            filters: mel_filter_bank(
                fft_len / 2 + 1,
                cfg.feature_size,
                cfg.min_frequency,
                cfg.max_frequency,
                cfg.sampling_rate,
            ),
            fft: RealFftPlanner::<f64>::new().plan_fft_forward(fft_len),
        }
    }

    pub fn extract(&self, x: &[f32]) -> Result<AudioFeatures> {
        let c = self.cfg;
        let (frame, hop, fft_len) = (c.frame_length(), c.hop_length(), c.fft_length());
        let truncated_samples = x.len().saturating_sub(c.max_samples());
        let real = &x[..x.len() - truncated_samples];
        let padded_len = real.len().div_ceil(c.pad_to_multiple_of) * c.pad_to_multiple_of;
        let pad_left = frame / 2;
        let scale = c.input_scale_factor as f32;
        let mut wave = vec![0.0f32; pad_left + padded_len];
        for (d, &s) in wave[pad_left..].iter_mut().zip(real) {
            *d = if c.input_scale_factor != 1.0 {
                s * scale
            } else {
                s
            };
        }
        let unfold = frame + 1;
        if wave.len() < unfold {
            return Err(too_short(real.len(), unfold - pad_left));
        }
        let num_frames = (wave.len() - unfold) / hop + 1;
        // The last sample of frame i's window is real audio.
        let mask: Vec<bool> = (0..num_frames)
            .map(|i| i * hop + unfold - 1 < pad_left + real.len())
            .collect();
        let valid = mask.iter().filter(|&&m| m).count();
        if valid == 0 {
            return Err(too_short(real.len(), unfold - pad_left));
        }
        let bins = fft_len / 2 + 1;
        let mels = c.feature_size;
        let mut input = vec![0.0f64; fft_len];
        let mut spectrum = self.fft.make_output_vec();
        let mut scratch = self.fft.make_scratch_vec();
        let mut features = vec![0.0f32; num_frames * mels];
        let p = c.preemphasis as f32;
        for i in 0..num_frames {
            if !mask[i] {
                continue; // zeroed by the reference (`speech * mask`)
            }
            let w = &wave[i * hop..i * hop + unfold];
            for (k, d) in input[..frame].iter_mut().enumerate() {
                let s = if c.preemphasis > 0.0 {
                    if c.preemphasis_htk_flavor {
                        if k == 0 {
                            w[0] * (1.0 - p)
                        } else {
                            w[k] - p * w[k - 1]
                        }
                    } else {
                        w[k + 1] - p * w[k]
                    }
                } else {
                    w[k]
                };
                *d = (s * self.window[k]) as f64;
            }
            input[frame..].fill(0.0);
            self.fft
                .process_with_scratch(&mut input, &mut spectrum, &mut scratch)
                .map_err(|e| Error::invalid_argument("audio", format!("FFT failed: {e}")))?;
            // numpy computes the f32 spectrum's magnitude in f32.
            let mag: Vec<f64> = spectrum.iter().map(|z| z.norm() as f32 as f64).collect();
            let row = &mut features[i * mels..(i + 1) * mels];
            for (m, out) in row.iter_mut().enumerate() {
                let mut e = 0.0f64;
                for (k, &a) in mag.iter().enumerate().take(bins) {
                    e += a * self.filters[k][m];
                }
                let mut v = (e + c.mel_floor).ln();
                if let Some(mean) = &c.per_bin_mean {
                    v -= mean[m];
                }
                if let Some(std) = &c.per_bin_stddev {
                    v /= std[m];
                }
                *out = v as f32;
            }
        }
        // Two stride-2 convolutions keep every other valid frame, twice.
        let num_soft_tokens = valid.div_ceil(2).div_ceil(2);
        Ok(AudioFeatures {
            features,
            num_frames,
            dim: mels,
            mask,
            num_soft_tokens,
            truncated_samples,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_counts_and_tokens_follow_the_reference_arithmetic() {
        let ex = AudioFeatureExtractor::mel();
        // 1 s: 16000 samples (a multiple of 128, so no padding) → (16000 + 160 − 321) / 160
        // + 1 = 99 frames, all valid → 50 → 25 soft tokens.
        let f = ex
            .extract(&Audio::new(vec![0.1; 16_000], 16_000).unwrap())
            .unwrap();
        assert_eq!(f.num_frames, 99);
        assert_eq!(f.mask.iter().filter(|&&m| m).count(), 99);
        assert_eq!(f.num_soft_tokens, 25);
        // 30 s + 1 sample is truncated to 30 s: 750 soft tokens, the reference's cap.
        let f = ex
            .extract(&Audio::new(vec![0.0; 480_001], 16_000).unwrap())
            .unwrap();
        assert_eq!((f.num_soft_tokens, f.truncated_samples), (750, 1));
        assert!(ex
            .extract(&Audio::new(vec![0.0; 100], 16_000).unwrap())
            .is_err());
        let fr = AudioFeatureExtractor::frames();
        let f = fr
            .extract(&Audio::new(vec![0.5; 1281], 16_000).unwrap())
            .unwrap();
        assert_eq!(
            (f.num_frames, f.num_soft_tokens, f.features.len()),
            (3, 3, 1920)
        );
        assert_eq!(f.features[1281], 0.0);
    }

    #[test]
    fn a_tone_peaks_in_its_mel_bin() {
        let c = MelConfig::default();
        let x: Vec<f32> = (0..8000)
            .map(|i| (2.0 * std::f32::consts::PI * 1000.0 * i as f32 / 16_000.0).sin())
            .collect();
        let f = MelExtractor::new(&c).extract(&x).unwrap();
        let row = &f.features[20 * 128..21 * 128];
        let peak = (0..128).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
        // 1 kHz on the HTK scale: 1000 Hz ≈ 1000 mel of 2840 over 129 steps → bin ≈ 44.
        let mel = 2595.0 * (1.0f64 + 1000.0 / 700.0).log10();
        let max_mel = 2595.0 * (1.0f64 + 8000.0 / 700.0).log10();
        let want = (mel / (max_mel / 129.0)).round() as usize - 1;
        assert!((peak as i64 - want as i64).abs() <= 1, "{peak} vs {want}");
        // Filters are triangles that peak at 1 and never go negative.
        let fb = mel_filter_bank(257, 128, 0.0, 8000.0, 16_000);
        assert!(fb.iter().flatten().all(|&v| (0.0..=1.0).contains(&v)));
    }
}
