//! Audio input: decoding WAV (8/16/24/32-bit integer and float PCM, ADPCM), FLAC, MP3 and
//! Ogg Vorbis with symphonia, mixing down to mono and resampling to the model's rate.
//!
//! This mirrors the reference's `load_audio` (`transformers.audio_utils`): samples are
//! read as f32 in [-1, 1] (the same scaling as libsndfile: `x / 2^(bits−1)`, unsigned 8-bit
//! centred first), every channel is averaged into one (`waveform.mean(axis=0)`, summed in
//! f32 in channel order, then divided), and a clip at another rate is resampled with
//! [`crate::audio::resample`], which reproduces the reference's `backend="torchaudio"` path
//! (`torchaudio.functional.resample`) exactly.

use std::path::Path;

use symphonia::core::codecs::audio::AudioDecoderOptions;
use symphonia::core::errors::Error as SymError;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, TrackType};
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;

use crate::audio::resample::{resample_with, Resampler};
use crate::error::{Error, Result};
use crate::limits::Limits;

/// Sample rates a clip may have, in Hz (telephony's 8 kHz to studio 768 kHz, with room):
/// outside them a file is refused before any resampler kernel is built.
pub const SAMPLE_RATES: std::ops::RangeInclusive<u32> = 1_000..=768_000;
/// The most interleaved samples decoded from one file (1 GiB of f32), whatever its rate
/// and channel count.
pub const MAX_DECODED_SAMPLES: u64 = 1 << 28;

/// A mono clip: f32 samples in [-1, 1] at `sample_rate` Hz.
#[derive(Debug, Clone, PartialEq)]
pub struct Audio {
    pub samples: Vec<f32>,
    pub sample_rate: u32,
}

impl Audio {
    /// Raw mono samples from the library API.
    pub fn new(samples: Vec<f32>, sample_rate: u32) -> Result<Self> {
        if !SAMPLE_RATES.contains(&sample_rate) {
            return Err(Error::invalid_argument(
                "sample_rate",
                format!(
                    "{sample_rate} Hz is outside {}..={} Hz",
                    SAMPLE_RATES.start(),
                    SAMPLE_RATES.end()
                ),
            ));
        }
        if let Some(i) = samples.iter().position(|x| !x.is_finite()) {
            return Err(Error::invalid_argument(
                "samples",
                format!("sample {i} is not a finite number"),
            ));
        }
        Ok(Audio {
            samples,
            sample_rate,
        })
    }

    /// Interleaved samples of `channels` channels, averaged into one as the reference does.
    pub fn from_interleaved(
        interleaved: &[f32],
        channels: usize,
        sample_rate: u32,
    ) -> Result<Self> {
        if channels == 0 || !interleaved.len().is_multiple_of(channels) {
            return Err(Error::invalid_argument(
                "channels",
                format!(
                    "{} interleaved samples do not split into {channels} channel(s)",
                    interleaved.len()
                ),
            ));
        }
        Audio::new(mix_to_mono(interleaved, channels), sample_rate)
    }

    pub fn duration_s(&self) -> f64 {
        self.samples.len() as f64 / self.sample_rate as f64
    }

    /// This clip at `rate` Hz (unchanged when it already is), with the default resampler.
    pub fn resampled(&self, rate: u32) -> Result<Audio> {
        self.resampled_with(rate, Resampler::default())
    }

    pub fn resampled_with(&self, rate: u32, which: Resampler) -> Result<Audio> {
        if rate == self.sample_rate {
            return Ok(self.clone());
        }
        Ok(Audio {
            samples: resample_with(&self.samples, self.sample_rate, rate, which)?,
            sample_rate: rate,
        })
    }
}

/// `waveform.mean(axis=0)` of a `[channels, frames]` f32 array: channels summed in order in
/// f32, then divided by the count.
pub fn mix_to_mono(interleaved: &[f32], channels: usize) -> Vec<f32> {
    if channels == 1 {
        return interleaved.to_vec();
    }
    let n = channels as f32;
    interleaved
        .chunks_exact(channels)
        .map(|frame| frame.iter().fold(0.0f32, |acc, &x| acc + x) / n)
        .collect()
}

fn audio_error(name: &str, message: impl Into<String>) -> Error {
    Error::Audio {
        name: name.to_string(),
        message: message.into(),
    }
}

