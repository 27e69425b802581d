//! Checkpoint loading, memory-mapped: Hugging Face safetensors (a single
//! `model.safetensors` or shards listed in `model.safetensors.index.json`), a `model.gguf`
//! written by `gemma4 quantize` (the same tensor names, projections block-quantized), or a
//! GGUF file from llama.cpp's converter (its tensor names mapped back by
//! [`crate::loading::gguf::names`], its config and tokenizer rebuilt from its metadata by
//! [`crate::loading::gguf::metadata`]). Tensors are materialised one at a time in the requested dtype
//! with their shape checked; large row tables (the per-layer embedding) can instead stay
//! on disk and be read row by row ([`RowTable`]).
//!
//! Every failure names the file and, where there is one, the tensor.

use std::cell::Cell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, SafeTensors};

use crate::error::{Error, Result};
use crate::loading::gguf::{self, StoredType};
use crate::loading::gguf::{metadata as gguf_metadata, names as gguf_names};
use crate::loading::input::open_regular;
use crate::nn::linear::LinearWeight;
use crate::quant::{self, QuantType};

struct TensorEntry {
    file: usize,
    /// How it is stored, or the name of a storage type this engine cannot read (an error
    /// only if the tensor is asked for: checkpoints may carry tensors nobody loads).
    dtype: std::result::Result<StoredType, String>,
    shape: Vec<usize>,
    /// Byte range inside the mapped file.
    start: usize,
    end: usize,
}

struct MappedFile {
    path: PathBuf,
    mmap: Arc<Mmap>,
}

/// Progress callback: bytes materialised so far and the total expected.
pub type ProgressFn = Box<dyn Fn(u64, u64)>;

/// All safetensors files of one checkpoint directory, memory-mapped.
pub struct Checkpoint {
    files: Vec<MappedFile>,
    tensors: HashMap<String, TensorEntry>,
    loaded_bytes: Cell<u64>,
    total_bytes: Cell<u64>,
    resident_bytes: Cell<u64>,
    progress: Option<ProgressFn>,
    /// For a llama.cpp GGUF file: its metadata and what its tensors say about the model.
    llama_cpp: Option<(gguf_metadata::Metadata, gguf_metadata::TensorFacts)>,
}

