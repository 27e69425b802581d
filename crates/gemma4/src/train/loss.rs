//! The causal-LM loss as Hugging Face computes it (`ForCausalLMLoss`): position `i`'s
//! logits (f32, after the final soft cap) predict label `i + 1`; unsupervised positions
//! (label −100 there) are skipped; the per-token cross-entropies are summed and divided
//! by the number of supervised tokens of the whole accumulation window
//! (`num_items_in_batch`), which the caller passes as `norm`.
//!
//! The head runs only on the supervised rows, and over the vocabulary a block of `block`
//! entries at a time: no `[seq, vocab]` tensor is ever held (Gemma 4's vocabulary has
//! 262,144 entries), and each block of the head's weight is widened to f32 (or
//! dequantized) once per pass for all rows. One pass keeps each row's running
//! log-sum-exp, its label's logit and the gradient `(softmax − onehot) ⊙ cap′` taken back
//! through the head, rescaled as the running max grows (see [`one_pass`]); the final
//! norm's backward is candle's.

use candle_core::{DType, Tensor, Var};
use rayon::prelude::*;

use crate::error::Result;
use crate::nn::activation::{exp_in_place, tanh_in_place};
use crate::text::model::TextModel;

/// Vocabulary entries per block of the head: a 1536-wide block widened to f32 is 12 MB,
/// below glibc's largest mmap threshold, so the blocks' buffers are reused (see
/// `nn::autograd`'s row blocks).
pub const VOCAB_BLOCK: usize = 2048;

/// The summed loss of the supervised tokens and the gradient of `loss_sum / norm` with
/// respect to the final residual stream `h` `[S, hidden]`.
pub struct HeadLoss {
    pub loss_sum: f64,
    pub tokens: usize,
    pub dh: Tensor,
}

/// Rows whose next token is supervised, with that token.
fn supervised_rows(s: usize, labels: &[Option<u32>]) -> Vec<(u32, u32)> {
    (0..s.saturating_sub(1))
        .filter_map(|r| labels.get(r + 1).copied().flatten().map(|l| (r as u32, l)))
        .collect()
}

/// The soft-capped logits of normed rows `hn` `[R, H]` against head rows `w` `[n, H]`
/// (f32), row-major `[R, n]`: the product, then the cap over rows in parallel.
fn capped_logits(model: &TextModel, hn: &Tensor, w: &Tensor) -> Result<Vec<f32>> {
    let n = w.dim(0)?;
    let mut z: Vec<f32> = hn.matmul(&w.t()?)?.flatten_all()?.to_vec1()?;
    if let Some(cap) = model.config().final_logit_softcapping {
        let cap = cap as f32;
        z.par_chunks_mut(n.max(1)).for_each(|row| {
            row.iter_mut().for_each(|v| *v /= cap);
            tanh_in_place(row);
            row.iter_mut().for_each(|v| *v *= cap);
        });
    }
    Ok(z)
}

/// A row's running state over the head's blocks: its max so far, the sum of
/// `e^(c − max)`, and its label's logit.
type RowState = (f32, f32, f32);

/// Folds a block's capped logits `row` (vocabulary entries `start..`) into the state of a
/// row labelled `t`, leaving `e^(c − max)` against the new max in `row`. Returns
/// `e^(old max − new max)`, the factor that rescales sums kept against the old max.
fn fold_block((m, l, picked): &mut RowState, row: &mut [f32], start: usize, t: u32) -> f32 {
    let t = t as usize;
    if t >= start && t < start + row.len() {
        *picked = row[t - start];
    }
    let bmax = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let new_m = m.max(bmax);
    let rescale = (*m - new_m).exp();
    row.iter_mut().for_each(|v| *v -= new_m);
    exp_in_place(row);
    *l = *l * rescale + row.iter().sum::<f32>();
    *m = new_m;
    rescale
}

/// `dc/dz` of the soft cap `c = cap · tanh(z / cap)` at the capped logit `c`.
fn cap_slope(c: f32, cap: f32) -> f32 {
    1.0 - (c / cap) * (c / cap)
}

/// Per row: log-sum-exp over the vocabulary and the label's logit.
fn scan(
    model: &TextModel,
    hn: &Tensor,
    labels: &[u32],
    block: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let r = labels.len();
    // Per row: running max, running sum of e^(c − max), the label's logit.
    let mut state: Vec<RowState> = vec![(f32::NEG_INFINITY, 0f32, 0f32); r];
    model.head_weight().row_blocks(block, |start, w| {
        let n = w.dim(0)?;
        let mut c = capped_logits(model, hn, &w)?;
        state
            .par_iter_mut()
            .zip(c.par_chunks_mut(n))
            .zip(labels.par_iter())
            .for_each(|((st, row), &t)| {
                fold_block(st, row, start, t);
            });
        Ok(())
    })?;
    Ok(state.iter().map(|(m, l, p)| (m + l.ln(), *p)).unzip())
}

/// What one pass over the head gives: per row the log-sum-exp and the label's logit, and
/// the gradient of the rows' summed loss with respect to the normed rows.
struct OnePass {
    lse: Vec<f32>,
    picked: Vec<f32>,
    dhn: Tensor,
}

