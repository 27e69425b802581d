//! The causal-LM loss as Hugging Face computes it (`ForCausalLMLoss`): position `i`'s
//! logits (f32, after the final soft cap) predict label `i + 1`; unsupervised positions
//! (label −100 there) are skipped; the per-token cross-entropies are summed and divided
//! by the number of supervised tokens of the whole accumulation window
//! (`num_items_in_batch`), which the caller passes as `norm`.
//!
//! The head runs only on rows whose next token is supervised, a chunk of rows at a time:
//! no `[seq, vocab]` tensor is ever held (Gemma 4's vocabulary has 262,144 entries), and
//! each chunk's gradient is taken right away.

use candle_core::{DType, Tensor, Var, D};

use crate::error::Result;
use crate::text::model::TextModel;

/// The summed loss of the supervised tokens and the gradient of `loss_sum / norm` with
/// respect to the final residual stream `h` `[S, hidden]`.
pub struct HeadLoss {
    pub loss_sum: f64,
    pub tokens: usize,
    pub dh: Tensor,
}

/// `labels[i]`: the token position `i` holds as a target, or `None` (HF's −100).
pub fn head_loss(
    model: &TextModel,
    h: &Tensor,
    labels: &[Option<u32>],
    norm: f64,
    chunk: usize,
) -> Result<HeadLoss> {
    let s = h.dim(0)?;
    let rows: Vec<(u32, u32)> = (0..s.saturating_sub(1))
        .filter_map(|r| labels.get(r + 1).copied().flatten().map(|l| (r as u32, l)))
        .collect();
    let mut dh = Tensor::zeros(h.dims(), DType::F32, h.device())?;
    let mut loss_sum = 0.0;
    for part in rows.chunks(chunk.max(1)) {
        let idx: Vec<u32> = part.iter().map(|p| p.0).collect();
        let lab: Vec<u32> = part.iter().map(|p| p.1).collect();
        let idx = Tensor::new(idx.as_slice(), h.device())?;
        let x = Var::from_tensor(&h.index_select(&idx, 0)?.to_dtype(DType::F32)?)?;
        let logits = model.full_logits(x.as_tensor())?;
        let lab = Tensor::new(lab.as_slice(), h.device())?.unsqueeze(1)?;
        let loss = token_losses(&logits, &lab)?.sum_all()?;
        loss_sum += loss.to_scalar::<f32>()? as f64;
        let grads = loss.affine(1.0 / norm, 0.0)?.backward()?;
        if let Some(g) = grads.get(x.as_tensor()) {
            // Cut from the graph it was built from (see `gradients::grad_of`).
            dh = dh.index_add(&idx, &g.detach(), 0)?;
        }
    }
    Ok(HeadLoss {
        loss_sum,
        tokens: rows.len(),
        dh,
    })
}

/// Cross-entropy of each row of `logits` `[R, V]` against `labels` `[R, 1]`:
/// `logsumexp(z) − z[label]`, `[R, 1]`.
fn token_losses(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    // The max only steadies the exponentials; logsumexp's gradient (the softmax) is the
    // same with it held constant.
    let m = logits.max_keepdim(D::Minus1)?.detach();
    let lse = (logits
        .broadcast_sub(&m)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + m)?;
    Ok((lse - logits.gather(labels, 1)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn token_losses_are_cross_entropies() {
        let z = Tensor::new(&[[1f32, 2., 3.], [0., 0., 0.]], &Device::Cpu).unwrap();
        let l = Tensor::new(&[[2u32], [0]], &Device::Cpu).unwrap();
        let got: Vec<Vec<f32>> = token_losses(&z, &l).unwrap().to_vec2().unwrap();
        let lse = (1f32.exp() + 2f32.exp() + 3f32.exp()).ln();
        assert!((got[0][0] - (lse - 3.0)).abs() < 1e-6);
        assert!((got[1][0] - 3f32.ln()).abs() < 1e-6);
    }
}
