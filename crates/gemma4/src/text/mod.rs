//! The text decoder: [`model`] (embeddings, layers, head, the batched forward pass) built
//! from [`decoder_layer`]s of [`attention`], [`mlp`], [`moe`] and [`ple`], with a
//! [`kv_cache`] per sequence; [`full_sequence`] runs a whole sequence without a cache
//! (training).

pub mod attention;
pub mod decoder_layer;
pub mod full_sequence;
pub mod kv_cache;
pub mod mlp;
pub mod model;
pub mod moe;
pub mod ple;
