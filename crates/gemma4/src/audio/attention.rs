//! The audio tower's chunked local attention with relative positions
//! (`Gemma4AudioAttention` + `Gemma4AudioRelPositionalEncoding`).
//!
//! The reference cuts the frames into blocks of `chunk` queries, gives each block a
//! context of `chunk + left − 1 + right` keys, and adds to `q·k` a relative term
//! `q·R[i]` read through a Transformer-XL "rel shift". What that computes, and what this
//! module computes directly per query, is:
//!
//! ```text
//! q = q_proj(x) · (D^-½ / ln 2) · softplus(per_dim_scale)      k = k_proj(x) · ln(1+e)/ln 2
//! R = relative_k_proj([sin(p·f), cos(p·f)])  for p = P, P−1, …, 0,  P = (chunk+left−1+right)/2
//! logit(t, t−d) = q_t·k_{t−d} + (idx ≤ P ? q_t·R[idx] : 0),  idx = left − 1 − d
//! logits soft-capped (cap·tanh(x/cap)); keys allowed for 0 ≤ d < left − 1 (the frame itself
//! and left − 2 before it) and 0 < −d < right, within the clip and valid
//! ```
//! Disallowed keys get `attention_invalid_logits_value` (−1e9), whose softmax weight is
//! exactly 0, so only the allowed offsets are computed. The window is one frame shorter
//! than the block context: the reference's mask (`sliding_window_mask_function((left − 1,
//! right))`) uses strict inequalities. The whole attention runs in f32, as the reference
//! casts q, k and v.

use candle_core::{DType, Device, Tensor, D};

use crate::config::audio::AudioConfig;
use crate::error::Result;
use crate::loading::weights::Weights;
use crate::nn::activation::soft_cap;
use crate::nn::linear::Linear;

/// Sinusoidal relative position embeddings `[P + 1, hidden]`, positions `P, P−1, …, 0`,
/// `[sin…, cos…]` with `hidden/2` timescales from 1 to 10⁴.
pub fn relative_positions(cfg: &AudioConfig, device: &Device) -> Result<Tensor> {
    let context =
        cfg.attention_chunk_size + cfg.attention_context_left - 1 + cfg.attention_context_right;
    let p = context / 2;
    let n = cfg.hidden_size / 2;
    let inc = (10_000f64).ln() / (n.max(2) - 1) as f64;
    // torch: exp(arange(n) · −inc) in f32, then position · inv in f32.
    let inv: Vec<f32> = (0..n).map(|i| ((i as f32) * (-inc as f32)).exp()).collect();
    let mut data = Vec::with_capacity((p + 1) * 2 * n);
    for pos in (0..=p).rev() {
        let t: Vec<f32> = inv.iter().map(|&f| pos as f32 * f).collect();
        data.extend(t.iter().map(|x| x.sin()));
        data.extend(t.iter().map(|x| x.cos()));
    }
    Ok(Tensor::from_vec(data, (p + 1, 2 * n), device)?)
}

pub struct AudioAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    post: Linear,
    relative_k_proj: Linear,
    /// `(D^-½ / ln 2) · softplus(per_dim_scale)` is applied as two f32 multiplies.
    q_scale: f64,
    per_dim_scale: Tensor,
    k_scale: f64,
    heads: usize,
    head_dim: usize,
    left: usize,
    right: usize,
    /// Largest relative index `P` with an embedding.
    max_rel: usize,
    cap: f64,
    invalid: f32,
}

impl AudioAttention {
    /// `w` is rooted at `layers.N.self_attn.`.
    pub fn new(cfg: &AudioConfig, w: &Weights) -> Result<Self> {
        let (h, clip) = (cfg.hidden_size, cfg.use_clipped_linears);
        let hd = cfg.head_dim();
        let lin = |n: &str| Linear::clippable(h, h, w, n, clip);
        // softplus with torch's threshold of 20, computed in f64 and rounded once.
        let pds = w.get_f32(&[hd], "per_dim_scale")?.to_vec1::<f32>()?;
        let soft: Vec<f32> = pds
            .iter()
            .map(|&x| {
                let x = x as f64;
                (if x > 20.0 { x } else { x.exp().ln_1p() }) as f32
            })
            .collect();
        let context =
            cfg.attention_chunk_size + cfg.attention_context_left - 1 + cfg.attention_context_right;
        Ok(AudioAttention {
            q_proj: lin("q_proj")?,
            k_proj: lin("k_proj")?,
            v_proj: lin("v_proj")?,
            post: lin("post")?,
            relative_k_proj: Linear::new(h, h, w, "relative_k_proj")?,
            q_scale: (hd as f64).powf(-0.5) / 2f64.ln(),
            per_dim_scale: Tensor::from_vec(soft, hd, &w.device)?,
            k_scale: (1.0 + std::f64::consts::E).ln() / 2f64.ln(),
            heads: cfg.num_attention_heads,
            head_dim: hd,
            left: cfg.attention_context_left,
            right: cfg.attention_context_right,
            max_rel: context / 2,
            cap: cfg.attention_logit_cap,
            invalid: cfg.attention_invalid_logits_value as f32,
        })
    }

