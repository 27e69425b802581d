//! One sequence's loss and the gradients of the trained adapter's tensors, by backprop
//! through the frozen decoder, one layer at a time.
//!
//! The forward pass is cut at layer boundaries: each layer's input (and, for a layer that
//! shares its keys and values, its producer's K/V, and its per-layer input) enters as a
//! leaf of its own graph. Backward then runs layer by layer from the last, each taking the
//! gradient of its output (and of the K/V later layers read from it) and handing back the
//! gradient of its inputs: `∂L/∂in = backward(Σ out ⊙ ∂L/∂out + Σ K ⊙ ∂L/∂K + Σ V ⊙ ∂L/∂V)`.
//! With recomputation on, only the layer inputs are kept from the forward pass and each
//! layer is run again just before its backward (peak memory: one layer's activations);
//! off, every layer's graph is kept from the forward pass (no second forward).
//! Gradients of the per-layer inputs flow last into the per-layer-embedding projection.

use std::collections::BTreeMap;

use candle_core::{backprop::GradStore, Tensor, Var};

use crate::error::Result;
use crate::lora::{with_adapters, AdapterSet};
use crate::multimodal::{ProcessedMedia, SoftTokens};
use crate::nn::linear::with_widened_cache;
use crate::nn::lora::{with_dropout, Dropout};
use crate::text::full_sequence::FullSequence;
use crate::text::model::TextModel;
use crate::train::loss::head_loss;

/// How a sequence's gradients are computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradientOptions {
    /// Run each layer again during backward instead of keeping its activations.
    pub recompute: bool,
    /// Vocabulary entries of the head computed at once for the loss.
    pub vocab_block: usize,
    /// LoRA dropout (its masks are drawn again, the same, when a layer is recomputed).
    pub dropout: Option<Dropout>,
    /// Also return the gradient of the scaled input embeddings
    /// ([`SequenceGradients::input_gradient`]).
    pub input_gradient: bool,
}

impl Default for GradientOptions {
    fn default() -> Self {
        GradientOptions {
            recompute: true,
            vocab_block: crate::train::loss::VOCAB_BLOCK,
            dropout: None,
            input_gradient: false,
        }
    }
}

/// A training example: token ids and, per position, the token it is supervised to be
/// (`None`: not supervised, HF's −100). Position `i`'s logits are scored against
/// `labels[i + 1]`.
///
/// A packed example ([`Example::pack`]) holds several sequences one after the other;
/// `segments` are their lengths (empty: one sequence). Each runs from position 0 and
/// attends only within itself, so the packed example computes what its sequences do apart
/// (the semantics of padding-free batches with per-sequence position ids).
///
/// A multimodal example carries the soft tokens of its images and audio clips (`media`),
/// encoded once by the frozen towers when the data is read: inputs of the decoder that
/// take no gradient, written over their placeholders, which are never supervised.
///
/// When the towers are trained too, an example also keeps its processed media
/// (`sources`: where its sequence starts in `ids`, and the media), which
/// [`media_sequence_gradients`] encodes again at every step.
#[derive(Debug, Clone)]
pub struct Example {
    pub ids: Vec<u32>,
    pub labels: Vec<Option<u32>>,
    pub segments: Vec<usize>,
    pub media: Option<SoftTokens>,
    pub sources: Vec<(usize, std::sync::Arc<ProcessedMedia>)>,
}

impl Example {
    /// One sequence.
    pub fn new(ids: Vec<u32>, labels: Vec<Option<u32>>) -> Self {
        Example {
            ids,
            labels,
            segments: Vec::new(),
            media: None,
            sources: Vec::new(),
        }
    }

    /// The lengths of the sequences it holds.
    pub fn segment_lengths(&self) -> Vec<usize> {
        match self.segments.is_empty() {
            true => vec![self.ids.len()],
            false => self.segments.clone(),
        }
    }

    /// `examples` one after the other, each its own sequence.
    pub fn pack(examples: &[&Example]) -> Result<Example> {
        let mut out = Example::new(Vec::new(), Vec::new());
        for ex in examples {
            let start = out.ids.len();
            out.sources
                .extend(ex.sources.iter().map(|(at, m)| (at + start, m.clone())));
            out.segments.extend(ex.segment_lengths());
            out.ids.extend_from_slice(&ex.ids);
            out.labels.extend_from_slice(&ex.labels);
            // Nothing predicts a sequence's first token: the previous sequence's last
            // position must not be scored against it.
            if let Some(l) = out.labels.get_mut(start) {
                *l = None;
            }
        }
        if examples.iter().any(|ex| ex.media.is_some()) {
            out.media = Some(pack_media(examples)?);
        }
        Ok(out)
    }
    /// Supervised tokens (what the loss is divided by).
    pub fn supervised(&self) -> usize {
        self.labels.iter().skip(1).filter(|l| l.is_some()).count()
    }
}

