//! The assistant drafter (`Gemma4AssistantForCausalLM`): a few decoder layers with
//! queries only, attending to the target's keys and values.
//!
//! One drafting step, as the reference computes it:
//! ```text
//! x = pre_projection(cat(target_embed(token) · √H_target, h_prev))   [1, 2·H_target] → [1, H]
//! for each layer: the decoder layer with q = RoPE(q_norm(q_proj ·)) at the round's
//!     fixed position, K/V = the target's K/V of the same layer type, scaling 1.0
//! h = norm(x); logits = head(h) (dense tied, or the centroid head); h_next = post_projection(h)
//! ```
//! The drafter keeps no cache: every step of a round sees the same target K/V at the
//! same position, and only `token` and `h_prev` change.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::config::{KvSource, LayerType};
use crate::draft::centroid_head::CentroidHead;
use crate::draft::config::DrafterConfig;
use crate::error::{Error, Result};
use crate::loading::weights::{Checkpoint, Weights};
use crate::nn::linear::Linear;
use crate::nn::norm::RmsNorm;
use crate::nn::rope::{self, Rope};
use crate::text::decoder_layer::DecoderLayer;
use crate::text::model::TextModel;

/// The target's keys and values one drafting round attends over, per layer type:
/// `[kv_heads, n, head_dim]` each.
pub type DraftKv = BTreeMap<LayerType, (Tensor, Tensor)>;

/// What one drafting step returns.
pub struct DraftStep {
    /// f32 logits `[1, vocab]`.
    pub logits: Tensor,
    /// The next step's recurrent state `[1, backbone_hidden]` (the reference's
    /// `last_hidden_state`, after `post_projection`).
    pub hidden: Tensor,
}

pub struct Drafter {
    cfg: DrafterConfig,
    pre_projection: Linear,
    post_projection: Linear,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// The drafter's own embedding, used only as its tied head.
    embed: Linear,
    centroid_head: Option<CentroidHead>,
    ropes: BTreeMap<LayerType, Rope>,
    /// The target layer whose K/V each layer type reads: the last layer of that type
    /// that computes its own (the reference's "store" layer).
    sources: BTreeMap<LayerType, usize>,
    dtype: DType,
    device: Device,
}

