//! GGUF files from llama.cpp's own converter and quantizer (llama-cpp-python 0.3.36's
//! `vendor/llama.cpp`, made by `scripts/fixtures/make_llamacpp_fixtures.py` from committed
//! fixtures) load with their tensor names mapped back and compute what the safetensors
//! checkpoint they came from computes. The checkpoint directory supplies `config.json` and
//! the tokenizer; the GGUF file is the only weights file in it.

mod common;

use std::path::{Path, PathBuf};

use gemma4::generate::sampling::SamplingParams;
use gemma4::generate::{generate, GenerateOptions};
use gemma4::loading::gguf::StoredType;
use gemma4::loading::npy;
use gemma4::loading::weights::Checkpoint;
use gemma4::text::model::LogitsFor;
use gemma4::{Gemma4, LoadOptions};

use common::{fixture, ids, json, max_abs, rows, top1_agreement, TOL};

/// A directory holding `fixture`'s side files (config, tokenizer, templates) and the
/// llama.cpp file `gguf`, as a user who downloaded a GGUF next to the config has it.
fn gguf_dir(fixture_name: &str, gguf: &str, tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gemma4-llamacpp-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    for entry in std::fs::read_dir(fixture(fixture_name)).unwrap() {
        let p = entry.unwrap().path();
        let keep = p.is_file() && p.extension().is_none_or(|x| x != "safetensors");
        if keep {
            std::fs::copy(&p, d.join(p.file_name().unwrap())).unwrap();
        }
    }
    std::fs::copy(fixture("llamacpp").join(gguf), d.join(gguf)).unwrap();
    d
}

/// Every golden case: full-sequence logits within the project tolerance of the f32
/// reference, and the reference's greedy ids through the generation loop.
fn check_against_golden(dir: &Path, golden_of: &str) {
    let g = json(&fixture(golden_of).join("golden/prompts.json"));
    let model = Gemma4::load(dir, LoadOptions::default()).unwrap();
    let tm = &model.text;
    let vocab = tm.config().vocab_size;
    for (k, case) in g["cases"].as_array().unwrap().iter().enumerate() {
        let prompt = ids(&case["prompt_ids"]);
        let want_greedy = ids(&case["greedy_ids"]);
        let (_, want) =
            npy::read_f32(&fixture(golden_of).join(format!("golden/logits_{k}.npy"))).unwrap();
        let got = rows(
            &tm.forward(&prompt, &mut tm.new_cache(), LogitsFor::All)
                .unwrap(),
        );
        let d = max_abs(&got, &want);
        assert!(d <= TOL, "{golden_of} case {k}: logits differ by {d}");
        assert_eq!(top1_agreement(&got, &want, vocab), prompt.len());
        let opts = GenerateOptions {
            max_new_tokens: want_greedy.len(),
            sampling: SamplingParams::greedy(),
            stop_ids: vec![],
            adapters: Default::default(),
            constraint: None,
            draft: None,
        };
        let out = generate(tm, &prompt, &opts, |_| Ok(())).unwrap();
        assert_eq!(out.generated_ids, want_greedy, "{golden_of} case {k}");
    }
}

