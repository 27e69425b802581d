//! Block-quantized weights (`--quant`) against the f32 reference goldens of the committed
//! fixtures. Quantization changes the numbers by design, so the checks are the ones users
//! judge a format by: max-abs logit difference to f32 and top-1 agreement, teacher-forced
//! over every prompt position and every step of the reference's greedy continuation, both
//! in one batched pass (the prefill kernels) and token by token from the cache (the
//! one-row decode kernels, which for quantized weights quantize the activations to 8 bits).

mod common;

use gemma4::loading::npy;
use gemma4::quant::QuantType;
use gemma4::text::model::LogitsFor;
use gemma4::{Gemma4, LoadOptions};

use common::{fixture, ids, json, max_abs, rows, top1_agreement, Agreement};

/// Checkpoint `dir` loaded with its text decoder quantized to `q` (`None`: f32).
fn load_as(dir: &std::path::Path, q: Option<QuantType>) -> Gemma4 {
    Gemma4::load(
        dir,
        LoadOptions {
            quant: q,
            ..Default::default()
        },
    )
    .unwrap()
}

/// [`common::agreement`] of fixture `name` loaded with its decoder quantized to `q`.
fn agreement(name: &str, q: Option<QuantType>) -> (Agreement, Agreement) {
    let dir = fixture(name);
    common::agreement(&load_as(&dir, q).text, &dir)
}

/// The trained fixture (`kquant`: peaked logits like a real checkpoint's, widths that fill
/// every format's blocks): per format, top-1 agreement with f32 over all 92 positions and
/// the max-abs logit difference, printed as the README's table rows. Bounds sit above the
/// measured values (README): Q8_0 must agree on ≥ 99% of positions, as the issue asks.
#[test]
fn trained_fixture_agreement_per_format() {
    for (q, min_top1, max_abs_bound) in [
        (QuantType::Q8_0, 0.99, 0.5),
        (QuantType::Q6K, 0.99, 1.0),
        (QuantType::Q4K, 0.97, 3.0),
        (QuantType::Q4_0, 0.97, 3.0),
        (QuantType::Q5_0, 0.97, 3.0),
    ] {
        let (batched, decode) = agreement("kquant", Some(q));
        eprintln!(
            "| {q} | {:.3} | {:.1}% ({}/{}) | {:.3} | {:.1}% ({}/{}) |",
            batched.max_abs,
            100.0 * batched.fraction(),
            batched.top1,
            batched.positions,
            decode.max_abs,
            100.0 * decode.fraction(),
            decode.top1,
            decode.positions
        );
        for (path, a) in [("batched", &batched), ("decode", &decode)] {
            assert!(
                a.fraction() >= min_top1,
                "{q} {path}: top-1 agreement {:.3} < {min_top1}",
                a.fraction()
            );
            assert!(
                a.max_abs <= max_abs_bound,
                "{q} {path}: max-abs {} > {max_abs_bound}",
                a.max_abs
            );
        }
    }
}