impl Checkpoint {
    /// Opens, in this order of preference, `dir/model.gguf`, `dir/model.safetensors` or
    /// every shard named by `dir/model.safetensors.index.json`, or the one `*.gguf` file in
    /// `dir` (llama.cpp's files are named after the model and format).
    pub fn open(dir: &Path) -> Result<Self> {
        let gguf = dir.join("model.gguf");
        if gguf.exists() {
            return Self::open_gguf(&gguf);
        }
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        if !index.exists() && !single.exists() {
            let mut ggufs: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension()
                        .is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
                })
                .collect();
            ggufs.sort();
            match ggufs.len() {
                0 => {}
                1 => return Self::open_gguf(&ggufs[0]),
                _ => {
                    return Err(Error::io(
                        dir,
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidInput,
                            format!(
                                "{} GGUF files and no model.gguf: keep one of {} (or name it model.gguf)",
                                ggufs.len(),
                                ggufs
                                    .iter()
                                    .map(|p| p.display().to_string())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        ),
                    ))
                }
            }
        }
        let shard_names: Vec<String> = if index.exists() {
            let v = crate::error::read_json(&index)?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::config(&index, "no `weight_map` object"))?;
            let mut names: Vec<String> = Vec::new();
            for (tensor, file) in map {
                // Names for messages only: escaped and cut when there is an error.
                let tensor = || crate::error::printable(tensor);
                let file = file.as_str().ok_or_else(|| {
                    Error::config(
                        &index,
                        format!("`weight_map[{}]` is not a file name", tensor()),
                    )
                })?;
                // A shard is a file of this directory: no path, `..` or absolute name
                // reaches outside the checkpoint.
                let mut parts = Path::new(file).components();
                if !matches!(
                    (parts.next(), parts.next()),
                    (Some(std::path::Component::Normal(_)), None)
                ) {
                    return Err(Error::config(
                        &index,
                        format!(
                            "`weight_map[{}]` is `{}`, not the name of a file in the checkpoint directory",
                            tensor(),
                            crate::error::printable(file)
                        ),
                    ));
                }
                names.push(file.to_string());
            }
            names.sort();
            names.dedup();
            names
        } else if single.exists() {
            vec!["model.safetensors".to_string()]
        } else {
            return Err(Error::io(
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors, model.safetensors.index.json or *.gguf in this directory",
                ),
            ));
        };

        let mut files = Vec::new();
        let mut tensors = HashMap::new();
        for name in shard_names {
            Self::map_safetensors(&dir.join(&name), &mut files, &mut tensors)?;
        }
        Ok(Self::from_parts(files, tensors))
    }

    /// One safetensors file that is not a model checkpoint (a LoRA adapter's
    /// `adapter_model.safetensors`), with the same checks as a checkpoint's shards.
    pub fn open_safetensors(path: &Path) -> Result<Self> {
        let mut files = Vec::new();
        let mut tensors = HashMap::new();
        Self::map_safetensors(path, &mut files, &mut tensors)?;
        Ok(Self::from_parts(files, tensors))
    }

    /// Maps safetensors file `path`, validating its header, and records its tensors.
    fn map_safetensors(
        path: &Path,
        files: &mut Vec<MappedFile>,
        tensors: &mut HashMap<String, TensorEntry>,
    ) -> Result<()> {
        let path = path.to_path_buf();
        let file = open_regular(&path)?;
        // SAFETY: the mapping is read-only; a checkpoint modified while it is loaded is
        // outside what any loader can defend against (the same contract as safetensors).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let bad = |message: String| Error::Safetensors {
            path: path.clone(),
            message,
        };
        // `deserialize` validates the header and that every tensor lies inside the file,
        // so a truncated or corrupt file fails here.
        let st = SafeTensors::deserialize(&mmap).map_err(|e| {
            use safetensors::SafeTensorError as E;
            let text = crate::error::printable(&e.to_string());
            if mmap.starts_with(b"GGUF") {
                return bad(
                    "it is a GGUF file; name it `model.gguf` (or `*.gguf` alone in the directory)"
                        .to_string(),
                );
            }
            bad(match e {
                // What a file cut short gives: the header's length or its last
                // tensor's end lies past the end.
                E::MetadataIncompleteBuffer | E::InvalidHeaderLength | E::HeaderTooSmall => {
                    format!("{text} (the file has {} bytes): truncated?", mmap.len())
                }
                _ => text,
            })
        })?;
        let base = mmap.as_ptr() as usize;
        let file_idx = files.len();
        for (tname, view) in st.tensors() {
            let data = view.data();
            let start = data.as_ptr() as usize - base;
            let dtype = match view.dtype() {
                StDtype::F32 => Ok(StoredType::Dense(DType::F32)),
                StDtype::F16 => Ok(StoredType::Dense(DType::F16)),
                StDtype::BF16 => Ok(StoredType::Dense(DType::BF16)),
                other => Err(format!("{other:?}")),
            };
            tensors.insert(
                tname,
                TensorEntry {
                    file: file_idx,
                    dtype,
                    shape: view.shape().to_vec(),
                    start,
                    end: start + data.len(),
                },
            );
        }
        drop(st);
        files.push(MappedFile {
            path,
            mmap: Arc::new(mmap),
        });
        Ok(())
    }

    fn from_parts(files: Vec<MappedFile>, tensors: HashMap<String, TensorEntry>) -> Self {
        Checkpoint {
            files,
            tensors,
            loaded_bytes: Cell::new(0),
            total_bytes: Cell::new(0),
            resident_bytes: Cell::new(0),
            progress: None,
            llama_cpp: None,
        }
    }

    /// A single GGUF file: Hugging Face tensor names (`gemma4 quantize`), or llama.cpp's
    /// (`general.architecture = "gemma4"`), mapped to Hugging Face names.
    fn open_gguf(path: &Path) -> Result<Self> {
        let file = open_regular(path)?;
        // SAFETY: as for safetensors above.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let header = gguf::read_header(path, &mmap)?;
        let arch = header
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok());
        let is = |a: &str| arch.as_ref().is_some_and(|x| x.as_str() == a);
        let assistant = is(gguf_names::ASSISTANT_ARCHITECTURE);
        let llama_cpp = assistant || is(gguf_names::ARCHITECTURE);
        let facts = llama_cpp.then(|| {
            let rows = |n: &str| header.tensors.get(n).and_then(|t| t.shape.first().copied());
            let mut layers_with_v: Vec<usize> = header
                .tensors
                .keys()
                .filter_map(|n| {
                    n.strip_prefix("blk.")?
                        .strip_suffix(".attn_v.weight")?
                        .parse()
                        .ok()
                })
                .collect();
            layers_with_v.sort();
            let rope_freqs = header.tensors.get("rope_freqs.weight").and_then(|t| {
                (t.ty == StoredType::Dense(DType::F32)).then(|| {
                    mmap[t.start..t.end]
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect()
                })
            });
            gguf_metadata::TensorFacts {
                vocab_rows: rows("token_embd.weight").unwrap_or(0),
                per_layer_vocab_rows: rows("per_layer_token_embd.weight"),
                layers_with_v,
                rope_freqs,
            }
        });
        let mut tensors = HashMap::new();
        for (name, t) in header.tensors {
            let name = if llama_cpp {
                let mapped = match assistant {
                    true => gguf_names::assistant_hf_name(&name),
                    false => gguf_names::hf_name(&name),
                };
                match mapped {
                    Some(gguf_names::Mapped::Hf(hf)) => hf,
                    Some(gguf_names::Mapped::Ignored) => continue,
                    None => {
                        return Err(Error::Gguf {
                            path: path.to_path_buf(),
                            message: format!(
                                "tensor `{}` is not a Gemma 4 text tensor this engine knows \
                                 (llama.cpp naming); a vision/audio projector file (mmproj) \
                                 or a newer converter's output?",
                                crate::error::printable(&name)
                            ),
                        })
                    }
                }
            } else {
                name
            };
            tensors.insert(
                name,
                TensorEntry {
                    file: 0,
                    dtype: Ok(t.ty),
                    shape: t.shape,
                    start: t.start,
                    end: t.end,
                },
            );
        }
        let files = vec![MappedFile {
            path: path.to_path_buf(),
            mmap: Arc::new(mmap),
        }];
        let mut ckpt = Self::from_parts(files, tensors);
        ckpt.llama_cpp = facts.map(|f| (header.metadata, f));
        Ok(ckpt)
    }

    /// The weights file, when the checkpoint is a single file.
    pub fn single_file(&self) -> Option<&Path> {
        match self.files.as_slice() {
            [f] => Some(&f.path),
            _ => None,
        }
    }

    /// For a llama.cpp GGUF file, the `config.json` its metadata describes (see
    /// [`gguf_metadata`]); `None` for other checkpoints.
    pub fn llama_cpp_config(&self) -> Option<Result<serde_json::Value>> {
        let (meta, facts) = self.llama_cpp.as_ref()?;
        Some(
            gguf_metadata::config_json(meta, facts).map_err(|m| Error::Gguf {
                path: self.files[0].path.clone(),
                message: m,
            }),
        )
    }

    /// For a llama.cpp GGUF file, the `tokenizer.json` its metadata holds.
    pub fn llama_cpp_tokenizer(&self) -> Option<Result<serde_json::Value>> {
        let (meta, _) = self.llama_cpp.as_ref()?;
        Some(
            gguf_metadata::tokenizer_json(meta).map_err(|m| Error::Gguf {
                path: self.files[0].path.clone(),
                message: m,
            }),
        )
    }

    /// For a llama.cpp GGUF file, the chat template it carries (`tokenizer.chat_template`).
    pub fn llama_cpp_chat_template(&self) -> Option<String> {
        let (meta, _) = self.llama_cpp.as_ref()?;
        meta.get("tokenizer.chat_template")?
            .to_string()
            .ok()
            .cloned()
    }

    /// How tensor `name` is stored (an error naming it when missing or of a type this
    /// engine cannot read).
    pub fn stored_type(&self, name: &str) -> Result<StoredType> {
        self.stored(name, self.entry(name)?)
    }

    /// The stored bytes of tensor `name`.
    pub fn raw_bytes(&self, name: &str) -> Result<&[u8]> {
        let e = self.entry(name)?;
        Ok(&self.files[e.file].mmap[e.start..e.end])
    }

    /// Reports progress while tensors are materialised; `total` is the expected byte count.
    pub fn set_progress(&mut self, total: u64, f: ProgressFn) {
        self.total_bytes.set(total);
        self.progress = Some(f);
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Bytes of the tensors handed out through [`Weights`] so far, in the form they are
    /// kept (after dtype conversion or quantization; row tables that stay on disk excluded).
    pub fn resident_bytes(&self) -> u64 {
        self.resident_bytes.get()
    }

    fn note_resident(&self, bytes: usize) {
        self.resident_bytes
            .set(self.resident_bytes.get() + bytes as u64);
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The file tensor `name` is stored in, if present.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.tensors
            .get(name)
            .map(|t| self.files[t.file].path.as_path())
    }

    /// Whether this is a GGUF file (whose tensors may be block-quantized).
    pub fn is_gguf(&self) -> bool {
        self.files.len() == 1
            && self.files[0]
                .path
                .extension()
                .is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
    }

    /// Shape of a stored tensor, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    /// Total bytes of the stored tensors whose name starts with `prefix`.
    pub fn bytes_under(&self, prefix: &str) -> u64 {
        self.tensors
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, t)| (t.end - t.start) as u64)
            .sum()
    }

    fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            searched: self
                .files
                .iter()
                .map(|f| f.path.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// How tensor `e` (named `name`) is stored; an error naming it when the type is one this
    /// engine cannot read.
    fn stored(&self, name: &str, e: &TensorEntry) -> Result<StoredType> {
        e.dtype.clone().map_err(|dtype| Error::UnsupportedDtype {
            name: name.to_string(),
            path: self.files[e.file].path.clone(),
            dtype,
        })
    }

    fn check_shape(&self, name: &str, e: &TensorEntry, expected: &[usize]) -> Result<()> {
        if e.shape != expected {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                path: self.files[e.file].path.clone(),
                expected: expected.to_vec(),
                found: e.shape.clone(),
            });
        }
        Ok(())
    }

    /// After tensor `e` has been copied out of the map: counts it for progress and drops
    /// its file pages from this process's resident set. Reading a tensor faults its pages
    /// in, and without this they stay counted in RSS beside the copy until the process
    /// exits, which put peak RSS near twice the weights.
    fn done_with(&self, e: &TensorEntry) {
        self.loaded_bytes
            .set(self.loaded_bytes.get() + (e.end - e.start) as u64);
        if let Some(p) = &self.progress {
            p(self.loaded_bytes.get(), self.total_bytes.get());
        }
        #[cfg(unix)]
        {
            // Whole pages inside the tensor only: neighbours may share the edge pages, and
            // madvise rejects a start that is not page-aligned.
            let page = page_size();
            let start = e.start.div_ceil(page) * page;
            let end = e.end / page * page;
            if end > start {
                // SAFETY: the mapping is a read-only, shared mapping of a file. MADV_DONTNEED
                // only unmaps the pages; a later read faults them in again from the page
                // cache with the same contents, so no borrow of the map sees a change. (The
                // hazard memmap2 marks it unsafe for, zero-filled pages, concerns private
                // anonymous or copy-on-write mappings.) Failure only means the pages stay.
                let _ = unsafe {
                    self.files[e.file].mmap.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        start,
                        end - start,
                    )
                };
            }
        }
    }

    /// Tensor `name` as stored when it is block-quantized (checked against `expected`),
    /// `None` when it is stored dense.
    pub fn load_quantized(&self, name: &str, expected: &[usize]) -> Result<Option<QTensor>> {
        Ok(self
            .load_quantized_parts(name, expected, 1)?
            .map(|mut parts| parts.remove(0)))
    }

    /// A block-quantized `[n, rows, cols]` stack (MoE experts) as its `n` matrices, each
    /// copied once out of the map; `None` when it is stored dense.
    pub fn load_quantized_stack(
        &self,
        name: &str,
        expected: &[usize; 3],
    ) -> Result<Option<Vec<QTensor>>> {
        self.load_quantized_parts(name, expected, expected[0])
    }

    /// Tensor `name` (shape `expected`) split into `n` equal `[rows, cols]` quantized parts.
    fn load_quantized_parts(
        &self,
        name: &str,
        expected: &[usize],
        n: usize,
    ) -> Result<Option<Vec<QTensor>>> {
        let e = self.entry(name)?;
        let StoredType::Quant(q) = self.stored(name, e)? else {
            return Ok(None);
        };
        self.check_shape(name, e, expected)?;
        let cols = *e.shape.last().unwrap_or(&0);
        let rows = e.shape.iter().product::<usize>() / cols.max(1) / n.max(1);
        let bytes = &self.files[e.file].mmap[e.start..e.end];
        let per = bytes.len() / n.max(1);
        let parts = (0..n)
            .map(|i| {
                let part = std::borrow::Cow::Borrowed(&bytes[i * per..(i + 1) * per]);
                quant::from_bytes(part, q, rows, cols, &Device::Cpu).map_err(|err| Error::Gguf {
                    path: self.files[e.file].path.clone(),
                    message: format!("tensor `{name}`: {err}"),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.done_with(e);
        Ok(Some(parts))
    }

    /// Loads the int64 tensor `name` (an index buffer, such as a drafter's
    /// `token_ordering`), checking it has shape `expected`.
    pub fn load_i64(&self, name: &str, expected: &[usize]) -> Result<Vec<i64>> {
        let e = self.entry(name)?;
        self.check_shape(name, e, expected)?;
        if e.dtype.as_ref().err().map(String::as_str) != Some("I64") {
            return Err(Error::UnsupportedDtype {
                name: name.to_string(),
                path: self.files[e.file].path.clone(),
                dtype: match &e.dtype {
                    Ok(t) => format!("{t:?} (an int64 index was expected)"),
                    Err(t) => t.clone(),
                },
            });
        }
        let bytes = &self.files[e.file].mmap[e.start..e.end];
        let out = bytes
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
        self.done_with(e);
        Ok(out)
    }

    /// Loads tensor `name`, checking it has shape `expected`, converted to `dtype`.
    pub fn load(
        &self,
        name: &str,
        expected: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let e = self.entry(name)?;
        self.check_shape(name, e, expected)?;
        let t = match self.stored(name, e)? {
            StoredType::Dense(src) => {
                let bytes = &self.files[e.file].mmap[e.start..e.end];
                let t = Tensor::from_raw_buffer(bytes, src, &e.shape, device)?.to_dtype(dtype)?;
                self.done_with(e);
                t
            }
            StoredType::Quant(_) => self
                .load_quantized(name, expected)?
                .expect("checked quantized")
                .dequantize(device)?
                .reshape(expected)?
                .to_dtype(dtype)?,
        };
        Ok(t)
    }

    /// A 2-D table that stays memory-mapped; rows are converted on lookup.
    pub fn row_table(&self, name: &str, expected: &[usize; 2]) -> Result<RowTable> {
        let e = self.entry(name)?;
        self.check_shape(name, e, expected)?;
        let stored = self.stored(name, e)?;
        // Every lookup slices the mapping: the stored bytes must be exactly the rows.
        let row_bytes = stored.size_of(expected[1]);
        if row_bytes.and_then(|b| b.checked_mul(expected[0])) != Some(e.end - e.start) {
            return Err(Error::io(
                &self.files[e.file].path,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "tensor `{name}` holds {} bytes, not {expected:?} of {stored:?}",
                        e.end - e.start
                    ),
                ),
            ));
        }
        self.loaded_bytes
            .set(self.loaded_bytes.get() + (e.end - e.start) as u64);
        Ok(RowTable {
            name: name.to_string(),
            mmap: self.files[e.file].mmap.clone(),
            start: e.start,
            rows: expected[0],
            cols: expected[1],
            row_bytes: row_bytes.unwrap_or(0),
            stored,
        })
    }
}

/// This system's memory page size (4 KiB on x86-64 Linux; 16 or 64 KiB on some ARM).
#[cfg(unix)]
fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    // SAFETY: sysconf has no preconditions; a failure (-1) falls back to 64 KiB, a multiple
    // of every page size in use, so the range stays aligned.
    *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 64 * 1024,
    })
}

