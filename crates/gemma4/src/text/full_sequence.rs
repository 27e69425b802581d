//! The decoder over one whole sequence, with no KV cache: what training runs. Every layer
//! sees every position (the last-position shortcut of KV-shared layers is off, so
//! gradients reach the layers whose keys and values they read), and the pieces are
//! exposed one at a time ([`FullSequence`]) so a trainer can cut the computation at layer
//! boundaries (recomputation) and at chunks of the vocabulary (the loss).
//!
//! It is the same modules as the cached forward ([`TextModel::forward_batch`]); through
//! them it computes the same logits, which a test holds it to. Activations are f32
//! whatever the weights' format (a bf16 or quantized base is widened block by block in
//! each product, see `nn::autograd`).

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::config::{KvSource, LayerType};
use crate::error::{Error, Result};
use crate::nn::activation::soft_cap;
use crate::nn::mask::causal_mask;
use crate::nn::rope;
use crate::text::model::TextModel;

/// One sequence's fixed inputs to the full-sequence forward: positions' RoPE tables and
/// masks per layer type.
pub struct FullSequence {
    pub ids: Vec<u32>,
    pub ple_ids: Vec<u32>,
    tables: BTreeMap<LayerType, (Tensor, Tensor)>,
    masks: BTreeMap<LayerType, Option<Tensor>>,
}

impl FullSequence {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// The additive mask `[S, S]` of sequences packed one after the other (`segment[i]`: the
/// sequence of row `i`): row `i` sees row `j` iff both are of one sequence, `j ≤ i`, and,
/// with a sliding window `W`, `i − j < W`.
fn packed_mask(
    segment: &[usize],
    window: Option<usize>,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let s = segment.len();
    let mut m = vec![f32::NEG_INFINITY; s * s];
    for i in 0..s {
        for j in 0..=i {
            if segment[i] == segment[j] && window.is_none_or(|w| i - j < w) {
                m[i * s + j] = 0.0;
            }
        }
    }
    Ok(Tensor::from_vec(m, (s, s), device)?)
}

impl TextModel {
    /// Prepares `ids` (a text sequence from position 0) for [`Self::full_layer`].
    pub fn full_sequence(&self, ids: &[u32]) -> Result<FullSequence> {
        self.full_sequence_of(ids, &[ids.len()])
    }

    /// Prepares `ids`, sequences of `lengths` one after the other (a packed batch), for
    /// [`Self::full_layer`]: each from position 0 (its own RoPE angles) and attending only
    /// within itself (a block-diagonal causal mask, each block with the sliding window), so
    /// each computes what it would alone.
    pub fn full_sequence_of(&self, ids: &[u32], lengths: &[usize]) -> Result<FullSequence> {
        let max = self.cfg.max_position_embeddings;
        if ids.is_empty() || lengths.contains(&0) {
            return Err(Error::invalid_argument("sequence", "is empty"));
        }
        if lengths.iter().sum::<usize>() != ids.len() {
            return Err(Error::invalid_argument(
                "segments",
                format!("lengths {lengths:?} do not add up to the {} ids", ids.len()),
            ));
        }
        if let Some(&long) = lengths.iter().find(|&&n| n > max) {
            return Err(Error::ContextTooLong {
                prompt: long,
                new: 0,
                max,
            });
        }
        let positions: Vec<usize> = lengths.iter().flat_map(|&n| 0..n).collect();
        let segment: Vec<usize> = lengths
            .iter()
            .enumerate()
            .flat_map(|(k, &n)| std::iter::repeat_n(k, n))
            .collect();
        let mut tables = BTreeMap::new();
        let mut masks = BTreeMap::new();
        for (&t, r) in &self.ropes {
            tables.insert(
                t,
                r.cos_sin(&positions, candle_core::DType::F32, &self.device)?,
            );
            let window = (t == LayerType::Sliding).then_some(self.cfg.sliding_window);
            let mask = match lengths.len() {
                1 => causal_mask(&positions, &positions, window, None, &self.device)?,
                _ => Some(packed_mask(&segment, window, &self.device)?),
            };
            masks.insert(t, mask);
        }
        Ok(FullSequence {
            ids: ids.to_vec(),
            ple_ids: ids.to_vec(),
            tables,
            masks,
        })
    }

