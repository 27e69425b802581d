//! LoRA adapters in peft's format: loading them ([`LoraAdapter::load`]), attaching them to
//! a loaded model to run unmerged ([`crate::Gemma4::attach_adapter`], then
//! [`with_adapters`] or [`crate::GenerateOptions::adapters`] to turn them on), and merging
//! them into a checkpoint's weights ([`merge`]).
//!
//! The files are what `PeftModel.save_pretrained` writes ([`config`] for
//! `adapter_config.json`); `adapter_model.safetensors` holds
//! `base_model.model.{module}.lora_A.weight` `[r, in]` and `.lora_B.weight` `[out, r]`,
//! where `{module}` is the projection's path in the model
//! (`model.language_model.layers.{i}.self_attn.q_proj` for `Gemma4ForConditionalGeneration`,
//! `model.layers.{i}...` for `Gemma4ForCausalLM`; either form loads on either checkpoint, as
//! vLLM maps one onto the other). Every key must patch a projection of the model: an
//! adapter that loads and silently does nothing is refused, and attaching reports how many
//! projections it patched.

pub mod config;
pub mod merge;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::loading::weights::Checkpoint;
use crate::nn::linear::Linear;
pub use crate::nn::lora::{
    with_adapters, with_dropout, AdapterSet, Dropout, LoraDelta, MAX_ADAPTERS,
};
use config::AdapterConfig;

/// The prefix peft puts before every module path (`PeftModel.base_model.model`).
const PEFT_PREFIX: &str = "base_model.model.";

/// One projection's update in an adapter file.
#[derive(Debug, Clone)]
pub struct ModuleLora {
    /// The projection's path in the model, as the file names it (without peft's prefix);
    /// for the MoE experts, the fused parameter's path (`….experts.gate_up_proj`), which
    /// the file names after peft's nested wrappers ([`AdapterConfig::file_module`]).
    pub module: String,
    /// `[r, in]`, f32; `[r·E, in]` for a fused expert parameter (peft's `ParamWrapper`).
    pub a: Tensor,
    /// `[out, r]`, f32; `[out, r·E]` for a fused expert parameter.
    pub b: Tensor,
    /// `alpha / r` (or `alpha / √r` with rsLoRA), times any scale given at load.
    pub scaling: f64,
    /// `r`.
    pub rank: usize,
}

impl ModuleLora {
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Whether it adapts a fused expert parameter (one update per expert).
    pub fn is_experts(&self) -> bool {
        is_expert_param(&self.module)
    }
}

/// `….experts.gate_up_proj` or `….experts.down_proj`.
pub(crate) fn is_expert_param(module: &str) -> bool {
    module.rsplit_once('.').is_some_and(|(parent, p)| {
        (parent == "experts" || parent.ends_with(".experts"))
            && (p == "gate_up_proj" || p == "down_proj")
    })
}

/// A LoRA adapter read from a peft adapter directory.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub dir: PathBuf,
    /// The directory's name: what the server and the CLI call the adapter.
    pub name: String,
    pub config: AdapterConfig,
    /// One entry per patched projection, ordered by module path.
    pub modules: Vec<ModuleLora>,
}

