//! Parsing a GGUF header from the file's mapped bytes, as llama.cpp's `gguf_init` checks
//! it: every count, length, dimension, offset and size is checked against the bytes
//! actually there, with checked arithmetic, before anything is allocated for it. A hostile
//! file gets an error naming the field or tensor, never a panic, a wrapped offset or an
//! allocation its header merely claims.
//!
//! Refused, beyond a short or malformed header: versions other than 2 and 3, a
//! `general.alignment` that is not a power of two, a tensor with more than four
//! dimensions, a size that overflows, a data offset not a multiple of the alignment, a
//! byte range past the end of the file, two tensors whose bytes overlap, and a name given
//! twice.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

use super::StoredType;
use crate::error::printable as shown;

/// GGML's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;
/// Arrays nest at most this deep (GGUF files use one level).
const MAX_DEPTH: usize = 4;
/// The alignment when `general.alignment` is absent.
pub(super) const DEFAULT_ALIGNMENT: u64 = 32;

/// A tensor as the header describes it.
pub(super) struct RawTensor {
    pub name: String,
    pub ty: StoredType,
    /// Row-major (outermost first).
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

pub(super) struct RawHeader {
    pub metadata: HashMap<String, Value>,
    pub tensors: Vec<RawTensor>,
}

/// The bytes of the file, read front to back; every read checked against what is left.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn left(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8], String> {
        match usize::try_from(n) {
            Ok(n) if n <= self.left() => {
                let b = &self.bytes[self.pos..self.pos + n];
                self.pos += n;
                Ok(b)
            }
            _ => Err(format!(
                "{} needs {n} bytes at byte {}, but the file has {} left: truncated?",
                what(),
                self.pos,
                self.left()
            )),
        }
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], String> {
        let b = self.take(N as u64, what)?;
        Ok(b.try_into().expect("took N bytes"))
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, String> {
        let n = self.u64(what)?;
        let b = self.take(n, what)?;
        Ok(String::from_utf8_lossy(b).into_owned())
    }

    /// A count of items of at least `min_size` bytes each, refused when the bytes left
    /// cannot hold that many (so no allocation follows a count the file does not back).
    fn count(&mut self, min_size: u64, what: &dyn Fn() -> String) -> Result<usize, String> {
        let n = self.u64(what)?;
        match n.checked_mul(min_size) {
            Some(b) if b <= self.left() as u64 => Ok(n as usize),
            _ => Err(format!(
                "{} claims {n} entries at byte {}, more than the {} bytes left hold",
                what(),
                self.pos,
                self.left()
            )),
        }
    }

    fn value(&mut self, ty: u32, depth: usize, what: &dyn Fn() -> String) -> Result<Value, String> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(self.array::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("{} is a bool of value {b}", what())),
            },
            8 => Value::String(self.string(what)?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(format!("{} nests arrays deeper than {MAX_DEPTH}", what()));
                }
                let elem = self.u32(what)?;
                let n = self.count(min_value_size(elem), what)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1, what)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            t => return Err(format!("{} has unknown value type {t}", what())),
        })
    }
}

/// The fewest bytes a value of type `ty` takes (an unknown type fails when read).
fn min_value_size(ty: u32) -> u64 {
    match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => 1,
    }
}

