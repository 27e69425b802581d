//! Rotary position embedding of the text decoder, one table per layer type, as
//! `Gemma4TextRotaryEmbedding` with `modeling_rope_utils`:
//! - `default`: `inv_freq[i] = θ^(-2i/D)` for all `D/2` frequencies;
//! - `proportional`: the same formula (denominator the full head dim `D`) for the first
//!   `int(p·D // 2)` frequencies and 0 for the rest, all divided by `factor`.
//!
//! Angles are `position × inv_freq` in f32; `emb = [freqs, freqs]`; cos/sin are computed in
//! f32 and cast to the activation dtype. The rotation is rotate-half (not interleaved).

use candle_core::{DType, Device, Tensor};

use std::collections::BTreeMap;

use crate::config::{LayerType, RopeConfig, RopeKind, TextConfig};
use crate::error::Result;

#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    /// One table per layer type of a decoder config, at that type's head dim (the text
    /// decoder's and an assistant drafter's).
    pub fn per_layer_type(cfg: &TextConfig) -> BTreeMap<LayerType, Rope> {
        cfg.rope
            .iter()
            .filter_map(|(t, r)| cfg.rope_head_dim(*t).map(|d| (*t, Rope::new(r, d))))
            .collect()
    }

    pub fn new(cfg: &RopeConfig, head_dim: usize) -> Self {
        let half = head_dim / 2;
        let rotated = match cfg.kind {
            RopeKind::Default => half,
            RopeKind::Proportional => {
                ((cfg.partial_rotary_factor * head_dim as f64) / 2.0).floor() as usize
            }
        };
        let factor = match cfg.kind {
            RopeKind::Default => 1.0f32,
            RopeKind::Proportional => cfg.factor as f32,
        };
        let theta = cfg.theta as f32;
        let inv_freq = (0..half)
            .map(|i| {
                if i < rotated {
                    // Same op order as the reference: exponent in f32, then 1 / θ^e.
                    let e = (2 * i) as f32 / head_dim as f32;
                    (1.0f32 / theta.powf(e)) / factor
                } else {
                    0.0
                }
            })
            .collect();
        Rope { inv_freq }
    }

    /// From explicit inverse frequencies (the vision tower's axial RoPE, one per axis).
    pub fn from_inv_freq(inv_freq: Vec<f32>) -> Self {
        Rope { inv_freq }
    }

    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// cos and sin for `positions`, each `[positions.len(), D/2]` in `dtype` (the second half
    /// of the reference's `[freqs, freqs]` table repeats the first).
    pub fn cos_sin(
        &self,
        positions: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let shape = (positions.len(), half);
        let cos = Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}

/// Rotate-half RoPE on `x` of shape `[heads, seq, D]` with cos/sin `[seq, D/2]`.
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let x4 = x.unsqueeze(0)?.contiguous()?;
    if crate::nn::autograd::tracked(x) {
        return Ok(candle_nn::rotary_emb::rope_slow(&x4, cos, sin)?.squeeze(0)?);
    }
    Ok(candle_nn::rotary_emb::rope(&x4, cos, sin)?.squeeze(0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proportional_rotates_first_quarter_with_full_denominator() {
        let cfg = RopeConfig {
            kind: RopeKind::Proportional,
            theta: 1e6,
            partial_rotary_factor: 0.25,
            factor: 1.0,
        };
        let r = Rope::new(&cfg, 512);
        assert_eq!(r.inv_freq().len(), 256);
        assert!(r.inv_freq()[..64].iter().all(|&f| f > 0.0));
        assert!(r.inv_freq()[64..].iter().all(|&f| f == 0.0));
        // i = 1: θ^(-2/512), not θ^(-2/128).
        let want = 1.0 / 1e6f64.powf(2.0 / 512.0);
        assert!((r.inv_freq()[1] as f64 - want).abs() < 1e-7);
    }

    #[test]
    fn rotate_half_matches_reference_formula() {
        let cfg = RopeConfig {
            kind: RopeKind::Default,
            theta: 10_000.0,
            partial_rotary_factor: 1.0,
            factor: 1.0,
        };
        let d = 8;
        let r = Rope::new(&cfg, d);
        let pos = [0usize, 1, 7];
        let (cos, sin) = r.cos_sin(&pos, DType::F32, &Device::Cpu).unwrap();
        let x: Vec<f32> = (0..pos.len() * d)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let xt = Tensor::from_vec(x.clone(), (1, pos.len(), d), &Device::Cpu).unwrap();
        let y: Vec<f32> = apply(&xt, &cos, &sin)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (s, &p) in pos.iter().enumerate() {
            for i in 0..d {
                let f = r.inv_freq()[i % (d / 2)];
                let a = p as f32 * f;
                let xi = x[s * d + i];
                let rot = if i < d / 2 {
                    -x[s * d + i + d / 2]
                } else {
                    x[s * d + i - d / 2]
                };
                let want = xi * a.cos() + rot * a.sin();
                assert!((y[s * d + i] - want).abs() < 1e-5, "pos {p} dim {i}");
            }
        }
        // Position 0 is the identity.
        assert!((y[0] - x[0]).abs() < 1e-7);
    }
}
