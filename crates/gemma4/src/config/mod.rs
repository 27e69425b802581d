//! Model configuration: parses a checkpoint's `config.json` into a [`TextConfig`] and
//! resolves the per-layer plan the reference derives in `Gemma4TextConfig.__post_init__`
//! (`transformers/models/gemma4/configuration_gemma4.py`) and its heterogeneous
//! `per_layer_config`.
//!
//! Three top-level forms are accepted: `gemma4` (multimodal, decoder under `text_config`),
//! `gemma4_text` (text-only `Gemma4ForCausalLM` saves) and `gemma4_unified` (the 12B,
//! `gemma4_unified_text` decoder: same machinery without PLE or MoE). The full-attention
//! overrides come either from the published keys (`global_head_dim`,
//! `num_global_key_value_heads`) or from the `per_layer_config` that `save_pretrained` writes.

pub mod audio;
pub mod vision;

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};

use crate::config::audio::AudioSpec;
use crate::config::vision::{MultimodalTokens, VisionSpec};
use crate::error::{Error, Result};

/// Attention type of one decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LayerType {
    Sliding,
    Full,
}

impl LayerType {
    pub fn as_str(self) -> &'static str {
        match self {
            LayerType::Sliding => "sliding_attention",
            LayerType::Full => "full_attention",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "sliding_attention" => Some(LayerType::Sliding),
            "full_attention" => Some(LayerType::Full),
            _ => None,
        }
    }
}

/// RoPE variant of a layer type (`rope_parameters[layer_type]`).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// `default` (all dims rotated) or `proportional` (only `partial_rotary_factor` of them).
    pub kind: RopeKind,
    pub theta: f64,
    pub partial_rotary_factor: f64,
    /// Divides every inverse frequency (`factor`, 1.0 when absent).
    pub factor: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeKind {
    Default,
    Proportional,
}

/// Where a layer's keys and values come from (the reference's `kv_sharing_modes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvSource {
    /// Computes and caches its own K/V.
    Own,
    /// KV-shared consumer: reads the K/V of `producer` (the last non-shared layer of the
    /// same type) and has no cache and no k/v weights.
    Shared { producer: usize },
}

/// Everything one decoder layer needs, resolved from the global config and overrides.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSpec {
    pub layer_type: LayerType,
    pub head_dim: usize,
    pub num_kv_heads: usize,
    /// Dense MLP width, doubled on KV-shared layers when `use_double_wide_mlp`.
    pub intermediate_size: usize,
    pub kv_source: KvSource,
    /// Full layers of `attention_k_eq_v` models have no `v_proj`: V is the raw K projection.
    pub k_eq_v: bool,
}

/// Bidirectional attention over image/video spans (`use_bidirectional_attention`).
///
/// The two model classes compose it differently in their default (DynamicCache) path:
/// `Gemma4Model` keeps full layers causal and gives sliding layers
/// `window ∧ (causal ∨ same span)`; `Gemma4UnifiedModel` (12B) gives every layer
/// `base ∨ same span`, where `base` is that layer's causal (and, for sliding layers,
/// windowed) mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bidirectional {
    None,
    /// `"vision"` in a `gemma4` checkpoint.
    Vision,
    /// `"vision"` in a `gemma4_unified` checkpoint.
    VisionAllLayers,
}

/// The text decoder configuration with every field the reference uses for computation.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub sliding_window: usize,
    pub max_position_embeddings: usize,
    pub final_logit_softcapping: Option<f64>,
    pub attention_k_eq_v: bool,
    pub num_kv_shared_layers: usize,
    pub use_double_wide_mlp: bool,
    /// Per-layer-embedding width; 0 disables PLE.
    pub hidden_size_per_layer_input: usize,
    pub vocab_size_per_layer_input: usize,
    pub moe: Option<MoeConfig>,
    pub bidirectional: Bidirectional,
    pub tie_word_embeddings: bool,
    pub pad_token_id: u32,
    pub bos_token_id: u32,
    pub eos_token_ids: Vec<u32>,
    pub rope: BTreeMap<LayerType, RopeConfig>,
    pub layers: Vec<LayerSpec>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub top_k: usize,
    pub intermediate_size: usize,
}

