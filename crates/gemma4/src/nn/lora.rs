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
        })
    }

    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// `scaling · B (A x)`: `x` `[.., in]` (any float dtype) → f32 `[.., out]`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let inp = *dims
            .last()
            .ok_or_else(|| Error::invalid_argument("x", "a scalar"))?;
        let x2 = x.to_dtype(DType::F32)?.reshape(((), inp))?;
        let low = x2.matmul(&self.a.t()?)?;
        let y = low.matmul(&self.b.t()?)?.affine(self.scaling, 0.0)?;
        let mut out_dims = dims;
        *out_dims.last_mut().expect("rank ≥ 1") = self.b.dims()[0];
        Ok(y.reshape(out_dims)?)
    }

    /// The dense update `scaling · B A` `[out, in]` in f32 (what merging adds to the weight).
    pub fn dense(&self) -> Result<Tensor> {
        Ok(self.b.matmul(&self.a)?.affine(self.scaling, 0.0)?)
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
