//! The mixture-of-experts block of the 26B-A4B (`Gemma4TextRouter`, `Gemma4TextExperts`),
//! which runs beside the always-on dense MLP.
//!
//! Router, per token, on the residual `r` from before the dense MLP:
//! `z = rms_noscale(r) · scale · hidden^-½`, `p = softmax_f32(proj(z))`, the top-k of `p`
//! renormalised to sum 1 and multiplied by `per_expert_scale[e]`.
//! Experts on `pre_feedforward_layernorm_2(r)`: `down_e(gelu(gate_e) · up_e)` with the fused
//! `gate_up_proj [E, 2I, H]` (gate first), weighted and summed in f32.

use candle_core::{DType, Tensor};

use crate::config::MoeConfig;
use crate::error::Result;
use crate::loading::weights::Weights;
use crate::nn::activation::gelu_mul;
use crate::nn::linear::Linear;
use crate::nn::norm::RmsNorm;

#[derive(Debug, Clone)]
pub struct Router {
    proj: Linear,
    scale: Tensor,
    per_expert_scale: Vec<f32>,
    norm: RmsNorm,
    top_k: usize,
    root: f64,
}

/// Routing decision of one token: `(expert, weight)` pairs, best first.
pub type Routes = Vec<Vec<(usize, f32)>>;

impl Router {
    /// The routing projection.
    pub fn linears(&self) -> Vec<&Linear> {
        vec![&self.proj]
    }

    pub fn new(hidden: usize, cfg: &MoeConfig, eps: f64, w: &Weights) -> Result<Self> {
        let per_expert_scale = w
            .get_f32(&[cfg.num_experts], "per_expert_scale")?
            .to_vec1::<f32>()?;
        Ok(Router {
            // Routing decisions are discrete: the router stays at the compute dtype.
            proj: Linear::new(hidden, cfg.num_experts, &w.with_quant(None), "proj")?,
            scale: w.get(&[hidden], "scale")?,
            per_expert_scale,
            norm: RmsNorm::without_scale(eps),
            top_k: cfg.top_k,
            root: (hidden as f64).powf(-0.5),
        })
    }

    /// The routing probabilities `[S, E]` (f32) of every row of `r` `[S, H]`.
    fn probabilities(&self, r: &Tensor) -> Result<Tensor> {
        // The training forward computes in f32 over a bf16 base.
        let z = self
            .norm
            .forward(r)?
            .broadcast_mul(&self.scale.to_dtype(r.dtype())?)?
            .affine(self.root, 0.0)?;
        let logits = self.proj.forward(&z)?.to_dtype(DType::F32)?;
        Ok(match crate::nn::autograd::tracked(&logits) {
            true => match crate::nn::fused::softmax_last_dim(&logits)? {
                Some(p) => p,
                None => candle_nn::ops::softmax(&logits, candle_core::D::Minus1)?,
            },
            false => candle_nn::ops::softmax_last_dim(&logits)?,
        })
    }

    /// The top-k experts of each row of `probs`, best first.
    fn top_k(&self, probs: &[Vec<f32>]) -> Vec<Vec<usize>> {
        probs
            .iter()
            .map(|p| {
                let mut idx: Vec<usize> = (0..p.len()).collect();
                // Stable sort: equal probabilities keep the lower expert first, as torch.topk.
                idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
                idx.truncate(self.top_k);
                idx
            })
            .collect()
    }

    /// Routes every row of `r` `[S, H]`.
    pub fn route(&self, r: &Tensor) -> Result<Routes> {
        let probs: Vec<Vec<f32>> = self.probabilities(r)?.to_vec2()?;
        Ok(self
            .top_k(&probs)
            .into_iter()
            .zip(&probs)
            .map(|(idx, p)| {
                let sum: f32 = idx.iter().map(|&e| p[e]).sum();
                idx.iter()
                    .map(|&e| (e, p[e] / sum * self.per_expert_scale[e]))
                    .collect()
            })
            .collect())
    }

