//! `adapter_config.json` as peft writes it for a LoRA adapter (`peft.LoraConfig`).
//!
//! Only the fields that change what the adapter computes are read; peft adds fields with
//! every release, and the ones unknown here are ignored. A field that asks for something
//! this engine does not compute (DoRA, trained biases, extra saved modules, ...) is an
//! error naming it, never silently dropped: an adapter that loads and does something else
//! than in peft is the worst outcome.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The fields of `adapter_config.json` this engine reads and writes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AdapterConfig {
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub target_modules: Option<serde_json::Value>,
    /// peft's LoRA on parameters: here the MoE experts' fused `experts.gate_up_proj` and
    /// `experts.down_proj` (`[E, out, in]`), one update per expert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_parameters: Option<Vec<String>>,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    #[serde(default = "none_bias")]
    pub bias: String,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub task_type: Option<String>,
    /// Everything else peft wrote, kept so the checks below can read it.
    #[serde(flatten, skip_serializing)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

fn none_bias() -> String {
    "none".into()
}

impl AdapterConfig {
    /// Reads and checks `path`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let v = crate::error::read_json(path)?;
        let cfg: AdapterConfig =
            serde_json::from_value(v).map_err(|e| Error::config(path, e.to_string()))?;
        cfg.check(path)?;
        Ok(cfg)
    }

    /// A config for an adapter this engine writes.
    pub fn new(r: usize, lora_alpha: f64, use_rslora: bool, target_modules: Vec<String>) -> Self {
        AdapterConfig {
            peft_type: "LORA".into(),
            r,
            lora_alpha,
            lora_dropout: 0.0,
            use_rslora,
            target_modules: Some(serde_json::json!(target_modules)),
            target_parameters: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            bias: none_bias(),
            base_model_name_or_path: None,
            task_type: Some("CAUSAL_LM".into()),
            other: serde_json::Map::new(),
        }
    }

    fn check(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, why: &str| Err(Error::config(path, format!("`{field}`: {why}")));
        if self.peft_type != "LORA" {
            return bad(
                "peft_type",
                &format!("`{}`; only LoRA adapters are supported", self.peft_type),
            );
        }
        if self.r == 0 {
            return bad("r", "the rank must be at least 1");
        }
        if !self.lora_alpha.is_finite() {
            return bad("lora_alpha", "not a finite number");
        }
        if self.bias != "none" {
            return bad(
                "bias",
                &format!(
                    "`{}`; trained biases are not supported (only `none`)",
                    self.bias
                ),
            );
        }
        // Fields whose non-default value changes what the adapter computes.
        let truthy = |v: &serde_json::Value| match v {
            serde_json::Value::Null => false,
            serde_json::Value::Bool(b) => *b,
            serde_json::Value::Array(a) => !a.is_empty(),
            serde_json::Value::Object(o) => !o.is_empty(),
            serde_json::Value::String(s) => !s.is_empty(),
            serde_json::Value::Number(_) => true,
        };
        for (field, what) in [
            ("use_dora", "DoRA"),
            ("lora_bias", "a bias on lora_B"),
            ("fan_in_fan_out", "Conv1D-style (transposed) weights"),
            ("modules_to_save", "fully trained extra modules"),
            ("layer_replication", "layer replication"),
            ("use_qalora", "QA-LoRA"),
            ("alora_invocation_tokens", "activated LoRA"),
            ("trainable_token_indices", "trainable token embeddings"),
            ("use_bdlora", "block-diagonal LoRA"),
        ] {
            if self.other.get(field).is_some_and(truthy) {
                return bad(field, &format!("{what} is not supported"));
            }
        }
        for t in self.target_parameters.iter().flatten() {
            if expert_param(t).is_none() {
                return bad(
                    "target_parameters",
                    &format!(
                        "`{t}`: only the MoE experts' `experts.gate_up_proj` and \
                         `experts.down_proj` are supported"
                    ),
                );
            }
        }
        for pattern in self.rank_pattern.keys().chain(self.alpha_pattern.keys()) {
            module_pattern(pattern).map_err(|e| {
                Error::config(path, format!("pattern `{pattern}` is not a regex: {e}"))
            })?;
        }
        Ok(())
    }

    /// The rank and alpha of module `name` (its path in the model, such as
    /// `model.language_model.layers.0.self_attn.o_proj`): `rank_pattern` and
    /// `alpha_pattern` override `r` and `lora_alpha` for the modules their keys match,
    /// a key matching as peft matches it, as a regex against the whole name or a
    /// dot-separated suffix of it.
    pub fn rank_and_alpha(&self, name: &str) -> (usize, f64) {
        fn find<T: Copy>(patterns: &BTreeMap<String, T>, name: &str) -> Option<T> {
            patterns
                .iter()
                .find(|(k, _)| module_pattern(k).is_ok_and(|re| re.is_match(name)))
                .map(|(_, v)| *v)
        }
        let r = find(&self.rank_pattern, name).unwrap_or(self.r);
        let alpha = find(&self.alpha_pattern, name).unwrap_or(self.lora_alpha);
        (r, alpha)
    }

    /// peft's scaling for a module of rank `r` and alpha `alpha`: `alpha / r`, or
    /// `alpha / √r` with rsLoRA.
    pub fn scaling(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    /// The expert parameters adapted (`gate_up_proj`, `down_proj`), in the experts
    /// module's parameter order, which is the order of peft's nested wrappers.
    pub fn expert_params(&self) -> Vec<&'static str> {
        let listed: Vec<&str> = self
            .target_parameters
            .iter()
            .flatten()
            .filter_map(|t| expert_param(t))
            .collect();
        EXPERT_PARAMS
            .into_iter()
            .filter(|p| listed.contains(p))
            .collect()
    }

    /// The module name under which peft's file holds the update of module `module`: for an
    /// expert parameter (`….experts.gate_up_proj`), the experts module wrapped once per
    /// adapted parameter that comes after it (peft nests one `ParamWrapper` per parameter,
    /// the first innermost: `experts.base_layer` and `experts` with both); any other module
    /// as it is.
    pub fn file_module(&self, module: &str) -> String {
        let params = self.expert_params();
        match module.rsplit_once('.') {
            Some((parent, p)) if parent.ends_with("experts") && params.contains(&p) => {
                let pos = params.iter().position(|q| *q == p).expect("contained");
                let mut m = parent.to_string();
                for _ in pos + 1..params.len() {
                    m.push_str(".base_layer");
                }
                m
            }
            _ => module.to_string(),
        }
    }

    /// The inverse of [`Self::file_module`]: `….experts[.base_layer…]` to the expert
    /// parameter it adapts; any other module as it is. `None` for an experts module that
    /// names no adapted parameter.
    pub fn param_module(&self, file_module: &str) -> Option<String> {
        let params = self.expert_params();
        let mut m = file_module;
        let mut wraps = 0;
        while let Some(inner) = m.strip_suffix(".base_layer") {
            m = inner;
            wraps += 1;
        }
        if !m.ends_with("experts") || !(m.len() == 7 || m.ends_with(".experts")) {
            return (wraps == 0).then(|| file_module.to_string());
        }
        let pos = params.len().checked_sub(wraps + 1)?;
        Some(format!("{m}.{}", params[pos]))
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let text =
            serde_json::to_string_pretty(self).map_err(|e| Error::config(path, e.to_string()))?;
        crate::loading::atomic::write_atomic(path, format!("{text}\n").as_bytes())
    }
}

