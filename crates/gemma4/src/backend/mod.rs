//! Compute kernels behind the model's projections, one folder per device. The CPU's are
//! [`cpu`]; [`crate::nn::linear`] picks among them. A CUDA backend sits beside it.

pub(crate) mod cpu;