/// The soft tokens of packed `examples`: positions shifted to each example's place, span
/// ids renumbered so no two examples share one, text examples' ids read as they are.
fn pack_media(examples: &[&Example]) -> Result<SoftTokens> {
    let (mut slots, mut rows, mut ple_ids, mut spans) = (vec![], vec![], vec![], vec![]);
    let (mut start, mut next_span) = (0u32, 0i64);
    for ex in examples {
        match &ex.media {
            Some(m) => {
                slots.extend(m.slots.iter().map(|&p| p + start));
                rows.push(m.rows.clone());
                ple_ids.extend_from_slice(&m.ple_ids);
                let base = next_span;
                for &b in &m.spans {
                    spans.push(if b >= 0 { b + base } else { -1 });
                    next_span = next_span.max(b + base + 1);
                }
            }
            None => {
                ple_ids.extend_from_slice(&ex.ids);
                spans.extend(std::iter::repeat_n(-1, ex.ids.len()));
            }
        }
        start += ex.ids.len() as u32;
    }
    let rows = match rows.len() {
        1 => rows.pop().expect("one"),
        _ => Tensor::cat(&rows, 0)?,
    };
    Ok(SoftTokens {
        slots,
        rows,
        ple_ids,
        spans,
    })
}

/// What one sequence contributed.
#[derive(Debug, Clone)]
pub struct SequenceGradients {
    /// The summed cross-entropy of its supervised tokens.
    pub loss_sum: f64,
    pub tokens: usize,
    /// `∂(loss_sum / norm) / ∂` the scaled input embeddings `[S, hidden]` (through the
    /// residual stream and the per-layer-embedding projection), when asked for: the one
    /// gradient that passes through every operation's input gradient, the first layer's
    /// included (the embeddings themselves are never trained).
    pub input_gradient: Option<Tensor>,
}

/// One layer's graph: its leaves and its outputs.
struct Tape {
    h: Var,
    ple: Option<Var>,
    shared: Option<(Var, Var)>,
    out: Tensor,
    own: Option<(Tensor, Tensor)>,
}

fn run_layer(
    model: &TextModel,
    seq: &FullSequence,
    i: usize,
    h: &Tensor,
    ple: Option<&Tensor>,
    kv: &BTreeMap<usize, (Tensor, Tensor)>,
) -> Result<Tape> {
    let h = Var::from_tensor(h)?;
    let ple = ple
        .map(|p| -> Result<Var> {
            Ok(Var::from_tensor(
                &p.narrow(1, i, 1)?.squeeze(1)?.contiguous()?,
            )?)
        })
        .transpose()?;
    let p = model.kv_producer(i);
    let shared = match p != i {
        true => {
            let (k, v) = kv.get(&p).ok_or_else(|| {
                crate::error::Error::invalid_argument(
                    "model",
                    format!("layer {i} reads layer {p}'s keys, which come after it"),
                )
            })?;
            Some((Var::from_tensor(k)?, Var::from_tensor(v)?))
        }
        false => None,
    };
    let (out, own) = model.full_layer(
        i,
        seq,
        h.as_tensor(),
        ple.as_ref().map(|p| p.as_tensor()),
        shared.as_ref().map(|(k, v)| (k.as_tensor(), v.as_tensor())),
    )?;
    Ok(Tape {
        h,
        ple,
        shared,
        out,
        own,
    })
}

/// The gradient of `t` in `grads`, cut from the graph: candle builds a gradient from the
/// forward's tensors, so it tracks their graph, and a gradient fed into the next
/// backward as a constant (a layer's output gradient) would otherwise be differentiated
/// too.
fn grad_of(grads: &GradStore, t: &Tensor) -> Option<Tensor> {
    grads.get(t).map(Tensor::detach)
}

/// Adds `grads`' gradients of `vars` to `acc`.
fn accumulate(acc: &mut [Option<Tensor>], vars: &[Var], grads: &GradStore) -> Result<()> {
    for (a, v) in acc.iter_mut().zip(vars) {
        if let Some(g) = grad_of(grads, v.as_tensor()) {
            *a = Some(match a.take() {
                None => g,
                Some(x) => (x + g)?,
            });
        }
    }
    Ok(())
}

/// The summed loss of `example`'s supervised tokens and their count, forward only (the
/// adapters' tensors take part as constants: each layer's graph is dropped as it ends).
pub fn sequence_loss(
    model: &TextModel,
    set: AdapterSet,
    example: &Example,
    block: usize,
) -> Result<(f64, usize)> {
    with_adapters(set, || {
        let seq = model.full_sequence_with(
            &example.ids,
            &example.segment_lengths(),
            example.media.as_ref(),
        )?;
        let h = model.full_hidden(&seq)?;
        crate::train::loss::head_loss_only(model, &h, &example.labels, block)
    })
}

