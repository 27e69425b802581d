//! `gemma4 serve` end to end: the binary on an ephemeral port, spoken to over plain HTTP.
//! Answers are held to the library run in-process on the same prompt (greedy tokens
//! through the same output parser), streamed answers to whole ones, and every error to
//! the OpenAI shape.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use gemma4::generate::sampling::SamplingParams;
use gemma4::generate::{generate_from, GenerateOptions};
use gemma4::prompt::output_parser::{parse_output, Markers};
use gemma4::{Gemma4, LoadOptions, Media, Prompt};
use serde_json::{json, Value};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gemma4"))
            .args([
                "--threads",
                "2",
                "serve",
                "--model",
                model.to_str().unwrap(),
                "--port",
                "0",
            ])
            .args(extra)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines.next().expect("the server exited").unwrap();
            if let Some(rest) = line.strip_prefix("listening on http://") {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        // Keep draining stderr so the server never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        let s = Server { child, addr };
        let t = Instant::now();
        while s.get("/health").0 != 200 {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "the model never loaded"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn request(&self, method: &str, path: &str, headers: &[&str], body: &[u8]) -> (u16, String) {
        let mut c = TcpStream::connect(&self.addr).unwrap();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        for h in headers {
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        c.write_all(req.as_bytes()).unwrap();
        // A refused body may close the connection before all of it is written.
        let _ = c.write_all(body);
        let mut raw = Vec::new();
        let _ = c.read_to_end(&mut raw);
        parse_response(&raw)
    }

    fn get(&self, path: &str) -> (u16, String) {
        self.request("GET", path, &[], b"")
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, text) = self.request("POST", path, &[], body.to_string().as_bytes());
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// A streamed answer's events (the `data:` payloads; `[DONE]` as a string).
    fn stream(&self, path: &str, body: &Value) -> (u16, Vec<Value>) {
        let (status, text) = self.request("POST", path, &[], body.to_string().as_bytes());
        let events = text
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .map(|d| serde_json::from_str(d).unwrap_or(Value::String(d.to_string())))
            .collect();
        (status, events)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Status and body of an HTTP/1.1 response (chunked bodies joined).
fn parse_response(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return (status, body.to_string());
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    (status, out)
}

/// What the library answers for `prompt` greedily: the parsed message's content and the
/// number of tokens.
fn library_answer(
    model: &Gemma4,
    prompt: &Prompt,
    media: &Media,
    n: usize,
) -> (String, usize, Vec<u32>) {
    let input = model.prepare(prompt, media).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: n,
        sampling: SamplingParams::greedy(),
        // The server's: the checkpoint's EOS ids and <eos>, <turn|>, <|tool_response>.
        stop_ids: [model.stop_ids(), vec![1, 50, 106]].concat(),
        adapters: Default::default(),
        constraint: None,
        draft: None,
    };
    let out = generate_from(&model.text, &input, &opts, |_| Ok(())).unwrap();
    let tok = model.tokenizer().unwrap();
    let m = parse_output(
        tok,
        Markers::from_tokenizer(tok).unwrap(),
        &out.generated_ids,
    )
    .unwrap();
    (m.content, out.generated_ids.len(), out.generated_ids)
}

fn chat_body(text: &str, n: usize) -> Value {
    json!({"model": "text_only", "messages": [{"role": "user", "content": text}], "max_tokens": n, "temperature": 0})
}

/// Content, finish reason and usage of a streamed chat answer, checking its shape.
fn streamed(events: &[Value]) -> (String, String, Option<Value>) {
    assert_eq!(events.last(), Some(&json!("[DONE]")));
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let mut content = String::new();
    let mut finishes = Vec::new();
    let mut usage = None;
    for e in &events[..events.len() - 1] {
        if let Some(u) = e.get("usage") {
            assert_eq!(e["choices"], json!([]));
            usage = Some(u.clone());
            continue;
        }
        let c = &e["choices"][0];
        if let Some(t) = c["delta"]["content"].as_str() {
            content.push_str(t);
        }
        if let Some(f) = c["finish_reason"].as_str() {
            finishes.push(f.to_string());
        }
    }
    assert_eq!(finishes.len(), 1, "exactly one chunk has a finish_reason");
    (content, finishes.remove(0), usage)
}

#[test]
fn chat_answers_equal_the_library_streamed_or_whole() {
    let dir = fixture("text_only");
    let s = Server::start(&dir, &[]);
    let model = Gemma4::load(&dir, LoadOptions::default()).unwrap();
    let (status, models) = s.post("/v1/models", &json!({}));
    assert_eq!(status, 405, "{models}");
    let (status, models) = s.get("/v1/models");
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["id"], "text_only");
    for (text, n) in [("Hello there", 12), ("What is 2+2?", 5)] {
        let want = library_answer(
            &model,
            &Prompt::Chat(vec![gemma4::prompt::chat::Message::new("user", text)]),
            &Media::default(),
            n,
        );
        let (status, whole) = s.post("/v1/chat/completions", &chat_body(text, n));
        assert_eq!(status, 200, "{whole}");
        let choice = &whole["choices"][0];
        assert_eq!(choice["message"]["content"], want.0.as_str(), "{whole}");
        assert_eq!(whole["usage"]["completion_tokens"], want.1);
        let finish = if want.1 == n { "length" } else { "stop" };
        assert_eq!(choice["finish_reason"], finish);
        assert!(whole["id"].as_str().unwrap().starts_with("chatcmpl-"));
        let mut body = chat_body(text, n);
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let (status, events) = s.stream("/v1/chat/completions", &body);
        assert_eq!(status, 200);
        let (content, f, usage) = streamed(&events);
        assert_eq!(content, want.0);
        assert_eq!(f, finish);
        assert_eq!(usage.unwrap(), whole["usage"]);
    }
    // `stream_options` without `stream` is refused; so is more than one choice.
    let mut body = chat_body("Hi", 2);
    body["stream_options"] = json!({"include_usage": true});
    let (status, e) = s.post("/v1/chat/completions", &body);
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (400, Some("stream_options"))
    );
    let mut body = chat_body("Hi", 2);
    body["n"] = json!(2);
    let (status, e) = s.post("/v1/chat/completions", &body);
    assert_eq!((status, e["error"]["param"].as_str()), (400, Some("n")));
    // Text completions on token ids equal the library too.
    let ids = model.prompt_ids(&Prompt::Text("Once upon".into())).unwrap();
    let input = model
        .prepare(&Prompt::Ids(ids.clone()), &Media::default())
        .unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 6,
        sampling: SamplingParams::greedy(),
        stop_ids: model.stop_ids(),
        adapters: Default::default(),
        constraint: None,
        draft: None,
    };
    let out = generate_from(&model.text, &input, &opts, |_| Ok(())).unwrap();
    let text = model
        .tokenizer()
        .unwrap()
        .decode(&out.generated_ids, true)
        .unwrap();
    let (status, c) = s.post(
        "/v1/completions",
        &json!({"prompt": ids, "max_tokens": 6, "temperature": 0, "logprobs": 2}),
    );
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["choices"][0]["text"], text.as_str());
    assert_eq!(c["object"], "text_completion");
}