impl LoraAdapter {
    /// Reads `dir/adapter_config.json` and `dir/adapter_model.safetensors`.
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "adapter directory not found"),
            ));
        }
        let config = AdapterConfig::from_file(&config::config_path(dir))?;
        let path = dir.join("adapter_model.safetensors");
        if !path.exists() && dir.join("adapter_model.bin").exists() {
            return Err(Error::io(
                dir.join("adapter_model.bin"),
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "pickled adapters are not read (they can run code); save it with \
                     `save_pretrained(..., safe_serialization=True)`",
                ),
            ));
        }
        let file = Checkpoint::open_safetensors(&path)?;
        let bad = |message: String| Error::Safetensors {
            path: path.clone(),
            message,
        };
        let mut pairs: BTreeMap<String, [Option<String>; 2]> = BTreeMap::new();
        let mut names: Vec<&str> = file.tensor_names().collect();
        names.sort_unstable();
        for key in names {
            let printable = crate::error::printable(key);
            let rest = key.strip_prefix(PEFT_PREFIX).ok_or_else(|| {
                bad(format!(
                    "tensor `{printable}` does not start with `{PEFT_PREFIX}` (not a peft adapter?)"
                ))
            })?;
            let (module, slot) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
                (m, 0)
            } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
                (m, 1)
            } else {
                return Err(bad(format!(
                    "tensor `{printable}` is not a `lora_A`/`lora_B` weight (embedding \
                     adapters, DoRA magnitudes and saved modules are not supported)"
                )));
            };
            pairs.entry(module.to_string()).or_default()[slot] = Some(key.to_string());
        }
        if pairs.is_empty() {
            return Err(bad("no LoRA tensors".into()));
        }
        let mut modules = Vec::with_capacity(pairs.len());
        for (file_module, [a, b]) in pairs {
            let module = config.param_module(&file_module).ok_or_else(|| {
                bad(format!(
                    "`{}` is a wrapped experts module, but adapter_config.json's \
                     `target_parameters` adapts no expert parameter there",
                    crate::error::printable(&file_module)
                ))
            })?;
            let (a, b) = match (a, b) {
                (Some(a), Some(b)) => (a, b),
                (a, _) => {
                    return Err(bad(format!(
                        "`{}` has {} but no {}",
                        crate::error::printable(&module),
                        if a.is_some() { "lora_A" } else { "lora_B" },
                        if a.is_some() { "lora_B" } else { "lora_A" },
                    )))
                }
            };
            let load = |key: &str| -> Result<Tensor> {
                let shape = file.shape(key).unwrap_or_default().to_vec();
                if shape.len() != 2 {
                    return Err(bad(format!(
                        "`{}` has shape {shape:?}, not a matrix",
                        crate::error::printable(key)
                    )));
                }
                file.load(key, &shape, DType::F32, &Device::Cpu)
            };
            let (a, b) = (load(&a)?, load(&b)?);
            let rows = a.dims()[0];
            let experts = is_expert_param(&module);
            // An expert parameter's rank patterns match the experts module, as peft's.
            let pattern_name = match experts {
                true => module.rsplit_once('.').map_or(module.as_str(), |(m, _)| m),
                false => module.as_str(),
            };
            let (r, alpha) = config.rank_and_alpha(pattern_name);
            // The experts' factors hold r rows per expert; their count is checked when the
            // adapter is attached to a model.
            if !experts && r != rows {
                return Err(bad(format!(
                    "`{}` has rank {rows}, but adapter_config.json gives it rank {r}",
                    crate::error::printable(&file_module)
                )));
            }
            if experts && rows % r != 0 {
                return Err(bad(format!(
                    "`{}` has {rows} rows in lora_A, not a multiple of the rank {r} that \
                     adapter_config.json gives it (r per expert)",
                    crate::error::printable(&file_module)
                )));
            }
            let scaling = config.scaling(r, alpha);
            modules.push(ModuleLora {
                module,
                a,
                b,
                scaling,
                rank: r,
            });
        }
        Ok(LoraAdapter {
            name: dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "adapter".into()),
            dir: dir.to_path_buf(),
            config,
            modules,
        })
    }

    /// The same adapter with every update multiplied by `scale` (llama.cpp's `--lora-scaled`).
    pub fn scaled(mut self, scale: f64) -> Self {
        for m in &mut self.modules {
            m.scaling *= scale;
        }
        self
    }
}

/// A module path with the text decoder's prefix made one: `model.language_model.` (the
/// multimodal classes) and `model.` (`Gemma4ForCausalLM`) name the same projections.
pub(crate) fn canonical(module: &str) -> String {
    match module.strip_prefix("model.language_model.") {
        Some(rest) => format!("model.{rest}"),
        None => module.to_string(),
    }
}

