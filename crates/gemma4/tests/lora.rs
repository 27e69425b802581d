//! LoRA adapters against peft (transformers 5.23.0 + peft 0.21.2): the adapters and
//! goldens in `tests/fixtures/lora/` come from `scripts/fixtures/make_lora_fixtures.py`,
//! which gives every `lora_B` random values (a zero B, peft's initialisation, would make
//! these tests prove nothing). Unmerged and merged logits within 1e-4 (f32) of
//! `PeftModel`'s, greedy ids identical, the count of patched modules equal to peft's, and
//! adapters that cannot apply refused by name.

mod common;

use std::path::Path;

use candle_core::DType;
use gemma4::generate::sampling::SamplingParams;
use gemma4::generate::{generate, GenerateOptions};
use gemma4::loading::npy;
use gemma4::lora::{self, AdapterSet, LoraAdapter};
use gemma4::text::model::LogitsFor;
use gemma4::{Gemma4, LoadOptions};

use common::{fixture, ids, json, max_abs, rows, Scratch, TOL};

const CASES: [&str; 4] = [
    "e2b_all_linear",
    "keqv_rslora",
    "moe_all_linear",
    "causal_qv",
];

fn case_dir(case: &str) -> std::path::PathBuf {
    fixture("lora").join(case)
}

fn logits(model: &Gemma4, set: AdapterSet, prompt: &[u32]) -> Vec<f32> {
    let tm = &model.text;
    rows(
        &lora::with_adapters(set, || {
            tm.forward(prompt, &mut tm.new_cache(), LogitsFor::All)
        })
        .unwrap(),
    )
}

fn greedy(model: &Gemma4, set: AdapterSet, prompt: &[u32], n: usize) -> Vec<u32> {
    let opts = GenerateOptions {
        max_new_tokens: n,
        sampling: SamplingParams::greedy(),
        stop_ids: vec![],
        adapters: set,
        constraint: None,
        draft: None,
    };
    generate(&model.text, prompt, &opts, |_| Ok(()))
        .unwrap()
        .generated_ids
}

#[test]
fn unmerged_adapters_match_peft() {
    for case in CASES {
        let dir = case_dir(case);
        let g = json(&dir.join("golden/prompts.json"));
        let base_dir = fixture(g["base"].as_str().unwrap());
        let mut model = Gemma4::load(&base_dir, LoadOptions::default()).unwrap();
        let adapter = LoraAdapter::load(&dir).unwrap();
        let attached = model.attach_adapter(&adapter).unwrap();
        assert_eq!(attached.name, case);
        assert_eq!(
            attached.modules as u64,
            g["modules"].as_u64().unwrap(),
            "{case}: patched modules"
        );
        let on = attached.set();
        for (k, c) in g["cases"].as_array().unwrap().iter().enumerate() {
            let prompt = ids(&c["prompt_ids"]);
            let (_, want) = npy::read_f32(&dir.join(format!("golden/logits_{k}.npy"))).unwrap();
            let got = logits(&model, on, &prompt);
            let d = max_abs(&got, &want);
            assert!(
                d <= TOL,
                "{case} prompt {k}: logits differ from peft's by {d}"
            );
            let want_ids = ids(&c["greedy_ids"]);
            assert_eq!(
                greedy(&model, on, &prompt, want_ids.len()),
                want_ids,
                "{case} prompt {k}: greedy ids"
            );
            // Off, the same model is the base model again, and the adapter changed something.
            let (_, base) =
                npy::read_f32(&base_dir.join(format!("golden/logits_{k}.npy"))).unwrap();
            let off = logits(&model, AdapterSet::NONE, &prompt);
            assert!(
                max_abs(&off, &base) <= TOL,
                "{case} prompt {k}: adapter off"
            );
            assert!(
                max_abs(&got, &base) > 100.0 * TOL,
                "{case}: the adapter does nothing"
            );
        }
    }
}