/// Runs `example` through `model` with the adapters of `set` on, and adds to `acc` (one
/// slot per var of `vars`) the gradients of `loss_sum / norm`, where `norm` is the number
/// of supervised tokens of the whole accumulation window. `vars` are the trained tensors
/// (attached to the model as adapters of `set`).
pub fn sequence_gradients(
    model: &TextModel,
    set: AdapterSet,
    vars: &[Var],
    example: &Example,
    norm: f64,
    opts: GradientOptions,
    acc: &mut [Option<Tensor>],
) -> Result<SequenceGradients> {
    with_dropout(opts.dropout, || {
        with_adapters(set, || {
            let seq = model.full_sequence_with(
                &example.ids,
                &example.segment_lengths(),
                example.media.as_ref(),
            )?;
            let n = model.num_layers();
            let h0 = model.full_embeddings(&seq)?;
            let ple = model.full_per_layer_inputs(&seq, &h0)?.map(|p| p.detach());

            // Forward, cut at layer boundaries.
            let mut inputs = vec![h0.clone()];
            let mut kv: BTreeMap<usize, (Tensor, Tensor)> = BTreeMap::new();
            let mut tapes: Vec<Option<Tape>> = Vec::with_capacity(n);
            for i in 0..n {
                let tape = run_layer(model, &seq, i, &inputs[i], ple.as_ref(), &kv)?;
                inputs.push(tape.out.detach());
                if let Some((k, v)) = &tape.own {
                    kv.insert(i, (k.detach(), v.detach()));
                }
                tapes.push((!opts.recompute).then_some(tape));
            }

            let head = head_loss(model, &inputs[n], &example.labels, norm, opts.vocab_block)?;

            // Backward, layer by layer.
            let mut dh = head.dh;
            let mut dkv: BTreeMap<usize, (Tensor, Tensor)> = BTreeMap::new();
            let mut dple: Vec<Option<Tensor>> = vec![None; n];
            for i in (0..n).rev() {
                // A recomputed layer's forward and backward widen each weight once.
                let (tape, grads) = with_widened_cache(|| -> Result<_> {
                    let tape = match tapes[i].take() {
                        Some(t) => t,
                        None => run_layer(model, &seq, i, &inputs[i], ple.as_ref(), &kv)?,
                    };
                    let mut surrogate = (&tape.out * &dh)?.sum_all()?;
                    if let (Some((k, v)), Some((dk, dv))) = (&tape.own, dkv.remove(&i)) {
                        surrogate = ((surrogate + (k * dk)?.sum_all()?)? + (v * dv)?.sum_all()?)?;
                    }
                    let grads = surrogate.backward()?;
                    Ok((tape, grads))
                })?;
                accumulate(acc, vars, &grads)?;
                dh = match grad_of(&grads, tape.h.as_tensor()) {
                    Some(g) => g,
                    None => dh.zeros_like()?,
                };
                if let Some(p) = &tape.ple {
                    dple[i] = grad_of(&grads, p.as_tensor());
                }
                if let Some((k, v)) = &tape.shared {
                    let producer = model.kv_producer(i);
                    let (gk, gv) = match (
                        grad_of(&grads, k.as_tensor()),
                        grad_of(&grads, v.as_tensor()),
                    ) {
                        (Some(gk), Some(gv)) => (gk, gv),
                        _ => continue,
                    };
                    let sum = match dkv.remove(&producer) {
                        Some((ak, av)) => ((ak + gk)?, (av + gv)?),
                        None => (gk, gv),
                    };
                    dkv.insert(producer, sum);
                }
            }

            // The per-layer inputs' gradients into the projection that made them (and, when
            // asked for, on into the input embeddings it read).
            let mut input_gradient = opts.input_gradient.then(|| dh.clone());
            if ple.is_some() && dple.iter().any(Option::is_some) {
                let zero = |i: usize| -> Result<Tensor> {
                    let p = ple.as_ref().expect("checked");
                    Ok(p.narrow(1, i, 1)?.squeeze(1)?.zeros_like()?)
                };
                let parts = (0..n)
                    .map(|i| dple[i].clone().map_or_else(|| zero(i), Ok))
                    .collect::<Result<Vec<_>>>()?;
                let d = Tensor::stack(&parts, 1)?;
                let embeds = Var::from_tensor(&h0)?;
                let source = match opts.input_gradient {
                    true => embeds.as_tensor(),
                    false => &h0,
                };
                if let Some(p) = model.full_per_layer_inputs(&seq, source)? {
                    if p.track_op() {
                        let grads = (p * d)?.sum_all()?.backward()?;
                        accumulate(acc, vars, &grads)?;
                        if let (Some(ig), Some(g)) =
                            (input_gradient.as_mut(), grad_of(&grads, embeds.as_tensor()))
                        {
                            *ig = (&*ig + g)?;
                        }
                    }
                }
            }
            Ok(SequenceGradients {
                loss_sum: head.loss_sum,
                tokens: head.tokens,
                input_gradient,
            })
        })
    })
}

