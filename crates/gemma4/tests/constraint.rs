//! Constrained decoding (`generate::constraint`): answers held to a JSON schema are valid
//! under it and end at a stop id where the grammar ends, with random and trained weights;
//! a thought runs free before the held answer; the engine gives what `generate` gives;
//! schemas llguidance cannot compile are an error naming `response_format`.

mod common;

use std::sync::Arc;

use gemma4::generate::constraint::{ConstraintCompiler, ResponseFormat};
use gemma4::generate::engine::{Engine, EngineOptions, Event, Job};
use gemma4::generate::sampling::SamplingParams;
use gemma4::generate::{generate, generate_from, GenerateOptions, StopReason};
use gemma4::prompt::output_parser::{parse_output, Markers};
use gemma4::text::model::PromptInput;
use gemma4::{Gemma4, LoadOptions, Media, Prompt};
use serde_json::{json, Value};

use common::fixture;

fn compiler(model: &Gemma4) -> ConstraintCompiler {
    let tok = model.tokenizer().unwrap();
    let end = model.stop_ids()[0];
    ConstraintCompiler::new(tok, model.config.text.vocab_size, end).unwrap()
}

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "color": {"enum": ["red", "green", "blue"]},
            "n": {"type": "integer", "minimum": 0, "maximum": 99}
        },
        "required": ["ok", "color", "n"],
        "additionalProperties": false
    })
}

/// `text` is an answer under `schema()`.
fn check_answer(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    let o = v.as_object().unwrap();
    assert_eq!(o.len(), 3, "{text}");
    assert!(o["ok"].is_boolean(), "{text}");
    assert!(["red", "green", "blue"].contains(&o["color"].as_str().unwrap()));
    let n = o["n"].as_i64().unwrap();
    assert!((0..=99).contains(&n), "{text}");
}

fn options(model: &Gemma4, format: &ResponseFormat, sampling: SamplingParams) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: 60,
        sampling,
        stop_ids: model.stop_ids(),
        adapters: Default::default(),
        constraint: Some(compiler(model).compile(format).unwrap()),
        draft: None,
    }
}

#[test]
fn random_weights_answer_under_the_schema_and_stop_where_it_ends() {
    let model = Gemma4::load(&fixture("text_only"), LoadOptions::default()).unwrap();
    let tok = model.tokenizer().unwrap();
    let prompt = tok.encode("Describe the sky as JSON:").unwrap();
    let format = ResponseFormat::JsonSchema(schema());
    let mut answers = Vec::new();
    for seed in 0..6u64 {
        let sampling = if seed == 0 {
            SamplingParams::greedy()
        } else {
            SamplingParams {
                temperature: Some(1.5),
                seed,
                ..Default::default()
            }
        };
        let opts = options(&model, &format, sampling);
        let out = generate(&model.text, &prompt, &opts, |_| Ok(())).unwrap();
        assert_eq!(out.stop_reason, StopReason::StopToken, "seed {seed}");
        let (stop, body) = out.generated_ids.split_last().unwrap();
        assert!(model.stop_ids().contains(stop));
        let text = tok.decode(body, false).unwrap();
        check_answer(&text);
        answers.push(text);
    }
    // The samples differ: the mask narrows the choice, it does not make it.
    answers.sort();
    answers.dedup();
    assert!(answers.len() > 1, "{answers:?}");
    // Unconstrained, the same model writes no JSON at all.
    let free = GenerateOptions {
        adapters: Default::default(),
        constraint: None,
        ..options(&model, &format, SamplingParams::greedy())
    };
    let out = generate(&model.text, &prompt, &free, |_| Ok(())).unwrap();
    let text = tok.decode(&out.generated_ids, true).unwrap();
    assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");
}

#[test]
fn without_stop_ids_the_answer_goes_on_after_the_grammar_ends() {
    // `ignore_eos`: the grammar's end id marks where the JSON ends, and generation runs on
    // to max_new_tokens, free.
    let model = Gemma4::load(&fixture("text_only"), LoadOptions::default()).unwrap();
    let tok = model.tokenizer().unwrap();
    let prompt = tok.encode("Describe the sky as JSON:").unwrap();
    let opts = GenerateOptions {
        stop_ids: vec![],
        ..options(
            &model,
            &ResponseFormat::JsonSchema(schema()),
            SamplingParams::greedy(),
        )
    };
    let out = generate(&model.text, &prompt, &opts, |_| Ok(())).unwrap();
    assert_eq!(out.stop_reason, StopReason::MaxTokens);
    assert_eq!(out.generated_ids.len(), opts.max_new_tokens);
    let end = model.stop_ids()[0];
    let at = out.generated_ids.iter().position(|&t| t == end).unwrap();
    check_answer(&tok.decode(&out.generated_ids[..at], false).unwrap());
}

