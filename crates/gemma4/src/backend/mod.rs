//! Compute kernels behind the model's projections: [`matrix::Matrix`], the one trait every
//! projection multiplies through, with an implementation per weight format, and the
//! kernels themselves, one folder per device ([`cpu`]). A CUDA backend sits beside it.

pub(crate) mod cpu;
pub(crate) mod matrix;
