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

/// A scratch copy of a fixture's files that a test may break, removed when dropped (also
/// when the test fails). Derefs to its path.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// An empty scratch directory.
    pub fn empty(tag: &str) -> Self {
        let dst = std::env::temp_dir().join(format!("gemma4-scratch-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dst);
        std::fs::create_dir_all(&dst).unwrap();
        Scratch(dst)
    }

    pub fn of(name: &str, tag: &str) -> Self {
        let s = Self::empty(tag);
        let dst = s.0.clone();
        for e in std::fs::read_dir(fixture(name)).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
            }
        }
        s
    }

    /// Rewrites the JSON file `file` of the copy with `f`.
    pub fn edit_json(&self, file: &str, f: impl FnOnce(&mut Value)) {
        let p = self.0.join(file);
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, v.to_string()).unwrap();
    }
}

impl std::ops::Deref for Scratch {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The model fixtures' image goldens come from the reference's PIL image processor
/// (`make_vision_fixtures.py`); the 12B's merged-crop processor exists only with
/// torchvision, whose goldens match the default.
pub fn use_pil_processor(model: &mut gemma4::Gemma4) {
    use gemma4::vision::image_processor::PatchLayout;
    if model.image_processor.layout == PatchLayout::Tower {
        model
            .image_processor
            .set_backend(gemma4::vision::resize::ResizeKernel::Pillow);
    }
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
        .filter(|(a, b)| {
            gemma4::generate::sampling::argmax(a) == gemma4::generate::sampling::argmax(b)
        })
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

#[derive(Default)]
pub struct Agreement {
    pub max_abs: f32,
    pub top1: usize,
    pub positions: usize,
}

impl Agreement {
    pub fn add(&mut self, got: &[f32], want: &[f32], vocab: usize) {
        assert_eq!(got.len(), want.len());
        self.max_abs = self.max_abs.max(max_abs(got, want));
        self.top1 += top1_agreement(got, want, vocab);
        self.positions += got.len() / vocab;
    }

    pub fn fraction(&self) -> f64 {
        self.top1 as f64 / self.positions as f64
    }
}

/// Logits of `tm` over each golden prompt of fixture `golden` followed by the reference's
/// greedy continuation, against the f32 golden rows at the same positions:
/// `(batched, decode)`, the first over whole sequences in one pass, the second over the
/// continuation fed one token at a time after the prompt.
pub fn agreement(tm: &gemma4::text::model::TextModel, golden: &Path) -> (Agreement, Agreement) {
    use gemma4::text::model::LogitsFor;
    let g = json(&golden.join("golden/prompts.json"));
    let vocab = tm.config().vocab_size;
    let (mut batched, mut decode) = (Agreement::default(), Agreement::default());
    for (k, case) in g["cases"].as_array().unwrap().iter().enumerate() {
        let prompt = ids(&case["prompt_ids"]);
        let greedy = ids(&case["greedy_ids"]);
        let read = |f: String| gemma4::loading::npy::read_f32(&golden.join(f)).unwrap().1;
        let mut want = read(format!("golden/logits_{k}.npy"));
        let steps = read(format!("golden/step_logits_{k}.npy"));
        // The last prompt row is the first step's; the other steps follow it.
        want.extend_from_slice(&steps[vocab..]);
        let mut all = prompt.clone();
        all.extend(&greedy[..greedy.len() - 1]);
        let got = rows(
            &tm.forward(&all, &mut tm.new_cache(), LogitsFor::All)
                .unwrap(),
        );
        batched.add(&got, &want, vocab);

        let mut cache = tm.new_cache();
        let mut got = rows(&tm.forward(&prompt, &mut cache, LogitsFor::Last).unwrap());
        for &t in &greedy[..greedy.len() - 1] {
            got.extend(rows(
                &tm.forward(&[t], &mut cache, LogitsFor::Last).unwrap(),
            ));
        }
        decode.add(&got, &steps, vocab);
    }
    (batched, decode)
}
