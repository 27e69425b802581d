//! Audio side of `config.json`: the conformer tower (`Gemma4AudioConfig`, model_type
//! `gemma4_audio`) and the 12B's encoder-free embedder (`Gemma4UnifiedAudioConfig`), with
//! the reference's defaults.

use serde_json::{Map, Value};

use crate::config::Fields;

/// `Gemma4AudioConfig`.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Output channels of the two subsampling convolutions.
    pub subsampling_conv_channels: [usize; 2],
    pub conv_kernel_size: usize,
    pub residual_weight: f64,
    pub attention_chunk_size: usize,
    pub attention_context_left: usize,
    pub attention_context_right: usize,
    pub attention_logit_cap: f64,
    pub attention_invalid_logits_value: f64,
    pub use_clipped_linears: bool,
    pub rms_norm_eps: f64,
    pub gradient_clipping: f64,
    pub output_proj_dims: usize,
}

impl Default for AudioConfig {
    fn default() -> Self {
        AudioConfig {
            hidden_size: 1024,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            subsampling_conv_channels: [128, 32],
            conv_kernel_size: 5,
            residual_weight: 0.5,
            attention_chunk_size: 12,
            attention_context_left: 13,
            attention_context_right: 0,
            attention_logit_cap: 50.0,
            attention_invalid_logits_value: -1.0e9,
            use_clipped_linears: true,
            rms_norm_eps: 1e-6,
            gradient_clipping: 1e10,
            output_proj_dims: 1536,
        }
    }
}

impl AudioConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
    /// Width of the flattened subsampler output that `input_proj_linear` reads, as the
    /// reference computes it: `(channels[0] / 4) · channels[1]`.
    pub fn proj_input_dim(&self) -> usize {
        (self.subsampling_conv_channels[0] / 4) * self.subsampling_conv_channels[1]
    }
}

/// `Gemma4UnifiedAudioConfig` (12B): frames of `audio_embed_dim` raw samples.
#[derive(Debug, Clone, PartialEq)]
pub struct UnifiedAudioConfig {
    pub audio_embed_dim: usize,
    pub rms_norm_eps: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AudioSpec {
    Tower(AudioConfig),
    Unified(UnifiedAudioConfig),
}

type R<T> = std::result::Result<T, String>;

impl AudioSpec {
    /// Parses `audio_config`; `unified` selects the 12B's embedder config.
    pub fn from_object(o: &Map<String, Value>, unified: bool) -> R<Self> {
        let f = Fields(o);
        if unified {
            let c = UnifiedAudioConfig {
                audio_embed_dim: f.usize("audio_embed_dim", 640)?,
                rms_norm_eps: f.positive_f64("rms_norm_eps", 1e-6)?,
            };
            if c.audio_embed_dim == 0 {
                return Err("`audio_embed_dim` must be positive".into());
            }
            return Ok(AudioSpec::Unified(c));
        }
        let d = AudioConfig::default();
        let act = o
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("silu");
        if act != "silu" && act != "swish" {
            return Err(format!(
                "unsupported `hidden_act` `{act}` (the audio tower uses silu)"
            ));
        }
        let channels = match f.get("subsampling_conv_channels") {
            None => d.subsampling_conv_channels,
            Some(Value::Array(a)) if a.len() == 2 => {
                let c = |v: &Value| v.as_u64().filter(|&x| x > 0).map(|x| x as usize);
                match (c(&a[0]), c(&a[1])) {
                    (Some(x), Some(y)) => [x, y],
                    _ => {
                        return Err(
                            "`subsampling_conv_channels` must be two positive integers".into()
                        )
                    }
                }
            }
            Some(v) => {
                return Err(format!(
                    "`subsampling_conv_channels` must be a list of two channel counts, found {v}"
                ))
            }
        };
        let c = AudioConfig {
            hidden_size: f.usize("hidden_size", d.hidden_size)?,
            num_hidden_layers: f.usize("num_hidden_layers", d.num_hidden_layers)?,
            num_attention_heads: f.usize("num_attention_heads", d.num_attention_heads)?,
            subsampling_conv_channels: channels,
            conv_kernel_size: f.usize("conv_kernel_size", d.conv_kernel_size)?,
            residual_weight: f.f64("residual_weight", d.residual_weight)?,
            attention_chunk_size: f.usize("attention_chunk_size", d.attention_chunk_size)?,
            attention_context_left: f.usize("attention_context_left", d.attention_context_left)?,
            attention_context_right: f
                .usize("attention_context_right", d.attention_context_right)?,
            attention_logit_cap: f.positive_f64("attention_logit_cap", d.attention_logit_cap)?,
            attention_invalid_logits_value: f.f64(
                "attention_invalid_logits_value",
                d.attention_invalid_logits_value,
            )?,
            use_clipped_linears: f.bool("use_clipped_linears", d.use_clipped_linears)?,
            rms_norm_eps: f.positive_f64("rms_norm_eps", d.rms_norm_eps)?,
            gradient_clipping: f.f64("gradient_clipping", d.gradient_clipping)?,
            output_proj_dims: f.usize("output_proj_dims", d.output_proj_dims)?,
        };
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(format!(
                "`hidden_size` {} is not a multiple of {} attention heads",
                c.hidden_size, c.num_attention_heads
            ));
        }
        if c.attention_chunk_size == 0 || c.attention_context_left < 2 {
            return Err(
                "`attention_chunk_size` must be positive and `attention_context_left` at least 2 (a frame attends to itself)"
                    .into(),
            );
        }
        if c.conv_kernel_size == 0 || c.attention_logit_cap <= 0.0 || c.gradient_clipping <= 0.0 {
            return Err("`conv_kernel_size`, `attention_logit_cap` and `gradient_clipping` must be positive".into());
        }
        Ok(AudioSpec::Tower(c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors() {
        let o = serde_json::json!({"hidden_size": 64, "num_attention_heads": 4});
        let AudioSpec::Tower(c) = AudioSpec::from_object(o.as_object().unwrap(), false).unwrap()
        else {
            panic!("tower expected")
        };
        assert_eq!(
            (c.head_dim(), c.proj_input_dim(), c.attention_context_left),
            (16, 1024, 13)
        );
        for bad in [
            serde_json::json!({"hidden_act": "gelu"}),
            serde_json::json!({"hidden_size": 30, "num_attention_heads": 4}),
            serde_json::json!({"subsampling_conv_channels": [128]}),
            serde_json::json!({"attention_context_left": 1}),
        ] {
            assert!(
                AudioSpec::from_object(bad.as_object().unwrap(), false).is_err(),
                "{bad}"
            );
        }
        let u = serde_json::json!({"audio_embed_dim": 320});
        assert_eq!(
            AudioSpec::from_object(u.as_object().unwrap(), true).unwrap(),
            AudioSpec::Unified(UnifiedAudioConfig {
                audio_embed_dim: 320,
                rms_norm_eps: 1e-6
            })
        );
    }
}