/// The embedding tables: the tied head/embedding and the per-layer embeddings, which peft
/// adapts with `lora_embedding_A`/`_B` (not supported), never with `lora_A`/`lora_B`.
pub(crate) fn is_embedding(module: &str) -> bool {
    module.ends_with("embed_tokens") || module.ends_with("embed_tokens_per_layer")
}

/// A module of the vision encoder or its projector.
pub(crate) fn is_vision_module(module: &str) -> bool {
    ["vision_tower.", "embed_vision.", "vision_embedder."]
        .iter()
        .any(|t| module.contains(t))
}

/// A module of the audio encoder or its projector.
pub(crate) fn is_audio_module(module: &str) -> bool {
    ["audio_tower.", "embed_audio.", "audio_embedder."]
        .iter()
        .any(|t| module.contains(t))
}

/// Why an adapter module matched nothing, for the error.
fn unmatched(adapter: &LoraAdapter, module: &str) -> Error {
    let why = format!(
        "it matches no projection of this model (an adapter for another model? it names \
         `{}` as its base)",
        adapter
            .config
            .base_model_name_or_path
            .as_deref()
            .unwrap_or("no model")
    );
    Error::invalid_argument(
        "adapter",
        format!(
            "{}: module `{}`: {why}",
            adapter.dir.display(),
            crate::error::printable(module)
        ),
    )
}

/// The projections an adapter may patch, with their module paths as the checkpoint names
/// them: every projection loaded from its own checkpoint matrix except the embedding
/// tables (the first is also the tied LM head; peft adapts embeddings with other tensors
/// than `lora_A`/`lora_B`). MoE experts, one matrix of a stacked tensor each, are not
/// `nn.Linear`s in the reference either.
pub(crate) fn adaptable(linears: Vec<&Linear>) -> Vec<(&str, &Linear)> {
    linears
        .into_iter()
        .filter_map(|l| {
            let src = l.source()?;
            let module = src.name.strip_suffix(".weight")?;
            (src.index.is_none() && !is_embedding(module)).then_some((module, l))
        })
        .collect()
}

/// [`adaptable`] by canonical module path.
fn patchable<'a>(linears: &[&'a Linear]) -> HashMap<String, &'a Linear> {
    adaptable(linears.to_vec())
        .into_iter()
        .map(|(module, l)| (canonical(module), l))
        .collect()
}

/// The per-expert projections of every fused expert parameter, by the parameter's
/// canonical path, in expert order.
pub(crate) fn expert_linears<'a>(linears: &[&'a Linear]) -> BTreeMap<String, Vec<&'a Linear>> {
    let mut out: BTreeMap<String, Vec<(usize, &Linear)>> = BTreeMap::new();
    for l in linears {
        if let Some(src) = l.source() {
            if let (Some(e), true) = (src.index, is_expert_param(&src.name)) {
                out.entry(canonical(&src.name)).or_default().push((e, l));
            }
        }
    }
    out.into_iter()
        .map(|(k, mut v)| {
            v.sort_by_key(|(e, _)| *e);
            (k, v.into_iter().map(|(_, l)| l).collect())
        })
        .collect()
}

/// Attaches every update of `adapter` to `linears` as adapter `id`: all or nothing, so a
/// failure leaves the model as it was. Returns how many projections were patched (each
/// expert of a fused expert parameter counted).
pub(crate) fn patch(linears: Vec<&Linear>, id: usize, adapter: &LoraAdapter) -> Result<usize> {
    let targets = patchable(&linears);
    let experts = expert_linears(&linears);
    // Names first: an adapter for another model is reported as such, not as the first
    // shape that happens to differ.
    let mut matched: Vec<(Vec<&Linear>, &ModuleLora)> = Vec::with_capacity(adapter.modules.len());
    for m in &adapter.modules {
        let key = canonical(&m.module);
        let found = match m.is_experts() {
            true => experts.get(&key).cloned(),
            false => targets.get(&key).map(|l| vec![*l]),
        };
        matched.push((found.ok_or_else(|| unmatched(adapter, &m.module))?, m));
    }
    let mut planned = Vec::with_capacity(matched.len());
    for (found, m) in matched {
        let name = format!(
            "{}: {}{}",
            adapter.dir.display(),
            PEFT_PREFIX,
            adapter.config.file_module(&m.module)
        );
        let n = found.len();
        for (e, linear) in found.into_iter().enumerate() {
            let (a, b, shape) = (m.a.clone(), m.b.clone(), linear.weight().shape());
            let delta = match m.is_experts() {
                true => LoraDelta::expert(id, a, b, m.scaling, (e, n), shape, &name)?,
                false => LoraDelta::new(id, a, b, m.scaling, shape, &name)?,
            };
            planned.push((linear, delta));
        }
    }
    for (i, (linear, delta)) in planned.iter().enumerate() {
        if let Err(e) = linear.attach(delta.clone()) {
            for (l, _) in &planned[..i] {
                l.detach(id);
            }
            return Err(e);
        }
    }
    Ok(planned.len())
}

