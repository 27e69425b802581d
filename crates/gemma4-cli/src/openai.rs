//! The OpenAI API's shapes for what the library produces: an assistant message with
//! `reasoning_content` and `tool_calls` (arguments as a JSON string, as the API has them).

use gemma4::prompt::output_parser::{ParsedMessage, ToolCall};
use serde_json::{json, Value};

/// One tool call as the API writes it.
pub(crate) fn tool_call_json(call: &ToolCall, id: &str) -> Value {
    json!({
        "id": id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments.to_string()},
    })
}

/// `choices[].message` for a parsed completion; `call_id(i)` names the i-th call.
pub(crate) fn message_json(m: &ParsedMessage, call_id: impl Fn(usize) -> String) -> Value {
    let mut v = json!({"role": "assistant", "content": m.content});
    if let Some(r) = &m.reasoning_content {
        v["reasoning_content"] = json!(r);
    }
    if !m.tool_calls.is_empty() {
        v["tool_calls"] = m
            .tool_calls
            .iter()
            .enumerate()
            .map(|(i, c)| tool_call_json(c, &call_id(i)))
            .collect();
    }
    v
}
