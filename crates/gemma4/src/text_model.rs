//! The text decoder (`Gemma4TextModel` + the tied LM head of `Gemma4ForCausalLM`):
//! scaled embeddings, per-layer embeddings, the decoder layers with their KV cache and KV
//! sharing, final norm, logits against the unscaled embedding matrix, final softcap.
//!
//! Usable on its own: token ids (or input embeddings, for multimodal prompts) in, logits out.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use crate::activation::soft_cap;
use crate::attention::{causal_mask, SpanOverlay};
use crate::config::{Bidirectional, KvSource, LayerType, TextConfig};
use crate::decoder_layer::DecoderLayer;
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::linear::Linear;
use crate::norm::RmsNorm;
use crate::ple::PerLayerEmbeddings;
use crate::rope::{self, Rope};
use crate::weights::Weights;

/// `x` rounded to `dtype`, as the reference casts scalar buffers (`embed_scale`) to the
/// weight dtype before multiplying.
pub(crate) fn round_to(dtype: DType, x: f64) -> f64 {
    match dtype {
        DType::BF16 => half::bf16::from_f64(x).to_f64(),
        DType::F16 => half::f16::from_f64(x).to_f64(),
        DType::F32 => x as f32 as f64,
        _ => x,
    }
}

/// Which positions to compute logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Every position: `[S, vocab]`.
    All,
    /// Only the last position: `[1, vocab]`. KV-shared layers then run on the last
    /// position only (they write no cache, so nothing else is needed there).
    Last,
}

/// A prompt ready for the decoder: its ids and, for multimodal prompts, the input
/// embeddings with the soft tokens spliced in, the ids the per-layer embeddings read, and
/// the image spans for the bidirectional overlay.
#[derive(Debug, Clone)]
pub struct PromptInput {
    pub ids: Vec<u32>,
    pub embeds: Option<Tensor>,
    pub ple_ids: Vec<u32>,
    pub spans: Option<Vec<i64>>,
}

impl PromptInput {
    /// A text-only prompt.
    pub fn text(ids: Vec<u32>) -> Self {
        PromptInput {
            ple_ids: ids.clone(),
            ids,
            embeds: None,
            spans: None,
        }
    }
}

pub struct TextModel {
    cfg: TextConfig,
    /// The tied embedding table, which is also the LM head.
    embed_tokens: Linear,
    /// A separately stored copy of the head, when the checkpoint has one: llama.cpp's
    /// `output.weight`, which llama-quantize may keep in a finer format than the
    /// embedding (see [`crate::gguf_names`]). Safetensors checkpoints have none.
    lm_head: Option<Linear>,
    embed_scale: f64,
    ple: Option<PerLayerEmbeddings>,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    ropes: BTreeMap<LayerType, Rope>,
    dtype: DType,
    device: Device,
}