/// bf16 files converted from bf16 safetensors hold the same values (norms widened to
/// f32 exactly), so they must match the reference as tightly as the safetensors do:
/// the E2B layout (per-layer embeddings, KV-shared layers whose K/V projections the
/// converter drops) and the MoE layout (expert stacks, router scales).
#[test]
fn converted_bf16_files_match_the_reference() {
    for (name, gguf) in [("e2b_like", "e2b_like-bf16.gguf"), ("moe", "moe-bf16.gguf")] {
        let dir = gguf_dir(name, gguf, name);
        let ckpt = Checkpoint::open(&dir).unwrap();
        assert!(
            ckpt.contains("model.language_model.embed_tokens.weight"),
            "{name}: names mapped back"
        );
        check_against_golden(&dir, name);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// `llama-quantize ... Q8_0` output: projections and the per-layer-embedding table in
/// Q8_0 (the table is dequantized a row at a time on lookup), and its LM head a separate
/// `output.weight`. Judged like our own q8_0 on the trained fixture (tests/quant.rs):
/// top-1 agreement with f32 ≥ 99% over prompt and continuation, in one pass and token by
/// token, max-abs ≤ 0.5, and the reference's greedy ids.
#[test]
fn llama_quantized_q8_0_file_agrees_with_the_reference() {
    let dir = gguf_dir("kquant", "kquant-q8_0.gguf", "q8");
    let ckpt = Checkpoint::open(&dir).unwrap();
    for t in [
        "model.language_model.embed_tokens_per_layer.weight",
        "model.language_model.layers.0.mlp.down_proj.weight",
    ] {
        assert!(
            matches!(ckpt.stored_type(t), Ok(StoredType::Quant(_))),
            "{t} is stored quantized"
        );
    }
    drop(ckpt);
    let model = Gemma4::load(&dir, LoadOptions::default()).unwrap();
    let (batched, decode) = common::agreement(&model.text, &fixture("kquant"));
    eprintln!(
        "llama.cpp Q8_0: batched max-abs {:.3}, top-1 {}/{}; decode max-abs {:.3}, top-1 {}/{}",
        batched.max_abs,
        batched.top1,
        batched.positions,
        decode.max_abs,
        decode.top1,
        decode.positions
    );
    for a in [&batched, &decode] {
        assert!(a.fraction() >= 0.99, "{}/{}", a.top1, a.positions);
        assert!(a.max_abs <= 0.5, "max-abs {}", a.max_abs);
    }
    let g = json(&fixture("kquant").join("golden/prompts.json"));
    for (k, case) in g["cases"].as_array().unwrap().iter().enumerate() {
        let greedy = ids(&case["greedy_ids"]);
        let opts = GenerateOptions {
            max_new_tokens: greedy.len(),
            sampling: SamplingParams::greedy(),
            stop_ids: vec![],
            adapters: Default::default(),
            constraint: None,
            draft: None,
        };
        let out = generate(&model.text, &ids(&case["prompt_ids"]), &opts, |_| Ok(())).unwrap();
        assert_eq!(out.generated_ids, greedy, "case {k}: greedy ids");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The GGUF file alone, as users download it: the config comes from its `gemma4.*`
/// metadata and the tokenizer and chat template from `tokenizer.*`. The rebuilt text config
/// equals the one parsed from the checkpoint's `config.json`, the tokenizer encodes the
/// reference tokenizer's cases to the same ids, and the model computes the same logits.
#[test]
fn a_gguf_file_alone_is_a_checkpoint() {
    use gemma4::config::ModelConfig;
    for (name, gguf) in [("e2b_like", "e2b_like-bf16.gguf"), ("moe", "moe-bf16.gguf")] {
        let d = std::env::temp_dir().join(format!(
            "gemma4-llamacpp-alone-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(fixture("llamacpp").join(gguf), d.join(gguf)).unwrap();
        let model = Gemma4::load(&d, LoadOptions::default()).unwrap();
        let mut want = ModelConfig::from_file(&fixture(name).join("config.json")).unwrap();
        // Bidirectional attention over image spans is not recorded in the file, and a
        // text-only GGUF never has image spans.
        want.text.bidirectional = model.config.text.bidirectional;
        assert_eq!(
            model.config.text, want.text,
            "{name}: text config from metadata"
        );

        let tok = model.tokenizer().unwrap();
        let g = json(&fixture(name).join("golden/prompts.json"));
        let cases = g["tokenizer"].as_array().unwrap();
        assert!(!cases.is_empty());
        for case in cases {
            // The fixtures' tokenizer.json has no post-processor, while the converter
            // records `add_bos_token = true` (as the released tokenizers add `<bos>`).
            let text = case["text"].as_str().unwrap();
            let want = ids(&case["ids"]);
            assert_eq!(tok.encode_raw(text).unwrap(), want, "{name}: {text:?}");
            assert_eq!(tok.encode(text).unwrap(), [&[2], &want[..]].concat());
            assert_eq!(
                tok.decode(&want, false).unwrap(),
                case["decoded"].as_str().unwrap()
            );
            assert_eq!(
                tok.decode(&want, true).unwrap(),
                case["decoded_skip_special"].as_str().unwrap()
            );
        }
        drop(model);
        check_against_golden(&d, name);
        std::fs::remove_dir_all(&d).unwrap();
    }
}

/// A separately stored head (llama.cpp's `output.weight`, mapped to `lm_head.weight`;
/// llama-quantize may give it a finer format than the embedding) is the one the logits
/// come from. Checked with a second shard holding a head of twice the embedding: the
/// logits before the softcap double.
#[test]
fn a_separate_lm_head_is_used() {
    use safetensors::tensor::{serialize_to_file, Dtype, TensorView};
    let src = fixture("e2b_like");
    let d = std::env::temp_dir().join(format!("gemma4-lm-head-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), d.join(f)).unwrap();
    }
    let ckpt = Checkpoint::open(&src).unwrap();
    let embed_name = "model.language_model.embed_tokens.weight";
    let embed = ckpt
        .load(
            embed_name,
            ckpt.shape(embed_name).unwrap(),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
    let doubled: Vec<f32> = (embed * 2.0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let bytes: Vec<u8> = doubled.iter().flat_map(|v| v.to_le_bytes()).collect();
    let shape = ckpt.shape(embed_name).unwrap().to_vec();
    let view = TensorView::new(Dtype::F32, shape, &bytes).unwrap();
    let head = "model.language_model.lm_head.weight";
    serialize_to_file([(head, view)], None, &d.join("head.safetensors")).unwrap();
    let mut map = serde_json::Map::new();
    for name in ckpt.tensor_names() {
        map.insert(name.to_string(), "model.safetensors".into());
    }
    map.insert(head.into(), "head.safetensors".into());
    std::fs::write(
        d.join("model.safetensors.index.json"),
        serde_json::json!({ "weight_map": map }).to_string(),
    )
    .unwrap();
    // Without the softcap, logits are linear in the head.
    let mut cfg = json(&src.join("config.json"));
    cfg["text_config"]["final_logit_softcapping"] = serde_json::Value::Null;
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    let plain_dir = d.join("plain");
    std::fs::create_dir_all(&plain_dir).unwrap();
    std::fs::copy(
        src.join("model.safetensors"),
        plain_dir.join("model.safetensors"),
    )
    .unwrap();
    std::fs::write(plain_dir.join("config.json"), cfg.to_string()).unwrap();

    let ids = [2u32, 10, 20, 30];
    let logits = |dir: &Path| {
        let m = Gemma4::load(dir, LoadOptions::default()).unwrap();
        rows(
            &m.text
                .forward(&ids, &mut m.text.new_cache(), LogitsFor::All)
                .unwrap(),
        )
    };
    let (with_head, tied) = (logits(&d), logits(&plain_dir));
    let twice: Vec<f32> = tied.iter().map(|v| 2.0 * v).collect();
    assert!(
        max_abs(&with_head, &twice) <= TOL,
        "{}",
        max_abs(&with_head, &twice)
    );
    std::fs::remove_dir_all(&d).unwrap();
}

/// `gemma4 quantize` of a directory holding a llama.cpp bf16 file beside the config: the
/// output is our `model.gguf` and the side files, not a copy of the source GGUF (which
/// `Checkpoint::open` would then have to choose between), and it computes what
/// quantizing the llama.cpp file at load time computes.
#[test]
fn quantizing_a_llama_cpp_file_writes_one_gguf() {
    use gemma4::quant::QuantType;
    let src = gguf_dir("e2b_like", "e2b_like-bf16.gguf", "quantize-src");
    let out =
        std::env::temp_dir().join(format!("gemma4-llamacpp-quantized-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    gemma4::quant::checkpoint::quantize_checkpoint(&src, &out, QuantType::Q8_0, None).unwrap();
    let ggufs: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".gguf"))
        .collect();
    assert_eq!(ggufs, ["model.gguf"]);
    let ids = [2u32, 10, 20, 30];
    let logits = |dir: &Path, quant| {
        let opts = LoadOptions {
            quant,
            ..Default::default()
        };
        let m = Gemma4::load(dir, opts).unwrap();
        rows(
            &m.text
                .forward(&ids, &mut m.text.new_cache(), LogitsFor::All)
                .unwrap(),
        )
    };
    assert_eq!(logits(&out, None), logits(&src, Some(QuantType::Q8_0)));
    std::fs::remove_dir_all(&src).unwrap();
    std::fs::remove_dir_all(&out).unwrap();
}

/// Two GGUF files and no `model.gguf`: which one is meant is unclear, so it is an error
/// naming both rather than a guess.
#[test]
fn two_gguf_files_are_an_error_naming_both() {
    let dir = gguf_dir("moe", "moe-bf16.gguf", "two");
    std::fs::copy(dir.join("moe-bf16.gguf"), dir.join("other.gguf")).unwrap();
    let err = Checkpoint::open(&dir).err().unwrap().to_string();
    assert!(
        err.contains("moe-bf16.gguf") && err.contains("other.gguf"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A llama.cpp file with a tensor the name table does not know (here: a projector's) is
/// an error naming the tensor, not a model that silently ignores weights.
#[test]
fn unknown_llama_cpp_tensor_is_an_error_naming_it() {
    let dir = gguf_dir("moe", "moe-bf16.gguf", "unknown");
    let path = dir.join("moe-bf16.gguf");
    let bytes = std::fs::read(&path).unwrap();
    // Rename one tensor in place: same length, so the header stays valid.
    let (from, to) = (b"blk.0.attn_q.weight", b"v.blk.0.attn_q.weig");
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("tensor name in the header");
    let mut patched = bytes.clone();
    patched[at..at + from.len()].copy_from_slice(to);
    std::fs::write(&path, &patched).unwrap();
    let err = Checkpoint::open(&dir).err().unwrap().to_string();
    assert!(
        err.contains("v.blk.0.attn_q.weig")
            && err.contains("moe-bf16.gguf")
            && err.contains("not a valid GGUF file"),
        "{err}"
    );
    // A header cut short is a GGUF error too, never a safetensors one.
    std::fs::write(&path, &bytes[..200]).unwrap();
    let err = Checkpoint::open(&dir).err().unwrap().to_string();
    assert!(
        err.contains("moe-bf16.gguf") && err.contains("not a valid GGUF file"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The default compute dtype: a checkpoint's own (`from_pretrained`'s `dtype="auto"`: the
/// config's bfloat16 here), but f32 for one holding block-quantized tensors, whose
/// kernels and activations are f32 (a config beside it saying bfloat16 or not).
#[test]
fn quantized_checkpoints_compute_in_f32_by_default() {
    use candle_core::DType;
    assert_eq!(
        gemma4::default_dtype(&fixture("kquant")).unwrap(),
        DType::BF16
    );
    assert_eq!(
        gemma4::default_dtype(&fixture("vision_small")).unwrap(),
        DType::F32
    );
    let dir = gguf_dir("kquant", "kquant-q8_0.gguf", "dtype");
    assert_eq!(gemma4::default_dtype(&dir).unwrap(), DType::F32);
    // A bf16 llama.cpp file alone: its stored dense type.
    let alone = std::env::temp_dir().join(format!("gemma4-dtype-alone-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&alone);
    std::fs::create_dir_all(&alone).unwrap();
    std::fs::copy(
        fixture("llamacpp").join("moe-bf16.gguf"),
        alone.join("moe-bf16.gguf"),
    )
    .unwrap();
    assert_eq!(gemma4::default_dtype(&alone).unwrap(), DType::BF16);
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&alone).unwrap();
}