/// Parses the header of a GGUF file whose whole contents are `bytes`.
pub(super) fn parse(bytes: &[u8]) -> Result<RawHeader, String> {
    let mut c = Cursor { bytes, pos: 0 };
    let fixed = |s: &'static str| move || s.to_string();
    if c.take(4, &fixed("the magic"))? != b"GGUF" {
        return Err("the file does not start with `GGUF`".into());
    }
    let version = c.u32(&fixed("the version"))?;
    if !(2..=3).contains(&version) {
        return Err(format!("GGUF version {version} (2 and 3 are read)"));
    }
    // A tensor description takes at least 8 + 4 + 8 + 4 + 8 bytes, a key/value pair 8 + 4 + 1.
    let n_tensors = c.count(32, &fixed("the tensor count"))?;
    let n_kv = c.count(13, &fixed("the metadata count"))?;
    let mut metadata = HashMap::with_capacity(n_kv);
    for i in 0..n_kv {
        let key = c.string(&|| format!("metadata key {i}"))?;
        let what = || format!("metadata `{}`", shown(&key));
        let ty = c.u32(&what)?;
        let value = c.value(ty, 0, &what)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(format!("metadata `{}` is given twice", shown(&key)));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(Value::U32(a)) if a.is_power_of_two() => u64::from(*a),
        Some(v) => {
            return Err(format!(
                "`general.alignment` is {v:?}; it must be a u32 power of two"
            ))
        }
    };
    struct Info {
        name: String,
        ty: StoredType,
        shape: Vec<usize>,
        offset: u64,
        size: u64,
    }
    let mut infos = Vec::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = c.string(&|| format!("tensor name {i}"))?;
        let what = || format!("tensor `{}`", shown(&name));
        let n_dims = c.u32(&what)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!(
                "{} has {n_dims} dimensions (1 to {MAX_DIMS})",
                what()
            ));
        }
        let mut shape = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = c.u64(&what)?;
            shape.push(
                usize::try_from(d).map_err(|_| format!("{} has a dimension of {d}", what()))?,
            );
        }
        // GGUF lists dimensions innermost first.
        shape.reverse();
        let id = c.u32(&what)?;
        let ty = StoredType::from_type_id(id).ok_or_else(|| {
            format!(
                "{} has GGML type {id}, which is not supported (f32, f16, bf16, q8_0, q4_0, q5_0, q4_k, q6_k are)",
                what()
            )
        })?;
        if let StoredType::Quant(q) = ty {
            if shape.last().is_none_or(|&cols| cols % q.block_size() != 0) {
                return Err(format!("{} {shape:?} is not whole {q} blocks", what()));
            }
        }
        let size = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .and_then(|elems| ty.size_of(elems))
            .ok_or_else(|| format!("{} {shape:?}: its size overflows", what()))?;
        let offset = c.u64(&what)?;
        if offset % alignment != 0 {
            return Err(format!(
                "{} starts at data offset {offset}, not a multiple of the alignment {alignment}",
                what()
            ));
        }
        infos.push(Info {
            name,
            ty,
            shape,
            offset,
            size: size as u64,
        });
    }
    let data_start = (c.pos as u64).next_multiple_of(alignment);
    let file_len = bytes.len() as u64;
    let mut tensors = Vec::with_capacity(infos.len());
    for t in infos {
        let end = data_start
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.size).map(|e| (s, e)));
        let (start, end) = match end {
            Some((s, e)) if e <= file_len => (s as usize, e as usize),
            _ => {
                return Err(format!(
                    "tensor `{}` ({} bytes at data offset {}) ends past the end of the file \
                     ({file_len} bytes): truncated?",
                    shown(&t.name),
                    t.size,
                    t.offset
                ))
            }
        };
        tensors.push(RawTensor {
            name: t.name,
            ty: t.ty,
            shape: t.shape,
            start,
            end,
        });
    }
    let mut order: Vec<&RawTensor> = tensors.iter().collect();
    order.sort_by_key(|t| (t.start, t.end));
    for w in order.windows(2) {
        if w[0].end > w[1].start && w[0].start < w[0].end && w[1].start < w[1].end {
            return Err(format!(
                "tensors `{}` and `{}` overlap (bytes {}..{} and {}..{})",
                shown(&w[0].name),
                shown(&w[1].name),
                w[0].start,
                w[0].end,
                w[1].start,
                w[1].end
            ));
        }
    }
    let mut names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("tensor `{}` is given twice", shown(w[0])));
    }
    Ok(RawHeader { metadata, tensors })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GGUF v3 bytes: string metadata `kv`, then tensors `(name, dims innermost first,
    /// type id, offset)`, then `data` bytes after the header, padded to `align`.
    pub(crate) fn gguf(
        kv: &[(&str, u32, Vec<u8>)],
        tensors: &[(&str, Vec<u64>, u32, u64)],
        align: u64,
        data: usize,
    ) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend((kv.len() as u64).to_le_bytes());
        let s = |b: &mut Vec<u8>, s: &str| {
            b.extend((s.len() as u64).to_le_bytes());
            b.extend(s.as_bytes());
        };
        for (k, ty, v) in kv {
            s(&mut b, k);
            b.extend(ty.to_le_bytes());
            b.extend(v);
        }
        for (name, dims, ty, off) in tensors {
            s(&mut b, name);
            b.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(ty.to_le_bytes());
            b.extend(off.to_le_bytes());
        }
        b.resize((b.len() as u64).next_multiple_of(align) as usize + data, 0);
        b
    }

    fn err(bytes: &[u8]) -> String {
        let e = parse(bytes).err().expect("must be refused");
        assert!(
            !e.chars().any(char::is_control),
            "raw control character: {e:?}"
        );
        e
    }

    #[test]
    fn a_well_formed_header_parses() {
        let h = parse(&gguf(
            &[(
                "general.architecture",
                8,
                [5u64.to_le_bytes().to_vec(), b"gemma".to_vec()].concat(),
            )],
            &[("a", vec![4, 2], 0, 0), ("b", vec![32], 8, 32)],
            32,
            66,
        ))
        .unwrap();
        assert_eq!(h.tensors.len(), 2);
        assert_eq!(h.tensors[0].shape, [2, 4]);
        assert_eq!(h.tensors[1].end - h.tensors[1].start, 34);
    }

    #[test]
    fn hostile_headers_are_refused_with_the_reason() {
        let u32v = |v: u32| v.to_le_bytes().to_vec();
        // `general.alignment = 0` (a division by zero in candle's parser).
        let e = err(&gguf(&[("general.alignment", 4, u32v(0))], &[], 32, 0));
        assert!(e.contains("general.alignment"), "{e}");
        // An offset that wraps the data start past u64::MAX.
        let e = err(&gguf(&[], &[("t", vec![8], 0, u64::MAX - 31)], 32, 64));
        assert!(e.contains("`t`") && e.contains("past the end"), "{e}");
        // Dimensions whose product overflows (a 0-byte tensor once wrapped).
        let e = err(&gguf(&[], &[("t", vec![64, 1 << 58], 0, 0)], 32, 64));
        assert!(e.contains("overflows"), "{e}");
        // A data offset off the alignment.
        let e = err(&gguf(&[], &[("t", vec![8], 0, 4)], 32, 64));
        assert!(e.contains("not a multiple of the alignment"), "{e}");
        // Two tensors over the same bytes, and one name twice.
        let e = err(&gguf(
            &[],
            &[("a", vec![16], 0, 0), ("b", vec![8], 0, 32)],
            32,
            128,
        ));
        assert!(e.contains("overlap"), "{e}");
        let e = err(&gguf(
            &[],
            &[("a", vec![8], 0, 0), ("a", vec![8], 0, 32)],
            32,
            128,
        ));
        assert!(e.contains("given twice"), "{e}");
        // Five dimensions; an unknown type; a quantized row that is not whole blocks.
        let e = err(&gguf(&[], &[("t", vec![1; 5], 0, 0)], 32, 64));
        assert!(e.contains("5 dimensions"), "{e}");
        let e = err(&gguf(&[], &[("t", vec![8], 99, 0)], 32, 64));
        assert!(e.contains("GGML type 99"), "{e}");
        let e = err(&gguf(&[], &[("t", vec![31], 8, 0)], 32, 64));
        assert!(e.contains("whole q8_0 blocks"), "{e}");
        // Counts and lengths the file does not back: no allocation follows them.
        let mut huge_array = u32v(0);
        huge_array.extend(u64::MAX.to_le_bytes());
        let e = err(&gguf(&[("k", 9, huge_array)], &[], 32, 0));
        assert!(e.contains("claims"), "{e}");
        let mut b = gguf(
            &[(
                "k",
                8,
                [u64::MAX.to_le_bytes().to_vec(), b"x".to_vec()].concat(),
            )],
            &[],
            32,
            0,
        );
        b.truncate(60);
        assert!(err(&b).contains("truncated?"));
        let mut b = gguf(&[], &[], 32, 0);
        b[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(err(&b).contains("tensor count"));
        // Arrays nested past the limit.
        let mut nested = Vec::new();
        for _ in 0..6 {
            nested.extend(u32v(9));
            nested.extend(1u64.to_le_bytes());
        }
        nested.extend(u32v(0));
        nested.extend(1u64.to_le_bytes());
        nested.push(7);
        let e = err(&gguf(&[("k", 9, nested)], &[], 32, 0));
        assert!(e.contains("deeper"), "{e}");
        // A tensor name with terminal escapes and a newline is printed escaped.
        let e = err(&gguf(
            &[],
            &[("\u{1b}[31mevil\nerror: forged", vec![8], 99, 0)],
            32,
            64,
        ));
        assert!(e.contains("\\u{1b}[31mevil\\nerror: forged"), "{e}");
        // Not GGUF, and a version this reader does not know.
        assert!(err(b"GGML....").contains("GGUF"));
        let mut b = gguf(&[], &[], 32, 0);
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert!(err(&b).contains("version 1"));
    }
}
