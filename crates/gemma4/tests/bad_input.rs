//! Bad checkpoints and bad prompts give errors that name the file, tensor or argument.

mod common;

use std::path::Path;

use gemma4::generate::sampling::SamplingParams;
use gemma4::generate::{generate, GenerateOptions};
use gemma4::{Gemma4, LoadOptions, Prompt};

use common::{fixture, Scratch};

/// A scratch copy of a fixture that a test may break (removed when dropped).
fn scratch(name: &str, tag: &str) -> Scratch {
    Scratch::of(name, &format!("bad-{tag}"))
}

fn load_err(dir: &Path) -> String {
    let e = Gemma4::load(dir, LoadOptions::default())
        .err()
        .expect("loading must fail");
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "one-line error expected: {msg}");
    msg
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

#[test]
fn missing_directory_and_bad_json() {
    let msg = load_err(Path::new("/nonexistent/gemma4-model"));
    assert!(msg.contains("/nonexistent/gemma4-model"), "{msg}");
    let dir = scratch("e2b_like", "json");
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    let msg = load_err(&dir);
    assert!(
        msg.contains("config.json") && msg.contains("invalid JSON"),
        "{msg}"
    );
}

#[test]
fn missing_shard_is_named() {
    let dir = scratch("dense_keqv", "shard");
    std::fs::remove_file(dir.join("model-00003-of-00005.safetensors")).unwrap();
    let msg = load_err(&dir);
    assert!(msg.contains("model-00003-of-00005.safetensors"), "{msg}");
}

#[test]
fn truncated_and_corrupt_safetensors_are_named() {
    let dir = scratch("e2b_like", "trunc");
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let msg = load_err(&dir);
    assert!(
        msg.contains("model.safetensors") && msg.contains("not a valid safetensors"),
        "{msg}"
    );
    std::fs::write(&p, b"garbage garbage garbage").unwrap();
    let msg = load_err(&dir);
    assert!(msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn wrong_shape_names_tensor_and_file() {
    let dir = scratch("e2b_like", "shape");
    edit_config(&dir, |v| v["text_config"]["intermediate_size"] = 100.into());
    let msg = load_err(&dir);
    assert!(
        msg.contains("layers.0.mlp.gate_proj.weight") && msg.contains("model.safetensors"),
        "{msg}"
    );
    assert!(
        msg.contains("[100, 64]") && msg.contains("[96, 64]"),
        "{msg}"
    );
}

/// A tensor of a type the engine cannot read (here I64) is an error naming it and its file
/// only when it is needed: checkpoints may carry such tensors that nothing loads.
#[test]
fn unreadable_tensor_type_is_named_when_needed() {
    use safetensors::tensor::{serialize_to_file, Dtype, TensorView};
    let dir = scratch("e2b_like", "dtype");
    let ckpt = gemma4::loading::weights::Checkpoint::open(&dir).unwrap();
    let names: Vec<String> = ckpt.tensor_names().map(str::to_string).collect();
    drop(ckpt);
    let ints = vec![0u8; 8 * 64];
    let write_index = |extra: &[&str]| {
        let mut map = serde_json::Map::new();
        for n in names.iter().filter(|n| !extra.contains(&n.as_str())) {
            map.insert(n.clone(), "model.safetensors".into());
        }
        for &n in extra {
            map.insert(n.into(), "extra.safetensors".into());
        }
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::json!({ "weight_map": map }).to_string(),
        )
        .unwrap();
    };
    let write_extra = |name: &str| {
        let view = TensorView::new(Dtype::I64, vec![64], &ints).unwrap();
        serialize_to_file([(name, view)], None, &dir.join("extra.safetensors")).unwrap();
    };

    // An extra integer buffer nobody asks for: the checkpoint loads.
    write_extra("model.language_model.position_ids");
    write_index(&["model.language_model.position_ids"]);
    Gemma4::load(&dir, LoadOptions::default()).unwrap();

    // The final norm stored as I64 in the other shard: an error naming both.
    let norm = "model.language_model.norm.weight";
    let main = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&main).unwrap();
    let rest: Vec<(String, TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != norm)
        .collect();
    serialize_to_file(rest, None, &dir.join("model.safetensors")).unwrap();
    write_extra(norm);
    write_index(&[norm]);
    let msg = load_err(&dir);
    assert!(
        msg.contains(norm) && msg.contains("extra.safetensors") && msg.contains("I64"),
        "{msg}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = scratch("text_only", "missing");
    edit_config(&dir, |v| v["hidden_size_per_layer_input"] = 16.into());
    let msg = load_err(&dir);
    assert!(
        msg.contains("model.embed_tokens_per_layer.weight") && msg.contains("not found"),
        "{msg}"
    );
}

#[test]
fn unknown_config_value_is_named() {
    let dir = scratch("moe", "cfg");
    edit_config(&dir, |v| {
        v["text_config"]["rope_parameters"]["full_attention"]["rope_type"] = "yarn".into()
    });
    let msg = load_err(&dir);
    assert!(msg.contains("config.json") && msg.contains("yarn"), "{msg}");
}

#[test]
fn prompts_beyond_context_or_vocabulary_are_errors() {
    let model = Gemma4::load(&fixture("text_only"), LoadOptions::default()).unwrap();
    let max = model.config.text.max_position_embeddings;
    let opts = GenerateOptions {
        max_new_tokens: 4,
        sampling: SamplingParams::greedy(),
        stop_ids: vec![],
        adapters: Default::default(),
        constraint: None,
        draft: None,
    };
    let long = vec![5u32; max + 1];
    let msg = generate(&model.text, &long, &opts, |_| Ok(()))
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("exceeds the model's context"), "{msg}");
    let msg = model
        .prompt_ids(&Prompt::Ids(vec![2, 100_000]))
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("100000") && msg.contains("vocabulary"),
        "{msg}"
    );
    assert!(model.prompt_ids(&Prompt::Ids(vec![])).is_err());
}

