//! The element-wise operations of a training forward as single fused operations with their
//! own backward: RMSNorm, `gelu(gate) · up`, and the softmax over the last dimension.
//!
//! candle differentiates their composed forms (see `nn::autograd`) by keeping every
//! intermediate tensor of the forward and running one single-threaded pass per elementary
//! operation in backward: on E2B's double-wide MLP (`[512, 12288]` per sequence) that is
//! a dozen passes over 25 MB for GELU alone, each way. Here each runs as one pass over
//! rows in parallel, forward and backward, and keeps only its inputs (and, for the
//! softmax, its output). The formulas are the reference's, in f32 (training's activation
//! dtype); `tanh` and `exp` are the vectorised ones of `nn::activation` (a few ulp of
//! libm's, as torch's vectorised CPU kernels are).
//!
//! Inputs that are not contiguous f32 on the CPU take the composed forms.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::nn::activation::{exp_in_place, tanh_in_place};

/// Elements per parallel task, about.
const TASK: usize = 1 << 15;

fn msg(s: &str) -> candle_core::Error {
    candle_core::Error::Msg(s.to_string())
}

/// The contiguous f32 values of a custom op's input.
fn values<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        return Err(msg(&format!("{op}: f32 input expected")));
    };
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| msg(&format!("{op}: contiguous input expected")))?;
    Ok(&v[a..b])
}

