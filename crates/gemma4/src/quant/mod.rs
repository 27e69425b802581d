//! Block-quantized weights in GGML's formats (Q8_0, Q4_0, Q5_0, Q4_K, Q6_K), the same bytes
//! llama.cpp stores in GGUF files, with candle's CPU kernels (which quantize the activation
//! row to 8 bits and take integer dot products, as llama.cpp does).
//!
//! Which tensors are quantized is a policy of the text decoder ([`QuantType::for_matrix`],
//! [`QuantType::embedding_type`]): its projections take the chosen format; the tied
//! embedding / LM head takes Q8_0 under `q8_0` and Q6_K under the 4- and 6-bit formats
//! (llama.cpp's choice for `output.weight`, which keeps the logits close); norms, scalars,
//! the MoE router, the per-layer embedding table and the vision and audio towers stay at
//! the compute dtype.

pub mod checkpoint;

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// A weight format for the text decoder's projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QuantType {
    /// 8-bit, blocks of 32 with an f16 scale (8.5 bits per weight).
    Q8_0,
    /// 4-bit, blocks of 32 with an f16 scale (4.5 bits per weight).
    Q4_0,
    /// 5-bit, blocks of 32 with an f16 scale (5.5 bits per weight). What llama-quantize
    /// falls back to in Q4_K(_M) files for rows that do not fill a 256-wide super-block
    /// (the 26B-A4B's 704-wide expert and 2112-wide MLP down projections).
    Q5_0,
    /// 4-bit k-quant, super-blocks of 256 with 6-bit sub-block scales and mins (4.5 bpw).
    Q4K,
    /// 6-bit k-quant, super-blocks of 256 with 8-bit sub-block scales (6.56 bpw).
    Q6K,
}

impl QuantType {
    pub const ALL: [QuantType; 5] = [
        QuantType::Q8_0,
        QuantType::Q4_0,
        QuantType::Q5_0,
        QuantType::Q4K,
        QuantType::Q6K,
    ];

    pub fn name(self) -> &'static str {
        match self {
            QuantType::Q8_0 => "q8_0",
            QuantType::Q4_0 => "q4_0",
            QuantType::Q5_0 => "q5_0",
            QuantType::Q4K => "q4_k",
            QuantType::Q6K => "q6_k",
        }
    }

    pub fn ggml(self) -> GgmlDType {
        match self {
            QuantType::Q8_0 => GgmlDType::Q8_0,
            QuantType::Q4_0 => GgmlDType::Q4_0,
            QuantType::Q5_0 => GgmlDType::Q5_0,
            QuantType::Q4K => GgmlDType::Q4K,
            QuantType::Q6K => GgmlDType::Q6K,
        }
    }

    pub fn from_ggml(t: GgmlDType) -> Option<Self> {
        QuantType::ALL.into_iter().find(|q| q.ggml() == t)
    }

    /// Elements per block: rows must be a multiple of this.
    pub fn block_size(self) -> usize {
        self.ggml().block_size()
    }

    /// The format a `[out, in]` projection gets under this scheme: this one when `in` is a
    /// multiple of its block, else Q8_0 when `in` is a multiple of 32 (llama.cpp falls back
    /// the same way for rows that do not fill a k-quant super-block, though to Q5_0/Q8_0),
    /// else none (the matrix stays at the compute dtype).
    pub fn for_matrix(self, in_dim: usize) -> Option<QuantType> {
        [self, QuantType::Q8_0]
            .into_iter()
            .find(|q| in_dim > 0 && in_dim.is_multiple_of(q.block_size()))
    }

    /// The format of the tied embedding / LM head under this scheme.
    pub fn embedding_type(self) -> QuantType {
        match self {
            QuantType::Q8_0 => QuantType::Q8_0,
            _ => QuantType::Q6K,
        }
    }
}

impl fmt::Display for QuantType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for QuantType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let norm = s.to_ascii_lowercase().replace('-', "_");
        QuantType::ALL
            .into_iter()
            .find(|q| q.name() == norm || q.name().replace('_', "") == norm)
            .ok_or_else(|| {
                Error::invalid_argument(
                    "quant",
                    format!(
                        "`{s}` is not a known format; expected one of {}",
                        QuantType::ALL.map(QuantType::name).join(", ")
                    ),
                )
            })
    }
}

/// Rows quantized per parallel task: enough work to amortise the task, few enough that
/// both cores stay busy on the smallest projections.
const ROWS_PER_TASK: usize = 64;

/// Quantizes a 2-D `[rows, cols]` tensor to `q`, rows in parallel. `cols` must be a
/// multiple of the block size (see [`QuantType::for_matrix`]).
pub fn quantize(t: &Tensor, q: QuantType) -> Result<QTensor> {
    let (rows, cols) = t.dims2()?;
    if !cols.is_multiple_of(q.block_size()) {
        return Err(Error::invalid_argument(
            "quant",
            format!(
                "a row of {cols} values is not a whole number of {q} blocks ({})",
                q.block_size()
            ),
        ));
    }
    // candle's `QTensor::quantize` reads its source's storage from the start, whatever the
    // view's offset, so every chunk gets a tensor of its own.
    let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let parts = values
        .par_chunks(ROWS_PER_TASK * cols)
        .map(|chunk| -> Result<Vec<u8>> {
            let part = Tensor::from_slice(chunk, (chunk.len() / cols, cols), &Device::Cpu)?;
            Ok(QTensor::quantize(&part, q.ggml())?.data()?.into_owned())
        })
        .collect::<Result<Vec<_>>>()?;
    // Quantized rows are whole blocks laid end to end, so the parts concatenate.
    let bytes: Vec<u8> = parts.concat();
    from_bytes(Cow::Owned(bytes), q, rows, cols, &Device::Cpu)
}