#[test]
fn stop_strings_end_the_answer_and_are_not_returned() {
    let dir = fixture("text_only");
    let s = Server::start(&dir, &[]);
    // The greedy answer without a stop string, then cut by a piece of its own middle.
    let (_, whole) = s.post("/v1/chat/completions", &chat_body("Tell me a story", 24));
    let content = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let chars: Vec<char> = content.chars().collect();
    assert!(
        chars.len() >= 6,
        "the answer is too short to cut: {content:?}"
    );
    let stop: String = chars[3..5].iter().collect();
    let before = &content[..content.find(&stop).unwrap()];
    for stream in [false, true] {
        let mut body = chat_body("Tell me a story", 24);
        body["stop"] = json!([stop, "never appears"]);
        body["stream"] = json!(stream);
        let (got, finish) = if stream {
            let (_, events) = s.stream("/v1/chat/completions", &body);
            let (c, f, _) = streamed(&events);
            (c, f)
        } else {
            let (_, v) = s.post("/v1/chat/completions", &body);
            let c = &v["choices"][0];
            (
                c["message"]["content"].as_str().unwrap().to_string(),
                c["finish_reason"].as_str().unwrap().to_string(),
            )
        };
        assert_eq!(got, before, "stream {stream}");
        assert_eq!(finish, "stop");
    }
}

