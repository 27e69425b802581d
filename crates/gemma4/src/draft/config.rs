//! `config.json` of an assistant drafter (`model_type: gemma4_assistant`,
//! `Gemma4AssistantConfig`): a small `gemma4_text` decoder whose layers are all KV-shared
//! (they read the target's keys and values), the width of the target it was trained with
//! (`backbone_hidden_size`), and its head: dense and tied, or the centroid head of
//! E2B/E4B's drafters (`use_ordered_embeddings`).

use std::path::Path;

use serde_json::Value;

use crate::config::{ModelConfig, TextConfig};
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct DrafterConfig {
    /// The drafter's decoder. Its layers are planned as if each owned its K/V; the
    /// drafter replaces every source with the target's layer of the same type.
    pub text: TextConfig,
    /// Hidden size of the target this drafter was trained with.
    pub backbone_hidden_size: usize,
    /// `(num_centroids, centroid_intermediate_top_k)` of the centroid head; `None`: a
    /// dense head tied to the drafter's embedding.
    pub centroids: Option<(usize, usize)>,
    /// Tokens drafted per round by default (`generation_config.json`'s
    /// `num_assistant_tokens`).
    pub num_assistant_tokens: Option<usize>,
}

/// The reference's drafting default when the drafter's generation config has no
/// `num_assistant_tokens` (`GenerationConfig`'s own default).
pub const DEFAULT_DRAFT_TOKENS: usize = 20;

