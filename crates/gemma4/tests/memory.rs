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
            gemma4::text::model::LogitsFor::Last,
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

/// The bandwidth bound of `gemma4 bench` counts only what a decoding step reads: of an
/// MoE layer's experts, the `top_k` a token is routed to.
#[test]
fn a_decode_step_leaves_unrouted_experts_unread() {
    let model = Gemma4::load(&fixture("moe"), LoadOptions::default()).unwrap();
    let cfg = model.text.config();
    let moe = cfg.moe.as_ref().expect("the moe fixture has an MoE block");
    let (h, i, e, k) = (
        cfg.hidden_size,
        moe.intermediate_size,
        moe.num_experts,
        moe.top_k,
    );
    // Per expert: gate_up [2I, H] and down [H, I], in the dtype the model holds.
    let expert = (2 * i * h + h * i) * model.text.dtype().size_in_bytes();
    let unread = cfg.num_hidden_layers * (e - k) * expert;
    assert_eq!(model.text.unread_bytes_per_token(), unread as u64);
    assert!(model.text_bytes > unread as u64);

    let dense = Gemma4::load(&fixture("e2b_like"), LoadOptions::default()).unwrap();
    assert_eq!(dense.text.unread_bytes_per_token(), 0);
}
