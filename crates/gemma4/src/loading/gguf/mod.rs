//! The GGUF container (llama.cpp's file format) for quantized checkpoints: reading the
//! header through candle's parser, and a streaming writer that emits one tensor at a time
//! so a checkpoint larger than memory can be written.
//!
//! Layout (GGUF v3): magic, version, tensor count, metadata count, the metadata key/value
//! pairs, per tensor its name, dims (innermost first), type id and data offset, padding to
//! `general.alignment` (32), then the data, each tensor padded to the alignment.

pub mod metadata;
pub mod names;
mod reader;

use std::collections::HashMap;
use std::io::{Seek, Write};
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::quantized::GgmlDType;

use candle_core::DType;

use crate::error::{Error, Result};
use crate::quant::QuantType;

const ALIGNMENT: u64 = reader::DEFAULT_ALIGNMENT;

/// How a tensor's elements are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredType {
    Dense(DType),
    Quant(QuantType),
}

impl StoredType {
    /// GGML's type id.
    fn type_id(self) -> Option<u32> {
        Some(match self {
            StoredType::Dense(DType::F32) => 0,
            StoredType::Dense(DType::F16) => 1,
            StoredType::Dense(DType::BF16) => 30,
            StoredType::Quant(QuantType::Q4_0) => 2,
            StoredType::Quant(QuantType::Q5_0) => 6,
            StoredType::Quant(QuantType::Q8_0) => 8,
            StoredType::Quant(QuantType::Q4K) => 12,
            StoredType::Quant(QuantType::Q6K) => 14,
            StoredType::Dense(_) => return None,
        })
    }

    /// The type of GGML's type id, where this engine reads it.
    fn from_type_id(id: u32) -> Option<Self> {
        let dense = [DType::F32, DType::F16, DType::BF16].map(StoredType::Dense);
        dense
            .into_iter()
            .chain(QuantType::ALL.into_iter().map(StoredType::Quant))
            .find(|t| t.type_id() == Some(id))
    }

    pub fn from_ggml(t: GgmlDType) -> Option<Self> {
        match t {
            GgmlDType::F32 => Some(StoredType::Dense(DType::F32)),
            GgmlDType::F16 => Some(StoredType::Dense(DType::F16)),
            GgmlDType::BF16 => Some(StoredType::Dense(DType::BF16)),
            q => QuantType::from_ggml(q).map(StoredType::Quant),
        }
    }

    /// Bytes of `elems` elements (a whole number of blocks for quantized types); `None`
    /// when that overflows.
    pub fn size_of(self, elems: usize) -> Option<usize> {
        match self {
            StoredType::Dense(d) => elems.checked_mul(d.size_in_bytes()),
            StoredType::Quant(q) => (elems / q.block_size()).checked_mul(q.ggml().type_size()),
        }
    }
}