/// Which top-level architecture the checkpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `gemma4`: `Gemma4ForConditionalGeneration`, text under `model.language_model.`.
    Gemma4,
    /// `gemma4_text`: `Gemma4ForCausalLM`, text under `model.`.
    Gemma4Text,
    /// `gemma4_unified` (12B), text under `model.language_model.`.
    Gemma4Unified,
}

/// A parsed `config.json`.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub text: TextConfig,
    /// The vision tower or the 12B's image embedder, when the checkpoint has one.
    pub vision: Option<VisionSpec>,
    /// The conformer audio tower or the 12B's audio embedder, when the checkpoint has one.
    pub audio: Option<AudioSpec>,
    pub mm_tokens: MultimodalTokens,
    /// End-of-sequence ids declared at the top level (`eos_token_id`), if any.
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// The config of checkpoint `dir`: its `config.json`, or for a llama.cpp GGUF file
    /// alone the file's metadata, which stands in for the config (and tokenizer) files
    /// when the directory has none.
    pub fn for_checkpoint(dir: &Path, ckpt: &crate::loading::weights::Checkpoint) -> Result<Self> {
        let config_path = dir.join("config.json");
        match (config_path.exists(), ckpt.llama_cpp_config()) {
            (false, Some(json)) => {
                let origin = ckpt.single_file().unwrap_or(dir).to_path_buf();
                ModelConfig::from_value(&json?).map_err(|m| Error::config(&origin, m))
            }
            _ => ModelConfig::from_file(&config_path),
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let value = crate::error::read_json(path)?;
        Self::from_value(&value).map_err(|m| Error::config(path, m))
    }

    /// Parses a config already read as JSON. Errors are plain messages; [`Self::from_file`]
    /// adds the file name.
    pub fn from_value(value: &Value) -> std::result::Result<Self, String> {
        let obj = value.as_object().ok_or("top level is not a JSON object")?;
        let model_type = obj
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("gemma4_text");
        let (architecture, text_obj, unified) = match model_type {
            "gemma4" | "gemma4_unified" => {
                let t = obj
                    .get("text_config")
                    .and_then(Value::as_object)
                    .ok_or("`text_config` is missing or not an object")?;
                let arch = if model_type == "gemma4" {
                    Architecture::Gemma4
                } else {
                    Architecture::Gemma4Unified
                };
                (arch, t, model_type == "gemma4_unified")
            }
            "gemma4_text" => (Architecture::Gemma4Text, obj, false),
            "gemma4_unified_text" => (Architecture::Gemma4Text, obj, true),
            other => {
                return Err(format!(
                "unsupported model_type `{other}` (expected gemma4, gemma4_text or gemma4_unified)"
            ))
            }
        };
        let text =
            TextConfig::from_object(text_obj, unified).map_err(|m| format!("text_config: {m}"))?;
        let vision = match obj.get("vision_config") {
            None | Some(Value::Null) => None,
            Some(Value::Object(v)) if architecture != Architecture::Gemma4Text => Some(
                VisionSpec::from_object(v, unified).map_err(|m| format!("vision_config: {m}"))?,
            ),
            Some(Value::Object(_)) => None,
            Some(v) => return Err(format!("`vision_config` must be an object, found {v}")),
        };
        let audio = match obj.get("audio_config") {
            None | Some(Value::Null) => None,
            Some(Value::Object(a)) if architecture != Architecture::Gemma4Text => {
                Some(AudioSpec::from_object(a, unified).map_err(|m| format!("audio_config: {m}"))?)
            }
            Some(Value::Object(_)) => None,
            Some(v) => return Err(format!("`audio_config` must be an object, found {v}")),
        };
        Ok(ModelConfig {
            architecture,
            text,
            vision,
            audio,
            mm_tokens: MultimodalTokens::from_object(obj)?,
            eos_token_ids: ids(obj.get("eos_token_id"))
                .map_err(|m| format!("eos_token_id: {m}"))?,
        })
    }
}

fn ids(v: Option<&Value>) -> std::result::Result<Vec<u32>, String> {
    let id = |x: &Value| {
        x.as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(|| format!("bad id {x} (ids are integers below 2^32)"))
    };
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(n @ Value::Number(_)) => Ok(vec![id(n)?]),
        Some(Value::Array(a)) => a.iter().map(id).collect(),
        Some(other) => Err(format!("expected an id or a list of ids, found {other}")),
    }
}