/// The values of a (contiguous or not) f32 tensor, for a backward pass.
fn vec_of(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// Whether `xs` can take the fused path.
fn fusable(xs: &[&Tensor]) -> bool {
    xs.iter()
        .all(|x| x.dtype() == candle_core::DType::F32 && x.device().is_cpu())
}

/// Rows of `cols` values per parallel task.
fn rows_per_task(cols: usize) -> usize {
    TASK.div_ceil(cols.max(1)).max(1)
}

// ---------------------------------------------------------------------------------------
// RMSNorm

/// `x · (mean(x²) + eps)^-½ · w` over the last dimension (`Gemma4RMSNorm`; `w` absent
/// in the scale-free variant).
struct RmsNormOp {
    weight: Option<Vec<f32>>,
    eps: f32,
}

impl RmsNormOp {
    fn inv_rms(&self, row: &[f32]) -> f32 {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
        (ms + self.eps).powf(-0.5)
    }
}

impl CustomOp1 for RmsNormOp {
    fn name(&self) -> &'static str {
        "rms-norm-train"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = values(s, l, self.name())?;
        let cols = l.dims().last().copied().unwrap_or(1).max(1);
        let mut y = vec![0f32; x.len()];
        let chunk = rows_per_task(cols) * cols;
        y.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .for_each(|(y, x)| {
                for (y, x) in y.chunks_mut(cols).zip(x.chunks(cols)) {
                    let r = self.inv_rms(x);
                    match &self.weight {
                        Some(w) => y
                            .iter_mut()
                            .zip(x.iter().zip(w))
                            .for_each(|(y, (x, w))| *y = x * r * w),
                        None => y.iter_mut().zip(x).for_each(|(y, x)| *y = x * r),
                    }
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    /// With `n = x·r`, `g = dy ⊙ w`: `dx = r · (g − n · mean(g ⊙ n))`.
    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let cols = x.dims().last().copied().unwrap_or(1).max(1);
        let xv = vec_of(x)?;
        let gv = vec_of(dy)?;
        let mut dx = vec![0f32; xv.len()];
        let chunk = rows_per_task(cols) * cols;
        dx.par_chunks_mut(chunk)
            .zip(xv.par_chunks(chunk).zip(gv.par_chunks(chunk)))
            .for_each(|(dx, (x, dy))| {
                let mut g = vec![0f32; cols];
                for ((dx, x), dy) in dx.chunks_mut(cols).zip(x.chunks(cols)).zip(dy.chunks(cols)) {
                    let r = self.inv_rms(x);
                    match &self.weight {
                        Some(w) => g
                            .iter_mut()
                            .zip(dy.iter().zip(w))
                            .for_each(|(g, (d, w))| *g = d * w),
                        None => g.copy_from_slice(dy),
                    }
                    let dot = g.iter().zip(x).map(|(g, x)| g * x * r).sum::<f32>() / cols as f32;
                    dx.iter_mut()
                        .zip(g.iter().zip(x))
                        .for_each(|(dx, (g, x))| *dx = r * (g - x * r * dot));
                }
            });
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// RMSNorm of the f32 rows of `x` with the fused backward; `None` where `x` cannot take it.
pub(crate) fn rms_norm(x: &Tensor, weight: Option<&Tensor>, eps: f64) -> Result<Option<Tensor>> {
    if !fusable(&[x]) {
        return Ok(None);
    }
    let weight = weight
        .map(|w| w.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>())
        .transpose()?;
    let op = RmsNormOp {
        weight,
        eps: eps as f32,
    };
    Ok(Some(x.contiguous()?.apply_op1(op)?))
}

// ---------------------------------------------------------------------------------------
// gelu(gate) · up

/// `√(2/π)`.
const BETA: f32 = std::f32::consts::FRAC_2_SQRT_PI * std::f32::consts::FRAC_1_SQRT_2;
const KAPPA: f32 = 0.044715;

/// `tanh(β · (x + κx³))` of every value of `x` into `t`.
fn gelu_tanh_inner(x: &[f32], t: &mut [f32]) {
    t.iter_mut()
        .zip(x)
        .for_each(|(t, &x)| *t = BETA * (x + KAPPA * x * x * x));
    tanh_in_place(t);
}

/// `gelu_pytorch_tanh(gate) · up`, element-wise.
struct GeluMulOp;

impl CustomOp2 for GeluMulOp {
    fn name(&self) -> &'static str {
        "gelu-mul-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = values(s1, l1, self.name())?;
        let u = values(s2, l2, self.name())?;
        if l1.shape() != l2.shape() {
            return Err(msg("gelu-mul-train: gate and up differ in shape"));
        }
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(TASK)
            .zip(g.par_chunks(TASK).zip(u.par_chunks(TASK)))
            .for_each(|(y, (g, u))| {
                gelu_tanh_inner(g, y);
                y.iter_mut()
                    .zip(g.iter().zip(u))
                    .for_each(|(y, (&g, &u))| *y = 0.5 * g * (1.0 + *y) * u);
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    /// `d gate = dy · up · gelu′(gate)`, `d up = dy · gelu(gate)`, with
    /// `gelu′(x) = ½(1 + t) + ½x(1 − t²)·β(1 + 3κx²)`.
    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (g, u, d) = (vec_of(gate)?, vec_of(up)?, vec_of(dy)?);
        let mut dg = vec![0f32; g.len()];
        let mut du = vec![0f32; g.len()];
        dg.par_chunks_mut(TASK)
            .zip(du.par_chunks_mut(TASK))
            .zip(
                g.par_chunks(TASK)
                    .zip(u.par_chunks(TASK).zip(d.par_chunks(TASK))),
            )
            .for_each(|((dg, du), (g, (u, d)))| {
                // tanh into dg, then both gradients from it.
                gelu_tanh_inner(g, dg);
                for i in 0..g.len() {
                    let (x, t) = (g[i], dg[i]);
                    let gelu = 0.5 * x * (1.0 + t);
                    let slope = 0.5 * (1.0 + t)
                        + 0.5 * x * (1.0 - t * t) * BETA * (1.0 + 3.0 * KAPPA * x * x);
                    du[i] = d[i] * gelu;
                    dg[i] = d[i] * u[i] * slope;
                }
            });
        Ok((
            Some(Tensor::from_vec(dg, gate.shape(), gate.device())?),
            Some(Tensor::from_vec(du, up.shape(), up.device())?),
        ))
    }
}

/// `gelu_pytorch_tanh(gate) · up` with the fused backward; `None` where the inputs cannot
/// take it.
pub(crate) fn gelu_mul(gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    if !fusable(&[gate, up]) || gate.shape() != up.shape() {
        return Ok(None);
    }
    Ok(Some(
        gate.contiguous()?.apply_op2(&up.contiguous()?, GeluMulOp)?,
    ))
}

// ---------------------------------------------------------------------------------------
// softmax

/// Softmax over the last dimension (masked entries, `−∞`, give exactly 0).
struct SoftmaxOp;

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "softmax-train"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = values(s, l, self.name())?;
        let cols = l.dims().last().copied().unwrap_or(1).max(1);
        let mut y = x.to_vec();
        y.par_chunks_mut(rows_per_task(cols) * cols).for_each(|y| {
            for row in y.chunks_mut(cols) {
                let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                // A fully masked row: torch gives NaN; keep its values NaN too.
                let m = if m == f32::NEG_INFINITY { f32::NAN } else { m };
                row.iter_mut().for_each(|v| *v -= m);
                exp_in_place(row);
                let inv = 1.0 / row.iter().sum::<f32>();
                row.iter_mut().for_each(|v| *v *= inv);
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    /// `dx = y ⊙ (dy − Σ dy ⊙ y)`.
    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let cols = y.dims().last().copied().unwrap_or(1).max(1);
        let yv = vec_of(y)?;
        let mut dx = vec_of(dy)?;
        let chunk = rows_per_task(cols) * cols;
        dx.par_chunks_mut(chunk)
            .zip(yv.par_chunks(chunk))
            .for_each(|(dx, y)| {
                for (d, y) in dx.chunks_mut(cols).zip(y.chunks(cols)) {
                    let dot: f32 = d.iter().zip(y).map(|(d, y)| d * y).sum();
                    d.iter_mut().zip(y).for_each(|(d, y)| *d = y * (*d - dot));
                }
            });
        Ok(Some(Tensor::from_vec(dx, y.shape(), y.device())?))
    }
}

/// Softmax over the last dimension with the fused backward; `None` where `x` cannot take
/// it.
pub(crate) fn softmax_last_dim(x: &Tensor) -> Result<Option<Tensor>> {
    if !fusable(&[x]) {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op1(SoftmaxOp)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Forward and the input gradients of `L = Σ f(x) ⊙ c` against candle's composed
    /// forms, which candle differentiates itself.
    fn check(
        fused: impl Fn(&[&Tensor]) -> Tensor,
        composed: impl Fn(&[&Tensor]) -> Tensor,
        inputs: &[Tensor],
        tol: f32,
    ) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let (a, b) = (fused(&ts), composed(&ts));
        assert!(max_diff(&a, &b) < tol, "forward {}", max_diff(&a, &b));
        let c = Tensor::rand(-1f32, 1., a.shape(), &Device::Cpu).unwrap();
        let ga = (&a * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&b * &c).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, t) in ts.iter().enumerate() {
            let (x, y) = (ga.get(t).unwrap(), gb.get(t).unwrap());
            let d = max_diff(x, y);
            assert!(d < tol, "input {i}: gradient {d}");
        }
    }

    #[test]
    fn rms_norm_forward_and_backward() {
        let d = Device::Cpu;
        // Rows of 96 and of 5 (several rows per task; a short one).
        for (rows, cols) in [(700, 96), (3, 5)] {
            let x = Tensor::randn(0f32, 2., (rows, cols), &d).unwrap();
            let w = Tensor::rand(0.5f32, 1.5, cols, &d).unwrap();
            let composed = |x: &Tensor, w: Option<&Tensor>| {
                let inv = x
                    .sqr()
                    .unwrap()
                    .mean_keepdim(D::Minus1)
                    .unwrap()
                    .affine(1.0, 1e-6)
                    .unwrap()
                    .powf(-0.5)
                    .unwrap();
                let y = x.broadcast_mul(&inv).unwrap();
                match w {
                    Some(w) => y.broadcast_mul(w).unwrap(),
                    None => y,
                }
            };
            check(
                |t| rms_norm(t[0], Some(&w), 1e-6).unwrap().unwrap(),
                |t| composed(t[0], Some(&w)),
                std::slice::from_ref(&x),
                1e-5,
            );
            check(
                |t| rms_norm(t[0], None, 1e-6).unwrap().unwrap(),
                |t| composed(t[0], None),
                &[x],
                1e-5,
            );
        }
    }

    #[test]
    fn gelu_mul_forward_and_backward() {
        let d = Device::Cpu;
        // Past one task's elements, and values out to where tanh saturates.
        let g = Tensor::randn(0f32, 3., (40, 1000), &d).unwrap();
        let u = Tensor::randn(0f32, 1., (40, 1000), &d).unwrap();
        check(
            |t| gelu_mul(t[0], t[1]).unwrap().unwrap(),
            |t| (t[0].gelu().unwrap() * t[1]).unwrap(),
            &[g, u],
            2e-5,
        );
    }

    #[test]
    fn softmax_forward_and_backward_with_masked_entries() {
        let d = Device::Cpu;
        let x = Tensor::randn(0f32, 3., (2, 300, 64), &d).unwrap();
        // A causal mask: −∞ above the diagonal of each [300, 64] block's first 64 rows.
        let mask: Vec<f32> = (0..300 * 64)
            .map(|i| match (i % 64) > (i / 64) {
                true => f32::NEG_INFINITY,
                false => 0.0,
            })
            .collect();
        let mask = Tensor::from_vec(mask, (300, 64), &d).unwrap();
        let masked = x.broadcast_add(&mask).unwrap();
        check(
            |t| softmax_last_dim(t[0]).unwrap().unwrap(),
            |t| candle_nn::ops::softmax(t[0], D::Minus1).unwrap(),
            &[x],
            1e-6,
        );
        // Masked entries are exactly zero.
        let y = softmax_last_dim(&masked).unwrap().unwrap();
        let v: Vec<f32> = y.get(0).unwrap().get(0).unwrap().to_vec1().unwrap();
        assert_eq!(v[0], 1.0);
        assert!(v[1..].iter().all(|&p| p == 0.0));
    }
}
