//! The text decoder (`Gemma4TextModel` + the tied LM head of `Gemma4ForCausalLM`):
//! scaled embeddings, per-layer embeddings, the decoder layers with their KV cache and KV
//! sharing, final norm, logits against the unscaled embedding matrix, final softcap.
//!
//! Usable on its own: token ids (or input embeddings, for multimodal prompts) in, logits out.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use crate::config::{Bidirectional, LayerType, TextConfig};
use crate::error::{Error, Result};
use crate::loading::weights::Weights;
use crate::nn::activation::soft_cap;
use crate::nn::linear::Linear;
use crate::nn::mask::{causal_mask, SpanOverlay};
use crate::nn::norm::RmsNorm;
use crate::nn::rope::{self, Rope};
use crate::text::attention::SeqStep;
use crate::text::decoder_layer::DecoderLayer;
use crate::text::kv_cache::KvCache;
use crate::text::ple::PerLayerEmbeddings;

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
    /// None: the step only fills the cache (a prompt chunk before the last one).
    None,
}

/// One sequence's part of a batched forward pass ([`TextModel::forward_batch`]).
pub struct StepInput<'a> {
    /// Scaled input embeddings `[s, hidden]` of the step's tokens ([`TextModel::embed`],
    /// or a multimodal prompt's rows with the soft tokens spliced in).
    pub embeds: Tensor,
    /// The ids the per-layer embeddings read, one per row.
    pub ple_ids: &'a [u32],
    /// Image/video span ids of the step's rows, for the bidirectional overlay.
    pub spans: Option<&'a [i64]>,
    pub cache: &'a mut KvCache,
    pub which: LogitsFor,
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
    pub(super) cfg: TextConfig,
    /// The tied embedding table, which is also the LM head.
    pub(super) embed_tokens: Linear,
    /// A separately stored copy of the head, when the checkpoint has one: llama.cpp's
    /// `output.weight`, which llama-quantize may keep in a finer format than the
    /// embedding (see [`crate::loading::gguf::names`]). Safetensors checkpoints have none.
    pub(super) lm_head: Option<Linear>,
    pub(super) embed_scale: f64,
    pub(super) ple: Option<PerLayerEmbeddings>,
    pub(super) layers: Vec<DecoderLayer>,
    pub(super) norm: RmsNorm,
    pub(super) ropes: BTreeMap<LayerType, Rope>,
    pub(super) dtype: DType,
    pub(super) device: Device,
}