/// The most decoder layers a config may declare (the released models have at most 60).
pub const MAX_LAYERS: usize = 1024;
/// The largest size or count a config field may hold (2^24: sixteen times the longest
/// context of the released models).
pub const MAX_CONFIG_INT: usize = 1 << 24;

/// Typed field access with the reference's defaults and errors naming the field (used by
/// every config section: text, vision, processors).
pub(crate) struct Fields<'a>(pub(crate) &'a Map<String, Value>);

impl Fields<'_> {
    pub(crate) fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }
    /// A size or count, at most [`MAX_CONFIG_INT`]: products of two such values cannot
    /// overflow, and nothing sized by one can claim more than the checkpoint backs.
    pub(crate) fn usize(&self, key: &str, default: usize) -> std::result::Result<usize, String> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => match v.as_u64() {
                Some(x) if x <= MAX_CONFIG_INT as u64 => Ok(x as usize),
                Some(x) => Err(format!(
                    "`{key}` is {x}, over the limit of {MAX_CONFIG_INT}"
                )),
                None => Err(format!("`{key}` must be a non-negative integer, found {v}")),
            },
        }
    }
    /// A token id or other u32, refused (not truncated) past `u32::MAX`.
    pub(crate) fn u32(&self, key: &str, default: u32) -> std::result::Result<u32, String> {
        let v = self.usize(key, default as usize)?;
        u32::try_from(v).map_err(|_| format!("`{key}` is {v}, past the largest id (2^32 - 1)"))
    }
    pub(crate) fn opt_u32(&self, key: &str) -> std::result::Result<Option<u32>, String> {
        self.get(key).map(|_| self.u32(key, 0)).transpose()
    }
    /// A finite number above zero (epsilons, rope bases, caps, scale factors: zero or
    /// less gives NaN or infinite activations).
    pub(crate) fn positive_f64(&self, key: &str, default: f64) -> std::result::Result<f64, String> {
        let v = self.f64(key, default)?;
        if !(v.is_finite() && v > 0.0) {
            return Err(format!(
                "`{key}` is {v}; it must be a finite number above 0"
            ));
        }
        Ok(v)
    }
    pub(crate) fn opt_usize(&self, key: &str) -> std::result::Result<Option<usize>, String> {
        self.get(key).map(|_| self.usize(key, 0)).transpose()
    }
    pub(crate) fn f64(&self, key: &str, default: f64) -> std::result::Result<f64, String> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| format!("`{key}` must be a number, found {v}")),
        }
    }
    pub(crate) fn bool(&self, key: &str, default: bool) -> std::result::Result<bool, String> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| format!("`{key}` must be true or false, found {v}")),
        }
    }
}

impl TextConfig {
    /// Parses a text config object. `unified` selects the `gemma4_unified_text` defaults
    /// (no PLE, no MoE, window 1024, 262144 positions, bidirectional vision).
    pub fn from_object(o: &Map<String, Value>, unified: bool) -> std::result::Result<Self, String> {
        let f = Fields(o);
        let num_hidden_layers = f.usize("num_hidden_layers", 30)?;
        if num_hidden_layers == 0 || num_hidden_layers > MAX_LAYERS {
            return Err(format!(
                "`num_hidden_layers` is {num_hidden_layers}; it must be within 1..={MAX_LAYERS}"
            ));
        }
        let act = f
            .get("hidden_activation")
            .and_then(Value::as_str)
            .unwrap_or("gelu_pytorch_tanh");
        if !matches!(act, "gelu_pytorch_tanh" | "gelu_new") {
            return Err(format!(
                "unsupported `hidden_activation` `{act}` (Gemma 4 uses gelu_pytorch_tanh)"
            ));
        }
        let bidirectional = match f.get("use_bidirectional_attention") {
            None if unified => Bidirectional::VisionAllLayers,
            None => Bidirectional::None,
            Some(Value::String(s)) if s == "vision" && unified => Bidirectional::VisionAllLayers,
            Some(Value::String(s)) if s == "vision" => Bidirectional::Vision,
            Some(Value::String(s)) if s == "all" => {
                return Err("`use_bidirectional_attention: \"all\"` (encoder mode) is not supported for generation".into())
            }
            Some(v) => return Err(format!("unknown `use_bidirectional_attention` value {v}")),
        };

        // Layer plan: default pattern 5 sliding : 1 full, last layer forced to full.
        let mut layer_types: Vec<LayerType> = match f.get("layer_types") {
            None => (0..num_hidden_layers)
                .map(|i| {
                    if (i + 1) % 6 != 0 {
                        LayerType::Sliding
                    } else {
                        LayerType::Full
                    }
                })
                .collect(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .and_then(LayerType::parse)
                        .ok_or_else(|| format!("unknown layer type {v} in `layer_types`"))
                })
                .collect::<std::result::Result<_, _>>()?,
            Some(v) => return Err(format!("`layer_types` must be a list, found {v}")),
        };
        if layer_types.len() != num_hidden_layers {
            return Err(format!(
                "`layer_types` has {} entries but `num_hidden_layers` is {num_hidden_layers}",
                layer_types.len()
            ));
        }
        *layer_types.last_mut().expect("at least one layer") = LayerType::Full;

