//! The LoRA adapter being trained: one `A` `[r, in]` and `B` `[out, r]` per targeted
//! projection of the text decoder, as candle [`Var`]s, initialised as peft initialises
//! them (A kaiming-uniform with `a = √5`, i.e. uniform in `±1/√in`; B zero), and written
//! in peft's format.
//!
//! Targets follow peft's `target_modules`: a list of names, each matching a projection
//! whose path ends with `.{name}`, or `all-linear` (every projection of the decoder but
//! the tied head and the embeddings: attention, MLP, the per-layer-embedding gate and
//! projections, the MoE router). KV-shared layers have no k/v projections and `k_eq_v`
//! full layers no v projection, so their adapters follow the model.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::{RngExt, SeedableRng};

use crate::error::{Error, Result};
use crate::lora::config::AdapterConfig;
use crate::lora::{LoraAdapter, ModuleLora};
use crate::nn::linear::Linear;
use crate::text::model::TextModel;

/// Which projections get an adapter, and its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    /// Module names (`q_proj`, `down_proj`, ...) or `all-linear`, and the expert
    /// parameters (`experts`, `experts.gate_up_proj`, `experts.down_proj`).
    pub targets: Vec<String>,
    /// Encoders whose projections the targets also select (`vision`, `audio`); empty: the
    /// encoders stay frozen.
    pub towers: Vec<String>,
}

impl LoraSpec {
    /// The modules peft adapts for Gemma 4 when none are named: `q_proj` and `v_proj`.
    pub fn default_targets() -> Vec<String> {
        vec!["q_proj".into(), "v_proj".into()]
    }
}

/// One trained projection.
#[derive(Debug, Clone)]
pub struct TrainableModule {
    /// Its path in the model (`model.language_model.layers.0.self_attn.q_proj`, or an
    /// expert parameter's `….experts.gate_up_proj`).
    pub module: String,
    pub a: Var,
    pub b: Var,
    pub scaling: f64,
    pub rank: usize,
}

/// A LoRA adapter whose weights are trained.
#[derive(Debug, Clone)]
pub struct TrainableAdapter {
    pub config: AdapterConfig,
    pub modules: Vec<TrainableModule>,
}

/// The expert parameters a target names: `experts` both, `experts.gate_up_proj` or
/// `experts.down_proj` one.
fn expert_target(t: &str) -> Option<&'static [&'static str]> {
    match t {
        "experts" => Some(&["gate_up_proj", "down_proj"]),
        "experts.gate_up_proj" => Some(&["gate_up_proj"]),
        "experts.down_proj" => Some(&["down_proj"]),
        _ => None,
    }
}