/// A `[rows, cols]` quantized tensor over GGML-layout `bytes`.
pub fn from_bytes(
    bytes: Cow<'_, [u8]>,
    q: QuantType,
    rows: usize,
    cols: usize,
    device: &Device,
) -> Result<QTensor> {
    let expected = rows * cols / q.block_size() * q.ggml().type_size();
    if bytes.len() != expected || !cols.is_multiple_of(q.block_size()) {
        return Err(Error::invalid_argument(
            "quant",
            format!(
                "{} bytes do not hold a [{rows}, {cols}] {q} tensor ({expected} expected)",
                bytes.len()
            ),
        ));
    }
    // candle views the bytes as blocks in place, which needs their alignment (f16 fields);
    // a file's offsets need not give it, so misaligned bytes are copied first.
    let aligned: Vec<u64>;
    let bytes = if (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<u64>()) {
        bytes
    } else {
        aligned = bytes
            .chunks(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b[..c.len()].copy_from_slice(c);
                u64::from_ne_bytes(b)
            })
            .collect();
        // SAFETY: the u64s' bytes, as many as were copied in; u8 has no alignment.
        Cow::Borrowed(unsafe {
            std::slice::from_raw_parts(aligned.as_ptr() as *const u8, bytes.len())
        })
    };
    let storage = QStorage::from_data(bytes, device, q.ggml())?;
    Ok(QTensor::new(storage, (rows, cols))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rows: usize, cols: usize) -> Tensor {
        // Deterministic values with a spread of magnitudes per row.
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1009) as f32 / 1009.0 - 0.5) * (1.0 + (i % 13) as f32))
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    /// Blocks at an odd address (a GGUF file with `general.alignment = 1`): copied, not
    /// viewed in place (candle asserts the blocks' alignment).
    #[test]
    fn misaligned_bytes_are_copied() {
        let q = quantize(&sample(2, 64), QuantType::Q8_0).unwrap();
        let bytes = q.data().unwrap().to_vec();
        // A 2-byte-aligned buffer, its bytes from the second one on: an odd address.
        let mut buf = vec![0u16; bytes.len() / 2 + 1];
        // SAFETY: the u16s' own bytes.
        let raw =
            unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut u8, buf.len() * 2) };
        raw[1..=bytes.len()].copy_from_slice(&bytes);
        let odd = &raw[1..=bytes.len()];
        assert_eq!(odd.as_ptr() as usize % 2, 1);
        assert_eq!(roundtrip(odd, &q), roundtrip(&bytes, &q));
    }

    fn roundtrip(bytes: &[u8], like: &QTensor) -> Vec<f32> {
        let (rows, cols) = like.shape().dims2().unwrap();
        from_bytes(
            Cow::Borrowed(bytes),
            QuantType::Q8_0,
            rows,
            cols,
            &Device::Cpu,
        )
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
    }

    #[test]
    fn names_parse_and_round_trip() {
        for q in QuantType::ALL {
            assert_eq!(q.name().parse::<QuantType>().unwrap(), q);
            assert_eq!(QuantType::from_ggml(q.ggml()), Some(q));
        }
        assert_eq!("Q4_K".parse::<QuantType>().unwrap(), QuantType::Q4K);
        assert_eq!("q4k".parse::<QuantType>().unwrap(), QuantType::Q4K);
        let err = "q3_k".parse::<QuantType>().unwrap_err().to_string();
        assert!(err.contains("q3_k") && err.contains("q8_0"), "{err}");
    }

    #[test]
    fn fallback_by_row_width() {
        assert_eq!(QuantType::Q4K.for_matrix(1536), Some(QuantType::Q4K));
        assert_eq!(QuantType::Q4K.for_matrix(96), Some(QuantType::Q8_0));
        assert_eq!(QuantType::Q4_0.for_matrix(96), Some(QuantType::Q4_0));
        assert_eq!(QuantType::Q6K.for_matrix(16), None);
        assert_eq!(QuantType::Q8_0.for_matrix(0), None);
    }

    /// Parallel quantization is byte-identical to quantizing the whole tensor at once, and
    /// the round trip error is within each format's step.
    #[test]
    fn parallel_quantization_matches_whole_and_round_trips() {
        let t = sample(200, 512);
        for q in QuantType::ALL {
            let par = quantize(&t, q).unwrap();
            let whole = QTensor::quantize(&t, q.ggml()).unwrap();
            assert_eq!(par.data().unwrap(), whole.data().unwrap(), "{q}");
            let back = par.dequantize(&Device::Cpu).unwrap();
            let err = (back - &t)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            // |t| ≤ 6.5; 4-bit steps are max/8 (Q4_0) or finer, 5-bit max/16, 8-bit max/127.
            let bound = match q {
                QuantType::Q8_0 => 6.5 / 127.0,
                QuantType::Q5_0 => 6.5 / 15.0,
                QuantType::Q6K => 6.5 / 31.0,
                _ => 6.5 / 7.0,
            };
            assert!(err <= bound, "{q}: round trip error {err} > {bound}");
        }
    }

    #[test]
    fn bad_widths_and_sizes_are_errors() {
        let t = sample(4, 48);
        let err = quantize(&t, QuantType::Q4K).unwrap_err().to_string();
        assert!(err.contains("48") && err.contains("q4_k"), "{err}");
        let err = from_bytes(
            Cow::Owned(vec![0u8; 10]),
            QuantType::Q8_0,
            2,
            32,
            &Device::Cpu,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("68 expected"), "{err}");
    }
}