    /// [`Self::route`] for training: the same choice of experts (discrete, as torch.topk's
    /// indices), and their weights `[S, k]` as a tensor differentiable in `r` (the
    /// reference's `top_k_weights`: gathered probabilities, renormalised, scaled), which
    /// is how the loss reaches the router's input and adapter.
    pub fn route_differentiable(&self, r: &Tensor) -> Result<(Routes, Tensor)> {
        let probs = self.probabilities(r)?;
        let rows: Vec<Vec<f32>> = probs.to_vec2()?;
        let chosen = self.top_k(&rows);
        let k = self.top_k;
        let s = chosen.len();
        let flat: Vec<u32> = chosen.iter().flatten().map(|&e| e as u32).collect();
        let scale: Vec<f32> = chosen
            .iter()
            .flatten()
            .map(|&e| self.per_expert_scale[e])
            .collect();
        let idx = Tensor::from_vec(flat, (s, k), r.device())?;
        let picked = probs.gather(&idx, 1)?;
        let weights = picked
            .broadcast_div(&picked.sum_keepdim(1)?)?
            .mul(&Tensor::from_vec(scale, (s, k), r.device())?)?;
        let values: Vec<Vec<f32>> = weights.to_vec2()?;
        let routes = chosen
            .into_iter()
            .zip(values)
            .map(|(idx, w)| idx.into_iter().zip(w).collect())
            .collect();
        Ok((routes, weights))
    }
}

#[derive(Debug, Clone)]
pub struct Experts {
    /// Per expert: the fused `[2I, H]` gate/up projection and the `[H, I]` down projection.
    gate_up: Vec<Linear>,
    down: Vec<Linear>,
    width: usize,
}

impl Experts {
    pub fn new(hidden: usize, cfg: &MoeConfig, w: &Weights) -> Result<Self> {
        let (e, i) = (cfg.num_experts, cfg.intermediate_size);
        let per_expert = |out: usize, inp: usize, name: &str| -> Result<Vec<Linear>> {
            Ok(w.stacked_matrices(e, out, inp, name)?
                .into_iter()
                .enumerate()
                .map(|(e, lw)| Linear::from_linear_weight(lw).with_source(w.name(name), Some(e)))
                .collect())
        };
        Ok(Experts {
            gate_up: per_expert(2 * i, hidden, "gate_up_proj")?,
            down: per_expert(hidden, i, "down_proj")?,
            width: i,
        })
    }

    /// Every expert's projections (gate/up, then down).
    pub fn linears(&self) -> Vec<&Linear> {
        self.gate_up.iter().chain(&self.down).collect()
    }

    /// Expert `e` on the rows of `xs` `[S, H]`.
    fn expert(&self, e: usize, xs: &Tensor) -> Result<Tensor> {
        let gu = self.gate_up[e].forward(xs)?;
        let h = gelu_mul(
            &gu.narrow(1, 0, self.width)?,
            &gu.narrow(1, self.width, self.width)?,
        )?;
        self.down[e].forward(&h)
    }

    /// Bytes all experts' weights occupy in memory.
    pub fn size_in_bytes(&self) -> usize {
        self.gate_up
            .iter()
            .chain(&self.down)
            .map(|l| l.weight().size_in_bytes())
            .sum()
    }

