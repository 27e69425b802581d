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

use crate::config::{Bidirectional, KvSource, LayerType};
use crate::error::{Error, Result};
use crate::multimodal::{splice, SoftTokens};
use crate::nn::activation::soft_cap;
use crate::nn::mask::{causal_mask, visible, SpanOverlay};
use crate::nn::rope;
use crate::text::model::TextModel;

/// One sequence's fixed inputs to the full-sequence forward: positions' RoPE tables and
/// masks per layer type.
pub struct FullSequence {
    pub ids: Vec<u32>,
    pub ple_ids: Vec<u32>,
    /// Placeholder positions and the soft tokens written over them.
    soft: Option<(Vec<u32>, Tensor)>,
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
/// sequence of row `i`, `pos[i]` its position in it, `spans[i]` its image span or −1):
/// row `i` sees row `j` iff both are of one sequence and [`visible`] says so there.
fn packed_mask(
    segment: &[usize],
    pos: &[usize],
    spans: Option<&[i64]>,
    window: Option<usize>,
    mode: Option<Bidirectional>,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let s = segment.len();
    let mut m = vec![f32::NEG_INFINITY; s * s];
    for i in 0..s {
        for j in 0..s {
            let same_span = spans.is_some_and(|b| b[i] >= 0 && b[i] == b[j]);
            if segment[i] == segment[j] && visible(pos[i], pos[j], window, same_span, mode) {
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
        self.full_sequence_with(ids, lengths, None)
    }

    /// [`Self::full_sequence_of`] with the soft tokens of the sequences' images, video
    /// frames and audio clips (encoded by frozen towers: constants of the graph) written
    /// over their placeholders, the per-layer embeddings reading the pad id there, and the
    /// bidirectional overlay over image spans where the config has one, as the
    /// reference's `Gemma4Model.forward` builds its input and masks.
    pub fn full_sequence_with(
        &self,
        ids: &[u32],
        lengths: &[usize],
        soft: Option<&SoftTokens>,
    ) -> Result<FullSequence> {
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
        if let Some(t) = soft {
            if t.ple_ids.len() != ids.len() || t.spans.len() != ids.len() {
                return Err(Error::invalid_argument(
                    "soft tokens",
                    format!("prepared for {} ids, not {}", t.ple_ids.len(), ids.len()),
                ));
            }
            if t.slots.len() != t.rows.dim(0)? || t.slots.iter().any(|&p| p as usize >= ids.len()) {
                return Err(Error::invalid_argument(
                    "soft tokens",
                    "their rows and placeholder positions disagree",
                ));
            }
        }
        let mode = match (soft, self.cfg.bidirectional) {
            (Some(_), m) if m != Bidirectional::None => Some(m),
            _ => None,
        };
        let spans = soft.map(|t| t.spans.as_slice());
        let mut tables = BTreeMap::new();
        let mut masks = BTreeMap::new();
        for (&t, r) in &self.ropes {
            tables.insert(
                t,
                r.cos_sin(&positions, candle_core::DType::F32, &self.device)?,
            );
            let window = (t == LayerType::Sliding).then_some(self.cfg.sliding_window);
            let mask = match (lengths.len(), spans) {
                (1, None) => causal_mask(&positions, &positions, window, None, &self.device)?,
                (1, Some(blocks)) => {
                    let overlay = mode.map(|mode| SpanOverlay {
                        blocks,
                        start: 0,
                        mode,
                    });
                    causal_mask(
                        &positions,
                        &positions,
                        window,
                        overlay.as_ref(),
                        &self.device,
                    )?
                }
                _ => Some(packed_mask(
                    &segment,
                    &positions,
                    spans.filter(|_| mode.is_some()),
                    window,
                    mode,
                    &self.device,
                )?),
            };
            masks.insert(t, mask);
        }
        Ok(FullSequence {
            ids: ids.to_vec(),
            ple_ids: soft.map_or_else(|| ids.to_vec(), |t| t.ple_ids.clone()),
            soft: soft.map(|t| (t.slots.clone(), t.rows.clone())),
            tables,
            masks,
        })
    }

    /// Scaled input embeddings `[S, hidden]` in f32 (constant: the embedding is never
    /// trained).
    pub fn full_embeddings(&self, seq: &FullSequence) -> Result<Tensor> {
        let h0 = self.embed_as(&seq.ple_ids, candle_core::DType::F32)?;
        match &seq.soft {
            Some((slots, rows)) if !slots.is_empty() => splice(&h0, slots, rows),
            _ => Ok(h0),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The packed mask is the block-diagonal of each sequence's own mask, image spans and
    /// the sliding window included, in every bidirectional mode.
    #[test]
    fn the_packed_mask_is_each_sequences_mask_on_the_diagonal() {
        let dev = Device::Cpu;
        // Two sequences of 7 and 6; an image span in each (ids 0 and 1 in the packed rows).
        let lengths = [7usize, 6];
        let spans: Vec<i64> = vec![-1, 0, 0, 0, -1, -1, -1, -1, -1, 1, 1, 1, -1];
        let segment: Vec<usize> = vec![0; 7].into_iter().chain(vec![1; 6]).collect();
        let pos: Vec<usize> = (0..7).chain(0..6).collect();
        for mode in [
            None,
            Some(Bidirectional::Vision),
            Some(Bidirectional::VisionAllLayers),
        ] {
            for window in [None, Some(2)] {
                let packed = packed_mask(&segment, &pos, Some(&spans), window, mode, &dev)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
                let mut start = 0;
                for &n in &lengths {
                    let local: Vec<usize> = (0..n).collect();
                    let blocks = &spans[start..start + n];
                    let overlay = mode.map(|mode| SpanOverlay {
                        blocks,
                        start: 0,
                        mode,
                    });
                    let own = causal_mask(&local, &local, window, overlay.as_ref(), &dev)
                        .unwrap()
                        .map(|m| m.to_vec2::<f32>().unwrap());
                    for i in 0..n {
                        for j in 0..13 {
                            let inside = (start..start + n).contains(&j);
                            let want = match (&own, inside) {
                                (_, false) => f32::NEG_INFINITY,
                                (None, true) => 0.0,
                                (Some(m), true) => m[i][j - start],
                            };
                            assert_eq!(
                                packed[start + i][j],
                                want,
                                "{mode:?} {window:?} row {} col {j}",
                                start + i
                            );
                        }
                    }
                    start += n;
                }
                // The overlay shows: an image token sees a later one of its span.
                let bidi = packed[1][3] == 0.0;
                let expect = !matches!(
                    (mode, window),
                    (None, _) | (Some(Bidirectional::Vision), None)
                );
                assert_eq!(bidi, expect, "{mode:?} {window:?}");
            }
        }
    }
}
