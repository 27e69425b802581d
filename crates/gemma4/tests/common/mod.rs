//! Helpers shared by the integration tests: fixture paths, golden files, comparisons.
#![allow(dead_code)] // each test binary uses a subset

use std::path::{Path, PathBuf};

use serde_json::Value;

/// The project standard: 1e-4 max-abs in f32.
pub const TOL: f32 = 1e-4;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

pub fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Rows of `vocab` logits on which `got` and `reference` pick the same top-1 id.
pub fn top1_agreement(got: &[f32], reference: &[f32], vocab: usize) -> usize {
    assert_eq!(got.len(), reference.len());
    got.chunks(vocab)
        .zip(reference.chunks(vocab))
        .filter(|(a, b)| gemma4::sampling::argmax(a) == gemma4::sampling::argmax(b))
        .count()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn rows(t: &candle_core::Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}
