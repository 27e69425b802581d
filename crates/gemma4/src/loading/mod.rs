//! Reading checkpoints and files: [`weights`] memory-maps safetensors and GGUF files and
//! hands tensors to the modules, [`gguf`] is the GGUF container (and llama.cpp's naming
//! and metadata), [`npy`] reads and writes NumPy arrays.

pub mod gguf;
pub(crate) mod input;
pub mod npy;
pub mod weights;
