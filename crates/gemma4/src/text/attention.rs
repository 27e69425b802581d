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
use crate::config::{Bidirectional, KvSource, LayerSpec, LayerType};
use crate::error::Result;
use crate::loading::weights::Weights;
use crate::nn::linear::Linear;
use crate::nn::norm::RmsNorm;
use crate::text::kv_cache::{KvCache, EMPTY};

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
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
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

/// Image/video spans of a multimodal prompt for the bidirectional overlay: `blocks[i]` is
/// the span id (≥ 0) of absolute position `start + i`, or −1 for text; positions outside
/// the slice are text.
#[derive(Debug, Clone, Copy)]
pub struct SpanOverlay<'a> {
    pub blocks: &'a [i64],
    pub start: usize,
    pub mode: Bidirectional,
}

impl SpanOverlay<'_> {
    fn block(&self, pos: usize) -> i64 {
        pos.checked_sub(self.start)
            .and_then(|i| self.blocks.get(i))
            .copied()
            .unwrap_or(-1)
    }
}

/// Additive mask `[queries, keys]` for query positions `q_pos` over keys at absolute
/// positions `k_pos` (any order; empty ring slots, `usize::MAX`, are never visible): key j is visible to
/// query i iff `j ≤ i` and, for sliding layers, `j > i − W` (exactly W keys including
/// itself). With a span overlay, tokens of the same image span also see each other,
/// composed as [`Bidirectional`] describes. Returns `None` when every key is visible (the
/// common decode step).
pub fn causal_mask(
    q_pos: &[usize],
    k_pos: &[usize],
    window: Option<usize>,
    overlay: Option<&SpanOverlay>,
    device: &candle_core::Device,
) -> Result<Option<Tensor>> {
    let visible = |i: usize, j: usize| {
        if j == EMPTY {
            return false;
        }
        let causal = j <= i;
        let in_window = window.is_none_or(|w| j + w > i);
        let same_span = overlay.is_some_and(|o| {
            let b = o.block(i);
            b >= 0 && b == o.block(j)
        });
        match overlay.map(|o| o.mode) {
            None | Some(Bidirectional::None) => causal && in_window,
            // Gemma4Model: full layers stay causal; sliding = window ∧ (causal ∨ span).
            Some(Bidirectional::Vision) if window.is_none() => causal,
            Some(Bidirectional::Vision) => in_window && (causal || same_span),
            // Gemma4UnifiedModel: every layer = its causal(+window) mask ∨ span.
            Some(Bidirectional::VisionAllLayers) => (causal && in_window) || same_span,
        }
    };
    let all = q_pos.iter().all(|&i| k_pos.iter().all(|&j| visible(i, j)));
    if all {
        return Ok(None);
    }
    let mut m = Vec::with_capacity(q_pos.len() * k_pos.len());
    for &i in q_pos {
        for &j in k_pos {
            m.push(if visible(i, j) {
                0.0f32
            } else {
                f32::NEG_INFINITY
            });
        }
    }
    Ok(Some(Tensor::from_vec(
        m,
        (q_pos.len(), k_pos.len()),
        device,
    )?))
}

/// Softmax-free check used by tests: the row-wise count of visible keys.
#[cfg(test)]
pub(crate) fn visible_counts(mask: &Tensor) -> Vec<usize> {
    let rows: Vec<Vec<f32>> = mask.to_vec2().unwrap();
    rows.iter()
        .map(|r| r.iter().filter(|x| x.is_finite()).count())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn sliding_window_sees_exactly_w_keys() {
        let q: Vec<usize> = (0..12).collect();
        let m = causal_mask(&q, &q, Some(4), None, &Device::Cpu)
            .unwrap()
            .unwrap();
        assert_eq!(visible_counts(&m), [1, 2, 3, 4, 4, 4, 4, 4, 4, 4, 4, 4]);
        let rows: Vec<Vec<f32>> = m.to_vec2().unwrap();
        // Query 7 sees keys 4..=7.
        assert!(rows[7][3].is_infinite() && rows[7][4] == 0.0 && rows[7][7] == 0.0);
    }

    /// Keys in ring order (a sliding layer's cache) with a slot that holds nothing.
    #[test]
    fn keys_in_any_order_and_empty_slots() {
        let k = [8, 5, EMPTY, 6, 7];
        let rows: Vec<Vec<f32>> = causal_mask(&[7, 8], &k, Some(3), None, &Device::Cpu)
            .unwrap()
            .unwrap()
            .to_vec2()
            .unwrap();
        let seen = |r: &Vec<f32>| -> Vec<usize> {
            k.iter()
                .zip(r)
                .filter(|(_, m)| m.is_finite())
                .map(|(p, _)| *p)
                .collect()
        };
        assert_eq!(seen(&rows[0]), [5, 6, 7]);
        assert_eq!(seen(&rows[1]), [8, 6, 7]);
    }

    #[test]
    fn full_causal_and_decode_steps_need_no_mask() {
        let m = causal_mask(&[0, 1, 2], &[0, 1, 2], None, None, &Device::Cpu)
            .unwrap()
            .unwrap();
        assert_eq!(visible_counts(&m), [1, 2, 3]);
        // Decode: one query over the kept W-1 keys plus itself.
        assert!(
            causal_mask(&[20], &[17, 18, 19, 20], Some(4), None, &Device::Cpu)
                .unwrap()
                .is_none()
        );
        assert!(causal_mask(
            &[20],
            &(0..21).collect::<Vec<_>>(),
            None,
            None,
            &Device::Cpu
        )
        .unwrap()
        .is_none());
    }

    #[test]
    fn span_overlay_compositions_follow_the_two_model_classes() {
        // Positions 0..8, an image span at 2..=6 (block 0), window 3.
        let blocks = [-1i64, -1, 0, 0, 0, 0, 0, -1];
        let q: Vec<usize> = (0..8).collect();
        let rows = |mode, window| -> Vec<Vec<f32>> {
            let o = SpanOverlay {
                blocks: &blocks,
                start: 0,
                mode,
            };
            causal_mask(&q, &q, window, Some(&o), &Device::Cpu)
                .unwrap()
                .unwrap()
                .to_vec2()
                .unwrap()
        };
        let sees = |r: &Vec<Vec<f32>>, i: usize, j: usize| r[i][j] == 0.0;
        // Gemma4, sliding: image token 2 sees the future tokens 3..=6 of its span...
        let g = rows(Bidirectional::Vision, Some(3));
        assert!(sees(&g, 2, 6) && sees(&g, 2, 4));
        // ...but token 6 no longer sees token 2 (window ∧ (causal ∨ span)), nor text after.
        assert!(!sees(&g, 6, 2) && sees(&g, 6, 4) && !sees(&g, 5, 7));
        // Gemma4, full layers: plain causal.
        let f = rows(Bidirectional::Vision, None);
        assert!(!sees(&f, 2, 3) && sees(&f, 6, 2));
        // 12B: the span overrides the window and applies on full layers too.
        let u = rows(Bidirectional::VisionAllLayers, Some(3));
        assert!(sees(&u, 6, 2) && sees(&u, 2, 6) && !sees(&u, 7, 2));
        let uf = rows(Bidirectional::VisionAllLayers, None);
        assert!(sees(&uf, 2, 6) && !sees(&uf, 1, 2));
    }

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
