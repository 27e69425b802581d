//! The causal-LM loss as Hugging Face computes it (`ForCausalLMLoss`): position `i`'s
//! logits (f32, after the final soft cap) predict label `i + 1`; unsupervised positions
//! (label −100 there) are skipped; the per-token cross-entropies are summed and divided
//! by the number of supervised tokens of the whole accumulation window
//! (`num_items_in_batch`), which the caller passes as `norm`.
//!
//! The head runs only on the supervised rows, and over the vocabulary a block of `block`
//! entries at a time: no `[seq, vocab]` tensor is ever held (Gemma 4's vocabulary has
//! 262,144 entries), and each block of the head's weight is widened to f32 (or
//! dequantized) once per pass for all rows. A first pass keeps each row's running
//! log-sum-exp and its label's logit; a second recomputes each block's logits for the
//! gradient, `(softmax − onehot) ⊙ cap′ / norm`, and takes it back through the head; the
//! final norm's backward is candle's.

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

/// Per row: log-sum-exp over the vocabulary and the label's logit.
fn scan(
    model: &TextModel,
    hn: &Tensor,
    labels: &[u32],
    block: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let r = labels.len();
    // Per row: running max, running sum of e^(c − max), the label's logit.
    let mut state = vec![(f32::NEG_INFINITY, 0f32, 0f32); r];
    model.head_weight().row_blocks(block, |start, w| {
        let n = w.dim(0)?;
        let mut c = capped_logits(model, hn, &w)?;
        state
            .par_iter_mut()
            .zip(c.par_chunks_mut(n))
            .zip(labels.par_iter())
            .for_each(|(((m, l, picked), row), &t)| {
                let t = t as usize;
                if t >= start && t < start + n {
                    *picked = row[t - start];
                }
                let bmax = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let new_m = m.max(bmax);
                row.iter_mut().for_each(|v| *v -= new_m);
                exp_in_place(row);
                *l = *l * (*m - new_m).exp() + row.iter().sum::<f32>();
                *m = new_m;
            });
        Ok(())
    })?;
    Ok(state.iter().map(|(m, l, p)| (m + l.ln(), *p)).unzip())
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
    let (lse, picked) = scan(model, &hc, &lab, block)?;
    let loss_sum: f64 = lse.iter().zip(&picked).map(|(a, b)| (a - b) as f64).sum();

    // d(loss / norm) / dz over each block, taken back through the head.
    let r = lab.len();
    let cap = model.config().final_logit_softcapping.map(|c| c as f32);
    let mut dhn = Tensor::zeros(hc.dims(), DType::F32, h.device())?;
    model.head_weight().row_blocks(block, |start, w| {
        let n = w.dim(0)?;
        let mut g = capped_logits(model, &hc, &w)?;
        g.par_chunks_mut(n)
            .zip(lse.par_iter().zip(lab.par_iter()))
            .for_each(|(row, (&lse, &t))| {
                // softmax − onehot, then through the cap: dc/dz = 1 − (c/cap)².
                let slope: Option<Vec<f32>> =
                    cap.map(|cap| row.iter().map(|c| 1.0 - (c / cap) * (c / cap)).collect());
                row.iter_mut().for_each(|v| *v -= lse);
                exp_in_place(row);
                let t = t as usize;
                if t >= start && t < start + n {
                    row[t - start] -= 1.0;
                }
                if let Some(s) = slope {
                    row.iter_mut().zip(&s).for_each(|(v, s)| *v *= s);
                }
            });
        let g = Tensor::from_vec(g, (r, n), h.device())?;
        dhn = (&dhn + g.matmul(&w)?)?;
        Ok(())
    })?;
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
