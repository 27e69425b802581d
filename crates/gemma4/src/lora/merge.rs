//! Merging adapters into a checkpoint's weights: `W + Σ scaling · B A` for every patched
//! projection, as peft's `merge_and_unload` computes it (the update in f32, the sum
//! rounded to the weight's stored dtype), written as a checkpoint of the same layout.
//!
//! The source must be a safetensors checkpoint (merging into GGML blocks would round the
//! update away); quantize the merged checkpoint afterwards (`gemma4 quantize`). Each shard
//! is rewritten on its own, so memory holds one shard's merged tensors at a time, and each
//! is written atomically.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device};

use super::{canonical, unmatched, LoraAdapter, LoraDelta, PEFT_PREFIX};
use crate::error::{Error, Result};
use crate::loading::atomic;
use crate::loading::gguf::StoredType;
use crate::loading::weights::Checkpoint;

/// What [`merge`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeReport {
    /// Weights changed (one per patched projection or fused expert parameter, whatever the
    /// number of adapters).
    pub patched: usize,
    /// Tensors written in all.
    pub tensors: usize,
    /// Files written or copied into the output directory.
    pub files: Vec<String>,
}

/// Writes checkpoint `model_dir` with `adapters` merged into its weights to `out_dir`
/// (created if missing; must not be `model_dir`). Every other file of the directory
/// (config, tokenizer, chat template, shard index) is copied as it is. Tensors keep their
/// stored dtype, or all take `dtype` when given (f32: the merged weights unrounded).
/// `progress` sees the tensors done and the total.
pub fn merge(
    model_dir: &Path,
    adapters: &[LoraAdapter],
    out_dir: &Path,
    dtype: Option<DType>,
    progress: &dyn Fn(usize, usize),
) -> Result<MergeReport> {
    if let Some(d) = dtype.filter(|&d| atomic::safetensors_dtype(d).is_none()) {
        return Err(Error::invalid_argument(
            "dtype",
            format!("{d:?}: merged weights are written as f32, f16 or bf16"),
        ));
    }
    let ckpt = Checkpoint::open(model_dir)?;
    if ckpt.is_gguf() {
        return Err(Error::invalid_argument(
            "model",
            format!(
                "{}: adapters merge into a safetensors checkpoint (the GGUF's blocks would \
                 round the update away); merge into the original weights, then quantize",
                model_dir.display()
            ),
        ));
    }
    if out_dir.exists()
        && std::fs::canonicalize(out_dir).ok() == std::fs::canonicalize(model_dir).ok()
    {
        return Err(Error::invalid_argument(
            "out",
            "is the model directory: write the merged checkpoint somewhere else",
        ));
    }
    // Weight name by canonical module path (fused expert parameters by their own path).
    let weights: HashMap<String, &str> = ckpt
        .tensor_names()
        .filter_map(|n| match n.strip_suffix(".weight") {
            Some(module) => (!super::is_embedding(module)).then(|| (canonical(module), n)),
            None => super::is_expert_param(n).then(|| (canonical(n), n)),
        })
        .collect();
    let mut updates: HashMap<&str, Vec<LoraDelta>> = HashMap::new();
    for adapter in adapters {
        for m in &adapter.modules {
            let name = *weights
                .get(&canonical(&m.module))
                .ok_or_else(|| unmatched(adapter, &m.module))?;
            let shape = ckpt.shape(name).unwrap_or_default();
            let label = format!("{PEFT_PREFIX}{}", adapter.config.file_module(&m.module));
            let (a, b) = (m.a.clone(), m.b.clone());
            match (shape, m.is_experts()) {
                ([o, i], false) => updates.entry(name).or_default().push(LoraDelta::new(
                    0,
                    a,
                    b,
                    m.scaling,
                    (*o, *i),
                    &label,
                )?),
                ([n, o, i], true) => {
                    for e in 0..*n {
                        let d = LoraDelta::expert(
                            0,
                            a.clone(),
                            b.clone(),
                            m.scaling,
                            (e, *n),
                            (*o, *i),
                            &label,
                        )?;
                        updates.entry(name).or_default().push(d);
                    }
                }
                _ => return Err(unmatched(adapter, &m.module)),
            }
        }
    }

    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let mut by_file: BTreeMap<&Path, Vec<&str>> = BTreeMap::new();
    for name in ckpt.tensor_names() {
        by_file
            .entry(ckpt.file_of(name).expect("listed tensor"))
            .or_default()
            .push(name);
    }
    let total: usize = by_file.values().map(Vec::len).sum();
    let mut done = 0;
    let mut files = Vec::new();
    for (file, mut names) in by_file {
        names.sort_unstable();
        let mut rewritten: HashMap<&str, (DType, Vec<u8>)> = HashMap::new();
        for &name in &names {
            let StoredType::Dense(stored) = ckpt.stored_type(name)? else {
                return Err(Error::invalid_argument(
                    "model",
                    format!("tensor `{name}` is block-quantized: merge into the original weights"),
                ));
            };
            let target = dtype.unwrap_or(stored);
            let deltas = updates.get(name).map(Vec::as_slice).unwrap_or_default();
            if !deltas.is_empty() || target != stored {
                let merged = merged(&ckpt, name, deltas)?.to_dtype(target)?;
                rewritten.insert(name, (target, atomic::safetensors_bytes(&merged, name)?));
            }
        }
        let mut tensors = Vec::with_capacity(names.len());
        for &name in &names {
            let (written, bytes) = match rewritten.get(name) {
                Some((d, b)) => (*d, b.as_slice()),
                None => match ckpt.stored_type(name)? {
                    StoredType::Dense(d) => (d, ckpt.raw_bytes(name)?),
                    StoredType::Quant(_) => unreachable!("refused above"),
                },
            };
            let st = atomic::safetensors_dtype(written).ok_or_else(|| {
                Error::invalid_argument(
                    "model",
                    format!(
                        "tensor `{name}` is stored as {written:?}, which merging does not write"
                    ),
                )
            })?;
            let shape = ckpt.shape(name).unwrap_or_default().to_vec();
            tensors.push((name, st, shape, bytes));
        }
        let file_name = file.file_name().unwrap_or_default();
        atomic::write_safetensors(&out_dir.join(file_name), tensors)?;
        files.push(file_name.to_string_lossy().into_owned());
        done += names.len();
        progress(done, total);
    }
    // Everything else the checkpoint directory holds (config, tokenizer, template, index).
    let entries = std::fs::read_dir(model_dir).map_err(|e| Error::io(model_dir, e))?;
    let mut others = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(model_dir, e))?.path();
        let is_weights = path.extension().is_some_and(|x| x == "safetensors");
        if path.is_file() && !is_weights {
            others.push(path);
        }
    }
    others.sort();
    for path in others {
        let name = path.file_name().unwrap_or_default();
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        atomic::write_atomic(&out_dir.join(name), &bytes)?;
        files.push(name.to_string_lossy().into_owned());
    }
    Ok(MergeReport {
        patched: updates.len(),
        tensors: total,
        files,
    })
}

/// `name`'s weight plus every delta, in f32 (a fused expert parameter's deltas each go to
/// their expert's matrix).
fn merged(ckpt: &Checkpoint, name: &str, deltas: &[LoraDelta]) -> Result<candle_core::Tensor> {
    let shape = ckpt.shape(name).unwrap_or_default().to_vec();
    let w = ckpt.load(name, &shape, DType::F32, &Device::Cpu)?;
    if shape.len() == 3 {
        let mut experts = (0..shape[0])
            .map(|e| w.get(e))
            .collect::<candle_core::Result<Vec<_>>>()?;
        for d in deltas {
            if let Some(e) = d.expert_index() {
                experts[e] = (&experts[e] + d.dense()?)?;
            }
        }
        return Ok(candle_core::Tensor::stack(&experts, 0)?);
    }
    let mut w = w;
    for d in deltas {
        w = (w + d.dense()?)?;
    }
    Ok(w)
}