#[test]
fn errors_have_the_openai_shape_and_the_key_guards_all_but_health() {
    let dir = fixture("text_only");
    let s = Server::start(&dir, &["--api-key", "sekrit", "--max-body-mb", "1"]);
    let auth = ["Authorization: Bearer sekrit"];
    assert_eq!(s.get("/health").0, 200);
    let (status, body) = s.get("/v1/models");
    assert_eq!(status, 401);
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["error"]["type"], "authentication_error");
    let (status, _) = s.request("GET", "/v1/models", &["Authorization: Bearer wrong"], b"");
    assert_eq!(status, 401);
    assert_eq!(s.request("GET", "/v1/models", &auth, b"").0, 200);
    let post = |body: &[u8]| {
        let (status, text) = s.request("POST", "/v1/chat/completions", &auth, body);
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{status}: {text}"));
        assert!(
            v["error"]["message"].is_string() && v["error"]["type"].is_string(),
            "{v}"
        );
        (status, v)
    };
    assert_eq!(post(b"{not json").0, 400);
    let (status, v) = post(
        json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    let big = vec![b' '; 2 << 20];
    assert_eq!(post(&big).0, 413);
    let image = |url: &str| {
        json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": url}}
        ]}]})
        .to_string()
    };
    let (status, v) = post(image("data:image/png;base64,@@@").as_bytes());
    assert_eq!(status, 400);
    assert_eq!(v["error"]["param"], "messages[0].content[1].image_url");
    let (status, v) = post(image("https://example.com/cat.png").as_bytes());
    assert_eq!(status, 400);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("data: URI"),
        "{v}"
    );
    let (status, v) = post(image("/etc/passwd").as_bytes());
    assert_eq!(status, 400);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--allow-local-media"),
        "{v}"
    );
    let png = base64::engine::general_purpose::STANDARD.encode(b"\x89PNG\r\n\x1a\nnot really");
    let (status, v) = post(image(&format!("data:image/png;base64,{png}")).as_bytes());
    assert_eq!(status, 400, "{v}");
    let (status, v) = post(
        json!({"messages": [{"role": "wizard", "content": "x"}]})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(
        (status, v["error"]["param"].as_str()),
        (400, Some("messages[0].role"))
    );
    let long = "word ".repeat(400);
    let (status, v) = post(
        json!({"messages": [{"role": "user", "content": long}]})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("context_length_exceeded")),
        "{v}"
    );
    let (status, _) = s.request("GET", "/no/such/thing", &auth, b"");
    assert_eq!(status, 404);
}

#[test]
fn concurrent_streams_equal_their_solo_answers_and_a_dropped_stream_frees_its_slot() {
    let dir = fixture("text_only");
    let s = Server::start(&dir, &["--parallel", "2", "--max-queue", "8"]);
    let prompts = ["one fish", "two fish", "red fish", "blue fish"];
    let solo: Vec<Value> = prompts
        .iter()
        .map(|p| s.post("/v1/chat/completions", &chat_body(p, 10)).1)
        .collect();
    let answers: Vec<(String, String)> = std::thread::scope(|sc| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                let s = &s;
                sc.spawn(move || {
                    let mut body = chat_body(p, 10);
                    body["stream"] = json!(true);
                    let (_, events) = s.stream("/v1/chat/completions", &body);
                    let (c, f, _) = streamed(&events);
                    (c, f)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (a, w) in answers.iter().zip(&solo) {
        assert_eq!(a.0, w["choices"][0]["message"]["content"].as_str().unwrap());
        assert_eq!(a.1, w["choices"][0]["finish_reason"].as_str().unwrap());
    }
    // A long stream dropped after its first event: the engine lets the sequence go.
    let mut c = TcpStream::connect(&s.addr).unwrap();
    let mut body = chat_body("go on forever", 100_000);
    body["stream"] = json!(true);
    let body = body.to_string();
    write!(
        c,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 64];
    c.read_exact(&mut first).unwrap();
    drop(c);
    let t = Instant::now();
    loop {
        let (_, m) = s.get("/metrics");
        if m.lines().any(|l| l == "gemma4_running_sequences 0") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the dropped stream kept running:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, _) = s.post("/v1/chat/completions", &chat_body("still here?", 2));
    assert_eq!(status, 200);
}

/// A copy of fixture `name` whose template writes image and audio parts as their markers
/// (the fixtures' own take strings only).
fn with_parts_template(name: &str) -> PathBuf {
    let src = fixture(name);
    let dir = std::env::temp_dir().join(format!("gemma4-serve-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
    }
    std::fs::write(
        dir.join("chat_template.jinja"),
        "{{ bos_token }}{% for m in messages %}<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n\
         {% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}\
         {% if p['type'] == 'image' %}<|image|>{% elif p['type'] == 'audio' %}<|audio|>\
         {% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}\
         <turn|>\n{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}",
    )
    .unwrap();
    dir
}

#[test]
fn an_image_in_a_data_uri_is_what_the_library_sees() {
    let dir = with_parts_template("vision_small");
    let png = std::fs::read(fixture("images").join("landscape.png")).unwrap();
    let url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&png)
    );
    let model = Gemma4::load(&dir, LoadOptions::default()).unwrap();
    let media = Media {
        images: vec![model
            .load_image(&fixture("images").join("landscape.png"))
            .unwrap()],
        ..Default::default()
    };
    let want = library_answer(
        &model,
        &Prompt::Rendered(
            "<bos><|turn>user\n<|image|>Describe this.<turn|>\n<|turn>model\n".into(),
        ),
        &media,
        6,
    );
    let s = Server::start(&dir, &[]);
    let (status, v) = s.post(
        "/v1/chat/completions",
        &json!({"max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "Describe this."}
        ]}]}),
    );
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], want.0.as_str());
    assert_eq!(v["usage"]["completion_tokens"], want.1);
}

