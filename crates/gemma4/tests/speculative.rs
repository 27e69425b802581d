//! Speculative decoding with assistant drafters against the reference
//! (`scripts/fixtures/make_drafter_fixtures.py`: transformers' assisted generation with
//! `Gemma4AssistantForCausalLM`, every drafter call recorded).

mod common;

use gemma4::draft::Drafter;
use std::sync::Arc;

use gemma4::generate::speculative::{DraftOptions, DraftRecord, DraftStats};
use gemma4::loading::npy;
use gemma4::text::model::TextModel;
use gemma4::{
    generate, step, Gemma4, GenerateOptions, LoadOptions, PromptInput, SamplingParams, Sequence,
};

use common::{fixture, ids, json, max_abs, rows, TOL};

/// Tolerance for the drafter calls of a whole generation, raised from [`TOL`]: the
/// drafter's inputs there are the target's own outputs (hidden states and K/V within ~1e-5
/// of the reference, summed in another order), and the distilled drafter amplifies them:
/// its logits reach ±14, and later calls of a round feed back its own state. The calls
/// measure 2e-5 to 1.15e-3 (the fourth call of a round on the MoE target; 8e-5 of the
/// logits' range); the drafter alone, given the reference's exact inputs, stays within
/// `TOL` (`drafter_step_matches_the_reference_on_its_exact_inputs`). A mechanism error
/// (a wrong K/V range, position or head) moves logits by whole units.
const TRACE_TOL: f32 = 2e-3;

fn greedy(max_new_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens,
        sampling: SamplingParams::greedy(),
        stop_ids: vec![],
        constraint: None,
        adapters: Default::default(),
        draft: None,
    }
}

fn with_draft(mut opts: GenerateOptions, drafter: &Arc<Drafter>, k: usize) -> GenerateOptions {
    let mut d = DraftOptions::new(drafter.clone(), k).unwrap();
    d.trace = true;
    opts.draft = Some(d);
    opts
}

/// Runs one sequence to its end through [`step`], prompts in chunks of `chunk`.
fn run(
    tm: &TextModel,
    prompt: &[u32],
    opts: &GenerateOptions,
    chunk: usize,
) -> (Vec<u32>, DraftStats, Vec<DraftRecord>) {
    let mut seq = Sequence::new(tm, PromptInput::text(prompt.to_vec()), opts).unwrap();
    while !seq.is_finished() {
        step(tm, &mut [&mut seq], chunk).unwrap();
    }
    (
        seq.generated().to_vec(),
        seq.draft_stats().unwrap_or_default(),
        seq.draft_trace().to_vec(),
    )
}

/// Every drafter call of the reference's assisted generation, in order: the position
/// id, how many target K/V entries it read per layer type, its logits and recurrent
/// state; and the generated ids, which equal plain greedy decoding.
fn check_pair(name: &str) -> DraftStats {
    let model = Gemma4::load(&fixture(name), LoadOptions::default()).unwrap();
    let tm = &model.text;
    let dir = fixture(&format!("drafters/{name}"));
    let drafter = Arc::new(Drafter::load(&dir, tm).unwrap());
    let trace = json(&dir.join("golden/trace.json"));
    let k = trace["draft_tokens"].as_u64().unwrap() as usize;
    let new = trace["new_tokens"].as_u64().unwrap() as usize;
    assert_eq!(drafter.config().num_assistant_tokens, Some(k));
    let window = tm.config().sliding_window;
    let vocab = tm.config().vocab_size;
    let mut total = DraftStats::default();
    for (c, case) in trace["cases"].as_array().unwrap().iter().enumerate() {
        let prompt = ids(&case["prompt_ids"]);
        let want_ids = ids(&case["greedy_ids"]);
        let calls = case["calls"].as_array().unwrap();
        let (shape, want_logits) =
            npy::read_f32(&dir.join(format!("golden/call_logits_{c}.npy"))).unwrap();
        assert_eq!(shape, [calls.len(), vocab]);
        let (shape, want_hidden) =
            npy::read_f32(&dir.join(format!("golden/call_hidden_{c}.npy"))).unwrap();
        let hb = shape[1];

        // The prompt in one pass, and in chunks of 5: the drafter reads the same K/V.
        let opts = with_draft(greedy(new), &drafter, k);
        let (ids_chunked, _, trace_chunked) = run(tm, &prompt, &opts, 5);
        let (got_ids, stats, records) = run(tm, &prompt, &opts, usize::MAX);
        assert_eq!(ids_chunked, got_ids, "{name} prompt {c}: chunked prefill");
        assert_eq!(trace_chunked.len(), records.len());
        let mut seen = 0;
        for call in &records {
            let want = &calls[seen];
            let at = format!("{name} prompt {c} call {seen}");
            assert_eq!(
                call.position as u64,
                want["position"].as_u64().unwrap(),
                "{at}: position"
            );
            for (t, n) in &call.kv_len {
                let given = want["kv_len"][t.as_str()].as_u64().unwrap() as usize;
                // The reference's sliding mask reads the last W + 1 entries given.
                let read = match t {
                    gemma4::config::LayerType::Sliding => given.min(window + 1),
                    gemma4::config::LayerType::Full => given,
                };
                assert_eq!(*n, read, "{at}: K/V entries of {}", t.as_str());
            }
            let d = max_abs(&call.logits, &want_logits[seen * vocab..(seen + 1) * vocab]);
            assert!(d <= TRACE_TOL, "{at}: drafter logits differ by {d}");
            assert_eq!(
                gemma4::generate::sampling::argmax(&call.logits) as u64,
                want["argmax"].as_u64().unwrap(),
                "{at}: draft"
            );
            let d = max_abs(&call.hidden, &want_hidden[seen * hb..(seen + 1) * hb]);
            assert!(d <= TRACE_TOL, "{at}: drafter state differs by {d}");
            seen += 1;
        }
        assert_eq!(seen, calls.len(), "{name} prompt {c}: drafter calls");
        assert_eq!(got_ids, want_ids, "{name} prompt {c}: tokens");
        let plain = generate(tm, &prompt, &greedy(new), |_| Ok(())).unwrap();
        assert_eq!(
            got_ids, plain.generated_ids,
            "{name} prompt {c}: vs plain greedy"
        );
        assert_eq!(stats.drafted, calls.len());
        total.add(&stats);
        // The prefill yields one token; every round its kept drafts and one of the
        // target's; a last pass with no room left to draft, one.
        let extra = got_ids.len() - (1 + stats.rounds + stats.accepted);
        assert!(extra <= 1, "{name} prompt {c}: {stats:?}");
    }
    assert!(
        total.accepted > 0,
        "{name}: the fixtures should exercise accepted drafts"
    );
    total
}