        let hidden_size = f.usize("hidden_size", 2304)?;
        let num_attention_heads = f.usize("num_attention_heads", 8)?;
        let num_key_value_heads = f.usize("num_key_value_heads", 4)?;
        let head_dim = f.usize("head_dim", 256)?;
        let intermediate_size = f.usize("intermediate_size", 9216)?;
        let attention_k_eq_v = f.bool("attention_k_eq_v", false)?;
        let num_kv_shared_layers = f.usize("num_kv_shared_layers", 0)?;
        let use_double_wide_mlp = f.bool("use_double_wide_mlp", false)?;
        if f.bool("attention_bias", false)? {
            return Err(
                "`attention_bias: true` is not used by any Gemma 4 model and is not supported"
                    .into(),
            );
        }

        // Per-layer overrides: `per_layer_config` when present, else the published keys.
        let mut overrides: BTreeMap<usize, Map<String, Value>> = BTreeMap::new();
        match o.get("per_layer_config") {
            Some(Value::Object(plc)) => {
                for (k, v) in plc {
                    let idx: usize = k.parse().map_err(|_| {
                        format!("`per_layer_config` key `{k}` is not a layer index")
                    })?;
                    if idx >= num_hidden_layers {
                        return Err(format!(
                            "`per_layer_config` key {idx} is out of range [0, {num_hidden_layers})"
                        ));
                    }
                    let m = v
                        .as_object()
                        .ok_or_else(|| format!("`per_layer_config[{k}]` must be an object"))?;
                    overrides.insert(idx, m.clone());
                }
            }
            None | Some(Value::Null) => {
                let global_head_dim = f.usize("global_head_dim", 512)?;
                let global_kv = f.opt_usize("num_global_key_value_heads")?;
                for (i, t) in layer_types.iter().enumerate() {
                    if *t == LayerType::Full {
                        let mut m = Map::new();
                        m.insert("head_dim".into(), global_head_dim.into());
                        // Only k_eq_v models take the global KV-head count (reference gate).
                        if let (true, Some(kv)) = (attention_k_eq_v, global_kv) {
                            m.insert("num_key_value_heads".into(), kv.into());
                        }
                        overrides.insert(i, m);
                    }
                }
            }
            Some(v) => return Err(format!("`per_layer_config` must be an object, found {v}")),
        }

        let first_shared = num_hidden_layers.checked_sub(num_kv_shared_layers).ok_or_else(|| {
            format!("`num_kv_shared_layers` ({num_kv_shared_layers}) exceeds `num_hidden_layers` ({num_hidden_layers})")
        })?;
        let producer_of = |t: LayerType| (0..first_shared).rev().find(|&i| layer_types[i] == t);

