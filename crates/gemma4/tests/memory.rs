//! Memory: weights copied out of the memory map do not stay resident twice. Loading a
//! tensor reads (faults in) its file pages; the loader then drops them from the process's
//! resident set, so peak RSS is the weights as held, not the weights plus the file.

mod common;

use common::fixture;
use gemma4::{Gemma4, LoadOptions};

/// Resident bytes of this process's mappings of `path`, from `/proc/self/smaps`.
#[cfg(target_os = "linux")]
fn mapped_rss(path: &std::path::Path) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let name = path.canonicalize().unwrap().display().to_string();
    let mut in_file = false;
    let mut total = 0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            in_file = line.ends_with(&name);
        } else if in_file && line.starts_with("Rss:") {
            let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
            total += kb * 1024;
        }
    }
    total
}

#[cfg(target_os = "linux")]
#[test]
fn loaded_weights_leave_no_file_pages_resident() {
    let dir = fixture("kquant");
    let file = dir.join("model.safetensors");
    let size = std::fs::metadata(&file).unwrap().len();
    let model = Gemma4::load(&dir, LoadOptions::default()).unwrap();
    let rss = mapped_rss(&file);
    // Pages shared by two tensors and the per-layer-embedding table (read a row per token,
    // never copied) may stay; every copied tensor's own pages must be gone.
    assert!(
        rss < size / 10,
        "{rss} of {size} bytes of the mapped file still resident after loading"
    );
    // And the model still computes from its copies.
    let logits = model
        .text
        .forward(
            &[2, 10, 20],
            &mut model.text.new_cache(),
            gemma4::text_model::LogitsFor::Last,
        )
        .unwrap();
    assert!(logits
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|v| v.is_finite()));
}
