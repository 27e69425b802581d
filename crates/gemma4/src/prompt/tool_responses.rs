//! Tool results for Gemma 4's launch-era chat templates. Those read a tool's answer only
//! from a `tool_responses` list (`{name, response}`) on the assistant message that made
//! the calls, as Google's own format has it; they ignore `role: "tool"` messages, which is
//! how OpenAI clients (and transformers) send results. The templates released later read
//! both. For a launch-era template, a call, its results and the answer after them are
//! folded into one assistant message before rendering, as llama.cpp does for these
//! templates:
//!
//! `assistant{tool_calls}`, `tool`…, [`assistant{content}`] →
//! `assistant{tool_calls, tool_responses, [content], [reasoning_content]}`
//!
//! A result's content is passed as sent (llama.cpp parses JSON text into an object; the
//! later official template prints a tool message's JSON text as a string, and passing it
//! unparsed makes both official templates render a conversation alike). Each result takes
//! the name of the call in the same position, else its `tool_call_id`.

use serde_json::{json, Map, Value};

/// Whether a template is launch-era: it reads `tool_responses` and never compares a
/// message's role with `'tool'`.
pub fn reads_only_tool_responses(source: &str) -> bool {
    let compares_tool_role = ["== 'tool'", "!= 'tool'", "== \"tool\"", "!= \"tool\""]
        .iter()
        .any(|p| source.contains(p));
    source.contains("tool_responses") && !compares_tool_role
}

fn role(m: &Value) -> &str {
    m.get("role").and_then(Value::as_str).unwrap_or("")
}

fn calls(m: &Value) -> Option<&Vec<Value>> {
    m.get("tool_calls")
        .and_then(Value::as_array)
        .filter(|c| !c.is_empty())
}

fn has_content(m: &Value) -> bool {
    match m.get("content") {
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        _ => false,
    }
}

/// `messages` with every call, its results and the answer after them folded into one
/// assistant message (see the module doc). Messages without `role: "tool"` are unchanged.
pub fn fold_tool_results(messages: &Value) -> Value {
    let Some(list) = messages.as_array() else {
        return messages.clone();
    };
    if !list.iter().any(|m| role(m) == "tool") {
        return messages.clone();
    }
    let mut out = Vec::with_capacity(list.len());
    let mut i = 0;
    while i < list.len() {
        let msg = &list[i];
        let Some(tool_calls) = calls(msg).filter(|_| role(msg) == "assistant") else {
            out.push(msg.clone());
            i += 1;
            continue;
        };
        let mut folded: Map<String, Value> = msg.as_object().cloned().unwrap_or_default();
        i += 1;
        let mut responses = Vec::new();
        while i < list.len() && role(&list[i]) == "tool" {
            let result = &list[i];
            // As sent: the later templates print a string result as a string (JSON
            // text included), and so does the launch-era one given the string.
            let response = result.get("content").cloned().unwrap_or(Value::Null);
            let name = tool_calls
                .get(responses.len())
                .and_then(|c| c.pointer("/function/name"))
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .or_else(|| result.get("tool_call_id").and_then(Value::as_str))
                .unwrap_or_default();
            responses.push(json!({"name": name, "response": response}));
            i += 1;
        }
        if !responses.is_empty() {
            folded.insert("tool_responses".into(), Value::Array(responses));
            // The answer after the results belongs to the same model turn.
            if let Some(next) = list.get(i) {
                if role(next) == "assistant" && calls(next).is_none() && has_content(next) {
                    folded.insert("content".into(), next["content"].clone());
                    i += 1;
                }
            }
        }
        out.push(Value::Object(folded));
    }
    Value::Array(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_its_results_and_the_answer_become_one_turn() {
        let call =
            |name: &str| json!({"type": "function", "function": {"name": name, "arguments": {}}});
        let messages = json!([
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": "", "reasoning_content": "Two calls.",
             "tool_calls": [call("get_weather"), call("get_time")]},
            {"role": "tool", "tool_call_id": "c1", "content": {"temp": 21}},
            {"role": "tool", "tool_call_id": "c2", "content": "noon"},
            {"role": "assistant", "content": "21 degrees at noon."},
            {"role": "user", "content": "Thanks"},
        ]);
        let folded = fold_tool_results(&messages);
        assert_eq!(
            folded,
            json!([
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {"role": "assistant", "content": "21 degrees at noon.", "reasoning_content": "Two calls.",
                 "tool_calls": [call("get_weather"), call("get_time")],
                 "tool_responses": [{"name": "get_weather", "response": {"temp": 21}},
                                    {"name": "get_time", "response": "noon"}]},
                {"role": "user", "content": "Thanks"},
            ])
        );
        // A result past the calls takes its id; the conversation may end at the results.
        let messages = json!([
            {"role": "assistant", "tool_calls": [call("f")]},
            {"role": "tool", "content": "1"},
            {"role": "tool", "tool_call_id": "extra", "content": "x"},
        ]);
        assert_eq!(
            fold_tool_results(&messages)[0]["tool_responses"],
            json!([{"name": "f", "response": "1"}, {"name": "extra", "response": "x"}])
        );
        // Nothing to fold: unchanged.
        let plain = json!([{"role": "user", "content": "hi"}]);
        assert_eq!(fold_tool_results(&plain), plain);
    }

    #[test]
    fn launch_era_templates_are_told_apart_by_what_they_read() {
        let launch = "{%- if message['tool_responses'] -%}{%- set ns.prev = 'tool' -%}";
        let later = "{%- if message['role'] != 'tool' -%}{%- if message.get('tool_responses') -%}";
        assert!(reads_only_tool_responses(launch));
        assert!(!reads_only_tool_responses(later));
        assert!(!reads_only_tool_responses("{{ messages }}"));
    }
}
