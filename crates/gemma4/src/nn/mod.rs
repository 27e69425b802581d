//! Building blocks shared by the towers: the one [`linear`] layer every projection goes
//! through (with the [`lora`] updates adapters add to it), [`norm`] (RMSNorm), [`rope`], the attention [`mask`]s and the vectorised [`activation`]s.

pub mod activation;
pub(crate) mod autograd;
pub(crate) mod fused;
pub mod linear;
pub mod lora;
pub mod mask;
pub mod norm;
pub mod rope;