        let mut layers = Vec::with_capacity(num_hidden_layers);
        for (i, &layer_type) in layer_types.iter().enumerate() {
            let ov = overrides.get(&i);
            let ov_usize = |key: &str, default: usize| -> std::result::Result<usize, String> {
                match ov.and_then(|m| m.get(key)) {
                    None | Some(Value::Null) => Ok(default),
                    Some(v) => v
                        .as_u64()
                        .map(|x| x as usize)
                        .ok_or_else(|| format!("`per_layer_config[{i}].{key}` must be an integer")),
                }
            };
            if let Some(m) = ov {
                if let Some(k) = m.keys().find(|k| {
                    !matches!(
                        k.as_str(),
                        "head_dim" | "num_key_value_heads" | "intermediate_size"
                    )
                }) {
                    return Err(format!("`per_layer_config[{i}]` overrides `{k}`, which this engine does not support per layer"));
                }
            }
            let kv_source = if i >= first_shared {
                let producer = producer_of(layer_type).ok_or_else(|| {
                    format!("layer {i} ({}) is KV-shared but no earlier layer of that type produces a cache", layer_type.as_str())
                })?;
                KvSource::Shared { producer }
            } else {
                KvSource::Own
            };
            let spec = LayerSpec {
                layer_type,
                head_dim: ov_usize("head_dim", head_dim)?,
                num_kv_heads: ov_usize("num_key_value_heads", num_key_value_heads)?,
                intermediate_size: ov_usize("intermediate_size", intermediate_size)?
                    * if use_double_wide_mlp && i >= first_shared {
                        2
                    } else {
                        1
                    },
                kv_source,
                k_eq_v: attention_k_eq_v && layer_type == LayerType::Full,
            };
            if spec.num_kv_heads == 0 || num_attention_heads % spec.num_kv_heads != 0 {
                return Err(format!(
                    "layer {i}: {num_attention_heads} attention heads are not a multiple of {} KV heads",
                    spec.num_kv_heads
                ));
            }
            if spec.head_dim == 0 || !spec.head_dim.is_multiple_of(2) {
                return Err(format!(
                    "layer {i}: head_dim {} must be even and positive",
                    spec.head_dim
                ));
            }
            layers.push(spec);
        }
        // A consumer reads its producer's cache, so their head geometry must agree.
        for (i, l) in layers.iter().enumerate() {
            if let KvSource::Shared { producer } = l.kv_source {
                let p = &layers[producer];
                if (p.head_dim, p.num_kv_heads) != (l.head_dim, l.num_kv_heads) {
                    return Err(format!("KV-shared layer {i} has a different head geometry from its producer {producer}"));
                }
            }
        }

        let rope = parse_rope(f.get("rope_parameters"), &layer_types)?;

        let moe = if !unified && f.bool("enable_moe_block", false)? {
            let num_experts = f
                .opt_usize("num_experts")?
                .ok_or("`enable_moe_block` needs `num_experts`")?;
            let top_k = f
                .opt_usize("top_k_experts")?
                .ok_or("`enable_moe_block` needs `top_k_experts`")?;
            let width = f
                .opt_usize("moe_intermediate_size")?
                .ok_or("`enable_moe_block` needs `moe_intermediate_size`")?;
            if top_k == 0 || top_k > num_experts {
                return Err(format!(
                    "`top_k_experts` ({top_k}) must be in 1..={num_experts}"
                ));
            }
            Some(MoeConfig {
                num_experts,
                top_k,
                intermediate_size: width,
            })
        } else {
            None
        };

        // `hidden_size_per_layer_input`: 256 when the key is absent, 0/null disables PLE.
        let hidden_size_per_layer_input = if unified {
            0
        } else {
            match o.get("hidden_size_per_layer_input") {
                None => 256,
                Some(Value::Null) => 0,
                Some(_) => f.usize("hidden_size_per_layer_input", 256)?,
            }
        };

