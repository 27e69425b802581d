//! Writing files so that a reader never sees half of one: the bytes go to a temporary file
//! beside the target, which is renamed over it once complete (a rename within one
//! directory is atomic), so an interrupted write leaves the previous file intact.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The temporary name [`commit`] renames to `path`.
pub(crate) fn temporary(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
}

/// Renames `temporary(path)` over `path` (after flushing it to disk).
pub(crate) fn commit(path: &Path) -> Result<()> {
    let tmp = temporary(path);
    let sync = std::fs::File::open(&tmp).and_then(|f| f.sync_all());
    sync.and_then(|_| std::fs::rename(&tmp, path)).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Writes `bytes` to `path` atomically.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temporary(path);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    commit(path)
}

/// safetensors' name for `dtype`, among those this engine writes (f32, f16, bf16).
pub(crate) fn safetensors_dtype(dtype: candle_core::DType) -> Option<safetensors::Dtype> {
    use candle_core::DType;
    match dtype {
        DType::F32 => Some(safetensors::Dtype::F32),
        DType::F16 => Some(safetensors::Dtype::F16),
        DType::BF16 => Some(safetensors::Dtype::BF16),
        _ => None,
    }
}

/// `t`'s elements as the little-endian bytes a safetensors file stores (f32, f16 or bf16;
/// `name` names it in the error for any other dtype).
pub(crate) fn safetensors_bytes(t: &candle_core::Tensor, name: &str) -> Result<Vec<u8>> {
    use candle_core::DType;
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => flat
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F16 => flat
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        other => {
            return Err(Error::invalid_argument(
                "dtype",
                format!(
                    "tensor `{name}` is {other:?}; safetensors are written in f32, f16 or bf16"
                ),
            ))
        }
    })
}

/// One tensor to write: name, dtype, shape and its bytes.
pub(crate) type TensorBytes<'a> = (&'a str, safetensors::Dtype, Vec<usize>, &'a [u8]);

/// Writes `tensors` to `path` as a safetensors file with the `format: pt` metadata
/// transformers and peft write, atomically.
pub(crate) fn write_safetensors(path: &Path, tensors: Vec<TensorBytes<'_>>) -> Result<()> {
    let views = tensors
        .into_iter()
        .map(|(name, dtype, shape, bytes)| {
            safetensors::tensor::TensorView::new(dtype, shape, bytes)
                .map(|v| (name, v))
                .map_err(|e| Error::Safetensors {
                    path: path.to_path_buf(),
                    message: format!("tensor `{name}`: {e}"),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let tmp = temporary(path);
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    safetensors::tensor::serialize_to_file(views, metadata, &tmp).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::Safetensors {
            path: tmp.clone(),
            message: e.to_string(),
        }
    })?;
    commit(path)
}
