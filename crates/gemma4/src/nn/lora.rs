//! The low-rank update a LoRA adapter adds to one projection, applied unmerged, and which
//! adapters are on for the forward pass running now.
//!
//! As peft's `lora.Linear` computes it: `y = base(x) + scaling · B(A(x))`, with the update in
//! f32 (peft keeps adapter weights in f32 over a bf16/f16 base, `autocast_adapter_dtype`,
//! and casts the input to them) and the sum rounded back to the base output's dtype. For a
//! `Gemma4ClippableLinear` peft wraps the inner `.linear`, so the update goes inside the
//! clamps; [`crate::nn::linear::Linear::forward`] applies it there.
//!
//! Many adapters can be loaded on one model ([`crate::Gemma4::attach_adapter`]); a forward
//! pass runs with a set of them on ([`AdapterSet`]), chosen by the caller with
//! [`with_adapters`]. The choice is a thread-local scope, like torch's `no_grad`, rather than
//! an argument threaded through every module: the model's forward runs on the calling thread
//! (its kernels split rows over rayon's pool but never call back into the modules).

use std::cell::Cell;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// How many adapters one model can hold (the bits of an [`AdapterSet`]).
pub const MAX_ADAPTERS: usize = 64;

/// Which of a model's loaded adapters a forward pass uses: a set of adapter ids
/// ([`crate::lora::AttachedAdapter::id`]). Two sequences can share a batched step only
/// when their sets are equal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AdapterSet(u64);

impl AdapterSet {
    /// The base model alone.
    pub const NONE: AdapterSet = AdapterSet(0);

    /// Only adapter `id`.
    pub fn only(id: usize) -> Self {
        Self::NONE.with(id)
    }

    /// This set and adapter `id`.
    pub fn with(self, id: usize) -> Self {
        assert!(id < MAX_ADAPTERS, "adapter ids are below {MAX_ADAPTERS}");
        AdapterSet(self.0 | 1 << id)
    }

    pub fn contains(self, id: usize) -> bool {
        id < MAX_ADAPTERS && self.0 & (1 << id) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The ids in the set, increasing.
    pub fn ids(self) -> impl Iterator<Item = usize> {
        (0..MAX_ADAPTERS).filter(move |&i| self.contains(i))
    }
}

thread_local! {
    static ACTIVE: Cell<AdapterSet> = const { Cell::new(AdapterSet::NONE) };
    static DROPOUT: Cell<Option<Dropout>> = const { Cell::new(None) };
}

/// LoRA dropout while training (peft's `lora_dropout`): each adapter's input is zeroed with
/// probability `p` and the rest scaled by `1/(1 − p)`, the base projection's input left
/// whole. The mask is a function of `seed` and the projection (never of a running random
/// state), so a layer run again for its backward (recomputation) draws the mask its
/// forward drew, and a resumed run the masks an uninterrupted one would have.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    pub p: f64,
    /// Distinct for every forward pass that should draw new masks (the trainer takes it
    /// from its seed, the step and the sequence).
    pub seed: u64,
}

/// Runs `f` with LoRA dropout `d` (or none) on this thread, then restores what was on.
pub fn with_dropout<R>(d: Option<Dropout>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Dropout>);
    impl Drop for Restore {
        fn drop(&mut self) {
            DROPOUT.with(|a| a.set(self.0));
        }
    }
    let _restore = Restore(DROPOUT.with(|a| a.replace(d.filter(|d| d.p > 0.0))));
    f()
}

/// 64-bit FNV-1a: a projection's key for its dropout masks, the same on every build (std's
/// hasher is not promised to be).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The dropout mask for an input of `shape` to the projection keyed `key`: `0` or
/// `1/(1 − p)` per element.
fn dropout_mask(
    d: Dropout,
    key: u64,
    shape: &candle_core::Shape,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(d.seed ^ key.rotate_left(17));
    let keep = (1.0 / (1.0 - d.p)) as f32;
    let p = d.p as f32;
    let v: Vec<f32> = (0..shape.elem_count())
        .map(|_| if rng.random::<f32>() < p { 0.0 } else { keep })
        .collect();
    Ok(Tensor::from_vec(v, shape, dev)?)
}

