//! The linear layer, `y = x Wᵀ (+ b)` with `W` stored `[out, in]` as in PyTorch. Every
//! projection of the model goes through this one type. Its weight ([`LinearWeight`]) is
//! held in the format its kernels want, picked at load: a tensor at the compute dtype,
//! GGML's blocks, or a repack for this CPU (Q8_0, Q4_0/Q5_0, Q4_K/Q6_K, bf16 and f32 in
//! tiles of sixteen rows where the CPU has AVX-512); each format multiplies through the
//! `backend::matrix::Matrix` trait, with matrix–vector kernels for decode batches (up to
//! 16 rows, each weight row read once for all) and GEMMs for prefill.
//!
//! It also covers `Gemma4ClippableLinear` (vision and audio towers): with
//! `use_clipped_linears` the input is clamped to `[input_min, input_max]` and the output to
//! `[output_min, output_max]`, bounds read from the checkpoint's 0-d buffers (±∞ = off).

use std::sync::{Arc, RwLock};

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use half::bf16;

use crate::backend::cpu::dense_tiles::{DenseTiles, TileElem};
use crate::backend::cpu::kquant_tiles::KTiles;
use crate::backend::cpu::q4_tiles::NibbleTiles;
use crate::backend::cpu::q8_packed::PackedQ8;
use crate::backend::matrix::{with_elements, DenseMatrix, GgmlMatrix, Matrix};
use crate::error::Result;
use crate::loading::weights::Weights;
use crate::nn::autograd;
use crate::nn::lora::{self, AdapterSet, LoraDelta};
use crate::text::model::round_to;

#[derive(Debug, Clone, Copy, PartialEq)]
struct Clip {
    input: (f64, f64),
    output: (f64, f64),
}

/// A projection's `[out, in]` weight in the format its kernels want: a tensor at the
/// compute dtype, GGML's blocks, or a repack for this CPU (see
/// `backend::matrix`). Cheap to clone.
#[derive(Debug, Clone)]
pub struct LinearWeight(Arc<dyn Matrix>);

type WidenedBlocks = std::collections::HashMap<(usize, usize, usize), Tensor>;