/// What `targets` select in `model` (and among the encoders' projections `towers`),
/// ordered by path: each projection path with its
/// `[out, in]` shape and 1, or each fused expert parameter's path with one expert's
/// `[out, in]` and the number of experts.
#[allow(clippy::type_complexity)]
fn targeted(
    model: &TextModel,
    targets: &[String],
    towers: &[&Linear],
) -> Result<Vec<(String, (usize, usize), usize)>> {
    let (expert_targets, targets): (Vec<&String>, Vec<&String>) =
        targets.iter().partition(|t| expert_target(t).is_some());
    let all = targets.iter().any(|t| *t == "all-linear");
    if all && targets.len() > 1 {
        return Err(Error::invalid_argument(
            "targets",
            "`all-linear` stands alone among module names (it already takes every projection)",
        ));
    }
    let mut out = Vec::new();
    let mut hit = vec![false; targets.len()];
    // A separately stored head is adaptable at inference, but the loss reads its weight
    // directly (`train::loss`), so an adapter on it would never be trained.
    let linears = model.linears();
    let candidates = [linears.clone(), towers.to_vec()].concat();
    for (module, l) in crate::lora::adaptable(candidates)
        .into_iter()
        .filter(|(m, _)| !m.ends_with("lm_head"))
    {
        // A clippable linear (the towers') is adapted at its inner `.linear`, named by
        // the projection that wraps it.
        let name = module.strip_suffix(".linear").unwrap_or(module);
        let name = name.rsplit('.').next().unwrap_or(name);
        let pick = match all {
            true => true,
            false => {
                let mut any = false;
                for (t, h) in targets.iter().zip(hit.iter_mut()) {
                    if *t == name || module.ends_with(&format!(".{t}")) || *t == module {
                        *h = true;
                        any = true;
                    }
                }
                any
            }
        };
        if pick {
            out.push((module.to_string(), l.weight().shape(), 1));
        }
    }
    if let Some((t, _)) = targets.iter().zip(&hit).find(|(_, h)| !all && !**h) {
        return Err(Error::invalid_argument(
            "targets",
            format!("`{t}` matches no projection of the model"),
        ));
    }
    let wanted: Vec<&str> = expert_targets
        .iter()
        .flat_map(|t| expert_target(t).into_iter().flatten().copied())
        .collect();
    if !wanted.is_empty() {
        let experts = crate::lora::expert_linears(&linears);
        if experts.is_empty() {
            return Err(Error::invalid_argument(
                "targets",
                "`experts`: the model has no MoE experts",
            ));
        }
        for (param, per_expert) in experts {
            if wanted.iter().any(|w| param.ends_with(&format!(".{w}"))) {
                // The path as the checkpoint names it (the first expert's source).
                let name = per_expert[0]
                    .source()
                    .map(|s| s.name.clone())
                    .unwrap_or(param);
                out.push((name, per_expert[0].weight().shape(), per_expert.len()));
            }
        }
    }
    if out.is_empty() {
        return Err(Error::invalid_argument("targets", "select no projection"));
    }
    // By path, the order an adapter read from its file has (the optimizer's state follows
    // the same order on resume).
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

impl TrainableAdapter {
    /// A fresh adapter on `model`'s projections that `spec` targets, initialised as peft
    /// does from `seed`, with the encoders of `spec.towers` adapted too. A checkpoint with
    /// encoders gets its `target_modules` as a regex of exactly the adapted paths: a list
    /// of names would make peft also wrap the encoders' projections of those names.
    pub fn for_model(model: &crate::Gemma4, spec: &LoraSpec, seed: u64) -> Result<Self> {
        let mut towers: Vec<&Linear> = Vec::new();
        for t in &spec.towers {
            match (t.as_str(), &model.vision) {
                ("vision", Some(v)) => towers.extend(v.linears()),
                ("vision", None) => {
                    return Err(Error::invalid_argument(
                        "towers",
                        "`vision`: the vision encoder is not loaded (the data has no image)",
                    ))
                }
                ("audio", _) => match &model.audio {
                    Some(a) => towers.extend(a.linears()),
                    None => {
                        return Err(Error::invalid_argument(
                            "towers",
                            "`audio`: the audio encoder is not loaded (the data has no audio)",
                        ))
                    }
                },
                (other, _) => {
                    return Err(Error::invalid_argument(
                        "towers",
                        format!("`{other}`: the encoders are `vision` and `audio`"),
                    ))
                }
            }
        }
        let mut a = Self::build(&model.text, spec, &towers, seed)?;
        if model.config.vision.is_some() || model.config.audio.is_some() {
            let paths: Vec<String> = a
                .modules
                .iter()
                .filter(|m| !crate::lora::is_expert_param(&m.module))
                .map(|m| regex::escape(&m.module))
                .collect();
            a.config.target_modules = Some(serde_json::json!(paths.join("|")));
        }
        Ok(a)
    }

    /// A fresh adapter on `model`'s projections that `spec` targets, initialised as peft
    /// does from `seed`.
    pub fn new(model: &TextModel, spec: &LoraSpec, seed: u64) -> Result<Self> {
        if !spec.towers.is_empty() {
            return Err(Error::invalid_argument(
                "towers",
                "adapting the encoders needs the whole model (TrainableAdapter::for_model)",
            ));
        }
        Self::build(model, spec, &[], seed)
    }

    fn build(model: &TextModel, spec: &LoraSpec, towers: &[&Linear], seed: u64) -> Result<Self> {
        if spec.r == 0 {
            return Err(Error::invalid_argument("r", "the rank must be at least 1"));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let chosen = targeted(model, &spec.targets, towers)?;
        // peft records the module names it resolved (`all-linear` becomes the list), and
        // reads the list back.
        let mut names: Vec<String> = chosen
            .iter()
            .filter(|(_, _, n)| *n == 1)
            .map(|(m, _, _)| {
                let m = m.strip_suffix(".linear").unwrap_or(m);
                m.rsplit('.').next().unwrap_or(m).to_string()
            })
            .collect();
        names.sort();
        names.dedup();
        let mut params: Vec<String> = chosen
            .iter()
            .filter(|(_, _, n)| *n > 1)
            .filter_map(|(m, _, _)| m.rsplit('.').next())
            .map(|p| format!("experts.{p}"))
            .collect();
        params.sort();
        params.dedup();
        let mut config = AdapterConfig::new(spec.r, spec.alpha, spec.use_rslora, names);
        if !params.is_empty() {
            config.target_parameters = Some(params);
        }
        let scaling = config.scaling(spec.r, spec.alpha);
        let mut modules = Vec::new();
        for (module, (out, inp), n) in chosen {
            // peft's kaiming-uniform A (one `nn.Linear(in, r·E)` for fused experts).
            let bound = 1.0 / (inp as f64).sqrt();
            let rows = spec.r * n;
            let a: Vec<f32> = (0..rows * inp)
                .map(|_| rng.random_range(-bound..bound) as f32)
                .collect();
            let a = Var::from_tensor(&Tensor::from_vec(a, (rows, inp), &Device::Cpu)?)?;
            let b = Var::zeros((out, rows), DType::F32, &Device::Cpu)?;
            modules.push(TrainableModule {
                module,
                a,
                b,
                scaling,
                rank: spec.r,
            });
        }
        Ok(TrainableAdapter { config, modules })
    }

    /// An adapter read from files, to train further.
    pub fn from_adapter(adapter: &LoraAdapter) -> Result<Self> {
        let modules = adapter
            .modules
            .iter()
            .map(|m| {
                Ok(TrainableModule {
                    module: m.module.clone(),
                    a: Var::from_tensor(&m.a.to_dtype(DType::F32)?)?,
                    b: Var::from_tensor(&m.b.to_dtype(DType::F32)?)?,
                    scaling: m.scaling,
                    rank: m.rank,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TrainableAdapter {
            config: adapter.config.clone(),
            modules,
        })
    }

    /// The trained tensors, A then B of each module in order.
    pub fn vars(&self) -> Vec<Var> {
        self.modules
            .iter()
            .flat_map(|m| [m.a.clone(), m.b.clone()])
            .collect()
    }

    /// A [`LoraAdapter`] sharing these tensors (attached to a model, training updates are
    /// seen by its forward pass), named `name`.
    pub fn as_adapter(&self, name: &str) -> LoraAdapter {
        LoraAdapter {
            dir: name.into(),
            name: name.to_string(),
            config: self.config.clone(),
            modules: self
                .modules
                .iter()
                .map(|m| ModuleLora {
                    module: m.module.clone(),
                    a: m.a.as_tensor().clone(),
                    b: m.b.as_tensor().clone(),
                    scaling: m.scaling,
                    rank: m.rank,
                })
                .collect(),
        }
    }

    /// The peft key of module `module`'s A (`slot` "lora_A") or B, expert parameters
    /// named after peft's nested wrappers.
    pub fn key(&self, module: &str, slot: &str) -> String {
        format!(
            "base_model.model.{}.{slot}.weight",
            self.config.file_module(module)
        )
    }

    /// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` as peft does
    /// (f32, metadata `format: pt`), each atomically. `base` is recorded as the base model.
    pub fn save(&self, dir: &Path, base: Option<&str>) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut tensors = Vec::new();
        for m in &self.modules {
            tensors.push((self.key(&m.module, "lora_A"), m.a.as_tensor().clone()));
            tensors.push((self.key(&m.module, "lora_B"), m.b.as_tensor().clone()));
        }
        write_f32_safetensors(&dir.join("adapter_model.safetensors"), &tensors)?;
        let mut config = self.config.clone();
        config.base_model_name_or_path = base.map(str::to_string);
        config.write(&dir.join("adapter_config.json"))
    }
}

/// Writes f32 `tensors` to `path` as safetensors (metadata `format: pt`), atomically.
pub(crate) fn write_f32_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    use crate::loading::atomic;
    let data = tensors
        .iter()
        .map(|(name, t)| atomic::safetensors_bytes(&t.to_dtype(DType::F32)?, name))
        .collect::<Result<Vec<_>>>()?;
    let entries = tensors
        .iter()
        .zip(&data)
        .map(|((name, t), bytes)| {
            (
                name.as_str(),
                safetensors::Dtype::F32,
                t.dims().to_vec(),
                bytes.as_slice(),
            )
        })
        .collect();
    atomic::write_safetensors(path, entries)
}