    /// Weighted sum of the routed experts for every row of `x` `[S, H]`. `weights`, when
    /// given, are the routes' weights `[S, k]` as a tensor ([`Router::route_differentiable`]),
    /// which then weigh the experts' outputs in place of the routes' values (training).
    pub fn forward(&self, x: &Tensor, routes: &Routes, weights: Option<&Tensor>) -> Result<Tensor> {
        let (s, hdim) = x.dims2()?;
        let n_experts = self.gate_up.len();
        // Group (token, weight) pairs by expert so each expert runs one matmul; with a
        // weight tensor, also where each pair's weight sits in it (row-major `[S, k]`).
        let mut per_expert: Vec<(Vec<u32>, Vec<f32>)> = vec![(vec![], vec![]); n_experts];
        let mut slots: Vec<Vec<u32>> = vec![vec![]; n_experts];
        let k = weights.map(|w| w.dim(1)).transpose()?.unwrap_or(0);
        for (tok, r) in routes.iter().enumerate() {
            for (j, &(e, wt)) in r.iter().enumerate() {
                per_expert[e].0.push(tok as u32);
                per_expert[e].1.push(wt);
                slots[e].push((tok * k + j) as u32);
            }
        }
        let flat_weights = weights.map(|w| w.flatten_all()).transpose()?;
        let mut out = Tensor::zeros((s, hdim), DType::F32, x.device())?;
        for (e, (toks, wts)) in per_expert.iter().enumerate() {
            if toks.is_empty() {
                continue;
            }
            let idx = Tensor::new(toks.as_slice(), x.device())?;
            let xs = x.index_select(&idx, 0)?;
            // The tokens routed to an expert go through it together: up to
            // `backend::matrix::SMALL_BATCH` of them (every decode step, and the ~8 per expert of a
            // prefill's tokens) through the small-batch kernels, which read the expert's
            // weights once for all of them; more through one batched product.
            let y = self.expert(e, &xs)?.to_dtype(DType::F32)?;
            let wt = match &flat_weights {
                Some(w) => w
                    .index_select(&Tensor::new(slots[e].as_slice(), x.device())?, 0)?
                    .unsqueeze(1)?,
                None => Tensor::new(wts.as_slice(), x.device())?.unsqueeze(1)?,
            };
            out = out.index_add(&idx, &y.broadcast_mul(&wt)?, 0)?;
        }
        Ok(out.to_dtype(x.dtype())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Experts with few tokens run through the small-batch kernels, with many one
    /// batched product: the same function as each token alone, up to f32 summation order.
    #[test]
    fn per_token_and_batched_experts_agree() {
        let dev = Device::Cpu;
        let (h, i, n) = (16, 8, 3);
        let mat = |o: usize, k: usize, seed: f32| {
            let v: Vec<f32> = (0..o * k)
                .map(|j| (j as f32 * 0.37 + seed).sin() * 0.5)
                .collect();
            Linear::from_weight(Tensor::from_vec(v, (o, k), &dev).unwrap())
        };
        let experts = Experts {
            gate_up: (0..n).map(|e| mat(2 * i, h, e as f32)).collect(),
            down: (0..n).map(|e| mat(h, i, 10.0 + e as f32)).collect(),
            width: i,
        };
        // 40 tokens: expert 0 gets all of them (batched), experts 1 and 2 a few each.
        let s = 40;
        let x = Tensor::randn(0f32, 1.0, (s, h), &dev).unwrap();
        let routes: Routes = (0..s)
            .map(|t| match t % 10 {
                0 => vec![(0, 0.7), (1, 0.3)],
                1 => vec![(0, 0.6), (2, 0.4)],
                _ => vec![(0, 1.0)],
            })
            .collect();
        let small = crate::backend::matrix::SMALL_BATCH;
        assert!(s > small && s / 10 <= small && s / 10 > 1);
        let got = experts.forward(&x, &routes, None).unwrap();
        // Each token alone: every expert sees one row.
        for t in 0..s {
            let one = experts
                .forward(
                    &x.narrow(0, t, 1).unwrap(),
                    &routes[t..t + 1].to_vec(),
                    None,
                )
                .unwrap();
            let (a, b) = (
                got.get(t).unwrap().to_vec1::<f32>().unwrap(),
                one.get(0).unwrap().to_vec1::<f32>().unwrap(),
            );
            for (a, b) in a.iter().zip(&b) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "token {t}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn router_renormalises_top_k_and_applies_per_expert_scale() {
        let dev = Device::Cpu;
        // hidden 2, 3 experts; proj rows pick out scores directly.
        let r = Router {
            proj: Linear::from_weight(
                Tensor::new(&[[1.0f32, 0.0], [0.0, 1.0], [-1.0, 0.0]], &dev).unwrap(),
            ),
            scale: Tensor::new(&[1.0f32, 1.0], &dev).unwrap(),
            per_expert_scale: vec![1.0, 2.0, 3.0],
            norm: RmsNorm::without_scale(0.0),
            top_k: 2,
            root: 1.0,
        };
        let x = Tensor::new(&[[1.0f32, 0.5]], &dev).unwrap();
        let routes = r.route(&x).unwrap();
        // normed x = x / rms, rms = sqrt((1 + 0.25) / 2)
        let n = (1.25f32 / 2.0).sqrt();
        let sc = [1.0 / n, 0.5 / n, -1.0 / n];
        assert_eq!(routes[0].iter().map(|r| r.0).collect::<Vec<_>>(), [0, 1]);
        let (a, b) = (sc[0].exp(), sc[1].exp());
        assert!((routes[0][0].1 - a / (a + b)).abs() < 1e-6);
        assert!((routes[0][1].1 - 2.0 * b / (a + b)).abs() < 1e-6);
    }
}
