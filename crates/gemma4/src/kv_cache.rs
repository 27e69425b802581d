//! Per-layer key/value cache for incremental decoding, as transformers' `DynamicCache`
//! with `DynamicSlidingWindowLayer`s: full-attention layers keep every token; sliding
//! layers keep only the last `W − 1` tokens between steps (during a step they attend over
//! those plus the new ones, the mask bounding the window). KV-shared layers own no cache:
//! they read their producer's keys and values of the current step.

use candle_core::Tensor;

use crate::config::{KvSource, LayerType, TextConfig};
use crate::error::Result;

#[derive(Debug, Clone)]
struct LayerCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    /// Tokens kept between steps (`W − 1` for sliding layers), `None` = unbounded.
    keep: Option<usize>,
}

impl LayerCache {
    /// Appends `[kv_heads, S, D]` keys/values; returns everything this step attends over.
    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (k_all, v_all) = match (&self.k, &self.v) {
            (Some(pk), Some(pv)) => (Tensor::cat(&[pk, k], 1)?, Tensor::cat(&[pv, v], 1)?),
            _ => (k.clone(), v.clone()),
        };
        let t = k_all.dim(1)?;
        let (k_keep, v_keep) = match self.keep {
            Some(keep) if t > keep => (
                k_all.narrow(1, t - keep, keep)?.contiguous()?,
                v_all.narrow(1, t - keep, keep)?.contiguous()?,
            ),
            _ => (k_all.clone(), v_all.clone()),
        };
        self.k = Some(k_keep);
        self.v = Some(v_keep);
        Ok((k_all, v_all))
    }
}

/// The cache of one sequence.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    sliding_window: usize,
    seq_len: usize,
}

impl KvCache {
    pub fn new(cfg: &TextConfig) -> Self {
        let layers = cfg
            .layers
            .iter()
            .map(|l| match l.kv_source {
                KvSource::Shared { .. } => None,
                KvSource::Own => Some(LayerCache {
                    k: None,
                    v: None,
                    keep: (l.layer_type == LayerType::Sliding)
                        .then(|| cfg.sliding_window.saturating_sub(1)),
                }),
            })
            .collect();
        KvCache {
            layers,
            sliding_window: cfg.sliding_window,
            seq_len: 0,
        }
    }

    /// Tokens processed so far (the position of the next token).
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Absolute position of the first cached key of a layer type before the next step.
    pub fn kv_start(&self, t: LayerType) -> usize {
        match t {
            LayerType::Full => 0,
            LayerType::Sliding => {
                self.seq_len - self.seq_len.min(self.sliding_window.saturating_sub(1))
            }
        }
    }

    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        match self.layers.get_mut(layer) {
            Some(Some(c)) => c.append(k, v),
            // Only reachable through a programming error: shared layers never append.
            _ => Err(candle_core::Error::Msg(format!("layer {layer} has no KV cache")).into()),
        }
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.seq_len += n;
    }

    /// Keys held by layer `layer` between steps (for tests and memory accounting).
    pub fn cached_len(&self, layer: usize) -> Option<usize> {
        self.layers
            .get(layer)?
            .as_ref()?
            .k
            .as_ref()
            .map(|k| k.dim(1).unwrap_or(0))
    }

    pub fn clear(&mut self) {
        for c in self.layers.iter_mut().flatten() {
            c.k = None;
            c.v = None;
        }
        self.seq_len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use candle_core::{DType, Device};

    fn cfg() -> TextConfig {
        let v = serde_json::json!({"model_type": "gemma4_text", "num_hidden_layers": 3, "sliding_window": 4,
            "num_kv_shared_layers": 1, "layer_types": ["sliding_attention", "full_attention", "full_attention"],
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 2, "global_head_dim": 2});
        ModelConfig::from_value(&v).unwrap().text
    }

    fn kv(n: usize, start: usize) -> Tensor {
        let data: Vec<f32> = (start..start + n).flat_map(|i| [i as f32, 0.0]).collect();
        Tensor::from_vec(data, (1, n, 2), &Device::Cpu).unwrap()
    }

    #[test]
    fn sliding_layers_keep_window_minus_one_full_layers_keep_all() {
        let cfg = cfg();
        let mut c = KvCache::new(&cfg);
        assert_eq!(c.cached_len(2), None, "shared layer owns no cache");
        // Prefill of 6 tokens: the step attends over all 6, then keeps W-1 = 3.
        let (k_all, _) = c.append(0, &kv(6, 0), &kv(6, 0)).unwrap();
        assert_eq!(k_all.dim(1).unwrap(), 6);
        c.append(1, &kv(6, 0), &kv(6, 0)).unwrap();
        c.advance(6);
        assert_eq!((c.cached_len(0), c.cached_len(1)), (Some(3), Some(6)));
        assert_eq!(c.kv_start(LayerType::Sliding), 3);
        assert_eq!(c.kv_start(LayerType::Full), 0);
        // Decode: 3 kept + 1 new = exactly the window; the oldest kept is position 3.
        let (k_all, _) = c.append(0, &kv(1, 6), &kv(1, 6)).unwrap();
        let firsts: Vec<f32> = k_all
            .to_dtype(DType::F32)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(firsts, [3.0, 4.0, 5.0, 6.0]);
        c.advance(1);
        assert_eq!(c.cached_len(0), Some(3));
        assert_eq!(c.kv_start(LayerType::Sliding), 4);
        c.clear();
        assert_eq!((c.seq_len(), c.cached_len(0)), (0, None));
    }
}
