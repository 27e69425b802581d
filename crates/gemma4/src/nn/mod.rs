//! Building blocks shared by the towers: the one [`linear`] layer every projection goes
//! through, [`norm`] (RMSNorm), [`rope`] and the vectorised [`activation`]s.

pub mod activation;
pub mod linear;
pub mod norm;
pub mod rope;