#[test]
fn adapters_switch_per_sequence_and_stack() {
    let mut model = Gemma4::load(&fixture("e2b_like"), LoadOptions::default()).unwrap();
    let a = model
        .attach_adapter(&LoraAdapter::load(&case_dir("e2b_all_linear")).unwrap())
        .unwrap();
    // A second adapter of the same model, scaled by −1: on together with the first, the
    // updates cancel and the base model comes back.
    let scratch = Scratch::empty("lora-negated");
    let neg = scratch.join("negated");
    std::fs::create_dir(&neg).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(case_dir("e2b_all_linear").join(f), neg.join(f)).unwrap();
    }
    let b = model
        .attach_adapter(&LoraAdapter::load(&neg).unwrap().scaled(-1.0))
        .unwrap();
    assert_eq!((a.id, b.id), (0, 1));
    assert_eq!(model.all_adapters(), a.set().with(b.id));
    let g = json(&case_dir("e2b_all_linear").join("golden/prompts.json"));
    let prompt = ids(&g["cases"][0]["prompt_ids"]);
    let (_, base) = npy::read_f32(&fixture("e2b_like").join("golden/logits_0.npy")).unwrap();
    let both = logits(&model, model.all_adapters(), &prompt);
    assert!(
        max_abs(&both, &base) <= TOL,
        "a + (−a) is not the base model"
    );

    // Sequences with different adapters cannot share a step; alone each gets its own.
    let opts = |set| GenerateOptions {
        max_new_tokens: 3,
        sampling: SamplingParams::greedy(),
        stop_ids: vec![],
        adapters: set,
        constraint: None,
        draft: None,
    };
    let prompt_in = gemma4::PromptInput::text(prompt.clone());
    let mut s1 = gemma4::Sequence::new(&model.text, prompt_in.clone(), &opts(a.set())).unwrap();
    let mut s2 =
        gemma4::Sequence::new(&model.text, prompt_in.clone(), &opts(AdapterSet::NONE)).unwrap();
    let err = gemma4::step(&model.text, &mut [&mut s1, &mut s2], usize::MAX).unwrap_err();
    assert!(err.to_string().contains("different adapters"), "{err}");
    // A finished sequence's cache is not reused by a sequence with other adapters.
    let mut s3 = gemma4::Sequence::new(&model.text, prompt_in.clone(), &opts(a.set())).unwrap();
    while !s3.is_finished() {
        gemma4::step(&model.text, &mut [&mut s3], usize::MAX).unwrap();
    }
    let mut longer = prompt.clone();
    longer.extend(s3.generated());
    longer.push(7);
    let next = gemma4::PromptInput::text(longer.clone());
    let other =
        gemma4::Sequence::branch_from(&model.text, next.clone(), &opts(AdapterSet::NONE), &s3)
            .unwrap();
    assert_eq!(
        other.fed(),
        0,
        "a cache computed with the adapter reused without it"
    );
    let same = gemma4::Sequence::branch_from(&model.text, next, &opts(a.set()), &s3).unwrap();
    assert!(same.fed() > 0);
}

#[test]
fn merged_adapters_match_peft_merge_and_unload() {
    for case in ["e2b_all_linear", "keqv_rslora"] {
        let dir = case_dir(case);
        let g = json(&dir.join("golden/prompts.json"));
        let base_dir = fixture(g["base"].as_str().unwrap());
        let adapter = LoraAdapter::load(&dir).unwrap();
        let out = Scratch::empty(&format!("lora-merged-{case}"));
        let report = lora::merge::merge(
            &base_dir,
            std::slice::from_ref(&adapter),
            &out,
            Some(DType::F32),
            &|_, _| {},
        )
        .unwrap();
        assert_eq!(report.patched as u64, g["modules"].as_u64().unwrap());
        for f in ["config.json", "tokenizer.json", "chat_template.jinja"] {
            assert!(out.join(f).exists(), "{case}: {f} not copied");
        }
        let merged = Gemma4::load(&out, LoadOptions::default()).unwrap();
        let prompt = ids(&g["cases"][0]["prompt_ids"]);
        let (_, want) = npy::read_f32(&dir.join("golden/merged_logits_0.npy")).unwrap();
        let d = max_abs(&logits(&merged, AdapterSet::NONE, &prompt), &want);
        assert!(d <= TOL, "{case}: merged logits differ from peft's by {d}");
    }
}