#[test]
fn the_next_turn_of_a_conversation_comes_from_the_prefix_cache() {
    let dir = fixture("text_only");
    let s = Server::start(&dir, &[]);
    let model = Gemma4::load(&dir, LoadOptions::default()).unwrap();
    let metric = |name: &str| -> f64 {
        let (_, m) = s.get("/metrics");
        m.lines()
            .find_map(|l| l.strip_prefix(&format!("gemma4_{name} ")))
            .unwrap()
            .parse()
            .unwrap()
    };
    let mut messages = vec![json!({"role": "user", "content": "Hello there"})];
    let (_, a1) = s.post(
        "/v1/chat/completions",
        &json!({"messages": messages, "max_tokens": 5, "temperature": 0}),
    );
    let answer = a1["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(metric("prefix_cache_hits_total"), 0.0);
    messages.push(json!({"role": "assistant", "content": answer}));
    messages.push(json!({"role": "user", "content": "And then?"}));
    let (_, a2) = s.post(
        "/v1/chat/completions",
        &json!({"messages": messages, "max_tokens": 5, "temperature": 0}),
    );
    assert_eq!(metric("prefix_cache_hits_total"), 1.0);
    assert!(metric("prefix_cache_tokens_total") >= 10.0);
    // The same answer as a fresh prefill.
    let rendered = model
        .chat_template
        .render_json(&Value::Array(messages), None, true, &Default::default())
        .unwrap();
    let want = library_answer(&model, &Prompt::Rendered(rendered), &Media::default(), 5);
    assert_eq!(a2["choices"][0]["message"]["content"], want.0.as_str());
}

/// The `chat_tools` fixture's goldens.
fn tools_golden() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixture("chat_tools").join("golden/chat.json")).unwrap(),
    )
    .unwrap()
}

fn weather_tool() -> Value {
    tools_golden()["cases"][0]["tools"].clone()
}