    /// Its projections (q, k, v, post, then the relative-position one).
    pub fn linears(&self) -> Vec<&Linear> {
        vec![
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.post,
            &self.relative_k_proj,
        ]
    }

    /// Allowed key offsets `d` (key = query − d), in a fixed order.
    fn offsets(&self) -> Vec<i64> {
        let mut d: Vec<i64> = (0..self.left as i64 - 1).collect();
        d.extend((1..self.right as i64).map(|r| -r));
        d
    }

    /// `x` `[T, hidden]`, `pos` from [`relative_positions`] (in `x`'s dtype), `valid[t]`:
    /// frame t is real audio. Returns `[T, hidden]`.
    pub fn forward(&self, x: &Tensor, pos: &Tensor, valid: &[bool]) -> Result<Tensor> {
        let (t, _) = x.dims2()?;
        let (h, dh) = (self.heads, self.head_dim);
        let heads = |y: Tensor| -> Result<Tensor> {
            Ok(y.to_dtype(DType::F32)?
                .reshape((t, h, dh))?
                .transpose(0, 1)?
                .contiguous()?)
        };
        let q = heads(
            self.q_proj
                .forward(x)?
                .to_dtype(DType::F32)?
                .affine(self.q_scale as f32 as f64, 0.0)?
                .reshape((t, h, dh))?
                .broadcast_mul(&self.per_dim_scale)?
                .reshape((t, h * dh))?,
        )?;
        let k = heads(
            self.k_proj
                .forward(x)?
                .to_dtype(DType::F32)?
                .affine(self.k_scale as f32 as f64, 0.0)?,
        )?;
        let v = heads(self.v_proj.forward(x)?)?;
        // R: [P + 1, h, dh] → [h, dh, P + 1]; bd[h, t, i] = q_t · R[i].
        let r = self
            .relative_k_proj
            .forward(pos)?
            .to_dtype(DType::F32)?
            .reshape((self.max_rel + 1, h, dh))?
            .permute((1, 2, 0))?
            .contiguous()?;
        let bd = q.matmul(&r)?;

        let offsets = self.offsets();
        let before = offsets.iter().copied().max().unwrap_or(0).max(0) as usize;
        let after = (-offsets.iter().copied().min().unwrap_or(0)).max(0) as usize;
        let pad = |y: &Tensor| -> Result<Tensor> { Ok(y.pad_with_zeros(1, before, after)?) };
        let (kp, vp) = (pad(&k)?, pad(&v)?);
        let mut logits = Vec::with_capacity(offsets.len());
        let mut values = Vec::with_capacity(offsets.len());
        let mut allowed = Vec::with_capacity(t * offsets.len());
        for &d in &offsets {
            let start = (before as i64 - d) as usize;
            let kd = kp.narrow(1, start, t)?;
            let mut l = (&q * &kd)?.sum(D::Minus1)?;
            let idx = self.left as i64 - 1 - d;
            if idx as usize <= self.max_rel {
                l = (l + bd.narrow(2, idx as usize, 1)?.squeeze(2)?)?;
            }
            logits.push(l);
            values.push(vp.narrow(1, start, t)?);
        }
        for q_pos in 0..t as i64 {
            for &d in &offsets {
                let key = q_pos - d;
                allowed.push((0..t as i64).contains(&key) && valid[key as usize]);
            }
        }
        let w = offsets.len();
        let logits = Tensor::stack(&logits, 2)?; // [h, t, w]
        let capped = soft_cap(&logits, self.cap)?;
        let allowed = Tensor::from_vec(
            allowed.into_iter().map(u8::from).collect::<Vec<u8>>(),
            (1, t, w),
            x.device(),
        )?
        .broadcast_as((h, t, w))?;
        let invalid = Tensor::full(self.invalid, (h, t, w), x.device())?;
        let masked = allowed.where_cond(&capped, &invalid)?;
        // candle's fused softmax has no backward: trained adapters take the fused one of
        // `nn::fused` (or the composed form).
        let probs = match crate::nn::autograd::tracked(&masked) {
            true => match crate::nn::fused::softmax_last_dim(&masked)? {
                Some(p) => p,
                None => candle_nn::ops::softmax(&masked, D::Minus1)?,
            },
            false => candle_nn::ops::softmax_last_dim(&masked)?,
        };
        let values = Tensor::stack(&values, 2)?; // [h, t, w, dh]
        let out = probs.unsqueeze(3)?.broadcast_mul(&values)?.sum(2)?; // [h, t, dh]
        let out = out
            .transpose(0, 1)?
            .reshape((t, h * dh))?
            .to_dtype(x.dtype())?;
        self.post.forward(&out)
    }
}