    /// Scaled input embeddings `[S, hidden]` in f32 (constant: the embedding is never
    /// trained).
    pub fn full_embeddings(&self, seq: &FullSequence) -> Result<Tensor> {
        self.embed_as(&seq.ids, candle_core::DType::F32)
    }

    /// The per-layer inputs `[S, L, P]` from the input embeddings `h0`, when the model has
    /// per-layer embeddings.
    pub fn full_per_layer_inputs(&self, seq: &FullSequence, h0: &Tensor) -> Result<Option<Tensor>> {
        self.ple
            .as_ref()
            .map(|p| p.forward(&seq.ple_ids, h0))
            .transpose()
    }

    /// Layer `i` over the whole sequence: `h` `[S, hidden]`, `ple` `[S, L, P]` (all layers';
    /// this one's slice is taken here) or this layer's `[S, P]`, `shared` its producer's
    /// keys and values when it shares them. Returns the residual stream and the keys and
    /// values it computed, if it computes its own.
    #[allow(clippy::type_complexity)]
    pub fn full_layer(
        &self,
        i: usize,
        seq: &FullSequence,
        h: &Tensor,
        ple: Option<&Tensor>,
        shared: Option<(&Tensor, &Tensor)>,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let layer = &self.layers[i];
        let t = layer.spec().layer_type;
        let (cos, sin) = &seq.tables[&t];
        let rot = |x: &Tensor| rope::apply(x, cos, sin);
        let mask = seq.masks.get(&t).and_then(Option::as_ref);
        let ple = match ple {
            Some(p) if p.rank() == 3 => Some(p.narrow(1, i, 1)?.squeeze(1)?),
            Some(p) => Some(p.clone()),
            None => None,
        };
        layer.forward_full(h, &rot, ple.as_ref(), shared, mask)
    }

    /// Where layer `i` reads its keys and values from: itself, or its producer.
    pub fn kv_producer(&self, i: usize) -> usize {
        match self.layers[i].spec().kv_source {
            KvSource::Own => i,
            KvSource::Shared { producer } => producer,
        }
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The final norm of residual-stream rows `h` (differentiable).
    pub fn final_norm(&self, h: &Tensor) -> Result<Tensor> {
        self.norm.forward(h)
    }

    /// The LM head's `[vocab, hidden]` weight (the tied embedding, or a stored head).
    pub fn head_weight(&self) -> &crate::nn::linear::LinearWeight {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens).weight()
    }

    /// f32 logits `[R, vocab]` of final residual-stream rows `h` `[R, hidden]`: final norm,
    /// the tied head, the soft cap.
    pub fn full_logits(&self, h: &Tensor) -> Result<Tensor> {
        let h = self.norm.forward(h)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        let mut logits = head.forward(&h)?.to_dtype(candle_core::DType::F32)?;
        if let Some(cap) = self.cfg.final_logit_softcapping {
            logits = soft_cap(&logits, cap)?;
        }
        Ok(logits)
    }

    /// The final residual stream `[S, hidden]` of `seq`, every layer run in order. Each
    /// layer's output (and its keys and values) is cut from the graph it was computed in,
    /// so a forward pass with trained tensors in it keeps one layer's graph at a time.
    pub fn full_hidden(&self, seq: &FullSequence) -> Result<Tensor> {
        let mut h = self.full_embeddings(seq)?;
        let ple = self.full_per_layer_inputs(seq, &h)?.map(|p| p.detach());
        let mut kv: BTreeMap<usize, (Tensor, Tensor)> = BTreeMap::new();
        for i in 0..self.num_layers() {
            let p = self.kv_producer(i);
            let shared = (p != i).then(|| kv.get(&p)).flatten().map(|(k, v)| (k, v));
            let (out, own) = self.full_layer(i, seq, &h, ple.as_ref(), shared)?;
            if let Some((k, v)) = own {
                kv.insert(i, (k.detach(), v.detach()));
            }
            h = out.detach();
        }
        Ok(h)
    }

    /// Every position's f32 logits `[S, vocab]` of `ids` through the full-sequence path
    /// (no cache): the same numbers as [`Self::forward`] with [`crate::LogitsFor::All`].
    pub fn forward_full(&self, ids: &[u32]) -> Result<Tensor> {
        let seq = self.full_sequence(ids)?;
        self.full_logits(&self.full_hidden(&seq)?)
    }
}