/// The random-weight fixtures cover the other architectures (MoE experts quantized per
/// expert, k_eq_v, the 12B layout). Their near-flat logits amplify any rounding (the
/// reference's own bf16 run drifts 0.3–3.0 from f32 and flips up to 5 of 27 top-1 ids), so
/// the bound is like the bf16 test's: on prompt 0, Q8_0 may lose at most 2 more top-1
/// positions than transformers' bf16 and drift at most 2.5× as far (not 1.5×: these
/// checkpoints are stored in bf16, so the reference's bf16 run keeps its weights exact and
/// rounds only activations, while Q8_0 also rounds every weight; 2.14× measured on
/// `unified`). 4-bit formats are judged on the trained fixture only: here they flip most
/// top-1 ids.
#[test]
fn random_fixtures_drift_like_reference_bf16() {
    for name in ["e2b_like", "moe", "dense_keqv", "unified"] {
        let dir = fixture(name);
        let g = json(&dir.join("golden/prompts.json"));
        let prompt = ids(&g["cases"][0]["prompt_ids"]);
        let (_, f32_ref) = npy::read_f32(&dir.join("golden/logits_0.npy")).unwrap();
        let (_, bf16_ref) = npy::read_f32(&dir.join("golden/logits_bf16_0.npy")).unwrap();
        let vocab = f32_ref.len() / prompt.len();
        let top1 = |x: &[f32]| top1_agreement(x, &f32_ref, vocab);
        let d_ref = max_abs(&bf16_ref, &f32_ref);
        let q = QuantType::Q8_0;
        let model = load_as(&dir, Some(q));
        let tm = &model.text;
        let got = rows(
            &tm.forward(&prompt, &mut tm.new_cache(), LogitsFor::All)
                .unwrap(),
        );
        let d = max_abs(&got, &f32_ref);
        eprintln!(
            "{name} {q}: max-abs {d:.3} (top-1 {}), transformers bf16 {d_ref:.3} (top-1 {}) of {}",
            top1(&got),
            top1(&bf16_ref),
            prompt.len()
        );
        assert!(
            d <= 2.5 * d_ref,
            "{name} {q}: drift {d} vs reference bf16's {d_ref}"
        );
        assert!(
            top1(&got) + 2 >= top1(&bf16_ref),
            "{name} {q}: top-1 agreement"
        );
    }
}

/// Control for the measure above: unquantized f32 agrees everywhere.
#[test]
fn unquantized_control_agrees_everywhere() {
    for a in <[Agreement; 2]>::from(agreement("kquant", None)) {
        assert!(a.max_abs <= common::TOL, "{}", a.max_abs);
        assert_eq!(a.top1, a.positions);
    }
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("gemma4-quant-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// `gemma4 quantize` round trip: the written checkpoint loads without re-quantizing and
/// computes exactly what quantizing at load time computes (same bytes, same kernels), for
/// every format on the trained fixture and for the MoE experts' stacked tensors.
#[test]
fn quantized_checkpoints_round_trip() {
    use gemma4::quant::checkpoint::quantize_checkpoint;
    let cases = QuantType::ALL
        .iter()
        .map(|&q| ("kquant", q))
        .chain([("moe", QuantType::Q8_0)]);
    for (name, q) in cases {
        let src = fixture(name);
        let out = temp_dir(&format!("{name}-{q}"));
        let report = quantize_checkpoint(&src, &out, q, None).unwrap();
        assert!(report.quantized.values().sum::<usize>() > 0, "{name} {q}");
        assert!(report.bytes_out < report.bytes_in, "{name} {q}");
        let stored = load_as(&out, None);
        let at_load = load_as(&src, Some(q));
        assert_eq!(stored.text_bytes, at_load.text_bytes, "{name} {q}");
        let g = json(&src.join("golden/prompts.json"));
        for case in g["cases"].as_array().unwrap() {
            let prompt = ids(&case["prompt_ids"]);
            let run = |m: &Gemma4| {
                rows(
                    &m.text
                        .forward(&prompt, &mut m.text.new_cache(), LogitsFor::All)
                        .unwrap(),
                )
            };
            assert_eq!(run(&stored), run(&at_load), "{name} {q}: logits");
        }
        // Quantizing a quantized checkpoint is refused with a message naming it.
        let err = quantize_checkpoint(&out, &temp_dir("again"), q, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("already a quantized checkpoint"), "{err}");
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// A truncated `model.gguf` is an error naming the file, not a crash.
#[test]
fn truncated_gguf_is_an_error_naming_it() {
    let out = temp_dir("trunc");
    gemma4::quant::checkpoint::quantize_checkpoint(&fixture("kquant"), &out, QuantType::Q8_0, None)
        .unwrap();
    let path = out.join("model.gguf");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = Gemma4::load(&out, LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.gguf") && err.contains("truncated"),
        "{err}"
    );
    std::fs::remove_dir_all(&out).unwrap();
}