/// A `[rows, cols]` embedding table read straight from the mapped file: only the rows that
/// are looked up are ever touched (the E2B per-layer table is 4.7 GB in bf16). Rows may be
/// block-quantized (llama.cpp quantizes this table); they are dequantized on lookup.
pub struct RowTable {
    name: String,
    mmap: Arc<Mmap>,
    start: usize,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    stored: StoredType,
}

impl RowTable {
    /// Rows `ids` as a `[ids.len(), cols]` tensor of `dtype`.
    pub fn lookup(&self, ids: &[u32], dtype: DType, device: &Device) -> Result<Tensor> {
        let row_bytes = self.row_bytes;
        let mut buf = Vec::with_capacity(ids.len() * row_bytes);
        for &id in ids {
            let id = id as usize;
            if id >= self.rows {
                return Err(Error::invalid_argument(
                    "token id",
                    format!("{id} is outside the {} rows of `{}`", self.rows, self.name),
                ));
            }
            let off = self.start + id * row_bytes;
            buf.extend_from_slice(&self.mmap[off..off + row_bytes]);
        }
        let t = match self.stored {
            StoredType::Dense(d) => {
                Tensor::from_raw_buffer(&buf, d, &[ids.len(), self.cols], device)?
            }
            StoredType::Quant(q) => quant::from_bytes(
                std::borrow::Cow::Owned(buf),
                q,
                ids.len(),
                self.cols,
                &Device::Cpu,
            )?
            .dequantize(device)?,
        };
        Ok(t.to_dtype(dtype)?)
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
}

/// A view of a checkpoint under a name prefix, in the style of candle's `VarBuilder`:
/// modules take one and ask for their tensors by relative name.
#[derive(Clone)]
pub struct Weights<'a> {
    ckpt: &'a Checkpoint,
    prefix: String,
    pub dtype: DType,
    pub device: Device,
    /// Projections loaded through [`Self::matrix`] are block-quantized to this scheme.
    pub quant: Option<QuantType>,
    /// Block-quantized projections are repacked for this CPU's kernels (else they keep
    /// GGML's layout, for `gemma4 quantize` to write out).
    repack: bool,
}