/// peft's `get_pattern_key` match: the key as a regex on the whole name, after any
/// dot-terminated prefix.
fn module_pattern(key: &str) -> std::result::Result<Regex, regex::Error> {
    Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
}

/// The experts' fused parameters in the order `Gemma4TextExperts` defines them.
const EXPERT_PARAMS: [&str; 2] = ["gate_up_proj", "down_proj"];

/// The expert parameter a `target_parameters` entry names (peft matches it against the end
/// of the parameter's path): `experts.gate_up_proj`, `….experts.down_proj`.
fn expert_param(entry: &str) -> Option<&'static str> {
    let (parent, p) = entry.rsplit_once('.')?;
    let p = EXPERT_PARAMS.into_iter().find(|q| *q == p)?;
    (parent == "experts" || parent.ends_with(".experts")).then_some(p)
}

/// Where an adapter's files are.
pub(crate) fn config_path(dir: &Path) -> PathBuf {
    dir.join("adapter_config.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: serde_json::Value) -> std::result::Result<AdapterConfig, String> {
        let mut v = serde_json::json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        let c: AdapterConfig = serde_json::from_value(v).map_err(|e| e.to_string())?;
        c.check(Path::new("adapter_config.json"))
            .map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn patterns_override_rank_and_alpha_as_peft_matches_them() {
        let c = cfg(serde_json::json!({
            "rank_pattern": {"layers.1.self_attn.q_proj": 4},
            "alpha_pattern": {"o_proj": 32},
        }))
        .unwrap();
        let m = "model.language_model.layers";
        assert_eq!(
            c.rank_and_alpha(&format!("{m}.1.self_attn.q_proj")),
            (4, 16.0)
        );
        assert_eq!(
            c.rank_and_alpha(&format!("{m}.11.self_attn.q_proj")),
            (8, 16.0)
        );
        assert_eq!(
            c.rank_and_alpha(&format!("{m}.0.self_attn.o_proj")),
            (8, 32.0)
        );
        assert_eq!(
            c.rank_and_alpha(&format!("{m}.0.self_attn.xo_proj")),
            (8, 16.0)
        );
        assert_eq!(c.scaling(8, 16.0), 2.0);
        let rs = cfg(serde_json::json!({"use_rslora": true})).unwrap();
        assert_eq!(rs.scaling(16, 16.0), 4.0);
    }

    /// peft nests one wrapper per adapted expert parameter, the first (in the module's
    /// order, whatever the config's) innermost.
    #[test]
    fn expert_parameters_are_named_as_peft_nests_them() {
        let m = "model.language_model.layers.3.experts";
        let both = cfg(serde_json::json!({
            "target_parameters": ["experts.down_proj", "experts.gate_up_proj"]
        }))
        .unwrap();
        assert_eq!(both.expert_params(), ["gate_up_proj", "down_proj"]);
        for (param, file) in [
            ("gate_up_proj", format!("{m}.base_layer")),
            ("down_proj", m.to_string()),
        ] {
            let module = format!("{m}.{param}");
            assert_eq!(both.file_module(&module), file);
            assert_eq!(both.param_module(&file), Some(module));
        }
        let down = cfg(serde_json::json!({"target_parameters": ["experts.down_proj"]})).unwrap();
        assert_eq!(down.file_module(&format!("{m}.down_proj")), m);
        assert_eq!(down.param_module(m), Some(format!("{m}.down_proj")));
        assert_eq!(down.param_module(&format!("{m}.base_layer")), None);
        // Other modules pass through.
        let q = "model.layers.0.self_attn.q_proj";
        assert_eq!(
            (both.file_module(q), both.param_module(q)),
            (q.to_string(), Some(q.to_string()))
        );
    }

    #[test]
    fn what_is_not_computed_here_is_refused_by_name() {
        for (field, value) in [
            ("use_dora", serde_json::json!(true)),
            ("modules_to_save", serde_json::json!(["lm_head"])),
            ("bias", serde_json::json!("all")),
            ("peft_type", serde_json::json!("IA3")),
            (
                "target_parameters",
                serde_json::json!(["mlp.gate_proj.weight"]),
            ),
            ("r", serde_json::json!(0)),
        ] {
            let err = cfg(serde_json::json!({ field: value })).unwrap_err();
            assert!(err.contains(field), "{field}: {err}");
        }
        // Defaults and fields unknown here pass.
        cfg(serde_json::json!({"use_dora": false, "modules_to_save": null, "eva_config": null}))
            .unwrap();
        let err = cfg(serde_json::json!({"alpha_pattern": {"(": 1}})).unwrap_err();
        assert!(err.contains("not a regex"), "{err}");
    }
}