/// Runs `f` with the adapters of `set` on for every projection that has them (on this
/// thread), then restores the set that was on before, also when `f` panics.
pub fn with_adapters<R>(set: AdapterSet, f: impl FnOnce() -> R) -> R {
    struct Restore(AdapterSet);
    impl Drop for Restore {
        fn drop(&mut self) {
            ACTIVE.with(|a| a.set(self.0));
        }
    }
    let _restore = Restore(ACTIVE.with(|a| a.replace(set)));
    f()
}

/// The adapters on for this thread's forward pass now.
pub(crate) fn active() -> AdapterSet {
    ACTIVE.with(|a| a.get())
}

/// One adapter's update of one projection: `scaling · B A`, with `A` `[r, in]` and `B`
/// `[out, r]` kept in f32.
#[derive(Debug, Clone)]
pub struct LoraDelta {
    pub(crate) id: usize,
    a: Tensor,
    b: Tensor,
    scaling: f64,
    /// Its dropout masks' key (from the adapter tensor's name).
    key: u64,
    /// `(e, E)` for expert `e` of a fused `[E, out, in]` parameter (peft's `ParamWrapper`):
    /// `a` `[r·E, in]` and `b` `[out, r·E]` hold every expert's factors, expert `e`'s
    /// being rows `e·r..(e+1)·r` of A and columns `k·E + e` of B. They are sliced at each
    /// use, so a trained adapter's updated values (and its graph) are what the expert sees.
    expert: Option<(usize, usize)>,
}

impl LoraDelta {
    /// `a` `[r, in]`, `b` `[out, r]` for a projection of shape `[out, in]`; `name` names the
    /// adapter tensor in errors.
    pub fn new(
        id: usize,
        a: Tensor,
        b: Tensor,
        scaling: f64,
        (out, inp): (usize, usize),
        name: &str,
    ) -> Result<Self> {
        let (r, a_in) = a.dims2()?;
        let (b_out, b_r) = b.dims2()?;
        if a_in != inp || b_out != out || b_r != r || r == 0 {
            return Err(Error::invalid_argument(
                "adapter",
                format!(
                    "`{name}`: lora_A is [{r}, {a_in}] and lora_B [{b_out}, {b_r}], but the \
                     projection is [{out}, {inp}] (lora_A must be [r, {inp}], lora_B [{out}, r])"
                ),
            ));
        }
        Ok(LoraDelta {
            id,
            a: a.to_dtype(DType::F32)?.contiguous()?,
            b: b.to_dtype(DType::F32)?.contiguous()?,
            scaling,
            key: fnv1a(name),
            expert: None,
        })
    }

    /// Expert `e` of `n`'s update from the factors of a fused expert parameter: `a`
    /// `[r·n, in]`, `b` `[out, r·n]` (peft's `ParamWrapper` layout), for expert
    /// projections of shape `[out, in]`.
    pub fn expert(
        id: usize,
        a: Tensor,
        b: Tensor,
        scaling: f64,
        (e, n): (usize, usize),
        (out, inp): (usize, usize),
        name: &str,
    ) -> Result<Self> {
        let (rows, a_in) = a.dims2()?;
        let (b_out, cols) = b.dims2()?;
        if n == 0
            || e >= n
            || rows % n != 0
            || rows == 0
            || a_in != inp
            || b_out != out
            || cols != rows
        {
            return Err(Error::invalid_argument(
                "adapter",
                format!(
                    "`{name}`: lora_A is [{rows}, {a_in}] and lora_B [{b_out}, {cols}], but the \
                     {n} experts' projections are [{out}, {inp}] (lora_A must be [r·{n}, {inp}], \
                     lora_B [{out}, r·{n}])"
                ),
            ));
        }
        Ok(LoraDelta {
            id,
            a: a.to_dtype(DType::F32)?,
            b: b.to_dtype(DType::F32)?,
            scaling,
            key: fnv1a(&format!("{name}[{e}]")),
            expert: Some((e, n)),
        })
    }

    pub fn rank(&self) -> usize {
        self.a.dims()[0] / self.expert.map_or(1, |(_, n)| n)
    }

    /// The expert this update belongs to, for a fused expert parameter.
    pub(crate) fn expert_index(&self) -> Option<usize> {
        self.expert.map(|(e, _)| e)
    }