#[test]
fn a_tool_call_round_trip_on_a_trained_model() {
    let s = Server::start(&fixture("chat_tools"), &[]);
    let golden = tools_golden();
    let ask = json!({"role": "user", "content": "Weather in Paris?"});
    // Thinking on: a thought, then a call; the model stops to wait for the result.
    let body = json!({"messages": [ask], "tools": weather_tool(), "temperature": 0,
                      "chat_template_kwargs": {"enable_thinking": true}});
    let (status, v) = s.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls");
    assert_eq!(c["message"]["content"], Value::Null);
    assert_eq!(
        c["message"]["reasoning_content"],
        "I need the weather tool."
    );
    let call = &c["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris"}));
    // The same streamed: reasoning deltas, one tool-call delta with index, id and name.
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let (_, events) = s.stream("/v1/chat/completions", &sbody);
    let mut reasoning = String::new();
    let mut calls = Vec::new();
    let mut finish = Vec::new();
    for e in &events[..events.len() - 1] {
        let c = &e["choices"][0];
        reasoning.push_str(c["delta"]["reasoning_content"].as_str().unwrap_or(""));
        assert!(
            c["delta"]["content"].as_str().unwrap_or("").is_empty(),
            "{e}"
        );
        if let Some(tc) = c["delta"]["tool_calls"].as_array() {
            calls.extend(tc.iter().cloned());
        }
        if let Some(f) = c["finish_reason"].as_str() {
            finish.push(f.to_string());
        }
    }
    assert_eq!(reasoning, "I need the weather tool.");
    // OpenAI's shape: the call's first delta has its index, id, type and name with empty
    // arguments; the arguments follow in a delta with the index only.
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0]["index"], 0);
    assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    assert_eq!(calls[0]["function"]["arguments"], "");
    assert_eq!(calls[1]["index"], 0);
    assert!(calls[1].get("id").is_none() && calls[1]["function"].get("name").is_none());
    let streamed_args: Value =
        serde_json::from_str(calls[1]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(streamed_args, json!({"city": "Paris"}));
    assert_eq!(finish, ["tool_calls"]);
    // The client runs the tool and sends the result back, arguments as a JSON string as
    // the API has them: the prompt is the reference's, and so is the answer.
    let messages = json!([
        ask,
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
    ]);
    let (_, t) = s.post(
        "/tokenize",
        &json!({"messages": messages, "tools": weather_tool()}),
    );
    assert_eq!(t["tokens"], golden["cases"][1]["prompt_ids"]);
    let (_, v) = s.post(
        "/v1/chat/completions",
        &json!({"messages": messages, "tools": weather_tool(), "temperature": 0}),
    );
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "It is sunny in Paris."
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // Two calls in a row; one only when parallel calls are off.
    let two = json!({"messages": [{"role": "user", "content": "Weather in Paris and Rome?"}],
                     "tools": weather_tool(), "temperature": 0});
    let (_, v) = s.post("/v1/chat/completions", &two);
    let cities: Vec<Value> = v["choices"][0]["message"]["tool_calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| serde_json::from_str(c["function"]["arguments"].as_str().unwrap()).unwrap())
        .collect();
    assert_eq!(cities, [json!({"city": "Paris"}), json!({"city": "Rome"})]);
    let mut one = two.clone();
    one["parallel_tool_calls"] = json!(false);
    let (_, v) = s.post("/v1/chat/completions", &one);
    assert_eq!(
        v["choices"][0]["message"]["tool_calls"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // Thinking without tools: the thought apart from the answer.
    let (_, v) = s.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "What is 2+2?"}], "temperature": 0,
                "chat_template_kwargs": {"enable_thinking": true}}),
    );
    assert_eq!(v["choices"][0]["message"]["content"], "The answer is 4.");
    assert_eq!(
        v["choices"][0]["message"]["reasoning_content"],
        "Two plus two."
    );
    // `tool_choice: none` leaves the tools out of the prompt.
    let (_, with) = s.post(
        "/tokenize",
        &json!({"messages": [{"role": "user", "content": "x"}], "tools": weather_tool()}),
    );
    let (_, without) = s.post(
        "/tokenize",
        &json!({"messages": [{"role": "user", "content": "x"}], "tools": weather_tool(), "tool_choice": "none"}),
    );
    assert!(with["count"].as_u64() > without["count"].as_u64());
}

#[test]
fn an_audio_clip_in_input_audio_is_what_the_library_sees() {
    let dir = with_parts_template("audio_small");
    let wav = fixture("audio").join("hello_16k.wav");
    let data = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&wav).unwrap());
    let model = Gemma4::load(&dir, LoadOptions::default()).unwrap();
    let media = Media {
        audio: vec![model.load_audio(&wav).unwrap()],
        ..Default::default()
    };
    let want = library_answer(
        &model,
        &Prompt::Rendered("<bos><|turn>user\n<|audio|>Transcribe.<turn|>\n<|turn>model\n".into()),
        &media,
        6,
    );
    let s = Server::start(&dir, &[]);
    let (status, v) = s.post(
        "/v1/chat/completions",
        &json!({"max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
            {"type": "text", "text": "Transcribe."}
        ]}]}),
    );
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], want.0.as_str());
    assert_eq!(
        v["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        model
            .prepare(
                &Prompt::Rendered(
                    "<bos><|turn>user\n<|audio|>Transcribe.<turn|>\n<|turn>model\n".into()
                ),
                &media
            )
            .unwrap()
            .ids
            .len()
    );
}