/// Adapters on the MoE experts' fused parameters (peft's `target_parameters`, nested
/// wrappers in the file): every expert of both parameters is patched, and the logits,
/// unmerged and merged into the 3-D parameters, are within 1e-4 of `PeftModel`'s.
#[test]
fn expert_adapters_match_peft_unmerged_and_merged() {
    let dir = fixture("train").join("moe_experts");
    let g = json(&dir.join("golden/example.json"));
    let base = fixture("moe");
    let adapter = LoraAdapter::load(&dir).unwrap();
    let experts = json(&base.join("config.json"))["text_config"]["num_experts"]
        .as_u64()
        .unwrap() as usize;
    let fused = adapter.modules.iter().filter(|m| m.is_experts()).count();
    assert!(fused > 0 && adapter.modules.iter().all(|m| m.rank() == 2));
    let mut model = Gemma4::load(&base, LoadOptions::default()).unwrap();
    let attached = model.attach_adapter(&adapter).unwrap();
    assert_eq!(
        attached.modules,
        adapter.modules.len() - fused + fused * experts
    );
    let want = rows(
        &candle_core::safetensors::load(
            dir.join("golden/logits.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()["logits"],
    );
    let prompt = ids(&g["ids"]);
    let base_logits = logits(&model, AdapterSet::NONE, &prompt);
    assert!(
        max_abs(&base_logits, &want) > 100.0 * TOL,
        "the adapter changes little"
    );
    let d = max_abs(&logits(&model, attached.set(), &prompt), &want);
    assert!(d <= TOL, "unmerged logits differ from peft's by {d}");
    let out = Scratch::empty("lora-merged-experts");
    let report = lora::merge::merge(
        &base,
        std::slice::from_ref(&adapter),
        &out,
        Some(DType::F32),
        &|_, _| {},
    )
    .unwrap();
    assert_eq!(report.patched, adapter.modules.len());
    let merged = Gemma4::load(&out, LoadOptions::default()).unwrap();
    let d = max_abs(&logits(&merged, AdapterSet::NONE, &prompt), &want);
    assert!(d <= TOL, "merged logits differ from peft's by {d}");
}

/// Adapters on an encoder's linears (the vision tower's, then the audio tower's; peft wraps
/// each clippable linear's inner `.linear`) and the decoder's q/v: a chat prompt with an
/// image and a clip, its media encoded with the adapter on, gives `PeftModel`'s logits
/// within 1e-4 (and not without the encoder's adapters); the same adapter on a model
/// whose encoder was not loaded patches only the rest.
#[test]
fn tower_adapters_match_peft() {
    for (case, tower) in [
        ("vision_tower", "vision_tower."),
        ("audio_tower", "audio_tower."),
    ] {
        let dir = fixture("train").join(case);
        let base = fixture("audio_small");
        let adapter = LoraAdapter::load(&dir).unwrap();
        let mut model = Gemma4::load(&base, LoadOptions::default()).unwrap();
        let attached = model.attach_adapter(&adapter).unwrap();
        assert_eq!(attached.modules, adapter.modules.len());
        let rendered = std::fs::read_to_string(dir.join("golden/rendered.txt")).unwrap();
        let media = gemma4::Media {
            images: vec![model
                .load_image(&fixture("images").join("landscape.png"))
                .unwrap()],
            videos: vec![],
            audio: vec![model
                .load_audio(&fixture("audio").join("hello_16k.wav"))
                .unwrap()],
        };
        let prompt = gemma4::Prompt::Rendered(rendered);
        let tm = &model.text;
        let logits_of = |input: &gemma4::PromptInput, set: AdapterSet| {
            rows(
                &lora::with_adapters(set, || {
                    tm.forward_input(input, &mut tm.new_cache(), LogitsFor::All)
                })
                .unwrap(),
            )
        };
        let want = rows(
            &candle_core::safetensors::load(
                dir.join("golden/logits.safetensors"),
                &candle_core::Device::Cpu,
            )
            .unwrap()["logits"],
        );
        let input = model.prepare_with(&prompt, &media, attached.set()).unwrap();
        let d = max_abs(&logits_of(&input, attached.set()), &want);
        assert!(d <= TOL, "{case}: logits differ from peft's by {d}");
        // The encoder's adapters matter: without them (the decoder's only), other logits.
        let input = model.prepare(&prompt, &media).unwrap();
        assert!(max_abs(&logits_of(&input, attached.set()), &want) > 100.0 * TOL);
        let mut without = Gemma4::load(
            &base,
            LoadOptions {
                vision: tower != "vision_tower.",
                audio: tower != "audio_tower.",
                ..Default::default()
            },
        )
        .unwrap();
        let rest = adapter
            .modules
            .iter()
            .filter(|m| !m.module.contains(tower))
            .count();
        assert_eq!(without.attach_adapter(&adapter).unwrap().modules, rest);
    }
}

#[test]
fn merging_keeps_the_stored_dtype_and_rounds_once() {
    // The fixture stores bf16: each merged weight is (W + scaling·B·A) computed in f32 and
    // rounded to bf16 once; untouched tensors are copied byte for byte.
    let base_dir = fixture("e2b_like");
    let adapter = LoraAdapter::load(&case_dir("e2b_all_linear")).unwrap();
    let out = Scratch::empty("lora-merged-bf16");
    lora::merge::merge(
        &base_dir,
        std::slice::from_ref(&adapter),
        &out,
        None,
        &|_, _| {},
    )
    .unwrap();
    let read = |dir: &Path, name: &str| -> (safetensors::Dtype, Vec<u8>) {
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor(name).unwrap();
        (t.dtype(), t.data().to_vec())
    };
    let q = "model.language_model.layers.0.self_attn.q_proj.weight";
    let (dt, merged) = read(&out, q);
    assert_eq!(dt, safetensors::Dtype::BF16);
    let (_, orig) = read(&base_dir, q);
    let m = adapter
        .modules
        .iter()
        .find(|m| m.module == "model.language_model.layers.0.self_attn.q_proj")
        .unwrap();
    let delta = m.b.matmul(&m.a).unwrap().affine(m.scaling, 0.0).unwrap();
    let delta: Vec<f32> = delta.flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<u8> = orig
        .chunks(2)
        .zip(&delta)
        .flat_map(|(w, d)| {
            let w = half::bf16::from_le_bytes([w[0], w[1]]).to_f32();
            half::bf16::from_f32(w + d).to_le_bytes()
        })
        .collect();
    assert_eq!(merged, want);
    let norm = "model.language_model.layers.0.input_layernorm.weight";
    assert_eq!(read(&out, norm), read(&base_dir, norm));
}

#[test]
fn adapters_that_cannot_apply_are_refused_by_name() {
    // An adapter for another model: the MoE router matches nothing on a dense model.
    let mut model = Gemma4::load(&fixture("e2b_like"), LoadOptions::default()).unwrap();
    let err = model
        .attach_adapter(&LoraAdapter::load(&case_dir("moe_all_linear")).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("matches no projection") && err.contains("tests/fixtures/moe"),
        "{err}"
    );
    // Nothing of it was attached: the model is the base model.
    assert!(model.adapters().is_empty());
    let g = json(&fixture("e2b_like").join("golden/prompts.json"));
    let prompt = ids(&g["cases"][0]["prompt_ids"]);
    let (_, base) = npy::read_f32(&fixture("e2b_like").join("golden/logits_0.npy")).unwrap();
    let all = AdapterSet::only(0);
    assert!(max_abs(&logits(&model, all, &prompt), &base) <= TOL);

    // A k_proj where E2B shares its KV cache (no k_proj in the reference either).
    let err = model
        .attach_adapter(&LoraAdapter::load(&case_dir("keqv_rslora")).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("layers.4.self_attn.k_proj") && err.contains("matches no projection"),
        "{err}"
    );
    // Same module names, other shapes (text_only has two KV heads, e2b_like one), with
    // `Gemma4ForCausalLM`'s names matched onto the multimodal checkpoint's.
    let err = model
        .attach_adapter(&LoraAdapter::load(&case_dir("causal_qv")).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lora_A is") && err.contains("but the projection is"),
        "{err}"
    );
    assert!(model.adapters().is_empty());

    let broken = |tag: &str, edit: &dyn Fn(&Path)| -> String {
        let s = Scratch::empty(tag);
        let d = s.join("adapter");
        std::fs::create_dir(&d).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(case_dir("causal_qv").join(f), d.join(f)).unwrap();
        }
        edit(&d);
        LoraAdapter::load(&d).unwrap_err().to_string()
    };
    let err = broken("lora-dora", &|d| {
        let p = d.join("adapter_config.json");
        let mut v = json(&p);
        v["use_dora"] = true.into();
        std::fs::write(&p, v.to_string()).unwrap();
    });
    assert!(err.contains("use_dora"), "{err}");
    let err = broken("lora-rank", &|d| {
        let p = d.join("adapter_config.json");
        let mut v = json(&p);
        v["r"] = 3.into();
        std::fs::write(&p, v.to_string()).unwrap();
    });
    assert!(err.contains("rank 2") && err.contains("rank 3"), "{err}");
    let err = broken("lora-truncated", &|d| {
        let p = d.join("adapter_model.safetensors");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    });
    assert!(err.contains("adapter_model.safetensors"), "{err}");
    let err = broken("lora-nofile", &|d| {
        std::fs::remove_file(d.join("adapter_config.json")).unwrap();
    });
    assert!(err.contains("adapter_config.json"), "{err}");
    let err = broken("lora-foreign", &|d| {
        use safetensors::tensor::{serialize_to_file, Dtype, TensorView};
        let data = vec![0u8; 8];
        let v = TensorView::new(Dtype::F32, vec![2], &data).unwrap();
        serialize_to_file(
            [("base_model.model.lm_head.lora_embedding_A", v)],
            None,
            &d.join("adapter_model.safetensors"),
        )
        .unwrap();
    });
    assert!(err.contains("lora_embedding_A"), "{err}");
}