impl TextModel {
    /// Every projection of the decoder (the embedding/LM head, the per-layer-embedding
    /// projection, each layer's), each with the checkpoint tensor it came from: what
    /// `gemma4 quantize` writes, and where adapters attach.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut v = vec![&self.embed_tokens];
        v.extend(&self.lm_head);
        v.extend(self.ple.as_ref().map(|p| p.linear()));
        for l in &self.layers {
            v.extend(l.linears());
        }
        v
    }

    /// `w` is rooted at the text model (`model.language_model.` or `model.`).
    pub fn new(cfg: &TextConfig, w: &Weights) -> Result<Self> {
        if !cfg.tie_word_embeddings {
            return Err(Error::invalid_argument(
                "tie_word_embeddings",
                "untied LM heads are not used by Gemma 4 and are not supported",
            ));
        }
        let embedding = |name: &str| -> Result<Linear> {
            Ok(Linear::from_linear_weight(w.embedding_matrix(
                cfg.vocab_size,
                cfg.hidden_size,
                name,
            )?)
            .with_source(w.name(name), None))
        };
        let embed_tokens = embedding("embed_tokens.weight")?;
        let lm_head = if w.contains("lm_head.weight") {
            Some(embedding("lm_head.weight")?)
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
            .map(|(i, _)| DecoderLayer::new(cfg, i, &w.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let ropes = Rope::per_layer_type(cfg);
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
        self.embed_as(ids, self.dtype)
    }

    /// [`Self::embed`] with the rows in `dtype` (the full-sequence path computes in f32).
    pub(super) fn embed_as(&self, ids: &[u32], dtype: DType) -> Result<Tensor> {
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
            .rows(&idx, dtype)?
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
    /// [`crate::nn::mask::SpanOverlay`]), ignored when the config has none.
    pub fn forward_embeds(
        &self,
        h0: &Tensor,
        ple_ids: &[u32],
        spans: Option<&[i64]>,
        cache: &mut KvCache,
        which: LogitsFor,
    ) -> Result<Tensor> {
        let mut batch = [StepInput {
            embeds: h0.clone(),
            ple_ids,
            spans,
            cache,
            which,
        }];
        let mut out = self.forward_batch(&mut batch)?;
        out.pop()
            .flatten()
            .ok_or_else(|| Error::invalid_argument("logits", "none were asked for"))
    }

    /// One forward pass over several sequences at once: each brings its step's rows
    /// (a chunk of its prompt, or the one token it decodes), its own cache and which
    /// logits it wants. The projections, norms, MLPs and the head run once over every
    /// row, so each weight is read once for the whole batch; attention is per sequence,
    /// over its own cache with its own positions, window and image spans. Each sequence
    /// gets what it would get alone (up to f32 rounding where a kernel's summation order
    /// depends on the number of rows). Returns each sequence's f32 logits (`None` for
    /// [`LogitsFor::None`]).
    pub fn forward_batch(&self, batch: &mut [StepInput<'_>]) -> Result<Vec<Option<Tensor>>> {
        Ok(self
            .forward_batch_hidden(batch)?
            .into_iter()
            .map(|o| o.map(|(logits, _)| logits))
            .collect())
    }

    /// [`Self::forward_batch`] that also returns, beside each sequence's logits, the
    /// hidden states they were computed from: the final norm's output `[n, hidden]` for
    /// the same rows (the reference's `hidden_states[-1]`, which an assistant drafter
    /// reads).
    pub fn forward_batch_hidden(
        &self,
        batch: &mut [StepInput<'_>],
    ) -> Result<Vec<Option<(Tensor, Tensor)>>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let max = self.cfg.max_position_embeddings;
        let mut positions = Vec::new();
        let mut seqs = Vec::with_capacity(batch.len());
        let mut embeds = Vec::with_capacity(batch.len());
        let mut ple_ids = Vec::new();
        let mut overlays = Vec::with_capacity(batch.len());
        let mut whiches = Vec::with_capacity(batch.len());
        for input in batch.iter_mut() {
            let s = input.embeds.dim(0)?;
            if s == 0 {
                return Err(Error::invalid_argument("prompt", "no tokens to run"));
            }
            if input.ple_ids.len() != s {
                return Err(Error::invalid_argument(
                    "ple_ids",
                    format!("{} ids for {s} input rows", input.ple_ids.len()),
                ));
            }
            let past = input.cache.seq_len();
            if past + s > max {
                return Err(Error::ContextTooLong {
                    prompt: past + s,
                    new: 0,
                    max,
                });
            }
            let start = positions.len();
            positions.extend(past..past + s);
            overlays.push(match (input.spans, self.cfg.bidirectional) {
                (Some(blocks), mode) if mode != Bidirectional::None => Some(SpanOverlay {
                    blocks,
                    start: past,
                    mode,
                }),
                _ => None,
            });
            embeds.push(input.embeds.clone());
            ple_ids.extend_from_slice(input.ple_ids);
            seqs.push(start..start + s);
            whiches.push(input.which);
        }
        let mut h = match embeds.len() {
            1 => embeds.pop().expect("one input"),
            _ => Tensor::cat(&embeds, 0)?,
        };
        let mut ple = match &self.ple {
            Some(p) => Some(p.forward(&ple_ids, &h)?),
            None => None,
        };
        let mut rope_tables = BTreeMap::new();
        for (&t, rope) in &self.ropes {
            rope_tables.insert(t, rope.cos_sin(&positions, self.dtype, &self.device)?);
        }
        let mut steps = Vec::with_capacity(batch.len());
        for ((input, rows), overlay) in batch.iter_mut().zip(&seqs).zip(&overlays) {
            input.cache.begin_step(rows.len())?;
            let masks = self.masks(&positions[rows.clone()], input.cache, overlay.as_ref())?;
            steps.push(SeqStep {
                rows: rows.clone(),
                cache: &mut *input.cache,
                masks,
            });
        }

        let first_shared = self.cfg.first_kv_shared_layer();
        let narrowing = seqs
            .iter()
            .zip(&whiches)
            .any(|(r, w)| *w != LogitsFor::All && r.len() > 1);
        for (i, layer) in self.layers.iter().enumerate() {
            if i == first_shared && narrowing {
                // Past the sharing point nothing writes a cache: only the rows whose
                // logits are wanted matter.
                let keep = Self::wanted_rows(&steps, &whiches);
                let idx = Tensor::new(keep.as_slice(), &self.device)?;
                h = h.index_select(&idx, 0)?;
                ple = ple.map(|p| p.index_select(&idx, 0)).transpose()?;
                for (cos, sin) in rope_tables.values_mut() {
                    *cos = cos.index_select(&idx, 0)?;
                    *sin = sin.index_select(&idx, 0)?;
                }
                let mut at = 0;
                for ((st, overlay), w) in steps.iter_mut().zip(&overlays).zip(&whiches) {
                    let n = if *w == LogitsFor::All {
                        st.rows.len()
                    } else {
                        1
                    };
                    let q_pos = &positions[st.rows.end - n..st.rows.end];
                    st.masks = self.masks(q_pos, st.cache, overlay.as_ref())?;
                    st.rows = at..at + n;
                    at += n;
                }
            }
            let (cos, sin) = &rope_tables[&layer.spec().layer_type];
            let rot = |t: &Tensor| rope::apply(t, cos, sin);
            let layer_ple = ple
                .as_ref()
                .map(|p| p.narrow(1, i, 1)?.squeeze(1))
                .transpose()?;
            h = layer.forward(&h, &rot, layer_ple.as_ref(), &mut steps)?;
        }
        for st in steps.iter_mut() {
            st.cache.end_step()?;
        }

        // The head over the wanted rows of every sequence at once.
        let counts: Vec<usize> = steps
            .iter()
            .zip(&whiches)
            .map(|(st, w)| match w {
                LogitsFor::None => 0,
                LogitsFor::All => st.rows.len(),
                LogitsFor::Last => 1,
            })
            .collect();
        let picked: Vec<u32> = steps
            .iter()
            .zip(&counts)
            .flat_map(|(st, &n)| (st.rows.end - n..st.rows.end).map(|r| r as u32))
            .collect();
        let mut out = Vec::with_capacity(steps.len());
        if picked.is_empty() {
            out.resize(steps.len(), None);
            return Ok(out);
        }
        // `picked` is increasing: as many rows as `h` has means all of them, in order.
        let h = if picked.len() == h.dim(0)? {
            h
        } else {
            h.index_select(&Tensor::new(picked.as_slice(), &self.device)?, 0)?
        };
        let h = self.norm.forward(&h)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        let mut logits = head.forward(&h)?;
        if let Some(cap) = self.cfg.final_logit_softcapping {
            logits = soft_cap(&logits, cap)?;
        }
        let logits = logits.to_dtype(DType::F32)?;
        let mut at = 0;
        for n in counts {
            out.push(
                (n > 0)
                    .then(|| -> Result<_> { Ok((logits.narrow(0, at, n)?, h.narrow(0, at, n)?)) })
                    .transpose()?,
            );
            at += n;
        }
        Ok(out)
    }

    /// Rows of the step's activations still needed past the KV-sharing point: all of a
    /// sequence that wants every row's logits, the last one of the others.
    fn wanted_rows(steps: &[SeqStep<'_>], whiches: &[LogitsFor]) -> Vec<u32> {
        steps
            .iter()
            .zip(whiches)
            .flat_map(|(st, w)| {
                let r = &st.rows;
                let from = if *w == LogitsFor::All {
                    r.start
                } else {
                    r.end - 1
                };
                (from..r.end).map(|i| i as u32)
            })
            .collect()
    }

    /// Attention masks per layer type for queries at `q_pos` over what `cache` holds
    /// during the step.
    fn masks(
        &self,
        q_pos: &[usize],
        cache: &KvCache,
        overlay: Option<&SpanOverlay<'_>>,
    ) -> Result<BTreeMap<LayerType, Option<Tensor>>> {
        let mut masks = BTreeMap::new();
        for &t in self.ropes.keys() {
            let window = (t == LayerType::Sliding).then_some(self.cfg.sliding_window);
            let k_pos = cache.key_positions(t);
            masks.insert(
                t,
                causal_mask(q_pos, &k_pos, window, overlay, &self.device)?,
            );
        }
        Ok(masks)
    }
}