    /// `(A, B)` of this projection: the whole factors, or one expert's slices.
    fn factors(&self) -> Result<(Tensor, Tensor)> {
        Ok(match self.expert {
            None => (self.a.clone(), self.b.clone()),
            Some((e, n)) => {
                let r = self.rank();
                let out = self.b.dims()[0];
                let a = self.a.narrow(0, e * r, r)?;
                let b = self
                    .b
                    .reshape((out, r, n))?
                    .narrow(2, e, 1)?
                    .squeeze(2)?
                    .contiguous()?;
                (a, b)
            }
        })
    }

    /// `scaling · B (A x)`: `x` `[.., in]` (any float dtype) → f32 `[.., out]`; under
    /// [`with_dropout`], `scaling · B (A (x ⊙ mask))`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let inp = *dims
            .last()
            .ok_or_else(|| Error::invalid_argument("x", "a scalar"))?;
        let mut x2 = x.to_dtype(DType::F32)?.reshape(((), inp))?;
        if let Some(d) = DROPOUT.with(Cell::get) {
            x2 = (x2.clone() * dropout_mask(d, self.key, x2.shape(), x2.device())?)?;
        }
        let (a, b) = self.factors()?;
        let low = x2.matmul(&a.t()?)?;
        let y = low.matmul(&b.t()?)?.affine(self.scaling, 0.0)?;
        let mut out_dims = dims;
        *out_dims.last_mut().expect("rank ≥ 1") = self.b.dims()[0];
        Ok(y.reshape(out_dims)?)
    }

    /// Whether this update's factors are being trained (they take part in a gradient
    /// computation).
    pub(crate) fn trains(&self) -> bool {
        self.a.track_op() || self.b.track_op()
    }

    /// `x Wᵀ + scaling · B (A x)` with the frozen base weight `w`, as one differentiable
    /// operation ([`crate::nn::autograd::lora_product`]): what training runs. `None` for
    /// an expert's slice of fused factors, which takes the composed form.
    pub(crate) fn fused_with(
        &self,
        w: &crate::nn::linear::LinearWeight,
        x: &Tensor,
    ) -> Result<Option<Tensor>> {
        if self.expert.is_some() {
            return Ok(None);
        }
        let mask = match DROPOUT.with(Cell::get) {
            Some(d) => Some(dropout_mask(d, self.key, x.shape(), x.device())?),
            None => None,
        };
        crate::nn::autograd::lora_product(w, x, (&self.a, &self.b, self.scaling), mask.as_ref())
            .map(Some)
    }

    /// The dense update `scaling · B A` `[out, in]` in f32 (what merging adds to the weight).
    pub fn dense(&self) -> Result<Tensor> {
        let (a, b) = self.factors()?;
        Ok(b.matmul(&a)?.affine(self.scaling, 0.0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn delta() -> LoraDelta {
        let d = Device::Cpu;
        let a = Tensor::new(&[[1f32, 0., 2.], [0., 1., -1.]], &d).unwrap();
        let b = Tensor::new(&[[1f32, 1.], [2., 0.], [0., 3.], [1., -1.]], &d).unwrap();
        LoraDelta::new(0, a, b, 0.5, (4, 3), "t").unwrap()
    }

    #[test]
    fn update_is_scaled_b_a_x() {
        let x = Tensor::new(&[[1f32, 2., 3.]], &Device::Cpu).unwrap();
        // A x = [7, -1]; B (A x) = [6, 14, -3, 8]; × 0.5.
        let y: Vec<Vec<f32>> = delta().apply(&x).unwrap().to_vec2().unwrap();
        assert_eq!(y, vec![vec![3.0, 7.0, -1.5, 4.0]]);
        let dense: Vec<Vec<f32>> = delta().dense().unwrap().to_vec2().unwrap();
        let via_dense: Vec<f32> = (0..4)
            .map(|o| (0..3).map(|i| dense[o][i] * [1., 2., 3.][i]).sum())
            .collect();
        assert_eq!(via_dense, y[0]);
    }

    #[test]
    fn dropout_masks_the_update_input_reproducibly() {
        let d = Device::Cpu;
        let (inp, out, rows) = (64, 3, 50);
        let a = Tensor::rand(-1f32, 1., (2, inp), &d).unwrap();
        let b = Tensor::rand(-1f32, 1., (out, 2), &d).unwrap();
        let delta = LoraDelta::new(0, a, b, 0.5, (out, inp), "layers.0.q_proj").unwrap();
        let x = Tensor::rand(0.5f32, 1., (rows, inp), &d).unwrap();
        let drop = Dropout { p: 0.25, seed: 7 };
        let with = |d: Option<Dropout>| with_dropout(d, || delta.apply(&x).unwrap());
        let masked = with(Some(drop));
        // The same seed draws the same mask (a recomputed layer), another seed another.
        assert_eq!(
            masked.to_vec2::<f32>().unwrap(),
            with(Some(drop)).to_vec2::<f32>().unwrap()
        );
        let other = with(Some(Dropout { seed: 8, ..drop }));
        assert_ne!(
            masked.to_vec2::<f32>().unwrap(),
            other.to_vec2::<f32>().unwrap()
        );
        // Without dropout (or at p = 0) the update is the plain one; the scope ends.
        let plain = delta.apply(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(with(None).to_vec2::<f32>().unwrap(), plain);
        assert_eq!(
            with(Some(Dropout { p: 0.0, ..drop }))
                .to_vec2::<f32>()
                .unwrap(),
            plain
        );
        // The mask: zeros at rate p, the kept inputs scaled by 1/(1 − p), and it is what
        // the update saw.
        let m = dropout_mask(drop, fnv1a("layers.0.q_proj"), x.shape(), &d).unwrap();
        let mv: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
        assert!(mv.iter().all(|&v| v == 0.0 || v == 1.0 / 0.75));
        let zeros = mv.iter().filter(|&&v| v == 0.0).count() as f64 / mv.len() as f64;
        assert!((zeros - 0.25).abs() < 0.03, "{zeros}");
        let want = delta.apply(&(&x * &m).unwrap()).unwrap();
        let diff = (masked - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
    }

    /// An expert's update is peft's `get_delta_weight` for a fused parameter: with A
    /// reshaped `[E, r, in]` and B `[out, r, E]`, `ΔW_e = scaling · B[:, :, e] A[e]`.
    #[test]
    fn expert_updates_slice_the_fused_factors_as_peft() {
        let d = Device::Cpu;
        let (n, r, inp, out) = (3, 2, 4, 5);
        let a = Tensor::rand(-1f32, 1., (r * n, inp), &d).unwrap();
        let b = Tensor::rand(-1f32, 1., (out, r * n), &d).unwrap();
        let (av, bv): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (a.to_vec2().unwrap(), b.to_vec2().unwrap());
        for e in 0..n {
            let delta =
                LoraDelta::expert(0, a.clone(), b.clone(), 0.5, (e, n), (out, inp), "x").unwrap();
            assert_eq!(delta.rank(), r);
            let got: Vec<Vec<f32>> = delta.dense().unwrap().to_vec2().unwrap();
            for o in 0..out {
                for i in 0..inp {
                    let want: f32 = (0..r)
                        .map(|k| bv[o][k * n + e] * av[e * r + k][i])
                        .sum::<f32>()
                        * 0.5;
                    assert!((got[o][i] - want).abs() < 1e-6, "expert {e} [{o}, {i}]");
                }
            }
        }
        let err = LoraDelta::expert(0, a.clone(), b, 1.0, (0, 4), (out, inp), "layers.0.experts")
            .unwrap_err();
        assert!(err.to_string().contains("layers.0.experts"), "{err}");
    }

    #[test]
    fn shapes_are_checked_and_named() {
        let d = Device::Cpu;
        let a = Tensor::zeros((2, 3), DType::F32, &d).unwrap();
        let b = Tensor::zeros((4, 2), DType::F32, &d).unwrap();
        let err = LoraDelta::new(0, a, b, 1.0, (4, 5), "layers.0.q_proj").unwrap_err();
        assert!(err.to_string().contains("layers.0.q_proj"), "{err}");
        assert!(err.to_string().contains("[4, 5]"), "{err}");
    }

    #[test]
    fn scope_restores_the_previous_set() {
        assert!(active().is_empty());
        let set = AdapterSet::only(3).with(5);
        with_adapters(set, || {
            assert_eq!(active(), set);
            with_adapters(AdapterSet::NONE, || assert!(active().is_empty()));
            assert_eq!(active(), set);
        });
        assert!(active().is_empty());
        let caught = std::panic::catch_unwind(|| with_adapters(set, || panic!("inside")));
        assert!(caught.is_err());
        assert!(active().is_empty());
        assert_eq!(set.ids().collect::<Vec<_>>(), vec![3, 5]);
    }
}