/// Decodes an audio file held in memory, its first `max_audio_seconds` of the default
/// [`Limits`]; `name` is used in errors and as the format hint (its extension).
pub fn decode_audio(bytes: &[u8], name: &str) -> Result<Audio> {
    decode_audio_with(bytes, name, &Limits::DEFAULT)
}

/// [`decode_audio`] within `limits`: the first `max_audio_seconds` of the file are decoded
/// (and at most [`MAX_DECODED_SAMPLES`] samples); the rest is not read.
pub fn decode_audio_with(bytes: &[u8], name: &str, limits: &Limits) -> Result<Audio> {
    if bytes.is_empty() {
        return Err(audio_error(name, "the file is empty"));
    }
    let cursor = std::io::Cursor::new(bytes.to_vec());
    let mss = MediaSourceStream::new(Box::new(cursor), Default::default());
    let mut hint = Hint::new();
    if let Some(ext) = Path::new(name).extension().and_then(|e| e.to_str()) {
        hint.with_extension(ext);
    }
    let mut format = symphonia::default::get_probe()
        .probe(
            &hint,
            mss,
            FormatOptions::default(),
            MetadataOptions::default(),
        )
        .map_err(|e| {
            audio_error(
                name,
                format!("not a supported audio file (WAV, FLAC, MP3, Ogg Vorbis): {e}"),
            )
        })?;
    let track = format
        .default_track(TrackType::Audio)
        .ok_or_else(|| audio_error(name, "the file has no audio track"))?;
    let track_id = track.id;
    let declared_frames = track.num_frames;
    let params = track
        .codec_params
        .as_ref()
        .and_then(|p| p.audio())
        .ok_or_else(|| audio_error(name, "the audio track has no codec parameters"))?
        .clone();
    let mut decoder = symphonia::default::get_codecs()
        .make_audio_decoder(&params, &AudioDecoderOptions::default())
        .map_err(|e| audio_error(name, format!("unsupported codec: {e}")))?;

    let mut interleaved: Vec<f32> = Vec::new();
    let mut chunk: Vec<f32> = Vec::new();
    let mut channels = params.channels.as_ref().map(|c| c.count()).unwrap_or(0);
    let mut rate = params.sample_rate.unwrap_or(0);
    let mut spec: Option<(usize, u32)> = None;
    let mut capped = false;
    loop {
        let packet = match format.next_packet() {
            Ok(Some(p)) => p,
            Ok(None) => break,
            Err(SymError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(audio_error(
                    name,
                    "the file is truncated (it ends in the middle of the audio data)",
                ))
            }
            Err(e) => return Err(audio_error(name, format!("corrupt audio data: {e}"))),
        };
        if packet.track_id != track_id {
            continue;
        }
        let buf = decoder
            .decode(&packet)
            .map_err(|e| audio_error(name, format!("corrupt audio data: {e}")))?;
        let this = (buf.spec().channels().count(), buf.spec().rate());
        match spec {
            None => {
                (channels, rate) = this;
                if channels == 0 || !SAMPLE_RATES.contains(&rate) {
                    return Err(audio_error(
                        name,
                        format!(
                            "{rate} Hz, {channels} channel(s): the sample rate must be within {}..={} Hz",
                            SAMPLE_RATES.start(),
                            SAMPLE_RATES.end()
                        ),
                    ));
                }
                spec = Some(this);
            }
            Some(first) if first != this => {
                return Err(audio_error(
                    name,
                    format!(
                        "the stream changes from {} Hz, {} channel(s) to {} Hz, {} channel(s)",
                        first.1, first.0, this.1, this.0
                    ),
                ))
            }
            Some(_) => {}
        }
        buf.copy_to_vec_interleaved(&mut chunk);
        interleaved.extend_from_slice(&chunk);
        let cap = (limits
            .max_audio_seconds
            .saturating_mul(u64::from(rate) * channels as u64))
        .min(MAX_DECODED_SAMPLES);
        if interleaved.len() as u64 >= cap {
            // Whole frames only; the rest of the file is not decoded.
            interleaved.truncate((cap as usize) / channels * channels);
            capped = true;
            break;
        }
    }
    if channels == 0 || rate == 0 {
        return Err(audio_error(
            name,
            "the file declares no channels or no sample rate",
        ));
    }
    let frames = interleaved.len() / channels;
    if frames == 0 {
        return Err(audio_error(name, "the file contains no audio samples"));
    }
    if let Some(declared) = declared_frames.filter(|_| !capped) {
        if (frames as u64) < declared {
            return Err(audio_error(
                name,
                format!(
                    "the file is truncated: its header declares {declared} samples per channel but only {frames} could be read"
                ),
            ));
        }
    }
    Audio::from_interleaved(&interleaved, channels, rate)
        .map_err(|e| audio_error(name, e.to_string()))
}