/// Loss and gradient in one pass over the head's blocks. The gradient of a row's loss is
/// `Σ_v (p_v − [v = t]) · c′_v · W_v` with `p = softmax(c)` and `c′` the cap's slope. `p`
/// needs the whole row's log-sum-exp, so the pass keeps, as flash attention keeps its
/// output, `acc = Σ_v e^(c_v − m) · c′_v · W_v` against the running max `m`, rescaled by
/// `e^(m_old − m_new)` when the max grows; at the end `Σ_v p_v c′_v W_v = acc / l`, with
/// `l = Σ_v e^(c_v − m)`. A second pass recomputing each block's logits would cost a
/// third product with the head (a fifth of a training step at E2B's shapes).
fn one_pass(model: &TextModel, hn: &Tensor, labels: &[u32], block: usize) -> Result<OnePass> {
    let (r, hidden) = hn.dims2()?;
    let cap = model.config().final_logit_softcapping.map(|c| c as f32);
    // Per row: running max, running sum of e^(c − max), the label's logit.
    let mut state: Vec<RowState> = vec![(f32::NEG_INFINITY, 0f32, 0f32); r];
    let mut acc = Tensor::zeros((r, hidden), DType::F32, hn.device())?;
    model.head_weight().row_blocks(block, |start, w| {
        let n = w.dim(0)?;
        let mut c = capped_logits(model, hn, &w)?;
        let mut rescale = vec![1f32; r];
        state
            .par_iter_mut()
            .zip(c.par_chunks_mut(n))
            .zip(labels.par_iter().zip(rescale.par_iter_mut()))
            .for_each(|((st, row), (&t, sc))| {
                let slope: Option<Vec<f32>> =
                    cap.map(|cap| row.iter().map(|&c| cap_slope(c, cap)).collect());
                *sc = fold_block(st, row, start, t);
                if let Some(s) = slope {
                    row.iter_mut().zip(&s).for_each(|(v, s)| *v *= s);
                }
            });
        let g = Tensor::from_vec(c, (r, n), hn.device())?;
        let scale = Tensor::from_vec(rescale, (r, 1), hn.device())?;
        acc = (acc.broadcast_mul(&scale)? + g.matmul(&w)?)?;
        Ok(())
    })?;
    // Σ p c′ W = acc / l; minus the label's own term, c′_t W_t.
    let l: Vec<f32> = state.iter().map(|s| s.1).collect();
    let lse: Vec<f32> = state.iter().map(|(m, l, _)| m + l.ln()).collect();
    let picked: Vec<f32> = state.iter().map(|s| s.2).collect();
    let slope_t: Vec<f32> = picked
        .iter()
        .map(|&c| cap.map_or(1.0, |cap| cap_slope(c, cap)))
        .collect();
    let ids = Tensor::new(labels, hn.device())?;
    let w_t = model.head_weight().rows(&ids, DType::F32)?;
    let inv_l = Tensor::from_vec(
        l.iter().map(|l| 1.0 / l).collect::<Vec<f32>>(),
        (r, 1),
        hn.device(),
    )?;
    let slope_t = Tensor::from_vec(slope_t, (r, 1), hn.device())?;
    let dhn = (acc.broadcast_mul(&inv_l)? - w_t.broadcast_mul(&slope_t)?)?;
    Ok(OnePass { lse, picked, dhn })
}

/// `labels[i]`: the token position `i` holds as a target, or `None` (HF's −100).
pub fn head_loss(
    model: &TextModel,
    h: &Tensor,
    labels: &[Option<u32>],
    norm: f64,
    block: usize,
) -> Result<HeadLoss> {
    let rows = supervised_rows(h.dim(0)?, labels);
    let mut dh = Tensor::zeros(h.dims(), DType::F32, h.device())?;
    if rows.is_empty() {
        return Ok(HeadLoss {
            loss_sum: 0.0,
            tokens: 0,
            dh,
        });
    }
    let idx: Vec<u32> = rows.iter().map(|p| p.0).collect();
    let lab: Vec<u32> = rows.iter().map(|p| p.1).collect();
    let idx = Tensor::new(idx.as_slice(), h.device())?;
    let x = Var::from_tensor(&h.index_select(&idx, 0)?.to_dtype(DType::F32)?)?;
    let hn = model.final_norm(x.as_tensor())?;
    let hc = hn.detach();
    let OnePass { lse, picked, dhn } = one_pass(model, &hc, &lab, block)?;
    let loss_sum: f64 = lse.iter().zip(&picked).map(|(a, b)| (a - b) as f64).sum();
    let dhn = dhn.affine(1.0 / norm, 0.0)?;
    let grads = (hn * dhn)?.sum_all()?.backward()?;
    if let Some(g) = grads.get(x.as_tensor()) {
        // Cut from the graph it was built from (see `gradients::grad_of`).
        dh = dh.index_add(&idx, &g.detach(), 0)?;
    }
    Ok(HeadLoss {
        loss_sum,
        tokens: rows.len(),
        dh,
    })
}

/// The summed loss of `labels`' supervised tokens for the final residual stream `h`, and
/// their count, without gradients (evaluation).
pub fn head_loss_only(
    model: &TextModel,
    h: &Tensor,
    labels: &[Option<u32>],
    block: usize,
) -> Result<(f64, usize)> {
    let rows = supervised_rows(h.dim(0)?, labels);
    if rows.is_empty() {
        return Ok((0.0, 0));
    }
    let idx: Vec<u32> = rows.iter().map(|p| p.0).collect();
    let lab: Vec<u32> = rows.iter().map(|p| p.1).collect();
    let x = h
        .detach()
        .index_select(&Tensor::new(idx.as_slice(), h.device())?, 0)?;
    let hn = model.final_norm(&x.to_dtype(DType::F32)?)?;
    let (lse, picked) = scan(model, &hn, &lab, block)?;
    Ok((
        lse.iter().zip(&picked).map(|(a, b)| (a - b) as f64).sum(),
        rows.len(),
    ))
}
