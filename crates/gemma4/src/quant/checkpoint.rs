//! `gemma4 quantize`: writes a checkpoint whose text-decoder projections are stored
//! block-quantized, so it loads without re-quantizing.
//!
//! The output directory holds `model.gguf` (every tensor of the source under its Hugging
//! Face name: the projections the [`crate::quant`] policy quantizes in their GGML format,
//! everything else byte for byte as stored) and a copy of the source's other files
//! (config, tokenizer, chat template, processor config). Which tensors are quantized is
//! decided by loading the text decoder with the scheme, so the file holds exactly what
//! `--quant` at load time would compute.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::QTensor;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::loading::gguf::{self, StoredType, TensorPlan};
use crate::loading::weights::{Checkpoint, ProgressFn, Weights};
use crate::model::text_prefix;
use crate::nn::linear::TensorSource;
use crate::quant::QuantType;
use crate::text::model::TextModel;

/// What [`quantize_checkpoint`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizeReport {
    pub tensors: usize,
    /// Tensors stored quantized, by format.
    pub quantized: BTreeMap<QuantType, usize>,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

fn is_weight_file(name: &str) -> bool {
    // Any GGUF (a llama.cpp file beside the config too): the output's model.gguf replaces it.
    name.ends_with(".safetensors")
        || name == "model.safetensors.index.json"
        || name.to_ascii_lowercase().ends_with(".gguf")
}

/// Quantizes checkpoint `dir` to `q` into directory `out` (created; a `model.gguf` there is
/// replaced). `progress` sees the bytes read while the decoder is quantized.
pub fn quantize_checkpoint(
    dir: &Path,
    out: &Path,
    q: QuantType,
    progress: Option<ProgressFn>,
) -> Result<QuantizeReport> {
    if dir.join("model.gguf").exists() {
        return Err(Error::invalid_argument(
            "model",
            format!(
                "{} is already a quantized checkpoint (model.gguf)",
                dir.display()
            ),
        ));
    }
    if out.exists() && std::fs::canonicalize(out).ok() == std::fs::canonicalize(dir).ok() {
        return Err(Error::invalid_argument(
            "out",
            "must be another directory than --model",
        ));
    }
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let mut ckpt = Checkpoint::open(dir)?;
    let prefix = text_prefix(config.architecture);
    if let Some(p) = progress {
        ckpt.set_progress(ckpt.bytes_under(prefix), p);
    }
    let w = Weights::new(
        &ckpt,
        prefix,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .with_quant(Some(q))
    .keeping_ggml_layout();
    let model = TextModel::new(&config.text, &w)?;
    // The projections the scheme quantized (not those stored quantized already), by
    // tensor, an expert stack's matrices in order.
    let mut parts: BTreeMap<&TensorSource, Arc<QTensor>> = BTreeMap::new();
    for l in model.linears() {
        if let (Some(qt), Some(src)) = (l.weight().as_ggml(), l.source()) {
            if !matches!(ckpt.stored_type(&src.name)?, StoredType::Quant(_)) {
                parts.insert(src, qt.clone());
            }
        }
    }
    let mut recorded: HashMap<&str, Vec<Arc<QTensor>>> = HashMap::new();
    for (src, qt) in parts {
        recorded.entry(src.name.as_str()).or_default().push(qt);
    }

    let mut names: Vec<&str> = ckpt.tensor_names().collect();
    names.sort();
    let mut report = QuantizeReport {
        tensors: names.len(),
        quantized: BTreeMap::new(),
        bytes_in: 0,
        bytes_out: 0,
    };
    let mut plan = Vec::with_capacity(names.len());
    for &name in &names {
        let shape = ckpt.shape(name).expect("listed").to_vec();
        let stored = ckpt.stored_type(name)?;
        report.bytes_in += ckpt.raw_bytes(name)?.len() as u64;
        let ty = match recorded.get(name) {
            Some(parts) => {
                let t = QuantType::from_ggml(parts[0].dtype()).expect("recorded formats");
                *report.quantized.entry(t).or_default() += 1;
                StoredType::Quant(t)
            }
            None => stored,
        };
        report.bytes_out += ty.size_of(shape.iter().product()).unwrap_or(0) as u64;
        plan.push(TensorPlan {
            name: name.to_string(),
            shape,
            ty,
        });
    }

    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let path = out.join("model.gguf");
    let mut f =
        std::io::BufWriter::new(std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?);
    let meta = [
        ("general.architecture", "gemma4-hf"),
        ("gemma4.tensor_names", "huggingface"),
        ("gemma4.quantization", q.name()),
    ];
    gguf::write(
        &mut f,
        &meta,
        &plan,
        |i| match recorded.get(plan[i].name.as_str()) {
            Some(parts) => {
                let mut bytes = Vec::new();
                for p in parts {
                    bytes.extend_from_slice(&p.data()?);
                }
                Ok(bytes)
            }
            None => Ok(ckpt.raw_bytes(&plan[i].name)?.to_vec()),
        },
        &path,
    )?;
    std::io::Write::flush(&mut f).map_err(|e| Error::io(&path, e))?;

    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().is_file() && !is_weight_file(&name) {
            let to = out.join(&name);
            std::fs::copy(entry.path(), &to).map_err(|e| Error::io(&to, e))?;
        }
    }
    Ok(report)
}