        let sliding_window = f.usize("sliding_window", if unified { 1024 } else { 512 })?;
        if sliding_window == 0 {
            return Err("`sliding_window` must be at least 1".into());
        }
        let softcap = match f.get("final_logit_softcapping") {
            None => None,
            Some(_) => Some(f.positive_f64("final_logit_softcapping", 30.0)?),
        };
        let eos = ids(o.get("eos_token_id"))?;
        Ok(TextConfig {
            vocab_size: f.usize("vocab_size", 262_144)?,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: f.positive_f64("rms_norm_eps", 1e-6)?,
            sliding_window,
            max_position_embeddings: f.usize(
                "max_position_embeddings",
                if unified { 262_144 } else { 131_072 },
            )?,
            final_logit_softcapping: softcap,
            attention_k_eq_v,
            num_kv_shared_layers,
            use_double_wide_mlp,
            hidden_size_per_layer_input,
            vocab_size_per_layer_input: f.usize("vocab_size_per_layer_input", 262_144)?,
            moe,
            bidirectional,
            tie_word_embeddings: f.bool("tie_word_embeddings", true)?,
            pad_token_id: f.u32("pad_token_id", 0)?,
            bos_token_id: f.u32("bos_token_id", 2)?,
            eos_token_ids: if eos.is_empty() { vec![1] } else { eos },
            rope,
            layers,
        })
    }

    /// Index of the first KV-shared (consumer) layer; `num_hidden_layers` when none.
    pub fn first_kv_shared_layer(&self) -> usize {
        self.num_hidden_layers - self.num_kv_shared_layers
    }

    /// The head dim RoPE tables of a layer type are built for (the reference resolves the
    /// per-layer config of that type).
    pub fn rope_head_dim(&self, t: LayerType) -> Option<usize> {
        self.layers
            .iter()
            .find(|l| l.layer_type == t)
            .map(|l| l.head_dim)
    }
}

fn parse_rope(
    v: Option<&Value>,
    layer_types: &[LayerType],
) -> std::result::Result<BTreeMap<LayerType, RopeConfig>, String> {
    let default_for = |t: LayerType| match t {
        LayerType::Sliding => RopeConfig {
            kind: RopeKind::Default,
            theta: 10_000.0,
            partial_rotary_factor: 1.0,
            factor: 1.0,
        },
        LayerType::Full => RopeConfig {
            kind: RopeKind::Proportional,
            theta: 1_000_000.0,
            partial_rotary_factor: 0.25,
            factor: 1.0,
        },
    };
    let mut out = BTreeMap::new();
    for &t in layer_types {
        if out.contains_key(&t) {
            continue;
        }
        let cfg = match v {
            None => default_for(t),
            Some(Value::Object(m)) => {
                let entry = m
                    .get(t.as_str())
                    .and_then(Value::as_object)
                    .ok_or_else(|| {
                        format!("`rope_parameters` has no entry for `{}`", t.as_str())
                    })?;
                let f = Fields(entry);
                let kind = match entry
                    .get("rope_type")
                    .and_then(Value::as_str)
                    .unwrap_or("default")
                {
                    "default" => RopeKind::Default,
                    "proportional" => RopeKind::Proportional,
                    other => {
                        return Err(format!(
                            "unsupported rope_type `{other}` for `{}`",
                            t.as_str()
                        ))
                    }
                };
                let theta = f.get("rope_theta").ok_or_else(|| {
                    format!("`rope_parameters.{}` has no `rope_theta`", t.as_str())
                })?;
                let theta = theta
                    .as_f64()
                    .filter(|t| t.is_finite() && *t > 0.0)
                    .ok_or("`rope_theta` must be a finite number above 0")?;
                let partial_rotary_factor = f.f64("partial_rotary_factor", 1.0)?;
                if !(partial_rotary_factor > 0.0 && partial_rotary_factor <= 1.0) {
                    return Err(format!(
                        "`partial_rotary_factor` is {partial_rotary_factor}; it must be within (0, 1]"
                    ));
                }
                RopeConfig {
                    kind,
                    theta,
                    partial_rotary_factor,
                    factor: f.positive_f64("factor", 1.0)?,
                }
            }
            Some(other) => {
                return Err(format!(
                    "`rope_parameters` must be an object, found {other}"
                ))
            }
        };
        out.insert(t, cfg);
    }
    Ok(out)
}

/// `generation_config.json`: stop ids and the checkpoint's sampling defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub do_sample: bool,
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
}