#[test]
fn json_object_opens_an_object() {
    let model = Gemma4::load(&fixture("text_only"), LoadOptions::default()).unwrap();
    let tok = model.tokenizer().unwrap();
    let prompt = tok.encode("Any JSON:").unwrap();
    let opts = options(
        &model,
        &ResponseFormat::JsonObject,
        SamplingParams::greedy(),
    );
    let out = generate(&model.text, &prompt, &opts, |_| Ok(())).unwrap();
    let text = tok.decode(&out.generated_ids, true).unwrap();
    assert!(text.starts_with('{'), "{text:?}");
    if out.stop_reason == StopReason::StopToken {
        assert!(serde_json::from_str::<Value>(&text).unwrap().is_object());
    }
}

#[test]
fn the_engine_holds_a_request_to_its_schema_beside_a_free_one() {
    let model = Arc::new(Gemma4::load(&fixture("text_only"), LoadOptions::default()).unwrap());
    let tok = model.tokenizer().unwrap();
    let prompt = tok.encode("Describe the sky as JSON:").unwrap();
    let format = ResponseFormat::JsonSchema(schema());
    let held = options(&model, &format, SamplingParams::greedy());
    let alone = generate(&model.text, &prompt, &held, |_| Ok(())).unwrap();
    let free = GenerateOptions {
        adapters: Default::default(),
        constraint: None,
        ..held.clone()
    };
    let free_alone = generate(&model.text, &prompt, &free, |_| Ok(())).unwrap();
    let engine = Engine::start(
        model.clone(),
        |g: &Gemma4| &g.text,
        EngineOptions::default(),
        None,
    );
    let run = |options: GenerateOptions| {
        engine
            .submit(Job {
                prompt: PromptInput::text(prompt.clone()),
                options,
                top_logprobs: None,
            })
            .unwrap()
    };
    let (a, b) = (run(held), run(free));
    let ids = |rx: std::sync::mpsc::Receiver<Event>| -> Vec<u32> {
        rx.iter()
            .filter_map(|e| match e {
                Event::Token { id, .. } => Some(id),
                Event::Failed(m) => panic!("{m}"),
                _ => None,
            })
            .collect()
    };
    assert_eq!(ids(a), alone.generated_ids);
    assert_eq!(ids(b), free_alone.generated_ids);
}

#[test]
fn a_thought_runs_free_before_the_held_answer() {
    // The trained fixture thinks before it answers "What is 2+2?".
    let dir = fixture("chat_tools");
    let model = Gemma4::load(&dir, LoadOptions::default()).unwrap();
    let tok = model.tokenizer().unwrap();
    let markers = Markers::from_tokenizer(tok).unwrap();
    let kwargs = json!({"enable_thinking": true});
    let rendered = model
        .chat_template
        .render_json(
            &json!([{"role": "user", "content": "What is 2+2?"}]),
            None,
            true,
            kwargs.as_object().unwrap(),
        )
        .unwrap();
    let input = model
        .prepare(&Prompt::Rendered(rendered), &Media::default())
        .unwrap();
    let format = ResponseFormat::JsonSchema(json!({
        "type": "object",
        "properties": {"answer": {"type": "integer"}},
        "required": ["answer"],
        "additionalProperties": false
    }));
    let open = tok.token_to_id("<|channel>").unwrap();
    let close = tok.token_to_id("<channel|>").unwrap();
    let held = compiler(&model).compile(&format).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 80,
        sampling: SamplingParams::greedy(),
        stop_ids: model.stop_ids(),
        adapters: Default::default(),
        constraint: Some(held.clone().after_reasoning(open, close)),
        draft: None,
    };
    let out = generate_from(&model.text, &input, &opts, |_| Ok(())).unwrap();
    assert_eq!(out.stop_reason, StopReason::StopToken);
    let msg = parse_output(tok, markers, &out.generated_ids).unwrap();
    assert_eq!(msg.reasoning_content.as_deref(), Some("Two plus two."));
    let v: Value = serde_json::from_str(&msg.content).unwrap();
    assert!(v["answer"].is_i64(), "{}", msg.content);
    // Without `after_reasoning` the thought cannot open: the answer is JSON from its
    // first token.
    let opts = GenerateOptions {
        adapters: Default::default(),
        constraint: Some(held),
        ..opts
    };
    let out = generate_from(&model.text, &input, &opts, |_| Ok(())).unwrap();
    assert_ne!(out.generated_ids[0], open);
    let msg = parse_output(tok, markers, &out.generated_ids).unwrap();
    assert!(msg.reasoning_content.is_none());
    assert!(serde_json::from_str::<Value>(&msg.content).unwrap()["answer"].is_i64());
}

#[test]
fn schemas_that_do_not_compile_name_response_format() {
    let model = Gemma4::load(&fixture("text_only"), LoadOptions::default()).unwrap();
    let c = compiler(&model);
    for bad in [
        json!([1, 2]),
        json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}),
        json!({"type": "frobnicate"}),
    ] {
        let e = c
            .compile(&ResponseFormat::JsonSchema(bad.clone()))
            .unwrap_err();
        assert!(e.to_string().contains("response_format"), "{bad}: {e}");
    }
}