impl Drafter {
    /// Loads drafter checkpoint `dir` for `target`, in the target's dtype and device.
    /// Fails when the drafter was made for another target: its backbone width, vocabulary,
    /// window or K/V geometry differ.
    pub fn load(dir: &Path, target: &TextModel) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "drafter directory not found"),
            ));
        }
        let ckpt = Checkpoint::open(dir)?;
        let cfg = DrafterConfig::for_checkpoint(dir, &ckpt)?;
        let tcfg = target.config();
        let mismatch = |what: String| Error::config(dir.join("config.json"), what);
        if cfg.backbone_hidden_size != tcfg.hidden_size {
            return Err(mismatch(format!(
                "the drafter was trained with a target of hidden size {} (`backbone_hidden_size`), this target's is {}",
                cfg.backbone_hidden_size, tcfg.hidden_size
            )));
        }
        if cfg.text.vocab_size != tcfg.vocab_size {
            return Err(mismatch(format!(
                "the drafter's vocabulary has {} tokens, the target's {}",
                cfg.text.vocab_size, tcfg.vocab_size
            )));
        }
        let mut text = cfg.text.clone();
        let first_shared = tcfg.first_kv_shared_layer();
        let mut sources = BTreeMap::new();
        for (i, spec) in text.layers.iter_mut().enumerate() {
            let t = spec.layer_type;
            let src = (0..first_shared)
                .rev()
                .find(|&j| tcfg.layers[j].layer_type == t)
                .ok_or_else(|| {
                    mismatch(format!(
                        "drafter layer {i} is {}, a layer type the target does not have",
                        t.as_str()
                    ))
                })?;
            let tspec = &tcfg.layers[src];
            if (spec.num_kv_heads, spec.head_dim) != (tspec.num_kv_heads, tspec.head_dim) {
                return Err(mismatch(format!(
                    "drafter layer {i} ({}) expects K/V of {} heads × {}, the target's layer {src} has {} × {}",
                    t.as_str(), spec.num_kv_heads, spec.head_dim, tspec.num_kv_heads, tspec.head_dim
                )));
            }
            spec.kv_source = KvSource::Shared { producer: src };
            sources.insert(t, src);
        }
        if sources.contains_key(&LayerType::Sliding) && text.sliding_window != tcfg.sliding_window {
            return Err(mismatch(format!(
                "the drafter's sliding window is {}, the target's {}",
                text.sliding_window, tcfg.sliding_window
            )));
        }

        let w = Weights::new(&ckpt, "", target.dtype(), target.device());
        let m = w.pp("model");
        let (h, hb) = (text.hidden_size, cfg.backbone_hidden_size);
        let layers = (0..text.layers.len())
            .map(|i| DecoderLayer::new(&text, i, &m.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let embed = Linear::from_linear_weight(m.embedding_matrix(
            text.vocab_size,
            h,
            "embed_tokens.weight",
        )?);
        let centroid_head = cfg
            .centroids
            .map(|c| CentroidHead::new(&ckpt, &w, h, text.vocab_size, c))
            .transpose()?;
        let ropes = Rope::per_layer_type(&text);
        Ok(Drafter {
            pre_projection: Linear::new(2 * hb, h, &w, "pre_projection")?,
            post_projection: Linear::new(h, hb, &w, "post_projection")?,
            layers,
            norm: RmsNorm::new(h, text.rms_norm_eps, &m, "norm")?,
            embed,
            centroid_head,
            ropes,
            sources,
            dtype: target.dtype(),
            device: target.device().clone(),
            cfg: DrafterConfig { text, ..cfg },
        })
    }

    pub fn config(&self) -> &DrafterConfig {
        &self.cfg
    }

    /// The target layer each of the drafter's layer types reads its K/V from.
    pub fn sources(&self) -> &BTreeMap<LayerType, usize> {
        &self.sources
    }

    /// One drafting step: `token_embed` is the target's scaled embedding of the last
    /// token `[1, H_target]`, `hidden` the recurrent state `[1, H_target]` (the target's
    /// final hidden state at the first step of a round), `position` the round's position
    /// id, `kv` the target's K/V per layer type.
    pub fn step(
        &self,
        token_embed: &Tensor,
        hidden: &Tensor,
        position: usize,
        kv: &DraftKv,
    ) -> Result<DraftStep> {
        let x = Tensor::cat(
            &[
                token_embed.to_dtype(self.dtype)?,
                hidden.to_dtype(self.dtype)?,
            ],
            1,
        )?;
        let mut h = self.pre_projection.forward(&x)?;
        let mut tables = BTreeMap::new();
        for (&t, rope) in &self.ropes {
            tables.insert(t, rope.cos_sin(&[position], self.dtype, &self.device)?);
        }
        for layer in &self.layers {
            let t = layer.spec().layer_type;
            let (cos, sin) = &tables[&t];
            let (k, v) = kv.get(&t).ok_or_else(|| {
                Error::invalid_argument("draft", format!("no target K/V for {}", t.as_str()))
            })?;
            let rot = |q: &Tensor| rope::apply(q, cos, sin);
            h = layer.forward_full(&h, &rot, None, Some((k, v)), None)?.0;
        }
        let h = self.norm.forward(&h)?;
        let logits = match &self.centroid_head {
            Some(head) => head.forward(&h, &self.embed)?,
            None => self.embed.forward(&h)?.to_dtype(DType::F32)?,
        };
        Ok(DraftStep {
            logits,
            hidden: self.post_projection.forward(&h)?,
        })
    }
}