#[test]
fn centroid_head_drafter_on_an_e2b_like_target_matches_the_reference() {
    check_pair("e2b_like");
}

#[test]
fn dense_head_drafter_on_a_31b_like_target_matches_the_reference() {
    check_pair("dense_keqv");
}

/// A 26B-A4B-like MoE target with no KV sharing (the reference needs its bug-2 patch):
/// the drafter reads the last layer of each type.
#[test]
fn dense_head_drafter_on_a_moe_target_matches_the_reference() {
    check_pair("moe");
}

/// The trained pair: the `kquant` target, trained on the tokenizer corpus, and a drafter
/// distilled from its continuations of corpus text. On the corpus prompts most drafts
/// are kept (the reference keeps 51 of 70), so a round yields several tokens.
#[test]
fn a_distilled_drafter_on_its_trained_target_is_mostly_right() {
    let s = check_pair("kquant");
    assert!(s.acceptance_rate() >= 0.6, "{s:?}");
    assert!(s.mean_accepted() >= 2.0, "{s:?}");
}

/// One round of drafter steps on the reference's exact inputs (its input rows and the
/// target K/V it was given), each within `TOL`.
fn check_round(name: &str) {
    use candle_core::{Device, Tensor};
    use gemma4::config::LayerType;
    let model = Gemma4::load(&fixture(name), LoadOptions::default()).unwrap();
    let dir = fixture(&format!("drafters/{name}"));
    let drafter = Drafter::load(&dir, &model.text).unwrap();
    let trace = json(&dir.join("golden/trace.json"));
    let k = trace["draft_tokens"].as_u64().unwrap() as usize;
    let calls = &trace["cases"][0]["calls"];
    let g = |f: &str| npy::read_f32(&dir.join("golden").join(f)).unwrap();
    let t = |(shape, data): (Vec<usize>, Vec<f32>)| {
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    };
    let window = model.text.config().sliding_window;
    let mut kv = std::collections::BTreeMap::new();
    for lt in [LayerType::Full, LayerType::Sliding] {
        let (kk, vv) = (
            t(g(&format!("round_{}_k.npy", lt.as_str()))),
            t(g(&format!("round_{}_v.npy", lt.as_str()))),
        );
        // The reference's sliding mask reads the last W + 1 entries given.
        let n = kk.dim(1).unwrap();
        let keep = match lt {
            LayerType::Sliding => n.min(window + 1),
            LayerType::Full => n,
        };
        kv.insert(
            lt,
            (
                kk.narrow(1, n - keep, keep).unwrap(),
                vv.narrow(1, n - keep, keep).unwrap(),
            ),
        );
    }
    let (shape, inputs) = g("round_inputs.npy");
    let hb = shape[1] / 2;
    let (_, want_logits) = g("call_logits_0.npy");
    let (_, want_hidden) = g("call_hidden_0.npy");
    let vocab = model.text.config().vocab_size;
    for j in 0..shape[0] {
        let call = k + j;
        let row = &inputs[j * 2 * hb..(j + 1) * 2 * hb];
        let embed = Tensor::from_slice(&row[..hb], (1, hb), &Device::Cpu).unwrap();
        let hidden = Tensor::from_slice(&row[hb..], (1, hb), &Device::Cpu).unwrap();
        let position = calls[call]["position"].as_u64().unwrap() as usize;
        let step = drafter.step(&embed, &hidden, position, &kv).unwrap();
        let d = max_abs(
            &rows(&step.logits),
            &want_logits[call * vocab..(call + 1) * vocab],
        );
        assert!(d <= TOL, "{name} call {call}: drafter logits differ by {d}");
        let d = max_abs(
            &rows(&step.hidden),
            &want_hidden[call * hb..(call + 1) * hb],
        );
        assert!(d <= TOL, "{name} call {call}: drafter state differs by {d}");
    }
}

