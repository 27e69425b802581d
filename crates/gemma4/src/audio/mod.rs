//! Audio: [`decode`] reads files (with [`resample`]), [`features`] makes the log-mel
//! features (or the 12B's raw frames), [`tower`] (with [`attention`]) is the conformer,
//! and [`encoder`] ties a checkpoint's tower or embedder to `embed_audio`.

pub mod attention;
pub mod decode;
pub mod encoder;
pub mod features;
pub mod resample;
pub mod tower;