impl GenerationConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let value = crate::error::read_json(path)?;
        let o = value
            .as_object()
            .ok_or_else(|| Error::config(path, "top level is not a JSON object"))?;
        let f = Fields(o);
        let wrap = |m: String| Error::config(path, m);
        let opt_f64 = |k: &str| -> Result<Option<f64>> {
            f.get(k).map(|_| f.f64(k, 0.0)).transpose().map_err(wrap)
        };
        GenerationConfig {
            eos_token_ids: ids(o.get("eos_token_id")).map_err(wrap)?,
            bos_token_id: f.opt_u32("bos_token_id").map_err(wrap)?,
            pad_token_id: f.opt_u32("pad_token_id").map_err(wrap)?,
            do_sample: f.bool("do_sample", false).map_err(wrap)?,
            temperature: opt_f64("temperature")?,
            top_k: f.opt_usize("top_k").map_err(wrap)?,
            top_p: opt_f64("top_p")?,
            min_p: opt_f64("min_p")?,
            repetition_penalty: opt_f64("repetition_penalty")?,
        }
        .checked()
        .map_err(wrap)
    }

    /// The sampling values in the ranges the sampler takes (named by their keys here, so a
    /// bad file is not blamed on a command-line flag later).
    fn checked(self) -> std::result::Result<Self, String> {
        let bad = |k: &str, v: f64, range: &str| Err(format!("`{k}` is {v}; it must be {range}"));
        if let Some(t) = self.temperature.filter(|t| !(t.is_finite() && *t >= 0.0)) {
            return bad("temperature", t, "a finite number >= 0");
        }
        if let Some(p) = self.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            return bad("top_p", p, "within (0, 1]");
        }
        if let Some(p) = self.min_p.filter(|p| !(0.0..=1.0).contains(p)) {
            return bad("min_p", p, "within [0, 1]");
        }
        if let Some(p) = self
            .repetition_penalty
            .filter(|p| !(p.is_finite() && *p > 0.0))
        {
            return bad("repetition_penalty", p, "a positive number");
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn e2b_text() -> Value {
        json!({
            "model_type": "gemma4",
            "text_config": {
                "hidden_size": 1536, "intermediate_size": 6144, "num_hidden_layers": 35,
                "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256,
                "global_head_dim": 512, "num_kv_shared_layers": 20, "use_double_wide_mlp": true,
                "layer_types": (0..35).map(|i| if i % 5 == 4 { "full_attention" } else { "sliding_attention" }).collect::<Vec<_>>(),
                "final_logit_softcapping": 30.0, "vocab_size": 262144
            },
            "vision_config": {}, "audio_config": {}
        })
    }

    #[test]
    fn e2b_layer_plan_matches_reference() {
        let c = ModelConfig::from_value(&e2b_text()).unwrap();
        let t = &c.text;
        assert!(c.vision.is_some() && c.audio.is_some());
        assert_eq!(
            t.hidden_size_per_layer_input, 256,
            "absent key means the 256 default"
        );
        assert_eq!(t.first_kv_shared_layer(), 15);
        assert_eq!(t.layers[4].head_dim, 512);
        // k_eq_v off: full layers keep num_key_value_heads and have v_proj.
        assert_eq!(t.layers[4].num_kv_heads, 1);
        assert!(!t.layers[4].k_eq_v);
        assert_eq!(t.layers[0].head_dim, 256);
        assert_eq!(t.layers[14].intermediate_size, 6144);
        assert_eq!(t.layers[15].intermediate_size, 12288);
        assert_eq!(t.layers[15].kv_source, KvSource::Shared { producer: 13 });
        assert_eq!(t.layers[19].kv_source, KvSource::Shared { producer: 14 });
        assert_eq!(t.layers[34].kv_source, KvSource::Shared { producer: 14 });
        assert_eq!(t.layers[14].kv_source, KvSource::Own);
        assert_eq!(t.rope[&LayerType::Full].kind, RopeKind::Proportional);
        assert_eq!(t.rope[&LayerType::Sliding].theta, 10_000.0);
    }

    #[test]
    fn global_kv_heads_apply_only_with_k_eq_v() {
        let mk = |keqv: bool| {
            json!({"model_type": "gemma4_text", "num_hidden_layers": 6, "num_attention_heads": 32,
                   "num_key_value_heads": 16, "num_global_key_value_heads": 4, "attention_k_eq_v": keqv})
        };
        let on = ModelConfig::from_value(&mk(true)).unwrap().text;
        let off = ModelConfig::from_value(&mk(false)).unwrap().text;
        assert_eq!(on.layers[5].num_kv_heads, 4);
        assert!(on.layers[5].k_eq_v);
        assert!(!on.layers[4].k_eq_v);
        assert_eq!(off.layers[5].num_kv_heads, 16);
        assert_eq!(on.layers[5].head_dim, 512);
    }

    #[test]
    fn saved_per_layer_config_form_is_equivalent() {
        let published = json!({"model_type": "gemma4_text", "num_hidden_layers": 6, "head_dim": 16,
            "global_head_dim": 32, "num_global_key_value_heads": 1, "attention_k_eq_v": true,
            "num_attention_heads": 4, "num_key_value_heads": 2});
        let saved = json!({"model_type": "gemma4_text", "num_hidden_layers": 6, "head_dim": 16,
            "per_layer_config": {"05": {"head_dim": 32, "num_key_value_heads": 1}},
            "attention_k_eq_v": true, "num_attention_heads": 4, "num_key_value_heads": 2});
        let a = ModelConfig::from_value(&published).unwrap().text;
        let b = ModelConfig::from_value(&saved).unwrap().text;
        assert_eq!(a.layers, b.layers);
    }

    #[test]
    fn default_pattern_forces_last_layer_full() {
        let t =
            ModelConfig::from_value(&json!({"model_type": "gemma4_text", "num_hidden_layers": 4}))
                .unwrap()
                .text;
        let types: Vec<_> = t.layers.iter().map(|l| l.layer_type).collect();
        assert_eq!(
            types,
            [
                LayerType::Sliding,
                LayerType::Sliding,
                LayerType::Sliding,
                LayerType::Full
            ]
        );
        let t =
            ModelConfig::from_value(&json!({"model_type": "gemma4_text", "num_hidden_layers": 12}))
                .unwrap()
                .text;
        assert_eq!(t.layers[5].layer_type, LayerType::Full);
        assert_eq!(t.layers[6].layer_type, LayerType::Sliding);
    }

    #[test]
    fn ple_null_disables_and_unified_has_none() {
        let t = ModelConfig::from_value(
            &json!({"model_type": "gemma4_text", "hidden_size_per_layer_input": null}),
        )
        .unwrap()
        .text;
        assert_eq!(t.hidden_size_per_layer_input, 0);
        let u = ModelConfig::from_value(
            &json!({"model_type": "gemma4_unified", "text_config": {"num_hidden_layers": 6}}),
        )
        .unwrap();
        assert_eq!(u.architecture, Architecture::Gemma4Unified);
        assert_eq!(u.text.hidden_size_per_layer_input, 0);
        assert_eq!(u.text.sliding_window, 1024);
        assert_eq!(u.text.bidirectional, Bidirectional::VisionAllLayers);
    }

    #[test]
    fn inconsistent_configs_are_errors() {
        let cases = [
            (json!({"model_type": "llama"}), "model_type"),
            (
                json!({"model_type": "gemma4_text", "num_hidden_layers": 3, "layer_types": ["full_attention"]}),
                "layer_types",
            ),
            (
                json!({"model_type": "gemma4_text", "layer_types": ["sliding_attention", "banana"], "num_hidden_layers": 2}),
                "banana",
            ),
            (
                json!({"model_type": "gemma4_text", "num_attention_heads": 8, "num_key_value_heads": 3}),
                "multiple",
            ),
            (
                json!({"model_type": "gemma4_text", "num_hidden_layers": 4, "num_kv_shared_layers": 9}),
                "exceeds",
            ),
            (
                json!({"model_type": "gemma4_text", "num_hidden_layers": 4, "num_kv_shared_layers": 3}),
                "produces",
            ),
            (
                json!({"model_type": "gemma4_text", "hidden_activation": "relu"}),
                "hidden_activation",
            ),
            (
                json!({"model_type": "gemma4_text", "rope_parameters": {"sliding_attention": {"rope_type": "yarn", "rope_theta": 1.0},
                "full_attention": {"rope_theta": 1.0}}}),
                "yarn",
            ),
            (
                json!({"model_type": "gemma4_text", "enable_moe_block": true}),
                "num_experts",
            ),
            (
                json!({"model_type": "gemma4_text", "per_layer_config": {"1": {"sliding_window": 3}}}),
                "sliding_window",
            ),
            (
                json!({"model_type": "gemma4", "text_config": 3}),
                "text_config",
            ),
        ];
        for (cfg, needle) in cases {
            let err = ModelConfig::from_value(&cfg).unwrap_err();
            assert!(
                err.contains(needle),
                "error `{err}` should mention `{needle}`"
            );
        }
    }
}