/// Reads and decodes an audio file; `-` reads standard input.
pub fn load_audio(path: &Path) -> Result<Audio> {
    load_audio_with(path, &Limits::DEFAULT)
}

/// [`load_audio`] within `limits`.
pub fn load_audio_with(path: &Path, limits: &Limits) -> Result<Audio> {
    decode_audio_with(
        &crate::loading::input::read_input(path)?,
        &path.display().to_string(),
        limits,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A canonical 16-bit PCM WAV file.
    pub(crate) fn wav_i16(samples: &[i16], channels: u16, rate: u32) -> Vec<u8> {
        let data_len = (samples.len() * 2) as u32;
        let mut b = Vec::new();
        b.extend_from_slice(b"RIFF");
        b.extend_from_slice(&(36 + data_len).to_le_bytes());
        b.extend_from_slice(b"WAVEfmt ");
        b.extend_from_slice(&16u32.to_le_bytes());
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&channels.to_le_bytes());
        b.extend_from_slice(&rate.to_le_bytes());
        b.extend_from_slice(&(rate * channels as u32 * 2).to_le_bytes());
        b.extend_from_slice(&(channels * 2).to_le_bytes());
        b.extend_from_slice(&16u16.to_le_bytes());
        b.extend_from_slice(b"data");
        b.extend_from_slice(&data_len.to_le_bytes());
        for s in samples {
            b.extend_from_slice(&s.to_le_bytes());
        }
        b
    }

    #[test]
    fn decodes_pcm16_and_averages_channels() {
        let bytes = wav_i16(&[16384, -16384, 32767, 1, -32768, -32768], 2, 8000);
        let a = decode_audio(&bytes, "x.wav").unwrap();
        assert_eq!(a.sample_rate, 8000);
        assert_eq!(
            a.samples,
            vec![0.0, (32767.0f32 / 32768.0 + 1.0 / 32768.0) / 2.0, -1.0]
        );
    }

    #[test]
    fn bad_files_are_errors_naming_the_file() {
        let good = wav_i16(&[1; 400], 1, 16000);
        for (bytes, what) in [
            (vec![], "empty"),
            (
                b"definitely not audio, just some text bytes".to_vec(),
                "supported",
            ),
            (good[..good.len() - 101].to_vec(), "truncated"),
            (wav_i16(&[], 1, 16000), "no audio samples"),
        ] {
            let e = decode_audio(&bytes, "clip.wav").unwrap_err().to_string();
            assert!(e.contains("clip.wav") && e.contains(what), "{what}: {e}");
        }
    }

    #[test]
    fn unsupported_codecs_and_corrupt_data_are_errors() {
        // A WAV whose format tag is GSM 6.10 (0x31), which no decoder here reads.
        let mut gsm = wav_i16(&[0; 320], 1, 8000);
        gsm[20..22].copy_from_slice(&0x31u16.to_le_bytes());
        let e = decode_audio(&gsm, "phone.wav").unwrap_err().to_string();
        assert!(e.contains("phone.wav") && e.contains("unsupported"), "{e}");
        // A FLAC stream marker followed by garbage.
        let mut flac = b"fLaC".to_vec();
        flac.extend((0..200u32).map(|i| (i * 37 % 251) as u8));
        let e = decode_audio(&flac, "x.flac").unwrap_err().to_string();
        assert!(e.contains("x.flac"), "{e}");
    }

    #[test]
    fn mono_mix_is_the_f32_mean() {
        let x = [0.1f32, 0.2, 0.3, 0.4, 0.5, 0.6];
        assert_eq!(
            mix_to_mono(&x, 3),
            vec![(0.1f32 + 0.2 + 0.3) / 3.0, (0.4f32 + 0.5 + 0.6) / 3.0]
        );
        assert!(Audio::from_interleaved(&x, 4, 16000).is_err());
        assert!(Audio::new(vec![f32::NAN], 16000).is_err());
    }
}