#[test]
fn response_format_holds_the_answer_to_its_schema_after_a_free_thought() {
    let s = Server::start(&fixture("chat_tools"), &[]);
    let schema = json!({"type": "object", "properties": {"answer": {"type": "integer"}},
                        "required": ["answer"], "additionalProperties": false});
    let format = json!({"type": "json_schema", "json_schema": {"name": "sum", "schema": schema}});
    // The trained model thinks first ("Two plus two."), then answers under the schema.
    let body = json!({"messages": [{"role": "user", "content": "What is 2+2?"}], "temperature": 0,
                      "chat_template_kwargs": {"enable_thinking": true}, "response_format": format});
    let (status, v) = s.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    let m = &v["choices"][0]["message"];
    assert_eq!(m["reasoning_content"], "Two plus two.");
    let answer: Value = serde_json::from_str(m["content"].as_str().unwrap()).unwrap();
    assert!(answer["answer"].is_i64(), "{answer}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // Streamed: the same content.
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let (status, events) = s.stream("/v1/chat/completions", &sbody);
    assert_eq!(status, 200);
    assert_eq!(streamed(&events).0, m["content"].as_str().unwrap());
    // json_object through the completions endpoint: the text opens an object, and when
    // the answer ended by itself it is one.
    let (status, v) = s.post(
        "/v1/completions",
        &json!({"prompt": "Any JSON:", "max_tokens": 40, "temperature": 0,
                "response_format": {"type": "json_object"}}),
    );
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert!(text.starts_with('{'), "{text}");
    if v["choices"][0]["finish_reason"] == "stop" {
        assert!(serde_json::from_str::<Value>(text).unwrap().is_object());
    }
    // Bad formats are 400s naming the field.
    for (format, param) in [
        (json!({"type": "xml"}), "response_format"),
        (
            json!({"type": "json_schema"}),
            "response_format.json_schema",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"schema": [1]}}),
            "response_format.json_schema.schema",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"schema": {"type": "frobnicate"}}}),
            "response_format",
        ),
    ] {
        let (status, v) = s.post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hi"}], "response_format": format}),
        );
        assert_eq!(status, 400, "{format}: {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
}

#[test]
fn idle_connections_and_stalled_bodies_are_closed() {
    let s = Server::start(&fixture("text_only"), &["--idle-timeout", "1"]);
    let closes_within = |c: &mut TcpStream, secs: u64| -> Vec<u8> {
        c.set_read_timeout(Some(Duration::from_secs(secs))).unwrap();
        let mut raw = Vec::new();
        // EOF (the server closed it) ends the read; a timeout would be an error.
        c.read_to_end(&mut raw)
            .expect("the server kept the connection open");
        raw
    };
    // A connection that never sends a request.
    let t = Instant::now();
    let mut c = TcpStream::connect(&s.addr).unwrap();
    closes_within(&mut c, 10);
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    // Headers begun and never finished.
    let mut c = TcpStream::connect(&s.addr).unwrap();
    c.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    closes_within(&mut c, 10);
    // A body that stops halfway: a 400 naming the pause, then the connection closes.
    let mut c = TcpStream::connect(&s.addr).unwrap();
    c.write_all(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\":",
    )
    .unwrap();
    let (status, body) = parse_response(&closes_within(&mut c, 10));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("--idle-timeout"), "{body}");
    // A kept-alive connection, idle after its answer.
    let mut c = TcpStream::connect(&s.addr).unwrap();
    c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let raw = closes_within(&mut c, 10);
    assert!(String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 200"));
    // The server still answers.
    assert_eq!(s.get("/health").0, 200);
}

/// A JSON array of ids.
fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

/// The `lora` fixtures' goldens: prompt ids and peft's greedy ids.
fn lora_case(case: &str, k: usize) -> (Vec<u64>, Vec<u64>) {
    let g: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("lora").join(case).join("golden/prompts.json")).unwrap(),
    )
    .unwrap();
    (
        ids(&g["cases"][k]["prompt_ids"]),
        ids(&g["cases"][k]["greedy_ids"]),
    )
}

#[test]
fn a_request_picks_a_lora_adapter_by_name_and_gets_pefts_answer() {
    let lora = fixture("lora").join("e2b_all_linear");
    let s = Server::start(
        &fixture("e2b_like"),
        &[
            "--dtype",
            "f32",
            "--lora",
            lora.to_str().unwrap(),
            "--parallel",
            "4",
        ],
    );
    // The adapter is a model of its own, its parent the served one.
    let (status, models) = s.get("/v1/models");
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    let names: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["e2b_like", "e2b_all_linear"]);
    assert_eq!(models["data"][1]["parent"], "e2b_like");

    let body = |model: &str, prompt: &[u64], n: usize| {
        json!({"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0,
               "ignore_eos": true, "return_token_ids": true})
    };
    let token_ids = |v: &Value| ids(&v["choices"][0]["token_ids"]);
    // Base and adapter requests at once: they never share a step, and each gets the
    // reference's greedy ids (peft's with the adapter, transformers' without).
    let cases: Vec<(String, Vec<u64>, Vec<u64>)> = (0..3)
        .flat_map(|k| {
            let (p, want) = lora_case("e2b_all_linear", k);
            let g: Value = serde_json::from_str(
                &std::fs::read_to_string(fixture("e2b_like").join("golden/prompts.json")).unwrap(),
            )
            .unwrap();
            let base = ids(&g["cases"][k]["greedy_ids"]);
            let n = want.len();
            [
                ("e2b_all_linear".to_string(), p.clone(), want),
                ("e2b_like".to_string(), p, base[..n].to_vec()),
            ]
        })
        .collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = cases
            .iter()
            .map(|(model, prompt, want)| {
                let s = &s;
                scope.spawn(move || {
                    let (status, v) = s.post("/v1/completions", &body(model, prompt, want.len()));
                    assert_eq!(status, 200, "{v}");
                    assert_eq!(v["model"], model.as_str());
                    assert_eq!(&token_ids(&v), want, "{model}: greedy ids");
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });
    // An unknown name lists what is served.
    let (status, err) = s.post("/v1/completions", &body("other", &[2], 1));
    assert_eq!(status, 404);
    let msg = err["error"]["message"].as_str().unwrap();
    assert!(msg.contains("`e2b_like`, `e2b_all_linear`"), "{msg}");
}

/// Status, lower-cased head and body of a GET with `headers`.
fn get_raw(s: &Server, path: &str, headers: &[&str]) -> (u16, String, String) {
    let mut c = TcpStream::connect(&s.addr).unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    c.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = c.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, _) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let (status, body) = parse_response(&raw);
    (status, head.to_ascii_lowercase(), body)
}

