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

use candle_core::{DType, Tensor, Var, D};

use crate::error::Result;
use crate::text::model::TextModel;

/// Vocabulary entries per block of the head.
pub const VOCAB_BLOCK: usize = 8192;

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

/// The soft-capped logits `[R, n]` of normed rows `hn` `[R, H]` against head rows `w`
/// `[n, H]` (f32).
fn capped_logits(model: &TextModel, hn: &Tensor, w: &Tensor) -> Result<Tensor> {
    let z = hn.matmul(&w.t()?)?;
    Ok(match model.config().final_logit_softcapping {
        Some(cap) => ((&z / cap)?.tanh()? * cap)?,
        None => z,
    })
}

/// Per row: log-sum-exp over the vocabulary and the label's logit.
fn scan(
    model: &TextModel,
    hn: &Tensor,
    labels: &[u32],
    block: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let r = labels.len();
    let mut m = vec![f32::NEG_INFINITY; r];
    let mut l = vec![0f32; r];
    let mut picked = vec![0f32; r];
    model.head_weight().row_blocks(block, |start, w| {
        let n = w.dim(0)?;
        let c = capped_logits(model, hn, &w)?;
        let bmax: Vec<f32> = c.max_keepdim(D::Minus1)?.flatten_all()?.to_vec1()?;
        let new_m: Vec<f32> = m.iter().zip(&bmax).map(|(a, b)| a.max(*b)).collect();
        let shifted = c.broadcast_sub(&Tensor::from_slice(&new_m, (r, 1), hn.device())?)?;
        let bsum: Vec<f32> = shifted
            .exp()?
            .sum_keepdim(D::Minus1)?
            .flatten_all()?
            .to_vec1()?;
        for i in 0..r {
            l[i] = l[i] * (m[i] - new_m[i]).exp() + bsum[i];
        }
        m = new_m;
        let local: Vec<u32> = labels
            .iter()
            .map(|&t| (t as usize).saturating_sub(start).min(n - 1) as u32)
            .collect();
        let at: Vec<f32> = c
            .gather(&Tensor::from_slice(&local, (r, 1), hn.device())?, 1)?
            .flatten_all()?
            .to_vec1()?;
        for i in 0..r {
            let t = labels[i] as usize;
            if t >= start && t < start + n {
                picked[i] = at[i];
            }
        }
        Ok(())
    })?;
    let lse = m.iter().zip(&l).map(|(m, l)| m + l.ln()).collect();
    Ok((lse, picked))
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
    let lse_t = Tensor::from_slice(&lse, (r, 1), h.device())?;
    let cap = model.config().final_logit_softcapping;
    let mut dhn = Tensor::zeros(hc.dims(), DType::F32, h.device())?;
    model.head_weight().row_blocks(block, |start, w| {
        let n = w.dim(0)?;
        let c = capped_logits(model, &hc, &w)?;
        let mut g = c.broadcast_sub(&lse_t)?.exp()?;
        let (local, minus): (Vec<u32>, Vec<f32>) = lab
            .iter()
            .map(|&t| {
                let t = t as usize;
                match t >= start && t < start + n {
                    true => ((t - start) as u32, -1.0),
                    false => (0, 0.0),
                }
            })
            .unzip();
        g = g.scatter_add(
            &Tensor::from_slice(&local, (r, 1), h.device())?,
            &Tensor::from_slice(&minus, (r, 1), h.device())?,
            1,
        )?;
        if let Some(cap) = cap {
            // c = cap·tanh(z/cap): dc/dz = 1 − (c/cap)².
            g = (g * (1.0 - (&c / cap)?.sqr()?)?)?;
        }
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