impl<'a> Weights<'a> {
    pub fn new(ckpt: &'a Checkpoint, prefix: &str, dtype: DType, device: &Device) -> Self {
        Weights {
            ckpt,
            prefix: prefix.to_string(),
            dtype,
            device: device.clone(),
            quant: None,
            repack: true,
        }
    }

    /// The same view, keeping block-quantized projections in GGML's layout (as
    /// [`LinearWeight::ggml`]) instead of repacking them for the kernels.
    pub fn keeping_ggml_layout(&self) -> Self {
        let mut w = self.clone();
        w.repack = false;
        w
    }

    /// `q` as a projection weight: repacked unless [`Self::keeping_ggml_layout`].
    fn quantized_weight(&self, q: Arc<QTensor>) -> Result<LinearWeight> {
        if self.repack {
            LinearWeight::quantized(q)
        } else {
            Ok(LinearWeight::ggml(q))
        }
    }

    /// The same view, quantizing projections to `quant` (`None`: keep the compute dtype).
    pub fn with_quant(&self, quant: Option<QuantType>) -> Self {
        let mut w = self.clone();
        w.quant = quant;
        w
    }

    /// The same view one level deeper (`pp("layers").pp(3)` → `layers.3.`).
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let mut w = self.clone();
        w.prefix = format!("{}{}.", self.prefix, name);
        w
    }

    pub fn name(&self, name: &str) -> String {
        format!("{}{}", self.prefix, name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.ckpt.contains(&self.name(name))
    }

    /// Tensor `name` with shape `shape`, in this view's dtype.
    pub fn get(&self, shape: &[usize], name: &str) -> Result<Tensor> {
        let t = self
            .ckpt
            .load(&self.name(name), shape, self.dtype, &self.device)?;
        self.ckpt
            .note_resident(t.elem_count() * self.dtype.size_in_bytes());
        Ok(t)
    }

    /// Tensor `name` in f32 whatever the compute dtype (norm weights, scalars, router).
    pub fn get_f32(&self, shape: &[usize], name: &str) -> Result<Tensor> {
        let t = self
            .ckpt
            .load(&self.name(name), shape, DType::F32, &self.device)?;
        self.ckpt.note_resident(t.elem_count() * 4);
        Ok(t)
    }

    /// A projection weight `[out, in]`: quantized under this view's scheme when its rows fit
    /// the format's blocks (see [`QuantType::for_matrix`]), else at the compute dtype.
    pub fn matrix(&self, out_dim: usize, in_dim: usize, name: &str) -> Result<LinearWeight> {
        self.matrix_as(
            self.quant.and_then(|q| q.for_matrix(in_dim)),
            out_dim,
            in_dim,
            name,
        )
    }

    /// The tied embedding / LM head `[vocab, hidden]`, quantized to the scheme's
    /// [`QuantType::embedding_type`].
    pub fn embedding_matrix(
        &self,
        vocab: usize,
        hidden: usize,
        name: &str,
    ) -> Result<LinearWeight> {
        let q = self
            .quant
            .and_then(|q| q.embedding_type().for_matrix(hidden));
        self.matrix_as(q, vocab, hidden, name)
    }

    /// `n` projections stored as one `[n, out, in]` tensor (MoE experts), split per matrix.
    pub fn stacked_matrices(
        &self,
        n: usize,
        out_dim: usize,
        in_dim: usize,
        name: &str,
    ) -> Result<Vec<LinearWeight>> {
        let full = self.name(name);
        if let Some(stored) = self
            .ckpt
            .load_quantized_stack(&full, &[n, out_dim, in_dim])?
        {
            // Already quantized (a `gemma4 quantize` output or a llama.cpp file).
            return stored
                .into_iter()
                .map(|qt| self.stored_matrix(qt))
                .collect();
        }
        let q = self.quant.and_then(|q| q.for_matrix(in_dim));
        let t = self.load_for(q, &full, &[n, out_dim, in_dim])?;
        (0..n).map(|e| self.finish_matrix(q, t.get(e)?)).collect()
    }

    /// Loads `full` for [`Self::finish_matrix`]: in f32 on the CPU when it will be quantized
    /// (the block kernels' input), else in this view's dtype and device.
    fn load_for(&self, q: Option<QuantType>, full: &str, shape: &[usize]) -> Result<Tensor> {
        match q {
            Some(_) => self.ckpt.load(full, shape, DType::F32, &Device::Cpu),
            None => self.ckpt.load(full, shape, self.dtype, &self.device),
        }
    }

    /// A projection weight stored quantized, its bytes counted as resident.
    fn stored_matrix(&self, qt: QTensor) -> Result<LinearWeight> {
        let lw = self.quantized_weight(Arc::new(qt))?;
        self.ckpt.note_resident(lw.size_in_bytes());
        Ok(lw)
    }

    /// One `[out, in]` matrix as a projection weight: quantized to `q` or kept dense;
    /// its bytes counted as resident.
    fn finish_matrix(&self, q: Option<QuantType>, m: Tensor) -> Result<LinearWeight> {
        let lw = match q {
            None if self.repack => LinearWeight::dense(m)?,
            None => LinearWeight::plain(m),
            Some(q) => self.quantized_weight(Arc::new(quant::quantize(&m, q)?))?,
        };
        self.ckpt.note_resident(lw.size_in_bytes());
        Ok(lw)
    }

    fn matrix_as(
        &self,
        q: Option<QuantType>,
        out_dim: usize,
        in_dim: usize,
        name: &str,
    ) -> Result<LinearWeight> {
        let full = self.name(name);
        if let Some(stored) = self.ckpt.load_quantized(&full, &[out_dim, in_dim])? {
            // Stored quantized: used as it is, whatever the scheme asked.
            return self.stored_matrix(stored);
        }
        let t = self.load_for(q, &full, &[out_dim, in_dim])?;
        self.finish_matrix(q, t)
    }

    pub fn row_table(&self, shape: [usize; 2], name: &str) -> Result<RowTable> {
        self.ckpt.row_table(&self.name(name), &shape)
    }
}