#[test]
fn drafter_step_matches_the_reference_on_its_exact_inputs() {
    for name in ["e2b_like", "dense_keqv", "moe", "kquant"] {
        check_round(name);
    }
}

#[test]
fn a_drafter_for_another_target_is_refused_by_name() {
    let model = Gemma4::load(&fixture("dense_keqv"), LoadOptions::default()).unwrap();
    let e = Drafter::load(&fixture("drafters/e2b_like"), &model.text)
        .err()
        .expect("geometry differs")
        .to_string();
    assert!(e.contains("config.json") && e.contains("K/V"), "{e}");
    let e = Drafter::load(&fixture("drafters/missing"), &model.text)
        .err()
        .expect("no such directory")
        .to_string();
    assert!(e.contains("drafters/missing"), "{e}");
    // Edited drafter configs: each error names the file or the tensor.
    let model_e2b = Gemma4::load(&fixture("e2b_like"), LoadOptions::default()).unwrap();
    let cases: [(&str, serde_json::Value, &str); 3] = [
        (
            "backbone_hidden_size",
            serde_json::json!(32),
            "backbone_hidden_size",
        ),
        (
            "num_centroids",
            serde_json::json!(32),
            "masked_embedding.centroids.weight",
        ),
        (
            "centroid_intermediate_top_k",
            serde_json::json!(0),
            "centroid_intermediate_top_k",
        ),
    ];
    for (key, value, want) in cases {
        let dir = common::Scratch::of("drafters/e2b_like", key);
        dir.edit_json("config.json", |v| v[key] = value.clone());
        let e = Drafter::load(&dir, &model_e2b.text)
            .err()
            .expect("a broken drafter")
            .to_string();
        assert!(e.contains(want), "{key}: {e}");
    }
    // A target checkpoint is not a drafter.
    let e = Drafter::load(&fixture("dense_keqv"), &model.text)
        .err()
        .expect("not a drafter")
        .to_string();
    assert!(e.contains("gemma4_assistant"), "{e}");
}

/// Penalties change the target's choice per position (each verification row sees the
/// drafts before it in its history): greedy output still equals plain greedy. Seeded
/// sampling is reproducible and yields the requested length.
#[test]
fn penalties_and_sampling_run_through_the_drafter() {
    let model = Gemma4::load(&fixture("dense_keqv"), LoadOptions::default()).unwrap();
    let tm = &model.text;
    let drafter = Arc::new(Drafter::load(&fixture("drafters/dense_keqv"), tm).unwrap());
    let prompt = [2, 300, 301, 302];
    let mut opts = greedy(20);
    opts.sampling.repetition_penalty = Some(1.3);
    opts.sampling.presence_penalty = Some(0.5);
    let plain = run(tm, &prompt, &opts, usize::MAX).0;
    let spec = run(
        tm,
        &prompt,
        &with_draft(opts.clone(), &drafter, 4),
        usize::MAX,
    )
    .0;
    assert_eq!(spec, plain);

    opts.sampling.temperature = Some(0.8);
    opts.sampling.top_k = Some(40);
    opts.sampling.seed = 5;
    let opts = with_draft(opts, &drafter, 4);
    let a = run(tm, &prompt, &opts, usize::MAX).0;
    assert_eq!(a.len(), 20);
    assert_eq!(a, run(tm, &prompt, &opts, usize::MAX).0);
}

