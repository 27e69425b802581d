"""`gemma4 serve` spoken to by the official `openai` Python SDK (pinned in .ci/run).

    python scripts/openai_conformance.py PATH/TO/gemma4 tests/fixtures/text_only [tests/fixtures/chat_tools]

Starts the server on a free port with an API key, then checks what SDK users rely on:
streamed output equals whole output at temperature 0, `include_usage` (and its 400
without `stream`), `finish_reason: length`, stop strings left out of the text, log
probabilities, the error classes the SDK raises for 400/401/404/413, four concurrent
streams equal to their solo answers, and a stream closed early freeing its sequence. With
the trained `chat_tools` fixture, a tool-call round trip: the call as the SDK parses it,
the result sent back, the prompt ids equal to the reference's rendering of the same
messages, and the model's answer; and a pydantic model as `response_format`, parsed by
the SDK. Exits non-zero on the first failure.
"""

import json
import subprocess
import sys
import threading
import time
import urllib.request

import openai

KEY = "conformance-key"


def start(binary, model):
    proc = subprocess.Popen(
        [binary, "--threads", "2", "serve", "--model", model, "--port", "0",
         "--api-key", KEY, "--max-body-mb", "1", "--parallel", "2"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    addr = None
    for line in proc.stderr:
        if line.startswith("listening on http://"):
            addr = line.split()[2]
            break
    if addr is None:
        raise SystemExit("the server did not start")
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{addr}/health") as r:
                if r.status == 200:
                    return proc, addr
        except Exception:
            pass
        if time.time() > deadline:
            raise SystemExit("the model never loaded")
        time.sleep(0.05)


def metric(addr, name):
    req = urllib.request.Request(f"{addr}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(f"gemma4_{name} "):
                return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok  {what}")


def main():
    binary, model = sys.argv[1], sys.argv[2]
    proc, addr = start(binary, model)
    try:
        run(addr)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    if len(sys.argv) > 3:
        proc, addr = start(binary, sys.argv[3])
        try:
            tools(addr, sys.argv[3])
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print("all conformance checks passed")


def tools(addr, model_dir):
    with open(f"{model_dir}/golden/chat.json") as f:
        golden = json.load(f)["cases"]
    client = openai.OpenAI(base_url=f"{addr}/v1", api_key=KEY, max_retries=0)
    name = client.models.list().data[0].id
    weather = golden[0]["tools"]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.chat.completions.create(model=name, messages=messages, tools=weather, temperature=0,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    msg = r.choices[0].message
    call = msg.tool_calls[0]
    check(r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
          and json.loads(call.function.arguments) == {"city": "Paris"},
          "a tool call, as the SDK parses it")
    check(getattr(msg, "reasoning_content", None) == "I need the weather tool.",
          "reasoning_content beside the call")
    # Streamed, accumulated as client code does: name and id from the first delta of an
    # index, arguments concatenated.
    acc = {}
    for chunk in client.chat.completions.create(
            model=name, messages=messages, tools=weather, temperature=0, stream=True,
            extra_body={"chat_template_kwargs": {"enable_thinking": True}}):
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            a = acc.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            a["id"] = a["id"] or tc.id
            a["name"] = a["name"] or (tc.function.name if tc.function else None)
            a["arguments"] += (tc.function.arguments or "") if tc.function else ""
    check(list(acc) == [0] and acc[0]["name"] == "get_weather" and acc[0]["id"]
          and json.loads(acc[0]["arguments"]) == {"city": "Paris"},
          "a streamed tool call, accumulated from its deltas")
    messages.append({"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": call.function.name, "arguments": call.function.arguments}}]})
    messages.append({"role": "tool", "tool_call_id": "call_1", "content": "sunny"})
    req = urllib.request.Request(f"{addr}/tokenize", method="POST",
                                 data=json.dumps({"messages": messages, "tools": weather}).encode(),
                                 headers={"Authorization": f"Bearer {KEY}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req) as resp:
        ids = json.loads(resp.read())["tokens"]
    check(ids == golden[1]["prompt_ids"], "the round trip's prompt ids are the reference's")
    r = client.chat.completions.create(model=name, messages=messages, tools=weather, temperature=0)
    check(r.choices[0].message.content == "It is sunny in Paris."
          and r.choices[0].finish_reason == "stop", "the answer after the tool's result")
    # Structured outputs as the SDK does them: a pydantic model becomes a strict
    # json_schema response_format and the answer is parsed back into it; the thought
    # before it runs free.
    import pydantic

    class Sum(pydantic.BaseModel):
        answer: int

    r = client.chat.completions.parse(model=name, messages=[{"role": "user", "content": "What is 2+2?"}],
                                      response_format=Sum, temperature=0,
                                      extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    msg = r.choices[0].message
    check(isinstance(msg.parsed, Sum) and getattr(msg, "reasoning_content", None) == "Two plus two.",
          "a pydantic response_format, parsed by the SDK after a free thought")


def run(addr):
    client = openai.OpenAI(base_url=f"{addr}/v1", api_key=KEY, max_retries=0)
    name = client.models.list().data[0].id
    check(name, f"models.list names the model ({name})")

    def msgs(text):
        return [{"role": "user", "content": text}]

    def whole(text, **kw):
        return client.chat.completions.create(model=name, messages=msgs(text), temperature=0, **kw)

    def streamed(text, **kw):
        content, finish, usage, chunks = "", [], None, 0
        for c in client.chat.completions.create(model=name, messages=msgs(text), temperature=0,
                                                stream=True, **kw):
            chunks += 1
            if c.usage is not None:
                usage = c.usage
            for ch in c.choices:
                content += ch.delta.content or ""
                if ch.finish_reason:
                    finish.append(ch.finish_reason)
        return content, finish, usage

    w = whole("Hello there", max_tokens=10)
    s = streamed("Hello there", max_tokens=10, stream_options={"include_usage": True})
    check(s[0] == w.choices[0].message.content, "streamed content equals whole content")
    check(s[1] == [w.choices[0].finish_reason], "one finish_reason, the same as whole")
    check(s[2] is not None and s[2].total_tokens == w.usage.total_tokens,
          "include_usage: the last chunk carries the usage")
    try:
        whole("Hi", max_tokens=2, stream_options={"include_usage": True})
        check(False, "stream_options without stream is refused")
    except openai.BadRequestError as e:
        check(e.status_code == 400, "stream_options without stream: 400")

    w = whole("Tell me more", max_tokens=3)
    check(w.choices[0].finish_reason == "length" and w.usage.completion_tokens == 3,
          "finish_reason length at max_tokens")

    long = whole("Tell me a story", max_tokens=24).choices[0].message.content
    if len(long) >= 6:
        stop = long[3:5]
        cut = whole("Tell me a story", max_tokens=24, stop=[stop])
        check(cut.choices[0].message.content == long[:long.find(stop)]
              and cut.choices[0].finish_reason == "stop", "stop strings are left out")
        cut = streamed("Tell me a story", max_tokens=24, stop=stop)
        check(cut[0] == long[:long.find(stop)], "stop strings are left out of streams")

    lp = whole("Hi", max_tokens=3, logprobs=True, top_logprobs=2)
    entries = lp.choices[0].logprobs.content or []
    check(all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries),
          "logprobs with top_logprobs parse")

    bad = openai.OpenAI(base_url=f"{addr}/v1", api_key="wrong", max_retries=0)
    try:
        bad.models.list()
        check(False, "a wrong key is refused")
    except openai.AuthenticationError as e:
        check(e.status_code == 401, "wrong key: 401 AuthenticationError")
    try:
        client.chat.completions.create(model="no-such-model", messages=msgs("x"))
        check(False, "an unknown model is refused")
    except openai.NotFoundError as e:
        check(e.status_code == 404, "unknown model: 404 NotFoundError")
    try:
        client.chat.completions.create(model=name, messages=msgs("x"), n=2)
        check(False, "n=2 is refused")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and "n" in str(e), "n=2: 400 BadRequestError")
    try:
        client.chat.completions.create(model=name, messages=msgs("x" * (2 << 20)))
        check(False, "a body over the limit is refused")
    except openai.APIStatusError as e:
        check(e.status_code == 413, "body over --max-body-mb: 413")

    prompts = ["one fish", "two fish", "red fish", "blue fish"]
    solo = [whole(p, max_tokens=10).choices[0].message.content for p in prompts]
    results = [None] * 4

    def go(i):
        results[i] = streamed(prompts[i], max_tokens=10)[0]

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    check(results == solo, "4 concurrent streams equal their solo answers")

    stream = client.chat.completions.create(model=name, messages=msgs("go on"), temperature=0,
                                            max_tokens=100000, stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.time() + 20
    while metric(addr, "running_sequences") != 0:
        if time.time() > deadline:
            raise AssertionError("a closed stream kept its sequence")
        time.sleep(0.05)
    check(True, "a closed stream frees its sequence")
    check(whole("still there?", max_tokens=2).choices[0].finish_reason in ("length", "stop"),
          "the server answers after a cancellation")


if __name__ == "__main__":
    main()
