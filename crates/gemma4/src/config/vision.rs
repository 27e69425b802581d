//! Vision side of `config.json`: the tower (`Gemma4VisionConfig`, model_type
//! `gemma4_vision`), the 12B's encoder-free embedder (`Gemma4UnifiedVisionConfig`) and the
//! multimodal token ids of the top-level config, with the reference's defaults.

use serde_json::{Map, Value};

use crate::config::Fields;

/// `Gemma4VisionConfig`.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub pooling_kernel_size: usize,
    pub patch_size: usize,
    pub position_embedding_size: usize,
    pub use_clipped_linears: bool,
    pub standardize: bool,
}

/// `Gemma4UnifiedVisionConfig` (12B).
#[derive(Debug, Clone, PartialEq)]
pub struct UnifiedVisionConfig {
    pub patch_size: usize,
    pub pooling_kernel_size: usize,
    pub mm_embed_dim: usize,
    pub mm_posemb_size: usize,
    pub rms_norm_eps: f64,
    pub output_proj_dims: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum VisionSpec {
    Tower(VisionConfig),
    Unified(UnifiedVisionConfig),
}

impl VisionSpec {
    pub fn patch_size(&self) -> usize {
        match self {
            VisionSpec::Tower(c) => c.patch_size,
            VisionSpec::Unified(c) => c.patch_size,
        }
    }
    pub fn pooling_kernel_size(&self) -> usize {
        match self {
            VisionSpec::Tower(c) => c.pooling_kernel_size,
            VisionSpec::Unified(c) => c.pooling_kernel_size,
        }
    }
}

/// Ids of the multimodal control tokens (`Gemma4Config`'s `*_token_id` fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultimodalTokens {
    pub boi: u32,
    pub eoi: u32,
    pub image: u32,
    pub video: u32,
    pub boa: u32,
    pub eoa: u32,
    pub audio: u32,
}

impl Default for MultimodalTokens {
    fn default() -> Self {
        MultimodalTokens {
            boi: 255_999,
            eoi: 258_882,
            image: 258_880,
            video: 258_884,
            boa: 256_000,
            eoa: 258_883,
            audio: 258_881,
        }
    }
}

type R<T> = std::result::Result<T, String>;

impl MultimodalTokens {
    pub fn from_object(o: &Map<String, Value>) -> R<Self> {
        let d = MultimodalTokens::default();
        let f = Fields(o);
        let id = |k: &str, d: u32| f.u32(k, d);
        Ok(MultimodalTokens {
            boi: id("boi_token_id", d.boi)?,
            eoi: id("eoi_token_id", d.eoi)?,
            image: id("image_token_id", d.image)?,
            video: id("video_token_id", d.video)?,
            boa: id("boa_token_id", d.boa)?,
            // The reference spells this one `eoa_token_index`; accept either.
            eoa: id("eoa_token_index", id("eoa_token_id", d.eoa)?)?,
            audio: id("audio_token_id", d.audio)?,
        })
    }
}

impl VisionSpec {
    /// Parses `vision_config`; `unified` selects the 12B's embedder config.
    pub fn from_object(o: &Map<String, Value>, unified: bool) -> R<Self> {
        let f = Fields(o);
        let num = |k: &str, d: usize| f.usize(k, d);
        let flag = |k: &str, d: bool| f.bool(k, d);
        if unified {
            let mm_embed_dim = num("mm_embed_dim", 3840)?;
            let c = UnifiedVisionConfig {
                patch_size: num("patch_size", 16)?,
                pooling_kernel_size: num("pooling_kernel_size", 3)?,
                mm_embed_dim,
                mm_posemb_size: num("mm_posemb_size", 1120)?,
                rms_norm_eps: f.positive_f64("rms_norm_eps", 1e-6)?,
                output_proj_dims: num("output_proj_dims", 3840)?,
            };
            if c.output_proj_dims != c.mm_embed_dim {
                return Err(format!(
                    "`output_proj_dims` ({}) must equal `mm_embed_dim` ({}): the projector reads the embedder's output",
                    c.output_proj_dims, c.mm_embed_dim
                ));
            }
            check_patching(c.patch_size, c.pooling_kernel_size)?;
            return Ok(VisionSpec::Unified(c));
        }
        let act = o
            .get("hidden_activation")
            .and_then(Value::as_str)
            .unwrap_or("gelu_pytorch_tanh");
        if !matches!(act, "gelu_pytorch_tanh" | "gelu_new") {
            return Err(format!("unsupported `hidden_activation` `{act}`"));
        }
        if flag("attention_bias", false)? {
            return Err("`attention_bias: true` is not supported in the vision tower".into());
        }
        let (mut theta, mut rope_type) = (100.0, "default".to_string());
        if let Some(rp) = o.get("rope_parameters").and_then(Value::as_object) {
            theta = Fields(rp).positive_f64("rope_theta", theta)?;
            if let Some(t) = rp.get("rope_type").and_then(Value::as_str) {
                rope_type = t.to_string();
            }
        }
        if !matches!(rope_type.as_str(), "default" | "axial") {
            return Err(format!(
                "vision `rope_type` `{rope_type}` is not supported (the tower uses axial RoPE)"
            ));
        }
        let hidden_size = num("hidden_size", 768)?;
        let num_attention_heads = num("num_attention_heads", 12)?;
        let c = VisionConfig {
            hidden_size,
            intermediate_size: num("intermediate_size", 3072)?,
            num_hidden_layers: num("num_hidden_layers", 16)?,
            num_attention_heads,
            num_key_value_heads: num("num_key_value_heads", 12)?,
            head_dim: num("head_dim", 64)?,
            rms_norm_eps: f.positive_f64("rms_norm_eps", 1e-6)?,
            rope_theta: theta,
            pooling_kernel_size: num("pooling_kernel_size", 3)?,
            patch_size: num("patch_size", 16)?,
            position_embedding_size: num("position_embedding_size", 10240)?,
            use_clipped_linears: flag("use_clipped_linears", false)?,
            standardize: flag("standardize", false)?,
        };
        if c.num_key_value_heads == 0
            || !c.num_attention_heads.is_multiple_of(c.num_key_value_heads)
        {
            return Err(format!(
                "{} attention heads are not a multiple of {} KV heads",
                c.num_attention_heads, c.num_key_value_heads
            ));
        }
        if c.head_dim == 0 || !c.head_dim.is_multiple_of(4) {
            return Err(format!(
                "`head_dim` {} must be a positive multiple of 4 (two axes of rotate-half RoPE)",
                c.head_dim
            ));
        }
        check_patching(c.patch_size, c.pooling_kernel_size)?;
        Ok(VisionSpec::Tower(c))
    }
}

/// Patch side and pooling kernel within what the image processor takes.
fn check_patching(patch: usize, pooling: usize) -> R<()> {
    use crate::vision::image_processor::{MAX_PATCH, MAX_POOLING};
    if !(1..=MAX_PATCH).contains(&patch) || !(1..=MAX_POOLING).contains(&pooling) {
        return Err(format!(
            "`patch_size` ({patch}) and `pooling_kernel_size` ({pooling}) must be within \
             1..={MAX_PATCH} and 1..={MAX_POOLING} (Gemma 4: 16 and 3)"
        ));
    }
    Ok(())
}
