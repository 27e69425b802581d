//! Self-attention of the text decoder (`Gemma4TextAttention`), one implementation for
//! every layer type and size; the [`LayerSpec`] decides head dim, KV heads, `k_eq_v` and
//! KV sharing.
//!
//! q = RoPE(q_norm(q_proj x)); k = RoPE(k_norm(k_proj x)); v = v_norm(v_proj x) where
//! `v_norm` has no weight and, on full layers of `attention_k_eq_v` models, V is the raw
//! k projection. Scores are `q·kᵀ` with scaling 1.0 (QK-norm replaces 1/√d), plus the
//! additive mask, softmax in f32, cast back, times V. GQA: query head `h` reads KV head
//! `h / (H / K)`.
//!
//! The vision tower's attention (`Gemma4VisionAttention`) is the same computation with
//! clippable projections, 2-D RoPE and no mask; [`Attention::vision`] builds it, and the
//! rotation is passed in by the caller.

use candle_core::{DType, Tensor};

use std::collections::BTreeMap;

use crate::config::vision::VisionConfig;
use crate::config::{KvSource, LayerSpec, LayerType};
use crate::error::Result;
use crate::loading::weights::Weights;
use crate::nn::linear::Linear;
use crate::nn::norm::RmsNorm;
use crate::text::kv_cache::KvCache;

#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Linear,
    /// `None` on KV-shared layers (stale tensors in a checkpoint are ignored).
    k_proj: Option<Linear>,
    /// `None` on KV-shared layers and on `k_eq_v` full layers.
    v_proj: Option<Linear>,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: Option<RmsNorm>,
    v_norm: RmsNorm,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// The projections, in checkpoint order.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut v = vec![&self.q_proj];
        v.extend(self.k_proj.iter().chain(&self.v_proj));
        v.push(&self.o_proj);
        v
    }

    pub fn new(
        hidden: usize,
        num_heads: usize,
        spec: &LayerSpec,
        eps: f64,
        w: &Weights,
    ) -> Result<Self> {
        let (d, kv) = (spec.head_dim, spec.num_kv_heads);
        let own_kv = matches!(spec.kv_source, KvSource::Own);
        Ok(Attention {
            q_proj: Linear::new(hidden, num_heads * d, w, "q_proj")?,
            k_proj: own_kv
                .then(|| Linear::new(hidden, kv * d, w, "k_proj"))
                .transpose()?,
            v_proj: (own_kv && !spec.k_eq_v)
                .then(|| Linear::new(hidden, kv * d, w, "v_proj"))
                .transpose()?,
            o_proj: Linear::new(num_heads * d, hidden, w, "o_proj")?,
            q_norm: RmsNorm::new(d, eps, w, "q_norm")?,
            k_norm: own_kv
                .then(|| RmsNorm::new(d, eps, w, "k_norm"))
                .transpose()?,
            v_norm: RmsNorm::without_scale(eps),
            num_heads,
            num_kv_heads: kv,
            head_dim: d,
        })
    }

    /// The vision tower's attention: MHA/GQA over `cfg`'s heads with clippable projections
    /// named `{q,k,v,o}_proj.linear`.
    pub fn vision(cfg: &VisionConfig, w: &Weights) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (nh, kv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let clip = cfg.use_clipped_linears;
        Ok(Attention {
            q_proj: Linear::clippable(h, nh * d, w, "q_proj", clip)?,
            k_proj: Some(Linear::clippable(h, kv * d, w, "k_proj", clip)?),
            v_proj: Some(Linear::clippable(h, kv * d, w, "v_proj", clip)?),
            o_proj: Linear::clippable(nh * d, h, w, "o_proj", clip)?,
            q_norm: RmsNorm::new(d, cfg.rms_norm_eps, w, "q_norm")?,
            k_norm: Some(RmsNorm::new(d, cfg.rms_norm_eps, w, "k_norm")?),
            v_norm: RmsNorm::without_scale(cfg.rms_norm_eps),
            num_heads: nh,
            num_kv_heads: kv,
            head_dim: d,
        })
    }

    /// Queries `[H, S, D]` after q_norm and the rotation `rot` (RoPE).
    pub fn queries(&self, x: &Tensor, rot: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let s = x.dim(0)?;
        let q = self
            .q_proj
            .forward(x)?
            .reshape((s, self.num_heads, self.head_dim))?;
        let q = self.q_norm.forward(&q)?.transpose(0, 1)?.contiguous()?;
        rot(&q)
    }

    /// This step's keys and values `[K, S, D]` (only for layers that own their KV).
    pub fn keys_values(
        &self,
        x: &Tensor,
        rot: &dyn Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let (Some(k_proj), Some(k_norm)) = (&self.k_proj, &self.k_norm) else {
            return Err(
                candle_core::Error::Msg("KV-shared layer cannot compute keys".into()).into(),
            );
        };
        let s = x.dim(0)?;
        let shape = (s, self.num_kv_heads, self.head_dim);
        let k_raw = k_proj.forward(x)?.reshape(shape)?;
        let v_raw = match &self.v_proj {
            Some(v) => v.forward(x)?.reshape(shape)?,
            None => k_raw.clone(),
        };
        let k = k_norm.forward(&k_raw)?.transpose(0, 1)?.contiguous()?;
        let k = rot(&k)?;
        let v = self.v_norm.forward(&v_raw)?.transpose(0, 1)?.contiguous()?;
        Ok((k, v))
    }

    /// Attends queries `[H, S, D]` over keys/values `[K, T, D]` with an additive f32 mask
    /// `[S, T]` (`None` = every key visible); returns `[S, hidden]`.
    pub fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.o_proj.forward(&self.attend_heads(q, k, v, mask)?)
    }

    /// [`Self::attend`] before the output projection: the heads' outputs `[S, H·D]`.
    fn attend_heads(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (h, s, d) = q.dims3()?;
        let kv = self.num_kv_heads;
        let g = h / kv;
        let t = k.dim(1)?;
        let dtype = q.dtype();
        // Group the query heads of each KV head so one batched matmul serves them all.
        let qg = q.contiguous()?.reshape((kv, g * s, d))?;
        let scores = qg.matmul(&k.t()?)?.to_dtype(DType::F32)?;
        let mut scores = scores.reshape((kv, g, s, t))?;
        if let Some(m) = mask {
            scores = scores.broadcast_add(m)?;
        }
        let probs = match crate::nn::autograd::tracked(&scores) {
            true => match crate::nn::fused::softmax_last_dim(&scores)? {
                Some(p) => p,
                None => candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?,
            },
            false => candle_nn::ops::softmax_last_dim(&scores)?,
        }
        .to_dtype(dtype)?;
        let out = probs.reshape((kv, g * s, t))?.matmul(v)?; // [K, G·S, D]
        Ok(out
            .reshape((h, s, d))?
            .transpose(0, 1)?
            .reshape((s, h * d))?)
    }

    /// The decoder's attention over a batched step: `x` `[T, hidden]` holds the rows of
    /// every sequence of `seqs`. Projections run once over all rows (one read of each
    /// weight); each sequence then stores its keys/values in its own cache (layers that
    /// own their KV) and attends over its cache (a KV-shared layer over its producer's)
    /// with its own mask. `rot` applies RoPE to `[heads, T, D]` at every row's position.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        rot: &dyn Fn(&Tensor) -> Result<Tensor>,
        layer: usize,
        spec: &LayerSpec,
        seqs: &mut [SeqStep<'_>],
    ) -> Result<Tensor> {
        let q = self.queries(x, rot)?;
        let (own, source) = match spec.kv_source {
            KvSource::Own => (Some(self.keys_values(x, rot)?), layer),
            KvSource::Shared { producer } => (None, producer),
        };
        let mut outs = Vec::with_capacity(seqs.len());
        for s in seqs.iter_mut() {
            let (start, n) = (s.rows.start, s.rows.len());
            if let Some((k, v)) = &own {
                s.cache
                    .write(layer, &k.narrow(1, start, n)?, &v.narrow(1, start, n)?)?;
            }
            let (k, v) = s.cache.view(source)?;
            let q = q.narrow(1, start, n)?;
            let mask = s.masks.get(&spec.layer_type).and_then(Option::as_ref);
            outs.push(self.attend_heads(&q, &k, &v, mask)?);
        }
        let out = match outs.len() {
            1 => outs.pop().expect("one output"),
            _ => Tensor::cat(&outs, 0)?,
        };
        self.o_proj.forward(&out)
    }
}

