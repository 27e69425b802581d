//! Parity with the reference (transformers 5.23.0) on the committed random-weight fixtures
//! built by `scripts/fixtures/make_fixtures.py`: full-sequence logits, cached greedy decoding
//! (ids and every step's logits), cached decode against a full forward, tokenizer and chat
//! template. Tolerance: 1e-4 max-abs in f32, as the project standard.

mod common;

use std::path::Path;

use gemma4::generate::sampling::SamplingParams;
use gemma4::generate::{generate, GenerateOptions, StopReason};
use gemma4::loading::npy;
use gemma4::prompt::chat::Message;
use gemma4::text::model::LogitsFor;
use gemma4::{Gemma4, LoadOptions};
use serde_json::Value;

use common::{fixture, ids, json, max_abs, rows, top1_agreement, TOL};

fn golden(dir: &Path) -> Value {
    json(&dir.join("golden/prompts.json"))
}

fn check_fixture(name: &str) {
    let dir = fixture(name);
    let g = golden(&dir);
    let model = Gemma4::load(&dir, LoadOptions::default()).unwrap();
    let tm = &model.text;
    let vocab = tm.config().vocab_size;
    for (k, case) in g["cases"].as_array().unwrap().iter().enumerate() {
        let prompt = ids(&case["prompt_ids"]);
        let want_greedy = ids(&case["greedy_ids"]);

        // 1. Logits of every prompt position, no cache reuse.
        let (shape, want) = npy::read_f32(&dir.join(format!("golden/logits_{k}.npy"))).unwrap();
        assert_eq!(shape, [prompt.len(), vocab]);
        let got = rows(
            &tm.forward(&prompt, &mut tm.new_cache(), LogitsFor::All)
                .unwrap(),
        );
        let d = max_abs(&got, &want);
        assert!(
            d <= TOL,
            "{name} case {k}: full-sequence logits differ by {d}"
        );

        // 2. Cached greedy decoding: every step's logits and the ids.
        let (shape, want_steps) =
            npy::read_f32(&dir.join(format!("golden/step_logits_{k}.npy"))).unwrap();
        assert_eq!(shape, [want_greedy.len(), vocab]);
        let mut cache = tm.new_cache();
        let mut logits = tm.forward(&prompt, &mut cache, LogitsFor::Last).unwrap();
        let mut step_logits = Vec::new();
        for (t, &want_id) in want_greedy.iter().enumerate() {
            let row = rows(&logits);
            let d = max_abs(&row, &want_steps[t * vocab..(t + 1) * vocab]);
            assert!(
                d <= TOL,
                "{name} case {k} step {t}: cached logits differ by {d}"
            );
            assert_eq!(
                gemma4::generate::sampling::argmax(&row),
                want_id,
                "{name} case {k} step {t}: greedy id"
            );
            step_logits.extend(row);
            logits = tm.forward(&[want_id], &mut cache, LogitsFor::Last).unwrap();
        }

        // 3. The same through the generation loop.
        let opts = GenerateOptions {
            max_new_tokens: want_greedy.len(),
            sampling: SamplingParams::greedy(),
            stop_ids: vec![],
            adapters: Default::default(),
            constraint: None,
            draft: None,
        };
        let out = generate(tm, &prompt, &opts, |_| Ok(())).unwrap();
        assert_eq!(
            out.generated_ids, want_greedy,
            "{name} case {k}: generate()"
        );
        assert_eq!(out.stop_reason, StopReason::MaxTokens);

        // 4. Cached decode equals one full forward over prompt + continuation.
        let mut all = prompt.clone();
        all.extend(&want_greedy[..want_greedy.len() - 1]);
        let full = rows(
            &tm.forward(&all, &mut tm.new_cache(), LogitsFor::All)
                .unwrap(),
        );
        let tail = &full[(prompt.len() - 1) * vocab..];
        let d = max_abs(tail, &step_logits);
        assert!(
            d <= TOL,
            "{name} case {k}: cached decode vs full forward differ by {d}"
        );
    }

    // Tokenizer and chat template against the reference tokenizer.
    let tok = model.tokenizer().unwrap();
    for case in g["tokenizer"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let got = tok.encode(text).unwrap();
        assert_eq!(got, ids(&case["ids"]), "{name}: encode {text:?}");
        assert_eq!(
            tok.decode(&got, false).unwrap(),
            case["decoded"].as_str().unwrap()
        );
        assert_eq!(
            tok.decode(&got, true).unwrap(),
            case["decoded_skip_special"].as_str().unwrap()
        );
    }
    for case in g["chat"].as_array().unwrap() {
        let msgs: Vec<Message> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        assert_eq!(
            model.chat_template.render(&msgs, agp).unwrap(),
            case["rendered"].as_str().unwrap()
        );
    }
}

#[test]
fn e2b_like_ple_kv_sharing_double_wide() {
    check_fixture("e2b_like");
}

#[test]
fn dense_k_eq_v_sharded_f32() {
    check_fixture("dense_keqv");
}

#[test]
fn moe_26b_like() {
    check_fixture("moe");
}

#[test]
fn text_only_causal_lm_layout() {
    check_fixture("text_only");
}

#[test]
fn kquant_widths_256() {
    check_fixture("kquant");
}

#[test]
fn unified_12b_like() {
    check_fixture("unified");
}

/// bf16 compute (the released weights' dtype). bf16 results are not bit-comparable
/// between engines (torch's kernels round at other points than candle's), and on these
/// random weights even the reference's own bf16 run lands 1.2–3.0 away from its f32 logits.
/// So the bound is relative to the reference: our bf16 may drift from the f32 golden at most
/// 1.5× as far as transformers' bf16 does, and lose at most 2 more top-1 positions.
#[test]
fn bf16_compute_is_as_accurate_as_reference_bf16() {
    for name in ["e2b_like", "dense_keqv", "moe", "text_only", "unified"] {
        let dir = fixture(name);
        let g = golden(&dir);
        let opts = LoadOptions {
            dtype: candle_core::DType::BF16,
            ..Default::default()
        };
        let model = Gemma4::load(&dir, opts).unwrap();
        let tm = &model.text;
        let vocab = tm.config().vocab_size;
        let prompt = ids(&g["cases"][0]["prompt_ids"]);
        let (_, f32_ref) = npy::read_f32(&dir.join("golden/logits_0.npy")).unwrap();
        let (_, bf16_ref) = npy::read_f32(&dir.join("golden/logits_bf16_0.npy")).unwrap();
        let ours = rows(
            &tm.forward(&prompt, &mut tm.new_cache(), LogitsFor::All)
                .unwrap(),
        );
        let top1 = |x: &[f32]| top1_agreement(x, &f32_ref, vocab);
        let (d_ours, d_ref) = (max_abs(&ours, &f32_ref), max_abs(&bf16_ref, &f32_ref));
        eprintln!(
            "{name}: vs f32 golden, ours bf16 {d_ours} (top-1 {}), transformers bf16 {d_ref} (top-1 {}) of {}",
            top1(&ours),
            top1(&bf16_ref),
            prompt.len()
        );
        assert!(
            d_ours <= 1.5 * d_ref,
            "{name}: bf16 drift {d_ours} vs reference's {d_ref}"
        );
        assert!(
            top1(&ours) + 2 >= top1(&bf16_ref),
            "{name}: bf16 top-1 agreement"
        );
    }
}
