//! The `gemma4` binary end to end on a committed fixture.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn gemma4(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gemma4"))
        .args(args)
        .output()
        .unwrap()
}

/// `gemma4 args` succeeding, its stdout read as JSON.
fn gemma4_json(args: &[&str]) -> serde_json::Value {
    let out = gemma4(args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A JSON array of ids.
fn ids(v: &serde_json::Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

fn golden_case(name: &str, k: usize) -> (Vec<u64>, Vec<u64>) {
    let g: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(name).join("golden/prompts.json")).unwrap(),
    )
    .unwrap();
    let c = &g["cases"][k];
    (ids(&c["prompt_ids"]), ids(&c["greedy_ids"]))
}

#[test]
fn generate_json_reproduces_reference_greedy_ids() {
    let (prompt, greedy) = golden_case("e2b_like", 0);
    let prompt_arg = prompt
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let dir = fixture("e2b_like");
    let n = greedy.len().to_string();
    let out = gemma4(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--dtype",
        "f32",
        "--prompt-ids",
        &prompt_arg,
        "--max-new-tokens",
        &n,
        "--greedy",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let got: Vec<u64> = v["generated_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    // The fixture's stop ids (1, 106, 50) may cut the reference continuation short.
    let cut = greedy
        .iter()
        .position(|t| [1, 106, 50].contains(t))
        .map_or(greedy.len(), |p| p + 1);
    assert_eq!(got, greedy[..cut]);
    assert_eq!(v["prompt_ids"].as_array().unwrap().len(), prompt.len());
    for key in ["text", "prefill_tok_s", "decode_tok_s"] {
        assert!(!v[key].is_null(), "missing {key}");
    }
}

#[test]
fn logits_writes_npy_matching_reference() {
    let (prompt, _) = golden_case("moe", 1);
    let prompt_arg = prompt
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let out_path =
        std::env::temp_dir().join(format!("gemma4-cli-logits-{}.npy", std::process::id()));
    let dir = fixture("moe");
    let out = gemma4(&[
        "logits",
        "--model",
        dir.to_str().unwrap(),
        "--dtype",
        "f32",
        "--prompt-ids",
        &prompt_arg,
        "--out",
        out_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (shape, got) = gemma4::loading::npy::read_f32(&out_path).unwrap();
    let (wshape, want) = gemma4::loading::npy::read_f32(&dir.join("golden/logits_1.npy")).unwrap();
    assert_eq!(shape, wshape);
    let d = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(d <= 1e-4, "{d}");
    std::fs::remove_file(out_path).unwrap();
}

#[test]
fn text_and_chat_prompts_run() {
    let dir = fixture("text_only");
    for args in [["--prompt", "Hello world"], ["--chat", "What is Rust?"]] {
        let out = gemma4(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            args[0],
            args[1],
            "--max-new-tokens",
            "5",
            "--seed",
            "1",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("generated"));
    }
}

#[test]
fn info_reports_layer_plan() {
    let dir = fixture("e2b_like");
    let out = gemma4(&["info", "--model", dir.to_str().unwrap(), "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["num_layers"], 7);
    assert_eq!(v["layers"][6]["kv_from"], 2);
    assert_eq!(v["layers"][5]["mlp_width"], 192);
    assert!(v["parameters"]["text"].as_u64().unwrap() > 300_000);
}

#[test]
fn bad_input_is_one_line_error_naming_it() {
    let out = gemma4(&["generate", "--model", "/no/such/model", "--prompt", "hi"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("/no/such/model"), "{err}");
    let dir = fixture("e2b_like");
    let out = gemma4(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        "2,x",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`x` is not a token id"));
}

/// The error names the problem once (no cause printed twice), `--system` needs `--chat`,
/// and `info` reads a directory holding only a llama.cpp GGUF file.
#[test]
fn errors_say_it_once_and_info_reads_a_gguf_alone() {
    let out = gemma4(&["generate", "--model", "/no/such/model", "--prompt", "hi"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("not found").count(), 1, "{err}");
    let dir = fixture("e2b_like");
    let out = gemma4(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "hi",
        "--system",
        "be brief",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--system goes with --chat"));
    let alone = std::env::temp_dir().join(format!("gemma4-cli-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&alone).unwrap();
    std::fs::copy(
        fixture("llamacpp").join("e2b_like-bf16.gguf"),
        alone.join("e2b_like-bf16.gguf"),
    )
    .unwrap();
    let out = gemma4(&["info", "--model", alone.to_str().unwrap(), "--json"]);
    std::fs::remove_dir_all(&alone).ok();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["num_layers"].as_u64().unwrap() > 0);
}

#[test]
fn generate_with_images_reproduces_reference_greedy_ids() {
    let dir = fixture("vision_large");
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden/prompts.json")).unwrap())
            .unwrap();
    let case = &g["cases"][2];
    let images = fixture("images");
    let out = gemma4(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        case["text"].as_str().unwrap(),
        "--image",
        images.join("portrait.jpg").to_str().unwrap(),
        "--image",
        images.join("alpha.png").to_str().unwrap(),
        // The goldens come from the reference's PIL image processor.
        "--resize",
        "pillow",
        "--greedy",
        "--max-new-tokens",
        "8",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["generated_ids"], case["greedy_ids"]);
    assert_eq!(v["prompt_ids"], case["input_ids"]);
}

#[test]
fn embed_image_writes_soft_tokens_and_bad_images_fail_cleanly() {
    let dir = fixture("vision_small");
    let out_path = std::env::temp_dir().join(format!("gemma4-embed-{}.npy", std::process::id()));
    let img = fixture("images").join("landscape.png");
    let out = gemma4(&[
        "embed-image",
        "--model",
        dir.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        // The goldens come from the reference's PIL image processor.
        "--resize",
        "pillow",
        "--out",
        out_path.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (shape, data) = gemma4::loading::npy::read_f32(&out_path).unwrap();
    assert_eq!(shape[1], 64);
    assert_eq!(
        v["images"][0]["soft_tokens"].as_u64().unwrap() as usize,
        shape[0]
    );
    // Same values as the reference's image features for this image (prompt 1).
    let (_, want) =
        gemma4::loading::npy::read_f32(&dir.join("golden/image_features_1.npy")).unwrap();
    let d = data
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d < 1e-4, "{d}");
    std::fs::remove_file(&out_path).ok();

    let bad = std::env::temp_dir().join(format!("gemma4-bad-{}.png", std::process::id()));
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\n truncated").unwrap();
    let out = gemma4(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "<|image|>",
        "--image",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(bad.to_str().unwrap()) && err.lines().count() == 1,
        "{err}"
    );
    std::fs::remove_file(&bad).ok();
}

#[test]
fn text_prompts_do_not_read_the_vision_weights() {
    // A copy of a vision checkpoint whose vision config no longer fits its tensors.
    let src = fixture("vision_small");
    let dir = std::env::temp_dir().join(format!("gemma4-novision-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
    }
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["vision_config"]["hidden_size"] = 40.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let d = dir.to_str().unwrap();
    let text = gemma4(&[
        "generate",
        "--model",
        d,
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "2",
    ]);
    assert!(
        text.status.success(),
        "{}",
        String::from_utf8_lossy(&text.stderr)
    );
    let img = fixture("images").join("tiny.png");
    let with_image = gemma4(&[
        "generate",
        "--model",
        d,
        "--prompt",
        "<|image|>",
        "--image",
        img.to_str().unwrap(),
    ]);
    assert_eq!(with_image.status.code(), Some(1));
    let err = String::from_utf8_lossy(&with_image.stderr);
    assert!(err.contains("model.vision_tower."), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

fn read_npy_max_diff(path: &Path, golden: &Path) -> (Vec<usize>, f32) {
    let (shape, data) = gemma4::loading::npy::read_f32(path).unwrap();
    let (_, want) = gemma4::loading::npy::read_f32(golden).unwrap();
    assert_eq!(data.len(), want.len());
    let d = data
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    (shape, d)
}

#[test]
fn generate_with_audio_files_reproduces_reference_greedy_ids() {
    let audio = fixture("audio");
    // (fixture, case, clips): one 16 kHz clip; two clips resampled from 44.1 and 8 kHz.
    for (name, k, clips) in [
        ("audio_small", 0, vec!["hello_16k.wav"]),
        (
            "audio_small",
            1,
            vec!["stereo_44k_s24.wav", "numbers_8k_u8.wav"],
        ),
        (
            "audio_unified",
            1,
            vec!["stereo_44k_s24.wav", "numbers_8k_u8.wav"],
        ),
    ] {
        let dir = fixture(name);
        let g: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("golden/prompts.json")).unwrap(),
        )
        .unwrap();
        let case = &g["cases"][k];
        let mut args = vec![
            "generate".to_string(),
            "--model".into(),
            dir.to_str().unwrap().into(),
            "--prompt".into(),
            case["text"].as_str().unwrap().into(),
            "--greedy".into(),
            "--max-new-tokens".into(),
            "8".into(),
            "--json".into(),
        ];
        for c in clips {
            args.push("--audio".into());
            args.push(audio.join(c).to_str().unwrap().into());
        }
        let out = gemma4(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["prompt_ids"], case["input_ids"], "{name} case {k}");
        assert_eq!(v["generated_ids"], case["greedy_ids"], "{name} case {k}");
    }
}

#[test]
fn embed_audio_writes_soft_tokens_and_bad_audio_fails_cleanly() {
    let dir = fixture("audio_small");
    let d = dir.to_str().unwrap();
    let clip = fixture("audio").join("hello_16k.wav");
    let out_path =
        std::env::temp_dir().join(format!("gemma4-embed-audio-{}.npy", std::process::id()));
    for (flag, golden, width) in [
        (None, "audio_embedded_0_0.npy", 64),
        (Some("--before-projection"), "audio_tower_0_0.npy", 48),
    ] {
        let mut args = vec![
            "embed-audio",
            "--model",
            d,
            "--audio",
            clip.to_str().unwrap(),
            "--out",
            out_path.to_str().unwrap(),
            "--json",
        ];
        args.extend(flag);
        let out = gemma4(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let (shape, diff) = read_npy_max_diff(&out_path, &dir.join("golden").join(golden));
        assert_eq!(shape, vec![40, width]);
        assert_eq!(v["audio"][0]["soft_tokens"], 40);
        assert!(diff < 1e-4, "{golden}: {diff}");
    }
    std::fs::remove_file(&out_path).ok();

    // A truncated WAV, a marker/clip mismatch, and audio for a checkpoint without a tower.
    let bytes = std::fs::read(&clip).unwrap();
    let bad = std::env::temp_dir().join(format!("gemma4-bad-{}.wav", std::process::id()));
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let b = bad.to_str().unwrap();
    let c = clip.to_str().unwrap();
    let vision_only = fixture("vision_small");
    for (args, needle) in [
        (
            vec!["--model", d, "--prompt", "<|audio|>", "--audio", b],
            b.to_string(),
        ),
        (
            vec![
                "--model",
                d,
                "--prompt",
                "<|audio|> <|audio|>",
                "--audio",
                c,
            ],
            "`--audio`: the prompt has 2 <|audio|> marker(s) but 1 audio clip(s)".to_string(),
        ),
        (
            vec![
                "--model",
                vision_only.to_str().unwrap(),
                "--prompt",
                "<|audio|>",
                "--audio",
                c,
            ],
            "no audio encoder".to_string(),
        ),
    ] {
        let mut full = vec!["generate"];
        full.extend(args);
        let out = gemma4(&full);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&needle) && err.lines().count() == 1, "{err}");
    }
    std::fs::remove_file(&bad).ok();
}

#[test]
fn audio_from_stdin_and_logits_with_audio() {
    use std::io::Write as _;
    let dir = fixture("audio_small");
    let clip = std::fs::read(fixture("audio").join("hello_16k.wav")).unwrap();
    let out_path =
        std::env::temp_dir().join(format!("gemma4-stdin-audio-{}.npy", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_gemma4"))
        .args([
            "embed-audio",
            "--model",
            dir.to_str().unwrap(),
            "--audio",
            "-",
            "--out",
            out_path.to_str().unwrap(),
        ])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&clip).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (shape, diff) = read_npy_max_diff(&out_path, &dir.join("golden/audio_embedded_0_0.npy"));
    assert_eq!(shape, vec![40, 64]);
    assert!(diff < 1e-4, "{diff}");

    // `logits` takes --audio too: the reference's logits of prompt 0.
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden/prompts.json")).unwrap())
            .unwrap();
    let out = gemma4(&[
        "logits",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        g["cases"][0]["text"].as_str().unwrap(),
        "--audio",
        fixture("audio").join("hello_16k.wav").to_str().unwrap(),
        "--out",
        out_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (shape, diff) = read_npy_max_diff(&out_path, &dir.join("golden/logits_0.npy"));
    assert_eq!(shape, vec![71, 512]);
    assert!(diff < 1e-4, "{diff}");
    std::fs::remove_file(&out_path).ok();
}

#[test]
fn bench_reports_medians_threads_and_rss_as_json() {
    let dir = fixture("e2b_like");
    let out = gemma4(&[
        "--threads",
        "1",
        "bench",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-len",
        "20",
        "--gen",
        "4",
        "--runs",
        "3",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["threads"], 1);
    assert_eq!(v["prompt_len"], 20);
    assert_eq!(v["decode_tok_s_runs"].as_array().unwrap().len(), 3);
    for k in ["load_s", "prefill_tok_s", "decode_tok_s", "peak_rss_bytes"] {
        assert!(v[k].as_f64().unwrap() > 0.0, "{k}: {}", v[k]);
    }
    // The median is one of the runs.
    let runs: Vec<f64> = v["decode_tok_s_runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert!(runs.contains(&v["decode_tok_s"].as_f64().unwrap()));
    // A context longer than the model allows is refused.
    let out = gemma4(&[
        "bench",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-len",
        "100000",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("context"));
}

/// `quantize` writes a checkpoint that `generate` loads as it is and that reproduces
/// `--quant` at load time token for token; its summary is available as JSON.
#[test]
fn quantize_round_trips_through_generate() {
    let src = fixture("kquant");
    let out = std::env::temp_dir().join(format!("gemma4-cli-quantize-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let o = gemma4(&[
        "quantize",
        "--model",
        src.to_str().unwrap(),
        "--quant",
        "q4_k",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["quantized"]["q4_k"].as_u64().unwrap() > 0, "{v}");
    assert!(v["bytes_out"].as_u64() < v["bytes_in"].as_u64(), "{v}");
    let gen = |model: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "What is the capital",
            "--max-new-tokens",
            "8",
        ];
        args.extend_from_slice(extra);
        let o = gemma4(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    assert_eq!(gen(&out, &[]), gen(&src, &["--quant", "q4_k"]));
    // An unknown format is refused naming the argument's choices.
    let o = gemma4(&[
        "generate",
        "--model",
        src.to_str().unwrap(),
        "--quant",
        "q3_k",
        "--prompt",
        "a",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("q3_k") && err.contains("q8_0"), "{err}");
    std::fs::remove_dir_all(&out).unwrap();
}

/// `bench --quant` measures the quantized model, and its bandwidth bound counts the bytes
/// the model holds: q8_0 streams about 8.5/32 of what f32 does (norms, scalars and the
/// per-layer-embedding projections' f32 rows keep it from being exact).
#[test]
fn bench_counts_quantized_bytes() {
    let dir = fixture("kquant");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "--threads",
            "1",
            "bench",
            "--model",
            dir.to_str().unwrap(),
            "--prompt-len",
            "4",
            "--gen",
            "2",
            "--runs",
            "1",
            "--warmup",
            "0",
            "--json",
        ];
        args.extend_from_slice(extra);
        gemma4_json(&args)
    };
    let (f32_run, q8_run) = (run(&["--dtype", "f32"]), run(&["--quant", "q8_0"]));
    assert_eq!(f32_run["dtype"], "f32");
    // Without --dtype, the checkpoint's own (its config says bfloat16), as
    // `from_pretrained` loads it.
    assert_eq!(run(&[])["dtype"], "bf16");
    assert_eq!(q8_run["dtype"], "q8_0");
    let bytes = |v: &serde_json::Value| v["streamed_bytes_per_token"].as_f64().unwrap();
    let ratio = bytes(&q8_run) / bytes(&f32_run);
    assert!(
        ratio > 8.5 / 32.0 && ratio < 0.35,
        "q8_0 / f32 bytes {ratio}"
    );
}

#[test]
fn limit_flags_reach_the_loaders_and_their_errors_name_the_flag() {
    let dir = fixture("vision_small");
    let img = fixture("images").join("landscape.png");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "<|image|> hi",
            "--image",
            img.to_str().unwrap(),
            "--greedy",
            "--max-new-tokens",
            "1",
            "--json",
        ];
        args.extend(extra);
        gemma4(&args)
    };
    let out = run(&["--max-image-pixels", "100"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("landscape.png") && err.contains("--max-image-pixels"),
        "{err}"
    );
    let out = run(&["--max-prompt-bytes", "3"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--max-prompt-bytes"), "{err}");
    // The defaults admit the fixture.
    let out = run(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn parse_output_prints_the_message_as_json() {
    let dir = fixture("text_only");
    let out = gemma4(&[
        "parse-output",
        "--model",
        dir.to_str().unwrap(),
        "--text",
        "<|channel>thought\nhm<channel|>ok<|tool_call>call:f{a:<|\"|>x<|\"|>,b:2}<tool_call|><|tool_response>",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["content"], "ok");
    assert_eq!(v["reasoning_content"], "hm");
    let call = &v["tool_calls"][0];
    assert_eq!(call["function"]["name"], "f");
    let args: serde_json::Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, serde_json::json!({"a": "x", "b": 2}));
    // The same completion as ids.
    let out2 = gemma4(&[
        "parse-output",
        "--model",
        dir.to_str().unwrap(),
        "--ids",
        "100,88,106",
    ]);
    assert!(
        out2.status.success(),
        "{}",
        String::from_utf8_lossy(&out2.stderr)
    );
    // --thinking: the prompt opened the thought, so the completion is one until
    // `<channel|>`; without it the stray close is dropped and all is content.
    let read = |thinking: bool| -> serde_json::Value {
        let mut args = vec![
            "parse-output",
            "--model",
            dir.to_str().unwrap(),
            "--text",
            "Two plus two.<channel|>Four.",
        ];
        if thinking {
            args.push("--thinking");
        }
        let out = gemma4(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let v = read(true);
    assert_eq!(
        (v["reasoning_content"].as_str(), v["content"].as_str()),
        (Some("Two plus two."), Some("Four."))
    );
    let v = read(false);
    assert_eq!(
        (v.get("reasoning_content"), v["content"].as_str()),
        (None, Some("Two plus two.Four."))
    );
}

#[test]
fn chat_answers_each_turn_as_the_library_does_and_saves_the_conversation() {
    use gemma4::generate::sampling::SamplingParams;
    use gemma4::generate::{generate_from, GenerateOptions};
    use gemma4::prompt::output_parser::{parse_output, Markers};
    use gemma4::{Gemma4, LoadOptions, Media, Prompt};
    use serde_json::{json, Value};
    use std::io::Write;

    let dir = fixture("text_only");
    let save = std::env::temp_dir().join(format!("gemma4-chat-{}.json", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_gemma4"))
        .args([
            "chat",
            "--model",
            dir.to_str().unwrap(),
            "--greedy",
            "--max-tokens",
            "6",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    write!(
        child.stdin.take().unwrap(),
        "Hello there\n/bogus\nAnd again?\n/save {}\n/exit\n",
        save.display()
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown command /bogus"));
    // The library, turn by turn, each from a fresh prefill (the CLI reuses the cache).
    let model = Gemma4::load(&dir, LoadOptions::default()).unwrap();
    let tok = model.tokenizer().unwrap();
    let mut messages: Vec<Value> = Vec::new();
    let mut want = String::new();
    for text in ["Hello there", "And again?"] {
        messages.push(json!({"role": "user", "content": text}));
        let mut kwargs = serde_json::Map::new();
        kwargs.insert("enable_thinking".into(), json!(false));
        let rendered = model
            .chat_template
            .render_json(&Value::Array(messages.clone()), None, true, &kwargs)
            .unwrap();
        let input = model
            .prepare(&Prompt::Rendered(rendered), &Media::default())
            .unwrap();
        let opts = GenerateOptions {
            max_new_tokens: 6,
            sampling: SamplingParams::greedy(),
            stop_ids: [model.stop_ids(), vec![1, 50, 106]].concat(),
            adapters: Default::default(),
            constraint: None,
            draft: None,
        };
        let ids = generate_from(&model.text, &input, &opts, |_| Ok(()))
            .unwrap()
            .generated_ids;
        let m = parse_output(tok, Markers::from_tokenizer(tok).unwrap(), &ids).unwrap();
        want.push_str(&m.content);
        want.push('\n');
        messages.push(json!({"role": "assistant", "content": m.content}));
    }
    assert_eq!(String::from_utf8_lossy(&out.stdout), want);
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&save).unwrap()).unwrap();
    std::fs::remove_file(&save).ok();
    assert_eq!(saved, Value::Array(messages));
}

#[test]
fn a_hub_id_is_found_in_the_local_hub_cache() {
    let cache = std::env::temp_dir().join(format!("gemma4-cli-hub-{}", std::process::id()));
    let snap = cache.join("models--google--tiny-gemma/snapshots/0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(cache.join("models--google--tiny-gemma/refs")).unwrap();
    std::fs::write(
        cache.join("models--google--tiny-gemma/refs/main"),
        "0123abcd",
    )
    .unwrap();
    for e in std::fs::read_dir(fixture("text_only")).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), snap.join(e.file_name())).unwrap();
        }
    }
    let run = |id: &str| {
        Command::new(env!("CARGO_BIN_EXE_gemma4"))
            .args(["info", "--model", id, "--json"])
            .env("HF_HUB_CACHE", &cache)
            .output()
            .unwrap()
    };
    let ok = run("google/tiny-gemma");
    // Offline: not downloaded, and the error says how to fetch it.
    let missing = Command::new(env!("CARGO_BIN_EXE_gemma4"))
        .args(["info", "--model", "google/other-gemma", "--json"])
        .env("HF_HUB_CACHE", &cache)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    std::fs::remove_dir_all(&cache).ok();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success());
    assert!(
        err.contains("hub cache") && err.contains("download google/other-gemma"),
        "{err}"
    );
}

#[test]
fn chat_shows_the_thought_apart_from_the_answer() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_gemma4"))
        .args([
            "chat",
            "--model",
            fixture("chat_tools").to_str().unwrap(),
            "--think",
            "--greedy",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is 2+2?\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    // The trained fixture's answer: the thought on stderr, the answer alone on stdout.
    assert_eq!(String::from_utf8_lossy(&out.stdout), "The answer is 4.\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("thinking: Two plus two."));
}

/// A stand-in for the Hugging Face hub on a local port, serving the `text_only` fixture as
/// repository `google/tiny-gemma` at commit `feedbeef` the way the hub answers `hf-hub`:
/// the revision's file list, and files by range with their etag and commit headers.
fn fake_hub() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = asked.clone();
    let dir = fixture("text_only");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.push("README.md".into());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let mut conn = conn.unwrap();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut request = String::new();
            reader.read_line(&mut request).unwrap();
            let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut range = None;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap() == 0 || h == "\r\n" {
                    break;
                }
                if let Some(r) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    let (a, b) = r.trim().split_once('-').unwrap();
                    range = Some((a.parse::<usize>().unwrap(), b.parse::<usize>().ok()));
                }
            }
            log.lock().unwrap().push(path.clone());
            let (status, headers, body) = if path == "/api/models/google/tiny-gemma/revision/main" {
                let siblings: Vec<serde_json::Value> = names
                    .iter()
                    .map(|n| serde_json::json!({"rfilename": n}))
                    .collect();
                let body = serde_json::json!({"sha": "feedbeef", "siblings": siblings}).to_string();
                ("200 OK", String::new(), body.into_bytes())
            } else if let Some(name) = path.strip_prefix("/google/tiny-gemma/resolve/main/") {
                let bytes = std::fs::read(dir.join(name)).unwrap_or_default();
                let (a, b) = range.unwrap_or((0, None));
                let end = b
                    .unwrap_or(bytes.len().saturating_sub(1))
                    .min(bytes.len().saturating_sub(1));
                let headers = format!(
                    "ETag: \"etag-{name}\"\r\nX-Repo-Commit: feedbeef\r\nContent-Range: bytes {a}-{end}/{}\r\n",
                    bytes.len()
                );
                (
                    "206 Partial Content",
                    headers,
                    bytes[a.min(bytes.len())..=end].to_vec(),
                )
            } else {
                ("404 Not Found", String::new(), Vec::new())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes());
            let _ = conn.write_all(&body);
        }
    });
    (addr, asked)
}

#[test]
fn a_hub_id_missing_from_the_cache_is_downloaded_into_it() {
    let (endpoint, asked) = fake_hub();
    let cache = std::env::temp_dir().join(format!("gemma4-cli-download-{}", std::process::id()));
    let run = |id: &str| {
        Command::new(env!("CARGO_BIN_EXE_gemma4"))
            .args(["info", "--model", id, "--json"])
            .env("HF_HUB_CACHE", &cache)
            .env("HF_ENDPOINT", &endpoint)
            .env_remove("HF_HUB_OFFLINE")
            .output()
            .unwrap()
    };
    let out = run("google/tiny-gemma");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let snap = cache.join("models--google--tiny-gemma/snapshots/feedbeef");
    // The engine's files, in huggingface_hub's layout; not the README.
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert_eq!(
            std::fs::read(snap.join(f)).unwrap(),
            std::fs::read(fixture("text_only").join(f)).unwrap(),
            "{f}"
        );
    }
    assert!(!snap.join("README.md").exists());
    assert_eq!(
        std::fs::read_to_string(cache.join("models--google--tiny-gemma/refs/main")).unwrap(),
        "feedbeef"
    );
    // The same as the fixture loaded from its directory.
    let local = Command::new(env!("CARGO_BIN_EXE_gemma4"))
        .args([
            "info",
            "--model",
            fixture("text_only").to_str().unwrap(),
            "--json",
        ])
        .output()
        .unwrap();
    let local: serde_json::Value = serde_json::from_slice(&local.stdout).unwrap();
    assert_eq!(info["parameters"], local["parameters"]);
    // The next run finds it in the cache: nothing more is asked of the hub.
    let before = asked.lock().unwrap().len();
    assert!(run("google/tiny-gemma").status.success());
    assert_eq!(asked.lock().unwrap().len(), before);
    // A repository the hub does not have: an error naming it.
    let out = run("google/no-such-gemma");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("google/no-such-gemma") && err.contains("hub"),
        "{err}"
    );
    std::fs::remove_dir_all(&cache).ok();
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `--lora` on `logits` and `generate` gives peft's numbers; `merge-lora` writes a
/// checkpoint whose logits are `merge_and_unload`'s, which `quantize` takes; a bad adapter
/// is one line naming the flag.
#[test]
fn lora_adapters_run_unmerged_and_merge_into_a_checkpoint() {
    let lora = fixture("lora").join("e2b_all_linear");
    let base = fixture("e2b_like");
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(lora.join("golden/prompts.json")).unwrap())
            .unwrap();
    let prompt = ids(&g["cases"][0]["prompt_ids"]);
    let greedy = ids(&g["cases"][0]["greedy_ids"]);
    let prompt_arg = prompt
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let tmp = std::env::temp_dir().join(format!("gemma4-cli-lora-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let npy = tmp.join("logits.npy");
    let logits = |model: &Path, extra: &[&str]| -> Vec<f32> {
        let mut args = vec![
            "logits",
            "--model",
            model.to_str().unwrap(),
            "--dtype",
            "f32",
            "--prompt-ids",
            &prompt_arg,
            "--out",
            npy.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = gemma4(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        if !extra.is_empty() {
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                err.contains("lora: `e2b_all_linear` patched 58 projections"),
                "{err}"
            );
        }
        gemma4::loading::npy::read_f32(&npy).unwrap().1
    };
    let (_, want) = gemma4::loading::npy::read_f32(&lora.join("golden/logits_0.npy")).unwrap();
    let d = max_diff(&logits(&base, &["--lora", lora.to_str().unwrap()]), &want);
    assert!(d <= 1e-4, "unmerged: {d}");
    // `:SCALE`: 0 turns the adapter off.
    let (_, plain) = gemma4::loading::npy::read_f32(&base.join("golden/logits_0.npy")).unwrap();
    let off = format!("{}:0", lora.display());
    assert!(max_diff(&logits(&base, &["--lora", &off]), &plain) <= 1e-4);

    let n = greedy.len().to_string();
    let o = gemma4(&[
        "generate",
        "--model",
        base.to_str().unwrap(),
        "--dtype",
        "f32",
        "--lora",
        lora.to_str().unwrap(),
        "--prompt-ids",
        &prompt_arg,
        "--max-new-tokens",
        &n,
        "--greedy",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(ids(&v["generated_ids"]), greedy);

    let merged = tmp.join("merged");
    let o = gemma4(&[
        "merge-lora",
        "--model",
        base.to_str().unwrap(),
        "--lora",
        lora.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
        "--dtype",
        "f32",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["patched"], 58);
    let (_, want) =
        gemma4::loading::npy::read_f32(&lora.join("golden/merged_logits_0.npy")).unwrap();
    let d = max_diff(&logits(&merged, &[]), &want);
    assert!(d <= 1e-4, "merged: {d}");
    // Into a non-empty directory: refused, nothing overwritten.
    let o = gemma4(&[
        "merge-lora",
        "--model",
        base.to_str().unwrap(),
        "--lora",
        lora.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not empty"));
    let gguf = tmp.join("gguf");
    let o = gemma4(&[
        "quantize",
        "--model",
        merged.to_str().unwrap(),
        "--quant",
        "q8_0",
        "--out",
        gguf.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(gguf.join("model.gguf").exists());

    // An adapter for another model: one line, naming the flag and the module.
    let other = fixture("lora").join("moe_all_linear");
    let o = gemma4(&[
        "generate",
        "--model",
        base.to_str().unwrap(),
        "--lora",
        other.to_str().unwrap(),
        "--prompt",
        "a",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("--lora") && err.contains("router.proj"),
        "{err}"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// `finetune` reads chat rows with images and audio (the towers, frozen, are loaded because
/// the rows have media): a row whose image cannot be read is skipped with a warning naming
/// the file, and counted.
#[test]
fn finetune_reads_image_and_audio_rows() {
    let tmp = std::env::temp_dir().join(format!("gemma4-cli-finetune-mm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    // The audio_small checkpoint with a template that renders media parts.
    let ckpt = tmp.join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    for entry in std::fs::read_dir(fixture("audio_small")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, ckpt.join(path.file_name().unwrap())).unwrap();
        }
    }
    std::fs::copy(
        fixture("chat_tools").join("chat_template.jinja"),
        ckpt.join("chat_template.jinja"),
    )
    .unwrap();
    let image = fixture("images").join("landscape.png");
    let clip = fixture("audio").join("hello_16k.wav");
    let row = |image: &str| {
        serde_json::json!({"messages": [
            {"role": "user", "content": [
                {"type": "image"},
                {"type": "text", "text": "What is this, and who speaks?"},
                {"type": "audio", "audio": clip.to_str().unwrap()},
            ]},
            {"role": "assistant", "content": "A field, and a voice."},
        ], "images": [image]})
        .to_string()
    };
    let data = tmp.join("data.jsonl");
    std::fs::write(
        &data,
        format!("{}\n{}\n", row(image.to_str().unwrap()), row("missing.png")),
    )
    .unwrap();
    let out = tmp.join("out");
    let o = gemma4(&[
        "finetune",
        "--model",
        ckpt.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "2",
        "--lr",
        "1e-2",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("line 2 skipped") && err.contains("missing.png"),
        "{err}"
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v["steps"].as_u64(), v["skipped"].as_u64()),
        (Some(2), Some(1))
    );
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    let losses: Vec<f64> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["loss"].as_f64())
        .collect();
    assert_eq!(losses.len(), 2);
    assert!(losses[1] < losses[0], "{log}");
    // The towers adapted too (--towers vision,audio): their projections are in the adapter,
    // and target_modules names exactly the adapted paths (a regex, as peft reads it).
    let towers = tmp.join("towers");
    let o = gemma4(&[
        "finetune",
        "--model",
        ckpt.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        towers.to_str().unwrap(),
        "--steps",
        "1",
        "--towers",
        "vision,audio",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let w: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(w["modules"].as_u64() > v["modules"].as_u64(), "{w}");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(towers.join("adapter_config.json")).unwrap())
            .unwrap();
    let targets = cfg["target_modules"].as_str().unwrap();
    assert!(targets.contains(r"model\.vision_tower\.encoder\.layers\.0\.self_attn\.q_proj\.linear"));
    assert!(targets.contains(r"model\.audio_tower\.layers\.0\.self_attn\.q_proj\.linear"));
    let o = gemma4(&[
        "finetune",
        "--model",
        ckpt.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        tmp.join("video").to_str().unwrap(),
        "--towers",
        "video",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("towers") && err.contains("video"), "{err}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// `finetune --targets q_proj,experts` on the MoE adapts the fused experts as peft's
/// `target_parameters` (every expert of both parameters patched when `--lora` loads it);
/// LoRA dropout on them is refused, as peft refuses it.
#[test]
fn finetune_adapts_the_moe_experts_on_request() {
    let tmp = std::env::temp_dir().join(format!(
        "gemma4-cli-finetune-experts-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let data = tmp.join("data.jsonl");
    std::fs::write(&data, "{\"text\": \"Rust is fast and safe.\"}\n").unwrap();
    let base = fixture("moe");
    let out = tmp.join("out");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "finetune",
            "--model",
            base.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--targets",
            "q_proj,experts",
            "--steps",
            "2",
            "--lr",
            "1e-2",
            "--r",
            "2",
            "--json",
        ];
        args.extend_from_slice(extra);
        gemma4(&args)
    };
    let o = run(&["--dropout", "0.1"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("dropout") && err.contains("experts"), "{err}");
    let o = run(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(
        cfg["target_parameters"],
        serde_json::json!(["experts.down_proj", "experts.gate_up_proj"])
    );
    let o = gemma4(&[
        "generate",
        "--model",
        base.to_str().unwrap(),
        "--lora",
        out.to_str().unwrap(),
        "--prompt",
        "Rust is",
        "--max-new-tokens",
        "2",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// `finetune` writes a peft adapter that `--lora` loads, a step log, its loss curve and a
/// checkpoint; 4 steps in one run equal 2, stop, resume, 2 (the adapter byte for byte,
/// with LoRA dropout on: its masks are seeded); unusable rows are skipped and counted; a
/// checkpoint of another model is refused.
#[test]
fn finetune_trains_an_adapter_and_resumes_exactly() {
    let tmp = std::env::temp_dir().join(format!("gemma4-cli-finetune-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let data = tmp.join("data.jsonl");
    std::fs::write(
        &data,
        concat!(
            r#"{"messages": [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris is the capital."}]}"#, "\n",
            r#"{"prompt": "The quick brown fox", "completion": " jumps over the lazy dog."}"#, "\n",
            r#"{"text": "Rust is fast and safe."}"#, "\n",
            r#"{"messages": [{"role": "user", "content": "Hello"}]}"#, "\n",
        ),
    )
    .unwrap();
    let base = fixture("e2b_like");
    let run = |out: &Path, extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "finetune",
            "--model",
            base.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--batch",
            "2",
            "--lr",
            "1e-2",
            "--r",
            "4",
            "--alpha",
            "8",
            "--dropout",
            "0.1",
            "--json",
        ];
        args.extend_from_slice(extra);
        let o = gemma4(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("line 4 skipped: no supervised token"), "{err}");
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let whole = tmp.join("whole");
    let v = run(&whole, &["--steps", "4", "--eval", data.to_str().unwrap()]);
    assert_eq!(
        (
            v["steps"].as_u64(),
            v["skipped"].as_u64(),
            v["modules"].as_u64()
        ),
        (Some(4), Some(1), Some(58))
    );
    let log = std::fs::read_to_string(whole.join("train_log.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("loss").is_some())
        .collect();
    assert_eq!(steps.len(), 4);
    assert!(
        steps[3]["loss"].as_f64() < steps[0]["loss"].as_f64(),
        "{log}"
    );
    assert!(log.contains("eval_loss"));
    let png = whole.join("loss.png");
    assert_eq!(v["loss_curve"].as_str(), png.to_str());
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(whole.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["lora_dropout"].as_f64(), Some(0.1));

    let split = tmp.join("split");
    run(&split, &["--steps", "4", "--stop-after", "2"]);
    // Without --resume an existing run is not overwritten.
    let o = gemma4(&[
        "finetune",
        "--model",
        base.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        split.to_str().unwrap(),
        "--steps",
        "4",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));
    let v = run(&split, &["--steps", "4", "--resume"]);
    assert_eq!(
        (v["steps"].as_u64(), v["steps_this_run"].as_u64()),
        (Some(4), Some(2))
    );
    let bytes = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert!(
        bytes(&whole) == bytes(&split),
        "a resumed run differs from an uninterrupted one"
    );

    // --pack: each step's examples in one sequence, the same losses as apart.
    let losses = |out: &Path, extra: &[&str]| -> Vec<f64> {
        let mut args = vec![
            "finetune",
            "--model",
            base.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--batch",
            "3",
            "--steps",
            "2",
            "--lr",
            "1e-2",
        ];
        args.extend_from_slice(extra);
        let o = gemma4(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read_to_string(out.join("train_log.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter_map(|v| v["loss"].as_f64())
            .collect()
    };
    let apart = losses(&tmp.join("apart"), &[]);
    let packed = losses(&tmp.join("packed"), &["--pack"]);
    assert_eq!(apart.len(), 2);
    for (p, a) in packed.iter().zip(&apart) {
        assert!(
            (p - a).abs() < 1e-4 * a.abs(),
            "packed {packed:?} vs apart {apart:?}"
        );
    }

    // The adapter is a peft adapter the engine runs.
    let o = gemma4(&[
        "generate",
        "--model",
        base.to_str().unwrap(),
        "--lora",
        whole.to_str().unwrap(),
        "--prompt",
        "What is the capital",
        "--max-new-tokens",
        "3",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("patched 58 projections"));

    // A checkpoint of another model is refused, naming the flag.
    let o = gemma4(&[
        "finetune",
        "--model",
        fixture("text_only").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        split.to_str().unwrap(),
        "--steps",
        "6",
        "--resume",
        "--batch",
        "2",
        "--lr",
        "1e-2",
        "--r",
        "4",
        "--alpha",
        "8",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--resume") && err.contains("another model"),
        "{err}"
    );
    // Data with no usable row: one line naming the file.
    let empty = tmp.join("empty.jsonl");
    std::fs::write(&empty, "{\"text\": \"\"}\n").unwrap();
    let o = gemma4(&[
        "finetune",
        "--model",
        base.to_str().unwrap(),
        "--data",
        empty.to_str().unwrap(),
        "--out",
        tmp.join("none").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no usable row") && err.contains("empty.jsonl"),
        "{err}"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// `generate --draft`: the drafter fixture's greedy output with its statistics, equal to
/// the output without it; a drafter for another target fails naming its config.
#[test]
fn generate_with_a_drafter_reports_acceptance_and_keeps_the_output() {
    let trace: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("drafters/e2b_like/golden/trace.json")).unwrap(),
    )
    .unwrap();
    let case = &trace["cases"][0];
    let prompt = ids(&case["prompt_ids"])
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let want = ids(&case["greedy_ids"]);
    let model = fixture("e2b_like");
    let drafter = fixture("drafters/e2b_like");
    let n = want.len().to_string();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--dtype",
            "f32",
            "--prompt-ids",
            &prompt,
            "--max-new-tokens",
            &n,
            "--greedy",
            "--json",
        ];
        args.extend_from_slice(extra);
        gemma4_json(&args)
    };
    let with = run(&["--draft", drafter.to_str().unwrap()]);
    let without = run(&[]);
    assert_eq!(with["generated_ids"], without["generated_ids"]);
    // The fixture's stop ids may end both early; uncut, they are the reference's.
    let got = ids(&with["generated_ids"]);
    assert_eq!(got, want[..got.len()]);
    let d = &with["draft"];
    assert_eq!(d["draft_tokens"], 4, "the drafter's num_assistant_tokens");
    assert!(d["accepted"].as_u64().unwrap() > 0, "{d}");
    let rate = d["acceptance_rate"].as_f64().unwrap();
    assert!(rate > 0.0 && rate <= 1.0, "{d}");
    assert!(without["draft"].is_null());
    let with6 = run(&["--draft", drafter.to_str().unwrap(), "--draft-tokens", "6"]);
    assert_eq!(with6["draft"]["draft_tokens"], 6);
    assert_eq!(with6["generated_ids"], without["generated_ids"]);

    let out = gemma4(&[
        "generate",
        "--model",
        fixture("dense_keqv").to_str().unwrap(),
        "--prompt-ids",
        "2,3",
        "--draft",
        drafter.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("drafters/e2b_like/config.json") && err.contains("K/V"),
        "{err}"
    );
}

/// `bench --draft --verify-max K`: the draft statistics of the timed runs, a pass cost for
/// every k against the decode step, a drafter step, and the speedups they allow.
#[test]
fn bench_times_verification_passes_and_the_drafter() {
    let model = fixture("kquant");
    let drafter = fixture("drafters/kquant");
    let v = gemma4_json(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--prompt-len",
        "8",
        "--gen",
        "6",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--draft",
        drafter.to_str().unwrap(),
        "--verify-max",
        "3",
        "--json",
    ]);
    assert_eq!(v["draft"]["draft_tokens"], 4);
    assert!(v["draft"]["drafted"].as_u64().unwrap() > 0, "{v}");
    let s = &v["speculative"];
    assert!(s["decode_step_s"].as_f64().unwrap() > 0.0);
    assert!(s["draft_step_s"].as_f64().unwrap() > 0.0);
    let ks: Vec<u64> = s["verify"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["k"].as_u64().unwrap())
        .collect();
    assert_eq!(ks, [1, 2, 3]);
    for a in ["0.5", "0.7", "0.9"] {
        let e = &s["expected_speedup"][a];
        assert_eq!(e["by_k"].as_array().unwrap().len(), 3);
        assert!((1..=3).contains(&e["best_k"].as_u64().unwrap()), "{e}");
    }
    // Without --verify-max nothing is timed beyond the runs.
    let plain = gemma4_json(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--prompt-len",
        "8",
        "--gen",
        "2",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--json",
    ]);
    assert!(plain["speculative"].is_null() && plain["draft"].is_null());
}