#[test]
fn the_chat_page_and_its_assets_need_no_key_while_the_api_does() {
    let s = Server::start(&fixture("text_only"), &["--api-key", "k1"]);
    let (status, head, page) = get_raw(&s, "/", &[]);
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/html"), "{head}");
    // Scripts only from the server itself: a model's answer can never run in the page.
    assert!(
        head.contains("content-security-policy: default-src 'none'; script-src 'self';"),
        "{head}"
    );
    // Every asset the page and its script name is served, with its type, and offline:
    // nothing is loaded from another host.
    let app = get_raw(&s, "/assets/app.js", &[]).2;
    let mut assets: Vec<String> = Vec::new();
    for text in [&page, &app] {
        for piece in text.split(['"', '\'']) {
            if piece.starts_with("/assets/") {
                assets.push(piece.to_string());
            }
        }
        assert!(!text.contains("http://") && !text.contains("https://"));
    }
    assets.sort();
    assets.dedup();
    assert!(assets.len() >= 5, "{assets:?}");
    for a in &assets {
        let (status, head, body) = get_raw(&s, a, &[]);
        let want = match a.rsplit('.').next().unwrap() {
            "js" => "text/javascript",
            "css" => "text/css",
            "svg" => "image/svg+xml",
            other => panic!("an asset of unknown type: {other}"),
        };
        assert_eq!(status, 200, "{a}");
        assert!(
            head.contains(&format!("content-type: {want}")),
            "{a}: {head}"
        );
        assert!(!body.is_empty(), "{a}");
    }
    // The API keeps its key; /auth tells the page whether it has the right one.
    assert_eq!(s.get("/v1/models").0, 401);
    let auth = |h: &[&str]| -> Value { serde_json::from_str(&get_raw(&s, "/auth", h).2).unwrap() };
    assert_eq!(auth(&[]), json!({"key_required": true, "key_valid": false}));
    assert_eq!(
        auth(&["Authorization: Bearer k2"]),
        json!({"key_required": true, "key_valid": false})
    );
    assert_eq!(
        auth(&["Authorization: Bearer k1"]),
        json!({"key_required": true, "key_valid": true})
    );
    let (status, _, models) = get_raw(&s, "/v1/models", &["Authorization: Bearer k1"]);
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(
        models["data"][0]["capabilities"],
        json!({"vision": false, "audio": false})
    );
    drop(s);
    let s = Server::start(&fixture("text_only"), &["--no-webui"]);
    assert_eq!(s.get("/").0, 404);
    assert_eq!(s.get("/assets/app.js").0, 404);
    assert_eq!(s.get("/v1/models").0, 200);
}

