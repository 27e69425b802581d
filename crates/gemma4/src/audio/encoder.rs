//! The audio encoder of a checkpoint: features in, soft tokens in the text width out
//! (`Gemma4Model.get_audio_features` and the 12B's `Gemma4UnifiedModel.get_audio_features`).
//!
//! - Conformer checkpoints (E2B, E4B): [`AudioTower`] (`model.audio_tower.`), its padding
//!   frames dropped, then `embed_audio` (RMSNorm without weight → linear).
//! - 12B (`gemma4_unified`): no tower; each frame of raw samples goes straight through
//!   `embed_audio`.

use candle_core::{DType, Device, Tensor};

use crate::audio::features::{AudioFeatureExtractor, AudioFeatures};
use crate::audio::tower::AudioTower;
use crate::config::audio::AudioSpec;
use crate::error::{Error, Result};
use crate::loading::weights::{Checkpoint, Weights};
use crate::multimodal::embedder::MultimodalEmbedder;

pub enum AudioEncoder {
    /// `model.audio_tower.` + `model.embed_audio.`
    Tower {
        tower: Box<AudioTower>,
        projector: MultimodalEmbedder,
    },
    /// 12B: `model.embed_audio.` over raw sample frames.
    Unified {
        frame: usize,
        projector: MultimodalEmbedder,
    },
}

impl AudioEncoder {
    pub fn load(
        spec: &AudioSpec,
        text_hidden: usize,
        ckpt: &Checkpoint,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let proj_w = Weights::new(ckpt, "model.embed_audio.", dtype, device);
        Ok(match spec {
            AudioSpec::Tower(c) => AudioEncoder::Tower {
                tower: Box::new(AudioTower::new(
                    c,
                    &Weights::new(ckpt, "model.audio_tower.", dtype, device),
                )?),
                projector: MultimodalEmbedder::new(
                    c.output_proj_dims,
                    text_hidden,
                    c.rms_norm_eps,
                    &proj_w,
                )?,
            },
            AudioSpec::Unified(c) => AudioEncoder::Unified {
                frame: c.audio_embed_dim,
                projector: MultimodalEmbedder::new(
                    c.audio_embed_dim,
                    text_hidden,
                    c.rms_norm_eps,
                    &proj_w,
                )?,
            },
        })
    }

    /// The feature extractor this encoder reads, with the reference's defaults.
    pub fn default_extractor(&self) -> AudioFeatureExtractor {
        match self {
            AudioEncoder::Tower { .. } => AudioFeatureExtractor::mel(),
            AudioEncoder::Unified { frame, .. } => AudioFeatureExtractor::Frames {
                sampling_rate: 16_000,
                samples_per_token: *frame,
            },
        }
    }

    /// The encoder's output for the valid frames, before `embed_audio`: the tower's soft
    /// tokens `[n, output_proj_dims]`, or the raw frames `[n, audio_embed_dim]` (12B).
    pub fn encode(&self, f: &AudioFeatures) -> Result<Tensor> {
        match self {
            AudioEncoder::Tower { tower, .. } => tower.forward(f),
            AudioEncoder::Unified { frame, projector } => {
                if f.dim != *frame {
                    return Err(Error::invalid_argument(
                        "audio",
                        format!(
                            "the feature extractor gives frames of {} samples but `audio_embed_dim` is {frame}",
                            f.dim
                        ),
                    ));
                }
                let device = projector.device();
                let x = Tensor::from_slice(&f.features, (f.num_frames, f.dim), &device)?;
                let keep: Vec<u32> = (0..f.num_frames as u32)
                    .filter(|&i| f.mask[i as usize])
                    .collect();
                Ok(x.index_select(&Tensor::new(keep.as_slice(), &device)?, 0)?)
            }
        }
    }

    /// Every projection of the encoder and its projector (what LoRA adapters patch).
    pub fn linears(&self) -> Vec<&crate::nn::linear::Linear> {
        match self {
            AudioEncoder::Tower { tower, projector } => {
                [tower.linears(), projector.linears()].concat()
            }
            AudioEncoder::Unified { projector, .. } => projector.linears(),
        }
    }

    /// Soft tokens in the text width `[num_soft_tokens, text_hidden]`.
    pub fn embed(&self, f: &AudioFeatures) -> Result<Tensor> {
        self.embed_as(f, None)
    }

    /// [`Self::embed`], the tower's activations in `dt` when given (training's f32).
    pub fn embed_as(&self, f: &AudioFeatures, dt: Option<DType>) -> Result<Tensor> {
        let x = match (self, dt) {
            (AudioEncoder::Tower { tower, .. }, Some(dt)) => tower.forward_as(f, dt)?,
            _ => self.encode(f)?,
        };
        match self {
            AudioEncoder::Tower { projector, .. } | AudioEncoder::Unified { projector, .. } => {
                projector.forward(&x)
            }
        }
    }
}
