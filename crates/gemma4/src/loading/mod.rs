//! Reading checkpoints and files: [`weights`] memory-maps safetensors and GGUF files and
//! hands tensors to the modules, [`gguf`] is the GGUF container (and llama.cpp's naming
//! and metadata), [`npy`] reads and writes NumPy arrays, [`hub`] finds a hub id's
//! checkpoint in the local Hugging Face cache, [`atomic`] writes files whole or not at all.

pub(crate) mod atomic;
pub mod gguf;
pub mod hub;
pub(crate) mod input;
pub mod npy;
pub mod weights;