impl TextModel {
    /// `w` is rooted at the text model (`model.language_model.` or `model.`).
    pub fn new(cfg: &TextConfig, w: &Weights) -> Result<Self> {
        if !cfg.tie_word_embeddings {
            return Err(Error::invalid_argument(
                "tie_word_embeddings",
                "untied LM heads are not used by Gemma 4 and are not supported",
            ));
        }
        let embed_tokens = Linear::from_linear_weight(w.embedding_matrix(
            cfg.vocab_size,
            cfg.hidden_size,
            "embed_tokens.weight",
        )?);
        let lm_head = if w.contains("lm_head.weight") {
            Some(Linear::from_linear_weight(w.embedding_matrix(
                cfg.vocab_size,
                cfg.hidden_size,
                "lm_head.weight",
            )?))
        } else {
            None
        };
        let ple = if cfg.hidden_size_per_layer_input > 0 {
            Some(PerLayerEmbeddings::new(
                cfg.vocab_size_per_layer_input,
                cfg.hidden_size,
                cfg.num_hidden_layers,
                cfg.hidden_size_per_layer_input,
                cfg.rms_norm_eps,
                w,
            )?)
        } else {
            None
        };
        let layers = cfg
            .layers
            .iter()
            .enumerate()
            .map(|(i, spec)| DecoderLayer::new(cfg, spec, &w.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let ropes = cfg
            .rope
            .iter()
            .filter_map(|(t, r)| cfg.rope_head_dim(*t).map(|d| (*t, Rope::new(r, d))))
            .collect();
        Ok(TextModel {
            embed_scale: round_to(w.dtype, (cfg.hidden_size as f64).sqrt()),
            embed_tokens,
            lm_head,
            ple,
            layers,
            norm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, w, "norm")?,
            ropes,
            dtype: w.dtype,
            device: w.device.clone(),
            cfg: cfg.clone(),
        })
    }

    /// Bytes held in memory that one decoding step does not read: the experts a token is
    /// not routed to (all but `top_k` of `num_experts` per layer; each expert is the same
    /// size), and the embedding table when a separate head is held (one row of it is
    /// read). The bandwidth bound of `gemma4 bench` subtracts these from the weights held.
    pub fn unread_bytes_per_token(&self) -> u64 {
        let experts: usize = self.layers.iter().map(|l| l.expert_bytes()).sum();
        let idle_experts = match &self.cfg.moe {
            Some(m) => experts * (m.num_experts - m.top_k) / m.num_experts,
            None => 0,
        };
        let unused_table = match self.lm_head {
            Some(_) => self.embed_tokens.weight().size_in_bytes(),
            None => 0,
        };
        (idle_experts + unused_table) as u64
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(&self.cfg)
    }

    /// Scaled input embeddings `[S, hidden]` of `ids`.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
            return Err(Error::invalid_argument(
                "token id",
                format!(
                    "{bad} is outside the vocabulary of {} tokens",
                    self.cfg.vocab_size
                ),
            ));
        }
        let idx = Tensor::new(ids, &self.device)?;
        Ok(self
            .embed_tokens
            .weight()
            .rows(&idx, self.dtype)?
            .affine(self.embed_scale, 0.0)?)
    }

    /// Runs `ids` through the model after what `cache` holds and returns f32 logits.
    pub fn forward(&self, ids: &[u32], cache: &mut KvCache, which: LogitsFor) -> Result<Tensor> {
        let h0 = self.embed(ids)?;
        self.forward_embeds(&h0, ids, None, cache, which)
    }

    /// Runs a prepared prompt (text or multimodal) after what `cache` holds.
    pub fn forward_input(
        &self,
        input: &PromptInput,
        cache: &mut KvCache,
        which: LogitsFor,
    ) -> Result<Tensor> {
        match &input.embeds {
            None => self.forward(&input.ids, cache, which),
            Some(h0) => {
                self.forward_embeds(h0, &input.ple_ids, input.spans.as_deref(), cache, which)
            }
        }
    }

    /// Like [`Self::forward`] from input embeddings `h0` `[S, hidden]`; `ple_ids` are the ids
    /// the per-layer embeddings read (multimodal placeholders replaced by the pad id);
    /// `spans` marks image/video spans for the bidirectional overlay (see
    /// [`crate::attention::SpanOverlay`]), ignored when the config has none.
    pub fn forward_embeds(
        &self,
        h0: &Tensor,
        ple_ids: &[u32],
        spans: Option<&[i64]>,
        cache: &mut KvCache,
        which: LogitsFor,
    ) -> Result<Tensor> {
        let s = h0.dim(0)?;
        if s == 0 {
            return Err(Error::invalid_argument("prompt", "no tokens to run"));
        }
        let past = cache.seq_len();
        if past + s > self.cfg.max_position_embeddings {
            return Err(Error::ContextTooLong {
                prompt: past + s,
                new: 0,
                max: self.cfg.max_position_embeddings,
            });
        }
        let positions: Vec<usize> = (past..past + s).collect();
        let overlay = match (spans, self.cfg.bidirectional) {
            (Some(blocks), mode) if mode != Bidirectional::None => Some(SpanOverlay {
                blocks,
                start: past,
                mode,
            }),
            _ => None,
        };
        let mut ple = match &self.ple {
            Some(p) => Some(p.forward(ple_ids, h0)?),
            None => None,
        };
        let mut rope_tables = BTreeMap::new();
        let mut masks = BTreeMap::new();
        for (&t, rope) in &self.ropes {
            rope_tables.insert(t, rope.cos_sin(&positions, self.dtype, &self.device)?);
            let k_start = cache.kv_start(t);
            let window = (t == LayerType::Sliding).then_some(self.cfg.sliding_window);
            masks.insert(
                t,
                causal_mask(
                    &positions,
                    k_start,
                    past + s - k_start,
                    window,
                    overlay.as_ref(),
                    &self.device,
                )?,
            );
        }

        let mut h = h0.clone();
        let mut shared: BTreeMap<LayerType, (Tensor, Tensor)> = BTreeMap::new();
        let first_shared = self.cfg.first_kv_shared_layer();
        for (i, layer) in self.layers.iter().enumerate() {
            if i == first_shared && which == LogitsFor::Last && s > 1 {
                // Past the sharing point nothing writes a cache: only the last row matters.
                h = h.narrow(0, s - 1, 1)?;
                ple = ple.map(|p| p.narrow(0, s - 1, 1)).transpose()?;
                for (cos, sin) in rope_tables.values_mut() {
                    *cos = cos.narrow(0, s - 1, 1)?;
                    *sin = sin.narrow(0, s - 1, 1)?;
                }
                for (t, m) in masks.iter_mut() {
                    let k_start = cache.kv_start(*t);
                    let window = (*t == LayerType::Sliding).then_some(self.cfg.sliding_window);
                    *m = causal_mask(
                        &positions[s - 1..],
                        k_start,
                        past + s - k_start,
                        window,
                        overlay.as_ref(),
                        &self.device,
                    )?;
                }
            }
            let spec = &self.cfg.layers[i];
            let (cos, sin) = &rope_tables[&spec.layer_type];
            let x = layer.input_norm(&h)?;
            let rot = |t: &Tensor| rope::apply(t, cos, sin);
            let q = layer.attn.queries(&x, &rot)?;
            let (k, v) = match spec.kv_source {
                KvSource::Own => {
                    let (k, v) = layer.attn.keys_values(&x, &rot)?;
                    let kv = cache.append(i, &k, &v)?;
                    // The last own layer of each type before the sharing point is the producer.
                    shared.insert(spec.layer_type, kv.clone());
                    kv
                }
                KvSource::Shared { .. } => shared[&spec.layer_type].clone(),
            };
            let attn = layer
                .attn
                .attend(&q, &k, &v, masks[&spec.layer_type].as_ref())?;
            let layer_ple = ple
                .as_ref()
                .map(|p| p.narrow(1, i, 1)?.squeeze(1))
                .transpose()?;
            h = layer.finish(&h, &attn, layer_ple.as_ref())?;
        }
        cache.advance(s);

        if which == LogitsFor::Last && h.dim(0)? > 1 {
            h = h.narrow(0, h.dim(0)? - 1, 1)?;
        }
        let h = self.norm.forward(&h)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        let mut logits = head.forward(&h)?;
        if let Some(cap) = self.cfg.final_logit_softcapping {
            logits = soft_cap(&logits, cap)?;
        }
        Ok(logits.to_dtype(DType::F32)?)
    }
}
