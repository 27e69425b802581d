//! The `chat_tools` fixture: a tiny model trained to think, call tools and answer after a
//! tool's result, with a template in Gemma 4's tool format. The template renders tools,
//! calls and results to the reference's ids (jinja2 through `apply_chat_template`), the
//! greedy continuation is the reference's, and the output parser reads it into the
//! message the model meant.

mod common;

use gemma4::generate::sampling::SamplingParams;
use gemma4::generate::{generate_from, GenerateOptions};
use gemma4::prompt::output_parser::{parse_output, Markers};
use gemma4::{Gemma4, LoadOptions, Media, Prompt};
use serde_json::{json, Value};

use common::{fixture, json as read_json};

#[test]
fn tools_render_generate_and_parse_as_the_reference() {
    let dir = fixture("chat_tools");
    let model = Gemma4::load(&dir, LoadOptions::default()).unwrap();
    let tok = model.tokenizer().unwrap();
    let golden = read_json(&dir.join("golden/chat.json"));
    let mut parsed = Vec::new();
    for case in golden["cases"].as_array().unwrap() {
        let kwargs = case["kwargs"].as_object().cloned().unwrap_or_default();
        let tools = case.get("tools").filter(|t| !t.is_null());
        let rendered = model
            .chat_template
            .render_json(&case["messages"], tools, true, &kwargs)
            .unwrap();
        assert_eq!(rendered, case["rendered"].as_str().unwrap());
        let ids = tok.encode_raw(&rendered).unwrap();
        let want: Vec<u32> = serde_json::from_value(case["prompt_ids"].clone()).unwrap();
        assert_eq!(ids, want);
        let input = model
            .prepare(&Prompt::Rendered(rendered), &Media::default())
            .unwrap();
        let opts = GenerateOptions {
            max_new_tokens: 80,
            sampling: SamplingParams::greedy(),
            stop_ids: model.stop_ids(),
            adapters: Default::default(),
            constraint: None,
            draft: None,
        };
        let out = generate_from(&model.text, &input, &opts, |_| Ok(())).unwrap();
        let greedy: Vec<u32> = serde_json::from_value(case["greedy_ids"].clone()).unwrap();
        assert_eq!(out.generated_ids, greedy);
        parsed.push(parse_output(tok, Markers::from_tokenizer(tok).unwrap(), &greedy).unwrap());
    }
    let calls = |m: &gemma4::prompt::output_parser::ParsedMessage| -> Vec<Value> {
        m.tool_calls
            .iter()
            .map(|c| json!([c.name, c.arguments]))
            .collect()
    };
    assert_eq!(
        parsed[0].reasoning_content.as_deref(),
        Some("I need the weather tool.")
    );
    assert_eq!(parsed[0].content, "");
    assert_eq!(
        calls(&parsed[0]),
        [json!(["get_weather", {"city": "Paris"}])]
    );
    assert_eq!(parsed[1].content, "It is sunny in Paris.");
    assert!(parsed[1].tool_calls.is_empty() && parsed[1].reasoning_content.is_none());
    assert_eq!(
        calls(&parsed[2]),
        [
            json!(["get_weather", {"city": "Paris"}]),
            json!(["get_weather", {"city": "Rome"}])
        ]
    );
    assert_eq!(
        parsed[3].reasoning_content.as_deref(),
        Some("Two plus two.")
    );
    assert_eq!(parsed[3].content, "The answer is 4.");
    assert_eq!(parsed[4].content, "Hello! How can I help?");
}

#[test]
fn a_launch_era_template_reads_tool_results_folded_into_the_call() {
    use gemma4::prompt::chat::ChatTemplate;
    // The fixture's template rewritten the launch-era way: tool results only from the
    // assistant message's `tool_responses`, no `tool` role.
    let dir = fixture("chat_tools");
    let src = std::fs::read_to_string(dir.join("chat_template_launch_era.jinja")).unwrap();
    let launch = ChatTemplate::from_source(
        Some(&src),
        "<bos>",
        "<eos>",
        "launch-era",
        &gemma4::Limits::DEFAULT,
    )
    .unwrap();
    let golden = read_json(&dir.join("golden/chat.json"));
    // OpenAI-style messages (`role: "tool"`) render to the reference's prompt.
    for case in golden["cases"].as_array().unwrap() {
        let kwargs = case["kwargs"].as_object().cloned().unwrap_or_default();
        let tools = case.get("tools").filter(|t| !t.is_null());
        let rendered = launch
            .render_json(&case["messages"], tools, true, &kwargs)
            .unwrap();
        assert_eq!(rendered, case["rendered"].as_str().unwrap());
    }
    // The answer after the results, then the next question: the same as the template
    // that reads `tool` messages.
    let model = Gemma4::load(&dir, LoadOptions::default()).unwrap();
    let mut messages = golden["cases"][1]["messages"].clone();
    let more = messages.as_array_mut().unwrap();
    more.push(json!({"role": "assistant", "content": "It is sunny in Paris."}));
    more.push(json!({"role": "user", "content": "And tomorrow?"}));
    let tools = golden["cases"][1].get("tools").filter(|t| !t.is_null());
    let none = serde_json::Map::new();
    let want = model
        .chat_template
        .render_json(&messages, tools, true, &none)
        .unwrap();
    assert_eq!(
        launch.render_json(&messages, tools, true, &none).unwrap(),
        want
    );
    assert!(
        want.contains("<tool_response|>It is sunny in Paris.<turn|>"),
        "{want}"
    );
}