#[test]
fn tokenize_expands_media_to_the_soft_tokens_the_model_sees() {
    let dir = with_parts_template("audio_small");
    let wav = fixture("audio").join("hello_16k.wav");
    let png = fixture("images").join("landscape.png");
    let b64 =
        |p: &Path| base64::engine::general_purpose::STANDARD.encode(std::fs::read(p).unwrap());
    let model = Gemma4::load(&dir, LoadOptions::default()).unwrap();
    let media = Media {
        images: vec![model.load_image(&png).unwrap()],
        audio: vec![model.load_audio(&wav).unwrap()],
        ..Default::default()
    };
    let want = model
        .prepare(
            &Prompt::Rendered(
                "<bos><|turn>user\n<|image|><|audio|>What is this?<turn|>\n<|turn>model\n".into(),
            ),
            &media,
        )
        .unwrap()
        .ids;
    let image_tokens = model.process_images(&media.images).unwrap()[0].num_soft_tokens;
    let audio_tokens = model.process_audio(&media.audio).unwrap()[0].num_soft_tokens;
    let s = Server::start(&dir, &[]);
    let (status, v) = s.post(
        "/tokenize",
        &json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", b64(&png))}},
            {"type": "input_audio", "input_audio": {"data": b64(&wav), "format": "wav"}},
            {"type": "text", "text": "What is this?"}
        ]}]}),
    );
    let models: Value = serde_json::from_str(&s.get("/v1/models").1).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(status, 200, "{v}");
    let ids: Vec<u32> = serde_json::from_value(v["tokens"].clone()).unwrap();
    assert_eq!(ids, want);
    assert_eq!(v["count"], want.len());
    assert_eq!(v["image_tokens"], json!([image_tokens]));
    assert_eq!(v["audio_tokens"], json!([audio_tokens]));
    assert!(image_tokens > 1 && audio_tokens > 1);
    assert_eq!(
        models["data"][0]["capabilities"],
        json!({"vision": true, "audio": true})
    );
}

/// `serve --draft`: concurrent requests draft inside the batched steps and get the
/// reference's greedy ids (streamed token by token, several per step), a request may
/// change or turn off drafting, `/metrics` counts drafts, and a server without a drafter
/// refuses `draft_tokens`.
#[test]
fn the_server_drafts_inside_continuous_batching() {
    let trace: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("drafters/e2b_like/golden/trace.json")).unwrap(),
    )
    .unwrap();
    let drafter = fixture("drafters/e2b_like");
    let s = Server::start(
        &fixture("e2b_like"),
        &[
            "--dtype",
            "f32",
            "--draft",
            drafter.to_str().unwrap(),
            "--parallel",
            "4",
        ],
    );
    let body = |prompt: &[u64], n: usize, extra: Value| {
        let mut b = json!({"prompt": prompt, "max_tokens": n, "temperature": 0,
                           "ignore_eos": true, "return_token_ids": true});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b
    };
    let cases: Vec<(Vec<u64>, Vec<u64>, Value)> = trace["cases"]
        .as_array()
        .unwrap()
        .iter()
        .zip([
            json!({}),
            json!({"draft_tokens": 2}),
            json!({"draft_tokens": 0}),
        ])
        .map(|(c, extra)| (ids(&c["prompt_ids"]), ids(&c["greedy_ids"]), extra))
        .collect();
    std::thread::scope(|scope| {
        for (prompt, want, extra) in &cases {
            let s = &s;
            scope.spawn(move || {
                let (status, v) =
                    s.post("/v1/completions", &body(prompt, want.len(), extra.clone()));
                assert_eq!(status, 200, "{v}");
                assert_eq!(&ids(&v["choices"][0]["token_ids"]), want, "{extra}");
                // Streamed: the same text.
                let mut b = body(prompt, want.len(), extra.clone());
                b["stream"] = json!(true);
                let (status, events) = s.stream("/v1/completions", &b);
                assert_eq!(status, 200);
                let streamed: String = events
                    .iter()
                    .filter_map(|e| e["choices"][0]["text"].as_str())
                    .collect();
                assert_eq!(streamed, v["choices"][0]["text"].as_str().unwrap());
            });
        }
    });
    let (_, m) = s.get("/metrics");
    let metric = |name: &str| -> f64 {
        m.lines()
            .find_map(|l| l.strip_prefix(&format!("gemma4_{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {m}"))
            .parse()
            .unwrap()
    };
    assert!(metric("draft_tokens_total") > 0.0);
    assert!(metric("draft_accepted_tokens_total") > 0.0);
    let rate = metric("draft_acceptance_rate");
    assert!(rate > 0.0 && rate <= 1.0);
    assert!(metric("draft_mean_accepted_length") > 0.0);
    let (status, err) = s.post(
        "/v1/completions",
        &body(&[2], 3, json!({"draft_tokens": 65})),
    );
    assert_eq!(status, 400, "{err}");
    drop(s);

    let plain = Server::start(&fixture("e2b_like"), &[]);
    let (status, err) = plain.post(
        "/v1/completions",
        &body(&[2], 3, json!({"draft_tokens": 3})),
    );
    assert_eq!(status, 400);
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--draft"),
        "{err}"
    );
    let (status, _) = plain.post(
        "/v1/completions",
        &body(&[2], 3, json!({"draft_tokens": 0})),
    );
    assert_eq!(status, 200);
}