impl DrafterConfig {
    /// Reads `dir/config.json` and, when present, `dir/generation_config.json`; for a
    /// llama.cpp drafter file alone (`general.architecture = "gemma4-assistant"`), the
    /// config its metadata describes.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::for_checkpoint(dir, &crate::loading::weights::Checkpoint::open(dir)?)
    }

    /// [`Self::from_dir`] with the directory's weights already open (a GGUF file's
    /// metadata stands in for a missing `config.json`).
    pub fn for_checkpoint(dir: &Path, ckpt: &crate::loading::weights::Checkpoint) -> Result<Self> {
        let path = dir.join("config.json");
        let mut cfg = if path.exists() {
            let value = crate::error::read_json(&path)?;
            Self::from_value(&value).map_err(|m| Error::config(&path, m))?
        } else {
            let origin = ckpt.single_file().unwrap_or(dir).to_path_buf();
            let value = ckpt.llama_cpp_config().ok_or_else(|| {
                Error::config(
                    &path,
                    "missing, and the directory holds no llama.cpp GGUF file",
                )
            })??;
            Self::from_value(&value).map_err(|m| Error::config(&origin, m))?
        };
        let gen = dir.join("generation_config.json");
        if gen.exists() {
            let v = crate::error::read_json(&gen)?;
            cfg.num_assistant_tokens = match v.get("num_assistant_tokens") {
                None | Some(Value::Null) => None,
                Some(n) => Some(n.as_u64().filter(|&n| n > 0).ok_or_else(|| {
                    Error::config(&gen, "`num_assistant_tokens` must be a positive integer")
                })? as usize),
            };
        }
        Ok(cfg)
    }

    pub fn from_value(value: &Value) -> std::result::Result<Self, String> {
        let o = value.as_object().ok_or("top level is not a JSON object")?;
        match o.get("model_type").and_then(Value::as_str) {
            Some("gemma4_assistant") => {}
            other => {
                return Err(format!(
                    "model_type is {}, expected gemma4_assistant (a drafter checkpoint)",
                    other.map_or("missing".into(), |t| format!("`{t}`"))
                ))
            }
        }
        let mut text = o
            .get("text_config")
            .and_then(Value::as_object)
            .cloned()
            .ok_or("`text_config` is missing or not an object")?;
        let layers = text
            .get("num_hidden_layers")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        match text.get("num_kv_shared_layers").and_then(Value::as_u64) {
            // The reference forces 0 (unset) to all-shared, and requires all-shared.
            None | Some(0) => {}
            Some(n) if n == layers => {}
            Some(n) => {
                return Err(format!(
                "`text_config.num_kv_shared_layers` is {n}: every one of the drafter's {layers} layers must be shared"
            ))
            }
        }
        text.insert("num_kv_shared_layers".into(), 0.into());
        text.insert("model_type".into(), "gemma4_text".into());
        let text = ModelConfig::from_value(&Value::Object(text))
            .map_err(|m| format!("text_config: {m}"))?
            .text;
        if text.hidden_size_per_layer_input != 0 {
            return Err(
                "a drafter has no per-layer embeddings (`hidden_size_per_layer_input` must be 0)"
                    .into(),
            );
        }
        if text.moe.is_some() {
            return Err("a drafter has no MoE block (`enable_moe_block` must be false)".into());
        }
        if text.use_double_wide_mlp {
            return Err(
                "a drafter has no double-wide MLP (`use_double_wide_mlp` must be false)".into(),
            );
        }
        if !o
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(true)
        {
            return Err("untied drafter heads are not supported".into());
        }
        let usize_field = |k: &str, default: usize| -> std::result::Result<usize, String> {
            match o.get(k) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v
                    .as_u64()
                    .filter(|&n| n > 0)
                    .map(|n| n as usize)
                    .ok_or_else(|| format!("`{k}` must be a positive integer")),
            }
        };
        let backbone_hidden_size = usize_field("backbone_hidden_size", 1536)?;
        let ordered = o
            .get("use_ordered_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let centroids = if ordered {
            let c = usize_field("num_centroids", 2048)?;
            let k = usize_field("centroid_intermediate_top_k", 32)?;
            if text.vocab_size % c != 0 || k > c {
                return Err(format!(
                    "the centroid head needs `num_centroids` ({c}) to divide the vocabulary ({}) and `centroid_intermediate_top_k` ({k}) <= it",
                    text.vocab_size
                ));
            }
            Some((c, k))
        } else {
            None
        };
        Ok(DrafterConfig {
            text,
            backbone_hidden_size,
            centroids,
            num_assistant_tokens: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"model_type": "gemma4_assistant", "backbone_hidden_size": 64, "use_ordered_embeddings": true,
               "num_centroids": 16, "centroid_intermediate_top_k": 4,
               "text_config": {"model_type": "gemma4_text", "num_hidden_layers": 4, "num_kv_shared_layers": 4,
                               "vocab_size": 512, "hidden_size": 48, "hidden_size_per_layer_input": 0,
                               "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                               "global_head_dim": 32, "sliding_window": 8}})
    }

    #[test]
    fn parses_the_assistant_config() {
        let c = DrafterConfig::from_value(&base()).unwrap();
        assert_eq!(c.backbone_hidden_size, 64);
        assert_eq!(c.centroids, Some((16, 4)));
        assert_eq!(c.text.layers.len(), 4);
        assert_eq!(c.text.layers[3].head_dim, 32);
    }

    #[test]
    fn rejects_what_no_drafter_has() {
        type Edit = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|v| v["model_type"] = json!("gemma4")),
                "gemma4_assistant",
            ),
            (
                Box::new(|v| v["text_config"]["num_kv_shared_layers"] = json!(2)),
                "must be shared",
            ),
            (
                Box::new(|v| v["text_config"]["hidden_size_per_layer_input"] = json!(8)),
                "per-layer",
            ),
            (Box::new(|v| v["num_centroids"] = json!(15)), "divide"),
            (
                Box::new(|v| v["centroid_intermediate_top_k"] = json!(17)),
                "top_k",
            ),
            (
                Box::new(|v| v["tie_word_embeddings"] = json!(false)),
                "untied",
            ),
        ];
        for (edit, want) in cases {
            let mut v = base();
            edit(&mut v);
            let e = DrafterConfig::from_value(&v).unwrap_err();
            assert!(e.contains(want), "{e} (wanted {want})");
        }
    }
}