thread_local! {
    /// Blocks widened by [`LinearWeight::row_blocks`] in the current
    /// [`with_widened_cache`] scope, by (weight, first row, rows).
    static WIDENED: std::cell::RefCell<Option<WidenedBlocks>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` with the f32 blocks that frozen products widen kept until it returns, so that
/// a layer's forward and backward, run one after the other inside it, widen each weight
/// once (training with recomputation: one layer's weights in f32 at a time). The scope
/// is the calling thread's, as candle runs a backward on the thread that asks for it.
pub fn with_widened_cache<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(Option<WidenedBlocks>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let prev = self.0.take();
            WIDENED.with(|c| *c.borrow_mut() = prev);
        }
    }
    let _restore = Restore(WIDENED.with(|c| c.borrow_mut().replace(WidenedBlocks::new())));
    f()
}

impl LinearWeight {
    /// A dense weight at the compute dtype: bf16 and f32 `[out, in]` matrices are tiled
    /// where the CPU has AVX-512 (AVX512-BF16 for bf16: one kernel for decode batches and
    /// prefill, `backend::cpu::dense_tiles`), others kept as they are.
    pub fn dense(t: Tensor) -> Result<Self> {
        fn tiled<T: TileElem + candle_core::WithDType>(t: &Tensor) -> Result<Option<LinearWeight>> {
            if !T::available() {
                return Ok(None);
            }
            let (rows, cols) = t.dims2()?;
            Ok(with_elements(t, |w: &[T]| DenseTiles::new(w, rows, cols))?
                .flatten()
                .map(|tiles| LinearWeight(Arc::new(tiles))))
        }
        if t.rank() == 2 && t.device().is_cpu() {
            let tiles = match t.dtype() {
                DType::BF16 => tiled::<bf16>(&t)?,
                DType::F32 => tiled::<f32>(&t)?,
                _ => None,
            };
            if let Some(tiles) = tiles {
                return Ok(tiles);
            }
        }
        Ok(Self::plain(t))
    }

    /// A dense weight kept as the tensor it is (candle's matmul, and the CPU's
    /// matrix–vector kernels for decode batches).
    pub fn plain(t: Tensor) -> Self {
        LinearWeight(Arc::new(DenseMatrix(t)))
    }

    /// A block-quantized weight, repacked when this machine has a faster kernel for the
    /// repacked form (Q8_0 with AVX2, `backend::cpu::q8_packed`; Q4_K, Q6_K, Q4_0 and
    /// Q5_0 with AVX-512 VNNI, `backend::cpu::kquant_tiles`, `q4_tiles`).
    pub fn quantized(q: Arc<QTensor>) -> Result<Self> {
        if PackedQ8::available() {
            if let Some(p) = PackedQ8::from_qtensor(&q)? {
                return Ok(LinearWeight(Arc::new(p)));
            }
        }
        if let Some(t) = KTiles::from_qtensor(&q)? {
            return Ok(LinearWeight(Arc::new(t)));
        }
        if let Some(t) = NibbleTiles::from_qtensor(&q)? {
            return Ok(LinearWeight(Arc::new(t)));
        }
        Ok(Self::ggml(q))
    }

    /// A block-quantized weight kept in GGML's layout.
    pub fn ggml(q: Arc<QTensor>) -> Self {
        LinearWeight(Arc::new(GgmlMatrix(q)))
    }

    /// GGML's blocks, for a weight kept in their layout ([`Self::ggml`]).
    pub fn as_ggml(&self) -> Option<&Arc<QTensor>> {
        self.0.ggml()
    }

    /// Bytes the weight occupies (what decoding streams per token).
    pub fn size_in_bytes(&self) -> usize {
        self.0.size_in_bytes()
    }

    /// `[out, in]`.
    pub fn shape(&self) -> (usize, usize) {
        self.0.shape()
    }

    /// The dtype its products come out in before conversion to the input's (f32 for the
    /// integer kernels).
    pub fn dtype(&self) -> DType {
        self.0.dtype()
    }

    pub fn device(&self) -> Device {
        self.0.device()
    }

    /// Rows `ids` as a `[ids.len(), in]` tensor of `dtype` (a tied embedding table); an
    /// id outside the table is an error naming it.
    pub fn rows(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        let ids: Vec<u32> = ids.flatten_all()?.to_vec1()?;
        let rows = self.shape().0;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= rows) {
            return Err(crate::error::Error::invalid_argument(
                "token id",
                format!("{bad} is outside the {rows} rows of the embedding"),
            ));
        }
        Ok(self.0.rows(&ids)?.to_dtype(dtype)?)
    }

    /// Whether the weight is block-quantized (see `backend::matrix::Matrix::quantized`).
    pub fn is_quantized(&self) -> bool {
        self.0.quantized()
    }

    /// Calls `f(start, rows)` on every block of at most `block` rows, in order: rows
    /// `start..` widened to f32 `[n, in]` (dequantized for GGML blocks), so a weight is never
    /// held widened whole.
    pub fn row_blocks(
        &self,
        block: usize,
        mut f: impl FnMut(usize, Tensor) -> Result<()>,
    ) -> Result<()> {
        let out = self.shape().0;
        let block = block.max(1);
        let mut start = 0;
        // Within a [`with_widened_cache`] scope, a block widened once is reused.
        let key = Arc::as_ptr(&self.0) as *const () as usize;
        while start < out {
            let n = block.min(out - start);
            let cached = WIDENED.with(|c| {
                c.borrow()
                    .as_ref()
                    .and_then(|m| m.get(&(key, start, n)).cloned())
            });
            let rows = match cached {
                Some(t) => t,
                None => {
                    let t = self.0.rows_f32(start, n)?;
                    WIDENED.with(|c| {
                        if let Some(m) = c.borrow_mut().as_mut() {
                            m.insert((key, start, n), t.clone());
                        }
                    });
                    t
                }
            };
            f(start, rows)?;
            start += n;
        }
        Ok(())
    }

    /// `x Wᵀ`: `x` `[.., in]` → `[.., out]` in `x`'s dtype.
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        self.0.matmul_t(x)
    }
}

/// The checkpoint tensor a projection's weight was loaded from: its full name and, for
/// one matrix of a stacked tensor (an MoE expert of `[E, out, in]`), its index.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorSource {
    pub name: String,
    pub index: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    clip: Option<Clip>,
    source: Option<TensorSource>,
    /// LoRA updates attached to this projection, one per adapter that patches it; added to
    /// the output while their adapter is on ([`lora::with_adapters`]). Shared behind a
    /// lock so that adapters attach to a loaded model through `&self`.
    adapters: Arc<RwLock<Vec<LoraDelta>>>,
}

fn clamp(x: Tensor, (lo, hi): (f64, f64)) -> Result<Tensor> {
    Ok(match (lo.is_finite(), hi.is_finite()) {
        (false, false) => x,
        _ => x.clamp(lo, hi)?,
    })
}

impl Linear {
    /// Loads `{name}.weight` with shape `[out_dim, in_dim]`.
    /// The weight is block-quantized when the view `w` carries a quantization scheme.
    pub fn new(in_dim: usize, out_dim: usize, w: &Weights, name: &str) -> Result<Self> {
        let name = format!("{name}.weight");
        Ok(
            Linear::from_linear_weight(w.matrix(out_dim, in_dim, &name)?)
                .with_source(w.name(&name), None),
        )
    }

    /// Loads `{name}.weight` and `{name}.bias`.
    pub fn with_bias(in_dim: usize, out_dim: usize, w: &Weights, name: &str) -> Result<Self> {
        let mut l = Self::new(in_dim, out_dim, w, name)?;
        l.bias = Some(w.get(&[out_dim], &format!("{name}.bias"))?);
        Ok(l)
    }

    /// A `Gemma4ClippableLinear`: `{name}.linear.weight`, plus the four bounds
    /// `{name}.{input,output}_{min,max}` when `clipped`. Bounds are rounded to the compute
    /// dtype, as the reference casts its buffers with the model.
    pub fn clippable(
        in_dim: usize,
        out_dim: usize,
        w: &Weights,
        name: &str,
        clipped: bool,
    ) -> Result<Self> {
        let mut l = Self::new(in_dim, out_dim, w, &format!("{name}.linear"))?;
        if clipped {
            let bound = |b: &str| -> Result<f64> {
                let v = w.get_f32(&[], &format!("{name}.{b}"))?.to_scalar::<f32>()? as f64;
                Ok(if v.is_finite() {
                    round_to(w.dtype, v)
                } else {
                    v
                })
            };
            l.clip = Some(Clip {
                input: (bound("input_min")?, bound("input_max")?),
                output: (bound("output_min")?, bound("output_max")?),
            });
        }
        Ok(l)
    }

    pub fn from_weight(weight: Tensor) -> Self {
        Self::from_linear_weight(LinearWeight::plain(weight))
    }

    pub fn from_linear_weight(weight: LinearWeight) -> Self {
        Linear {
            weight,
            bias: None,
            clip: None,
            source: None,
            adapters: Arc::default(),
        }
    }

    /// Attaches `delta` (its adapter's update of this projection); it is added to the
    /// output while its adapter is on. An adapter patches a projection at most once.
    pub(crate) fn attach(&self, delta: LoraDelta) -> Result<()> {
        let mut list = self.adapters.write().unwrap_or_else(|e| e.into_inner());
        if list.iter().any(|d| d.id == delta.id) {
            return Err(crate::error::Error::invalid_argument(
                "adapter",
                format!("adapter {} patches this projection twice", delta.id),
            ));
        }
        list.push(delta);
        Ok(())
    }

    /// Removes adapter `id`'s update, if it has one here.
    pub(crate) fn detach(&self, id: usize) {
        let mut list = self.adapters.write().unwrap_or_else(|e| e.into_inner());
        list.retain(|d| d.id != id);
    }

    /// `y` plus the updates of the adapters of `set` that patch this projection.
    fn add_adapters(&self, x: &Tensor, y: Tensor, set: AdapterSet) -> Result<Tensor> {
        let list = self.adapters.read().unwrap_or_else(|e| e.into_inner());
        let mut sum: Option<Tensor> = None;
        for d in list.iter().filter(|d| set.contains(d.id)) {
            let u = d.apply(x)?;
            sum = Some(match sum {
                None => u,
                Some(s) => (s + u)?,
            });
        }
        Ok(match sum {
            None => y,
            Some(u) => (y.to_dtype(DType::F32)? + u)?.to_dtype(y.dtype())?,
        })
    }

    /// Training's product: when the one adapter of `set` that patches this projection is
    /// being trained, the base product and its update as one operation (see
    /// [`autograd::lora_product`]); `None` otherwise (inference, several adapters, a
    /// bias, a non-f32 input, an expert's slice).
    fn trained_update(&self, x: &Tensor, set: AdapterSet) -> Result<Option<Tensor>> {
        if set.is_empty() || self.bias.is_some() || x.dtype() != DType::F32 {
            return Ok(None);
        }
        let list = self.adapters.read().unwrap_or_else(|e| e.into_inner());
        let mut on = list.iter().filter(|d| set.contains(d.id));
        match (on.next(), on.next()) {
            (Some(d), None) if d.trains() => d.fused_with(&self.weight, x),
            _ => Ok(None),
        }
    }

    /// Records the checkpoint tensor the weight came from (`index`: which matrix of a
    /// stacked tensor).
    pub fn with_source(mut self, name: String, index: Option<usize>) -> Self {
        self.source = Some(TensorSource { name, index });
        self
    }

    /// The checkpoint tensor the weight came from, when loaded from one.
    pub fn source(&self) -> Option<&TensorSource> {
        self.source.as_ref()
    }

    pub fn weight(&self) -> &LinearWeight {
        &self.weight
    }

    /// The dense weight's dtype, or f32 for quantized weights (their kernels compute in f32).
    pub fn dtype(&self) -> DType {
        self.weight.dtype()
    }

    pub fn device(&self) -> Device {
        self.weight.device()
    }

    /// `x`: `[.., in]` → `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = match &self.clip {
            Some(c) => clamp(x.clone(), c.input)?,
            None => x.clone(),
        };
        let set = lora::active();
        let y = match self.trained_update(&x, set)? {
            Some(y) => y,
            None => {
                let mut y = match autograd::tracked(&x) {
                    true => autograd::frozen_product(&self.weight, &x)?,
                    false => self.weight.matmul_t(&x)?,
                };
                if let Some(b) = &self.bias {
                    y = y.broadcast_add(b)?;
                }
                if !set.is_empty() {
                    y = self.add_adapters(&x, y, set)?;
                }
                y
            }
        };
        match &self.clip {
            Some(c) => clamp(y, c.output),
            None => Ok(y),
        }
    }
}