#[test]
fn generation_stops_at_context_end_and_on_stop_ids() {
    let model = Gemma4::load(&fixture("text_only"), LoadOptions::default()).unwrap();
    let max = model.config.text.max_position_embeddings;
    let opts = GenerateOptions {
        max_new_tokens: 50,
        sampling: SamplingParams::greedy(),
        stop_ids: vec![],
        adapters: Default::default(),
        constraint: None,
        draft: None,
    };
    let prompt = vec![2u32; max - 3];
    let out = generate(&model.text, &prompt, &opts, |_| Ok(())).unwrap();
    assert_eq!(
        out.generated_ids.len(),
        4,
        "3 cached steps left + the token from the last one"
    );
    assert_eq!(out.stop_reason, gemma4::generate::StopReason::ContextFull);

    // Stop on the third greedy token of a known continuation.
    let free = generate(&model.text, &[2, 300, 301, 302], &opts, |_| Ok(())).unwrap();
    let stop = free.generated_ids[2];
    let first = free.generated_ids.iter().position(|&t| t == stop).unwrap();
    let opts = GenerateOptions {
        stop_ids: vec![stop],
        ..opts
    };
    let out = generate(&model.text, &[2, 300, 301, 302], &opts, |_| Ok(())).unwrap();
    assert_eq!(out.generated_ids, free.generated_ids[..=first]);
    assert_eq!(out.stop_reason, gemma4::generate::StopReason::StopToken);
}

#[test]
fn text_prompts_start_with_bos_and_chat_uses_template() {
    let model = Gemma4::load(&fixture("e2b_like"), LoadOptions::default()).unwrap();
    let ids = model
        .prompt_ids(&Prompt::Text("Hello world!".into()))
        .unwrap();
    assert_eq!(ids[0], 2);
    assert_eq!(
        &ids[1..],
        model.tokenizer().unwrap().encode("Hello world!").unwrap()
    );
    let chat = model
        .prompt_ids(&Prompt::Chat(vec![gemma4::prompt::chat::Message::new(
            "user", "Hi",
        )]))
        .unwrap();
    // <bos><|turn>user\n ... <turn|>\n<|turn>model\n
    assert_eq!(&chat[..2], [2, 105]);
    assert_eq!(&chat[chat.len() - 3..], [105, chat[chat.len() - 2], 107]);
    assert!(model.stop_ids().contains(&106) && model.stop_ids().contains(&1));
}

#[test]
fn bad_audio_inputs_and_configs_are_named() {
    use gemma4::audio::decode::{load_audio, Audio};
    use gemma4::model::Media;
    // A missing file names the path.
    let e = load_audio(Path::new("/nonexistent/clip.wav"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/clip.wav"), "{e}");

    let model = Gemma4::load(&fixture("audio_small"), LoadOptions::default()).unwrap();
    let media = |samples: usize| Media {
        audio: vec![Audio::new(vec![0.1; samples], 16_000).unwrap()],
        ..Default::default()
    };
    // 100 samples (6 ms) give no complete 20 ms frame.
    let e = model
        .prepare(&Prompt::Text("<|audio|>".into()), &media(100))
        .unwrap_err()
        .to_string();
    assert!(e.contains("audio") && e.contains("too short"), "{e}");
    // Raw ids with audio placeholders that do not match the clip's soft tokens.
    let t = &model.config.mm_tokens;
    let e = model
        .prepare(
            &Prompt::Ids(vec![2, t.boa, t.audio, t.audio, t.eoa]),
            &media(16_000),
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("2 audio placeholder token(s)") && e.contains("25 soft tokens"),
        "{e}"
    );

    // An unknown activation and a tower that does not fit its tensors.
    let dir = scratch("audio_small", "audio-act");
    edit_config(&dir, |v| v["audio_config"]["hidden_act"] = "relu".into());
    let e = load_err(&dir);
    assert!(
        e.contains("audio_config") && e.contains("hidden_act"),
        "{e}"
    );
    edit_config(&dir, |v| {
        v["audio_config"]["hidden_act"] = "silu".into();
        v["audio_config"]["hidden_size"] = 64.into();
    });
    let e = load_err(&dir);
    assert!(e.contains("model.audio_tower."), "{e}");
    // A bad feature-extractor setting names the file and section.
    edit_config(&dir, |v| v["audio_config"]["hidden_size"] = 32.into());
    let p = dir.join("processor_config.json");
    let mut pc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    pc["feature_extractor"]["per_bin_mean"] = serde_json::json!([0.0, 1.0]);
    std::fs::write(&p, pc.to_string()).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("processor_config.json") && e.contains("per_bin_mean"),
        "{e}"
    );
}