/// [`sequence_gradients`] for an example whose media go through adapted encoders (tower
/// adapters): each sequence's media ([`Example::sources`]) are encoded again with the
/// adapters of `set` on, their soft tokens enter the decoder as constants, and the
/// decoder's gradient of its input embeddings at their placeholders is taken back through
/// the encoders: `∂L/∂θ_tower = backward(Σ soft ⊙ ∂L/∂h0[slots])`.
#[allow(clippy::too_many_arguments)]
pub fn media_sequence_gradients(
    model: &crate::Gemma4,
    set: AdapterSet,
    vars: &[Var],
    example: &Example,
    norm: f64,
    opts: GradientOptions,
    acc: &mut [Option<Tensor>],
) -> Result<SequenceGradients> {
    if example.sources.is_empty() {
        return sequence_gradients(&model.text, set, vars, example, norm, opts, acc);
    }
    let (ex, encoded) = with_dropout(opts.dropout, || encode_sources(model, set, example))?;
    let inner = GradientOptions {
        input_gradient: true,
        ..opts
    };
    let mut out = sequence_gradients(&model.text, set, vars, &ex, norm, inner, acc)?;
    let dh0 = out
        .input_gradient
        .clone()
        .expect("asked for the input gradient");
    let mut surrogate: Option<Tensor> = None;
    for (slots, rows) in &encoded {
        if !rows.track_op() {
            continue;
        }
        let idx = Tensor::new(slots.as_slice(), dh0.device())?;
        let d = dh0.index_select(&idx, 0)?;
        let term = (rows.to_dtype(candle_core::DType::F32)? * d)?.sum_all()?;
        surrogate = Some(match surrogate {
            None => term,
            Some(s) => (s + term)?,
        });
    }
    if let Some(s) = surrogate {
        accumulate(acc, vars, &s.backward()?)?;
    }
    if !opts.input_gradient {
        out.input_gradient = None;
    }
    Ok(out)
}

/// `example` with its soft tokens encoded again from its [`Example::sources`] with the
/// adapters of `set` on (as constants), and the encoded rows as computed (tracked through
/// any trained encoder adapters), with their placeholders' positions in the example.
#[allow(clippy::type_complexity)]
fn encode_sources(
    model: &crate::Gemma4,
    set: AdapterSet,
    example: &Example,
) -> Result<(Example, Vec<(Vec<u32>, Tensor)>)> {
    let mut starts = Vec::new();
    let mut at = 0;
    for n in example.segment_lengths() {
        starts.push((at, n));
        at += n;
    }
    let encoded = with_adapters(set, || {
        example
            .sources
            .iter()
            .map(|(start, media)| -> Result<Option<(Vec<u32>, Tensor)>> {
                let &(s, n) = starts.iter().find(|(s, _)| s == start).ok_or_else(|| {
                    crate::error::Error::invalid_argument(
                        "example",
                        format!("media at {start}, where no sequence starts"),
                    )
                })?;
                let ids = &example.ids[s..s + n];
                let soft = model.encode_media_as(ids, media, Some(candle_core::DType::F32))?;
                Ok(soft.map(|t| {
                    let slots = t.slots.iter().map(|&p| p + s as u32).collect();
                    (slots, t.rows)
                }))
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let encoded: Vec<(Vec<u32>, Tensor)> = encoded.into_iter().flatten().collect();
    let mut ex = example.clone();
    let media = ex.media.as_mut().ok_or_else(|| {
        crate::error::Error::invalid_argument("example", "has media sources but no soft tokens")
    })?;
    let slots: Vec<u32> = encoded
        .iter()
        .flat_map(|(s, _)| s.iter().copied())
        .collect();
    if slots != media.slots {
        return Err(crate::error::Error::invalid_argument(
            "example",
            "its media sources do not give its soft tokens' placeholders",
        ));
    }
    let rows: Vec<Tensor> = encoded.iter().map(|(_, r)| r.detach()).collect();
    media.rows = Tensor::cat(&rows, 0)?;
    Ok((ex, encoded))
}

/// [`sequence_loss`] with the example's media encoded again with the adapters of `set`
/// on, when it keeps them (trained encoders).
pub fn media_sequence_loss(
    model: &crate::Gemma4,
    set: AdapterSet,
    example: &Example,
    block: usize,
) -> Result<(f64, usize)> {
    match example.sources.is_empty() {
        true => sequence_loss(&model.text, set, example, block),
        false => sequence_loss(
            &model.text,
            set,
            &encode_sources(model, set, example)?.0,
            block,
        ),
    }
}