/// An adapter attached to a model.
#[derive(Debug, Clone, PartialEq)]
pub struct AttachedAdapter {
    /// Its id in the model's [`AdapterSet`]s.
    pub id: usize,
    pub name: String,
    pub dir: PathBuf,
    /// How many projections it patches.
    pub modules: usize,
    /// The largest rank among them.
    pub rank: usize,
}

impl AttachedAdapter {
    /// The set holding only this adapter.
    pub fn set(&self) -> AdapterSet {
        AdapterSet::only(self.id)
    }
}

impl crate::Gemma4 {
    /// Attaches `adapter` to the text decoder, unmerged: the base weights are untouched and
    /// the adapter's updates are added to the projections it patches while it is on
    /// ([`with_adapters`], [`crate::GenerateOptions::adapters`]). Fails, leaving the model
    /// as it was, when any of its modules matches no projection or has the wrong shape.
    pub fn attach_adapter(&mut self, adapter: &LoraAdapter) -> Result<AttachedAdapter> {
        let id = self.adapters.len();
        if id >= MAX_ADAPTERS {
            return Err(Error::invalid_argument(
                "adapter",
                format!("at most {MAX_ADAPTERS} adapters can be attached to one model"),
            ));
        }
        if self.adapters.iter().any(|a| a.name == adapter.name) {
            return Err(Error::invalid_argument(
                "adapter",
                format!(
                    "{}: an adapter named `{}` is already attached (adapters are named after \
                     their directory)",
                    adapter.dir.display(),
                    adapter.name
                ),
            ));
        }
        // An encoder's modules patch it when it is loaded; a checkpoint's encoder that was
        // not loaded computes nothing for them to change.
        let mut linears = self.text.linears();
        linears.extend(self.vision.iter().flat_map(|v| v.linears()));
        linears.extend(self.audio.iter().flat_map(|a| a.linears()));
        let skip_vision = self.vision.is_none() && self.config.vision.is_some();
        let skip_audio = self.audio.is_none() && self.config.audio.is_some();
        let filtered;
        let adapter = match skip_vision || skip_audio {
            true => {
                let mut a = adapter.clone();
                a.modules.retain(|m| {
                    !(skip_vision && is_vision_module(&m.module)
                        || skip_audio && is_audio_module(&m.module))
                });
                filtered = a;
                &filtered
            }
            false => adapter,
        };
        let modules = patch(linears, id, adapter)?;
        let attached = AttachedAdapter {
            id,
            name: adapter.name.clone(),
            dir: adapter.dir.clone(),
            modules,
            rank: adapter
                .modules
                .iter()
                .map(ModuleLora::rank)
                .max()
                .unwrap_or(0),
        };
        self.adapters.push(attached.clone());
        Ok(attached)
    }

    /// The adapters attached so far, by id.
    pub fn adapters(&self) -> &[AttachedAdapter] {
        &self.adapters
    }

    /// Every attached adapter at once (what `--lora` on the CLI turns on).
    pub fn all_adapters(&self) -> AdapterSet {
        self.adapters
            .iter()
            .fold(AdapterSet::NONE, |s, a| s.with(a.id))
    }
}
