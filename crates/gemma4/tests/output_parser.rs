//! The output parser on the fixture's tokenizer (the released vocabulary's marker ids):
//! thoughts, tool calls, the models' quirks, and streaming equal to the whole.

mod common;

use gemma4::prompt::output_parser::{parse_output, Delta, Markers, OutputParser, ParsedMessage};
use gemma4::prompt::tokenizer::Tokenizer;
use serde_json::json;

use common::fixture;

fn tok() -> Tokenizer {
    Tokenizer::from_dir(&fixture("text_only")).unwrap()
}

fn parse(tok: &Tokenizer, text: &str) -> ParsedMessage {
    let ids = tok.encode_raw(text).unwrap();
    parse_output(tok, Markers::from_tokenizer(tok).unwrap(), &ids).unwrap()
}

#[test]
fn marker_ids_are_the_released_ones() {
    let m = Markers::from_tokenizer(&tok()).unwrap();
    assert_eq!(
        (
            m.channel_open,
            m.channel_close,
            m.tool_call_open,
            m.tool_call_close,
            m.quote
        ),
        (100, 101, 48, 49, 52)
    );
    assert_eq!((m.turn_close, m.tool_response_open, m.eos), (106, 50, 1));
}

#[test]
fn thought_then_answer() {
    let t = tok();
    let m = parse(
        &t,
        "<|channel>thought\nLet me think.<channel|>The answer is 4.<turn|>ignored",
    );
    assert_eq!(m.reasoning_content.as_deref(), Some("Let me think."));
    assert_eq!(m.content, "The answer is 4.");
    assert!(m.tool_calls.is_empty());
    // Thinking off: no reasoning at all.
    let m = parse(&t, "Plain answer.<turn|>");
    assert_eq!(
        (m.content.as_str(), m.reasoning_content),
        ("Plain answer.", None)
    );
}

#[test]
fn tool_calls_become_json() {
    let t = tok();
    let m = parse(
        &t,
        "<|channel>thought\nneed weather<channel|><|tool_call>call:get_weather{city:<|\"|>Paris<|\"|>,days:3,opts:{units:<|\"|>C<|\"|>,hourly:false}}<tool_call|><|tool_response>",
    );
    assert_eq!(m.content, "");
    assert_eq!(m.reasoning_content.as_deref(), Some("need weather"));
    assert_eq!(m.tool_calls.len(), 1);
    assert_eq!(m.tool_calls[0].name, "get_weather");
    assert_eq!(
        m.tool_calls[0].arguments,
        json!({"city": "Paris", "days": 3, "opts": {"units": "C", "hourly": false}})
    );
    // Two calls in a row, the first close repeated; a marker inside a string is text.
    let m = parse(
        &t,
        "<|tool_call>call:a{x:1}<tool_call|><tool_call|><|tool_call>call:b{s:<|\"|>x <tool_call|> y<|\"|>}<tool_call|><|tool_response>",
    );
    let names: Vec<_> = m.tool_calls.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(m.tool_calls[1].arguments, json!({"s": "x <tool_call|> y"}));
    assert_eq!(m.content, "");
}

#[test]
fn quirks_are_tolerated_and_markers_never_leak() {
    let t = tok();
    // An empty thought, a stray close, a stray delimiter.
    let m = parse(
        &t,
        "<|channel>thought\n<channel|><channel|>Hi <|\"|>there.<eos>",
    );
    assert_eq!(m.content, "Hi there.");
    assert_eq!(m.reasoning_content.as_deref(), Some(""));
    // A call cut off by the token limit is dropped, and nothing of it shows.
    let m = parse(&t, "Checking.<|tool_call>call:get_weather{city:<|\"|>Par");
    assert_eq!(m.content, "Checking.");
    assert!(m.tool_calls.is_empty());
    // A thought cut off keeps what it has.
    let m = parse(&t, "<|channel>thought\nhalf a tho");
    assert_eq!(m.reasoning_content.as_deref(), Some("half a tho"));
    assert_eq!(m.content, "");
    // Other special tokens are not text.
    let m = parse(&t, "a<|turn>b<bos>c<turn|>");
    assert_eq!(m.content, "abc");
}

#[test]
fn ordinary_tokens_that_spell_a_marker_stay_text() {
    let t = tok();
    let mut ids = t.encode_raw("say <|chan").unwrap();
    ids.extend(t.encode_raw("nel> ok").unwrap());
    assert!(!ids.contains(&100));
    let m = parse_output(&t, Markers::from_tokenizer(&t).unwrap(), &ids).unwrap();
    assert_eq!(m.content, "say <|channel> ok");
}

#[test]
fn streamed_deltas_add_up_to_the_whole() {
    let t = tok();
    let text = "<|channel>thought\nThink ünïcode 日本.<channel|>Answer: ünïcode 日本 \
                <|tool_call>call:f{a:<|\"|>ü<|\"|>}<tool_call|> and after<turn|>";
    let ids = t.encode_raw(text).unwrap();
    let whole = parse_output(&t, Markers::from_tokenizer(&t).unwrap(), &ids).unwrap();
    let mut p = OutputParser::new(&t, Markers::from_tokenizer(&t).unwrap());
    let (mut content, mut reasoning, mut calls) = (String::new(), String::new(), Vec::new());
    let mut deltas = Vec::new();
    for &id in &ids {
        deltas.extend(p.push(id).unwrap());
    }
    deltas.extend(p.finish());
    for d in deltas {
        match d {
            Delta::Content(s) => {
                assert!(
                    !s.contains('\u{FFFD}') && !s.contains("<|") && !s.contains("|>"),
                    "{s:?}"
                );
                content.push_str(&s)
            }
            Delta::Reasoning(s) => reasoning.push_str(&s),
            Delta::ToolCall { index, call } => {
                assert_eq!(index, calls.len());
                calls.push(call)
            }
        }
    }
    assert_eq!(content, whole.content);
    assert_eq!(Some(reasoning), whole.reasoning_content);
    assert_eq!(calls, whole.tool_calls);
    assert_eq!(whole.content, "Answer: ünïcode 日本  and after");
    assert_eq!(
        whole.reasoning_content.as_deref(),
        Some("Think ünïcode 日本.")
    );
    assert_eq!(whole.tool_calls[0].arguments, json!({"a": "ü"}));
}