/// One sequence's share of a batched step, as a decoder layer sees it: its rows of the
/// step's activations, its cache, and its attention mask per layer type.
pub(crate) struct SeqStep<'a> {
    pub rows: std::ops::Range<usize>,
    pub cache: &'a mut KvCache,
    pub masks: BTreeMap<LayerType, Option<Tensor>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn attention_uses_unit_scaling_and_gqa_grouping() {
        // Two query heads sharing one KV head, D = 2, two keys.
        let dev = Device::Cpu;
        let spec = LayerSpec {
            layer_type: crate::config::LayerType::Full,
            head_dim: 2,
            num_kv_heads: 1,
            intermediate_size: 1,
            kv_source: crate::config::KvSource::Own,
            k_eq_v: false,
        };
        let eye = |n: usize| Tensor::eye(n, DType::F32, &dev).unwrap();
        let att = Attention {
            q_proj: Linear::from_weight(eye(4)),
            k_proj: None,
            v_proj: None,
            o_proj: Linear::from_weight(eye(4)),
            q_norm: RmsNorm::without_scale(1e-6),
            k_norm: None,
            v_norm: RmsNorm::without_scale(1e-6),
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: spec.head_dim,
        };
        let q = Tensor::new(&[[[1.0f32, 0.0]], [[0.0, 2.0]]], &dev).unwrap(); // [H=2, S=1, D=2]
        let k = Tensor::new(&[[[3.0f32, 0.0], [0.0, 1.0]]], &dev).unwrap(); // [K=1, T=2, D]
        let v = Tensor::new(&[[[1.0f32, 0.0], [0.0, 1.0]]], &dev).unwrap();
        let out: Vec<f32> = att
            .attend(&q, &k, &v, None)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let p = |a: f32, b: f32| (a.exp() / (a.exp() + b.exp()), b.exp() / (a.exp() + b.exp()));
        let (h0a, h0b) = p(3.0, 0.0); // head 0 scores: q·k = 3, 0 (no 1/sqrt(2))
        let (h1a, h1b) = p(0.0, 2.0);
        let want = [h0a, h0b, h1a, h1b];
        for (a, b) in out.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{out:?} vs {want:?}");
        }
    }
}
