//! AdamW as torch computes it (`torch.optim.AdamW`, its single-tensor path, in f32),
//! step for step, so a run here and one in torch agree to rounding:
//!
//! ```text
//! p ← p · (1 − lr·λ)
//! m ← m + (1 − β₁)(g − m)                      (torch's lerp)
//! v ← v·β₂ + (1 − β₂)·g·g
//! p ← p − (lr / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε)
//! ```
//!
//! Its moments are state a checkpoint saves ([`AdamW::state`], [`AdamW::restore`]).
//! Global-norm clipping is torch's `clip_grad_norm_` ([`clip_grad_norm`]).

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// torch's defaults (β = (0.9, 0.999), ε = 1e-8), without weight decay as
    /// transformers' `Trainer` sets it (torch's own default is 0.01).
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

pub struct AdamW {
    pub config: AdamWConfig,
    /// Steps taken.
    pub step: u64,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl AdamW {
    /// Zero moments for `params`.
    pub fn new(params: &[Var], config: AdamWConfig) -> Self {
        let zeros = || params.iter().map(|p| vec![0f32; p.elem_count()]).collect();
        AdamW {
            config,
            step: 0,
            m: zeros(),
            v: zeros(),
        }
    }

    /// One step at learning rate `lr`: `grads[i]` (`None`: a zero gradient) for `params[i]`.
    pub fn step(&mut self, params: &[Var], grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        if params.len() != self.m.len() || grads.len() != params.len() {
            return Err(Error::invalid_argument(
                "optimizer",
                format!(
                    "{} parameters and {} gradients for a state of {}",
                    params.len(),
                    grads.len(),
                    self.m.len()
                ),
            ));
        }
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let decay = (1.0 - lr * c.weight_decay) as f32;
        let w1 = (1.0 - c.beta1) as f32;
        let (b2, w2) = (c.beta2 as f32, (1.0 - c.beta2) as f32);
        let step_size = (lr / (1.0 - c.beta1.powi(t))) as f32;
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt() as f32;
        let eps = c.eps as f32;
        for (i, p) in params.iter().enumerate() {
            let mut pv: Vec<f32> = p.as_tensor().flatten_all()?.to_vec1()?;
            let g: Vec<f32> = match &grads[i] {
                Some(g) => g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
                None => vec![0.0; pv.len()],
            };
            let (m, v) = (&mut self.m[i], &mut self.v[i]);
            for j in 0..pv.len() {
                pv[j] *= decay;
                m[j] += w1 * (g[j] - m[j]);
                v[j] = v[j] * b2 + w2 * g[j] * g[j];
                let denom = v[j].sqrt() / bc2_sqrt + eps;
                pv[j] += -step_size * (m[j] / denom);
            }
            p.set(&Tensor::from_vec(pv, p.shape(), p.device())?)?;
        }
        Ok(())
    }

    /// The moments, as tensors shaped like `params` (first all `m`, then all `v`).
    pub fn state(&self, params: &[Var]) -> Result<Vec<Tensor>> {
        let mut out = Vec::with_capacity(2 * params.len());
        for moments in [&self.m, &self.v] {
            for (x, p) in moments.iter().zip(params) {
                out.push(Tensor::from_slice(x, p.shape(), p.device())?);
            }
        }
        Ok(out)
    }

    /// The optimizer with `state` ([`Self::state`]) after `step` steps.
    pub fn restore(
        params: &[Var],
        config: AdamWConfig,
        step: u64,
        state: &[Tensor],
    ) -> Result<Self> {
        if state.len() != 2 * params.len() {
            return Err(Error::invalid_argument(
                "optimizer state",
                format!("{} tensors for {} parameters", state.len(), params.len()),
            ));
        }
        let flat = |t: &Tensor, p: &Var| -> Result<Vec<f32>> {
            if t.elem_count() != p.elem_count() {
                return Err(Error::invalid_argument(
                    "optimizer state",
                    format!(
                        "a moment of {} elements for a parameter of {}",
                        t.elem_count(),
                        p.elem_count()
                    ),
                ));
            }
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        };
        let n = params.len();
        Ok(AdamW {
            config,
            step,
            m: (0..n)
                .map(|i| flat(&state[i], &params[i]))
                .collect::<Result<_>>()?,
            v: (0..n)
                .map(|i| flat(&state[n + i], &params[i]))
                .collect::<Result<_>>()?,
        })
    }
}

/// Scales `grads` so their global L2 norm is at most `max_norm`, as torch's
/// `clip_grad_norm_`; returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter().flatten() {
        let n: f32 = g.sqr()?.sum_all()?.sqrt()?.to_scalar()?;
        sq += (n as f64) * (n as f64);
    }
    let total = sq.sqrt();
    let coef = max_norm / (total + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut().flatten() {
            *g = g.affine(coef, 0.0)?;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn first_step_moves_each_weight_by_lr_against_its_gradient_sign() {
        // After one step m̂ = g and v̂ = g², so the update is lr · g / (|g| + ε).
        let p = Var::new(&[1f32, -2., 0.5], &Device::Cpu).unwrap();
        let g = Tensor::new(&[0.3f32, -4., 0.], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(std::slice::from_ref(&p), AdamWConfig::default());
        opt.step(std::slice::from_ref(&p), &[Some(g)], 0.1).unwrap();
        let got: Vec<f32> = p.as_tensor().to_vec1().unwrap();
        for (a, b) in got.iter().zip([0.9f32, -1.9, 0.5]) {
            assert!((a - b).abs() < 1e-6, "{got:?}");
        }
        assert_eq!(opt.step, 1);
    }

    #[test]
    fn clipping_scales_to_the_global_norm() {
        let d = Device::Cpu;
        let mut g = vec![
            Some(Tensor::new(&[3f32], &d).unwrap()),
            None,
            Some(Tensor::new(&[4f32], &d).unwrap()),
        ];
        let n = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        let a: Vec<f32> = g[0].as_ref().unwrap().to_vec1().unwrap();
        assert!((a[0] - 0.6).abs() < 1e-6);
    }
}