/// Inside one batched step, sequences that draft (each verifying its own drafts) and
/// sequences that do not run side by side, join at different times and prefill in
/// chunks; each gets the tokens it gets alone.
#[test]
fn drafting_and_plain_sequences_share_batched_steps() {
    let model = Gemma4::load(&fixture("e2b_like"), LoadOptions::default()).unwrap();
    let tm = &model.text;
    let drafter = Arc::new(Drafter::load(&fixture("drafters/e2b_like"), tm).unwrap());
    let trace = json(&fixture("drafters/e2b_like/golden/trace.json"));
    let prompts: Vec<Vec<u32>> = trace["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| ids(&c["prompt_ids"]))
        .collect();
    let jobs: Vec<(Vec<u32>, GenerateOptions)> = vec![
        (prompts[0].clone(), with_draft(greedy(20), &drafter, 4)),
        (prompts[1].clone(), greedy(17)),
        (prompts[1].clone(), with_draft(greedy(15), &drafter, 2)),
        (prompts[2].clone(), with_draft(greedy(22), &drafter, 6)),
    ];
    let alone: Vec<Vec<u32>> = jobs
        .iter()
        .map(|(p, o)| run(tm, p, o, usize::MAX).0)
        .collect();
    let mut seqs: Vec<Sequence> = jobs
        .iter()
        .map(|(p, o)| Sequence::new(tm, PromptInput::text(p.clone()), o).unwrap())
        .collect();
    let mut t = 0;
    while seqs.iter().any(|s| !s.is_finished()) {
        let joined = (t / 2 + 1).min(seqs.len());
        let mut batch: Vec<&mut Sequence> = seqs.iter_mut().take(joined).collect();
        step(tm, &mut batch, 7).unwrap();
        t += 1;
    }
    for (i, s) in seqs.iter().enumerate() {
        assert_eq!(s.generated(), alone[i].as_slice(), "job {i}");
    }
    assert!(seqs[0].draft_stats().unwrap().accepted > 0);
    assert!(seqs[1].draft_stats().is_none());
}

/// Drafters converted by llama.cpp's `convert_hf_to_gguf.py` (`gemma4-assistant`,
/// scripts/fixtures/make_llamacpp_fixtures.py): the config comes from the file's
/// metadata; the dense drafter computes what its safetensors computes; the E2B-like one
/// lost its centroid head in the conversion and drafts with the dense tied head, as
/// llama.cpp does. Output stays the target's greedy output either way.
#[test]
fn llama_cpp_drafter_files_load_and_draft() {
    for (name, centroids) in [("dense_keqv", false), ("e2b_like", true)] {
        let model = Gemma4::load(&fixture(name), LoadOptions::default()).unwrap();
        let tm = &model.text;
        let dir = common::Scratch::empty(&format!("gguf-drafter-{name}"));
        let file = format!("drafter-{name}-f32.gguf");
        std::fs::copy(fixture("llamacpp").join(&file), dir.join(&file)).unwrap();
        let gguf = Arc::new(Drafter::load(&dir, tm).unwrap());
        let st = Arc::new(Drafter::load(&fixture(&format!("drafters/{name}")), tm).unwrap());
        assert_eq!(st.config().centroids.is_some(), centroids);
        assert!(gguf.config().centroids.is_none());
        assert_eq!(gguf.config().num_assistant_tokens, None);
        let (mut a, mut b) = (st.config().text.clone(), gguf.config().text.clone());
        for t in [&mut a, &mut b] {
            t.eos_token_ids.clear();
            t.pad_token_id = 0;
            t.bos_token_id = 0;
            t.vocab_size_per_layer_input = 0;
            // k_eq_v only decides K/V projections, which a drafter has none of (the
            // metadata cannot tell it without them).
            t.attention_k_eq_v = false;
            t.layers.iter_mut().for_each(|l| l.k_eq_v = false);
        }
        assert_eq!(a, b, "{name}: the decoder config from the metadata");
        let prompt = [2u32, 300, 301, 302];
        let plain = run(tm, &prompt, &greedy(16), usize::MAX).0;
        let (ids_gguf, stats_gguf, trace_gguf) =
            run(tm, &prompt, &with_draft(greedy(16), &gguf, 4), usize::MAX);
        assert_eq!(ids_gguf, plain);
        assert!(stats_gguf.drafted > 0);
        if !centroids {
            let (_, _, trace_st) = run(tm, &prompt, &with_draft(greedy(16), &st, 4), usize::MAX);
            assert_eq!(trace_st.len(), trace_gguf.len());
            for (x, y) in trace_st.iter().zip(&trace_gguf) {
                let d = max_abs(&x.logits, &y.logits);
                assert!(d <= TOL, "{name}: GGUF drafter logits differ by {d}");
            }
        }
    }
}