/// One tensor of a GGUF file: its type, row-major shape and byte range in the file.
#[derive(Debug, Clone)]
pub struct GgufTensor {
    pub ty: StoredType,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

/// The header of a GGUF file: string metadata and the tensors' places.
pub struct GgufHeader {
    pub metadata: HashMap<String, gguf_file::Value>,
    pub tensors: HashMap<String, GgufTensor>,
}

/// Reads the header of the GGUF file `path`, whose whole contents are `bytes` (mapped),
/// checking every tensor lies inside the file, apart from the others, and has a type this
/// engine reads (see `reader`).
pub fn read_header(path: &Path, bytes: &[u8]) -> Result<GgufHeader> {
    let raw = reader::parse(bytes).map_err(|message| Error::Gguf {
        path: path.to_path_buf(),
        message,
    })?;
    let tensors = raw
        .tensors
        .into_iter()
        .map(|t| {
            let entry = GgufTensor {
                ty: t.ty,
                shape: t.shape,
                start: t.start,
                end: t.end,
            };
            (t.name, entry)
        })
        .collect();
    Ok(GgufHeader {
        metadata: raw.metadata,
        tensors,
    })
}

/// A tensor to be written: name, row-major shape and type; its bytes come later.
#[derive(Debug, Clone)]
pub struct TensorPlan {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: StoredType,
}

fn write_str<W: Write>(w: &mut W, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn pad<W: Write + Seek>(w: &mut W) -> std::io::Result<()> {
    let pos = w.stream_position()?;
    let n = (ALIGNMENT - pos % ALIGNMENT) % ALIGNMENT;
    w.write_all(&vec![0u8; n as usize])
}

/// Writes a GGUF v3 file: string metadata `meta`, the tensors of `plan` in order, each
/// tensor's bytes asked of `data(i)` only when it is written.
pub fn write<W: Write + Seek>(
    w: &mut W,
    meta: &[(&str, &str)],
    plan: &[TensorPlan],
    mut data: impl FnMut(usize) -> Result<Vec<u8>>,
    path: &Path,
) -> Result<()> {
    let io = |e: std::io::Error| Error::io(path, e);
    w.write_all(b"GGUF").map_err(io)?;
    w.write_all(&3u32.to_le_bytes()).map_err(io)?;
    w.write_all(&(plan.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&(meta.len() as u64).to_le_bytes())
        .map_err(io)?;
    for (k, v) in meta {
        write_str(w, k).map_err(io)?;
        w.write_all(&8u32.to_le_bytes()).map_err(io)?; // string
        write_str(w, v).map_err(io)?;
    }
    let mut offset = 0u64;
    let mut sizes = Vec::with_capacity(plan.len());
    for t in plan {
        let id = t.ty.type_id().ok_or_else(|| {
            Error::invalid_argument(
                "tensor",
                format!("`{}`: {:?} cannot be stored in GGUF", t.name, t.ty),
            )
        })?;
        write_str(w, &t.name).map_err(io)?;
        w.write_all(&(t.shape.len() as u32).to_le_bytes())
            .map_err(io)?;
        for &d in t.shape.iter().rev() {
            w.write_all(&(d as u64).to_le_bytes()).map_err(io)?;
        }
        w.write_all(&id.to_le_bytes()).map_err(io)?;
        w.write_all(&offset.to_le_bytes()).map_err(io)?;
        let size =
            t.ty.size_of(t.shape.iter().product()).ok_or_else(|| {
                Error::invalid_argument("tensor", format!("`{}`: too large", t.name))
            })? as u64;
        sizes.push(size);
        offset += size.div_ceil(ALIGNMENT) * ALIGNMENT;
    }
    pad(w).map_err(io)?;
    for (i, t) in plan.iter().enumerate() {
        let bytes = data(i)?;
        if bytes.len() as u64 != sizes[i] {
            return Err(Error::invalid_argument(
                "tensor",
                format!(
                    "`{}`: {} bytes given, {} planned",
                    t.name,
                    bytes.len(),
                    sizes[i]
                ),
            ));
        }
        w.write_all(&bytes).map_err(io)?;
        pad(w).map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_files_read_back() {
        let dir = std::env::temp_dir().join(format!("gemma4-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.gguf");
        let plan = vec![
            TensorPlan {
                name: "a.weight".into(),
                shape: vec![3, 64],
                ty: StoredType::Quant(QuantType::Q8_0),
            },
            TensorPlan {
                name: "b".into(),
                shape: vec![5],
                ty: StoredType::Dense(DType::BF16),
            },
        ];
        let payload = |i: usize| {
            vec![i as u8 + 1; plan[i].ty.size_of(plan[i].shape.iter().product()).unwrap()]
        };
        let mut f = std::fs::File::create(&path).unwrap();
        write(
            &mut f,
            &[("general.architecture", "gemma4")],
            &plan,
            |i| Ok(payload(i)),
            &path,
        )
        .unwrap();
        drop(f);
        let bytes = std::fs::read(&path).unwrap();
        let h = read_header(&path, &bytes).unwrap();
        assert_eq!(
            h.metadata["general.architecture"].to_string().unwrap(),
            "gemma4"
        );
        for (i, p) in plan.iter().enumerate() {
            let t = &h.tensors[&p.name];
            assert_eq!((t.ty, t.shape.clone()), (p.ty, p.shape.clone()));
            assert_eq!(&bytes[t.start..t.end], payload(i).as_slice());
            assert_eq!(t.start % 32, 0);
        }
        // Truncation is caught from the header.
        std::fs::write(&path, &bytes[..bytes.len() - 40]).unwrap();
        let err = read_header(&path, &bytes[..bytes.len() - 40])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("truncated") && err.contains("b"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
