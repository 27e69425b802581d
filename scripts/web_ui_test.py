#!/usr/bin/env python3
"""The chat page of `gemma4 serve`, tested in headless Chromium.

    python scripts/web_ui_test.py PATH/TO/gemma4 [--screenshots DIR] [--chromium PATH] [--chromedriver PATH]

Needs Debian's `chromium` and `chromium-driver` packages (`.ci/run` installs them) and
`selenium` (pinned in `.ci/run`). Two servers run on fixtures:

- `tests/fixtures/chat_tools`, with `--api-key`: a tiny model trained to think and call
  tools, so the thought block and the tool-call card show real model output;
- `tests/fixtures/audio_small` with a template that renders media parts: images and
  audio clips attached (file picker, drag-and-drop, paste, the microphone through
  Chromium's fake capture device).

Every state is checked in the page's DOM against what the API answers for the same
request, and photographed (`--screenshots`, default `target/webui-screenshots`; the
README's images come from `docs/images/webui`). The browser console must hold no error
but the one the error test provokes on purpose.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
KEY = "webui-test-key"
FAILED = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        FAILED.append(what)


class Server:
    def __init__(self, binary, model, *extra):
        self.proc = subprocess.Popen(
            [binary, "--threads", "2", "serve", "--model", str(model), "--port", "0", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for line in self.proc.stderr:
            m = re.match(r"listening on (http://\S+)", line)
            if m:
                self.url = m.group(1)
                break
        else:
            raise SystemExit(f"the server on {model} did not start")
        # Keep reading stderr so the server never blocks on a full pipe.
        import threading
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()
        self.key = KEY if "--api-key" in extra else None
        for _ in range(600):
            try:
                with urllib.request.urlopen(self.url + "/health") as r:
                    if r.status == 200:
                        return
            except Exception:
                time.sleep(0.1)
        raise SystemExit(f"the model {model} did not load")

    def post(self, path, body):
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), headers=headers)
        with urllib.request.urlopen(req) as r:
            return json.loads(r.read())

    def ask(self, text, **fields):
        """The API's message for one user turn, greedy."""
        body = {"messages": [{"role": "user", "content": text}], "temperature": 0, **fields}
        return self.post("/v1/chat/completions", body)["choices"][0]["message"]

    def metric(self, name):
        req = urllib.request.Request(self.url + "/metrics", headers={"Authorization": f"Bearer {self.key}"} if self.key else {})
        with urllib.request.urlopen(req) as r:
            m = re.search(rf"^gemma4_{name} (\S+)$", r.read().decode(), re.M)
        return float(m.group(1)) if m else None

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class Page:
    def __init__(self, args, shots):
        o = webdriver.ChromeOptions()
        o.binary_location = args.chromium
        for a in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,860",
                  "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                  "--autoplay-policy=no-user-gesture-required", "--lang=en-US"]:
            o.add_argument(a)
        o.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.downloads = Path(tempfile.mkdtemp(prefix="gemma4-webui-dl-"))
        o.add_experimental_option("prefs", {"download.default_directory": str(self.downloads),
                                            "download.prompt_for_download": False})
        self.d = webdriver.Chrome(service=Service(args.chromedriver), options=o)
        self.d.set_window_size(1280, 860)
        self.shots = shots

    def open(self, url):
        self.d.get(url)

    def wait(self, cond, what, timeout=30):
        try:
            # The page re-renders a message as it streams: an element found a moment ago
            # may be gone, and the condition is asked again.
            return WebDriverWait(self.d, timeout, poll_frequency=0.05,
                                 ignored_exceptions=(StaleElementReferenceException,)).until(lambda d: cond())
        except TimeoutException:
            self.shot("failed-" + re.sub(r"\W+", "_", what)[:40])
            raise SystemExit(f"FAIL timed out waiting for: {what}")

    def ready(self):
        self.wait(lambda: self.js("return document.body.dataset.ready === 'true'"), "the page to be ready")

    def js(self, script, *args):
        return self.d.execute_script(script, *args)

    def q(self, css):
        return self.d.find_elements(By.CSS_SELECTOR, css)

    def one(self, css):
        return self.d.find_element(By.CSS_SELECTOR, css)

    def text(self, css):
        e = self.q(css)
        return e[0].text if e else None

    def shot(self, name):
        if self.shots:
            self.shots.mkdir(parents=True, exist_ok=True)
            self.d.save_screenshot(str(self.shots / f"{name}.png"))

    def console_errors(self):
        return [e for e in self.d.get_log("browser") if e["level"] == "SEVERE"]

    def setting(self, name, value):
        if not self.one("#settings").is_displayed():
            self.one("#toggle-settings").click()
        e = self.one(f"#set-{name}")
        e.clear()
        if value:
            e.send_keys(value)

    def close_settings(self):
        if self.one("#settings").is_displayed():
            self.one("#toggle-settings").click()

    def send(self, text):
        box = self.one("#input")
        box.clear()
        box.send_keys(text)
        self.one("#send").click()

    def answers(self):
        return self.q("#messages .msg.assistant")

    def idle(self):
        return self.one("#send").is_displayed() and not self.one("#stop").is_displayed()

    def last_answer_done(self, count):
        done = """const a = document.querySelectorAll('#messages .msg.assistant');
            return a.length >= arguments[0] && !document.body.classList.contains('busy')
                && a[a.length - 1].querySelector('.stats') !== null;"""
        self.wait(lambda: self.js(done, count), f"answer {count} to finish")
        return self.answers()[-1]

    def set_thinking(self, on):
        box = self.one("#thinking")
        if box.is_selected() != on:
            box.click()

    def upload(self, input_id, path):
        """Hands `path` to the page's hidden file input, as the file picker would."""
        self.js("document.getElementById(arguments[0]).hidden = false", input_id)
        self.one(f"#{input_id}").send_keys(str(path))
        self.js("document.getElementById(arguments[0]).hidden = true", input_id)

    def drop_file(self, path, mime, how):
        """Puts a file into the page as a drop on the conversation or a paste, as a
        browser would hand it over (a DataTransfer with a File)."""
        data = base64.b64encode(Path(path).read_bytes()).decode()
        self.js("""
            const [data, name, mime, how] = arguments;
            const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, {type: mime}));
            if (how === 'drop') {
                document.getElementById('main').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
            } else {
                document.getElementById('input').dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true, cancelable: true}));
            }""", data, Path(path).name, mime, how)

    def quit(self):
        self.d.quit()
        shutil.rmtree(self.downloads, ignore_errors=True)


def media_checkpoint():
    """audio_small (vision and audio towers) with a template that renders media parts
    (the fixture's own template is text-only)."""
    dst = Path(tempfile.mkdtemp(prefix="gemma4-webui-media-")) / "audio_small"
    shutil.copytree(FIXTURES / "audio_small", dst, ignore=shutil.ignore_patterns("golden"))
    shutil.copy(FIXTURES / "chat_tools" / "chat_template_launch_era.jinja", dst / "chat_template.jinja")
    (dst / "tokenizer_config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((dst / "tokenizer_config.json").read_text()).items() if k != "chat_template"}))
    return dst


def golden_chat():
    return json.loads((FIXTURES / "chat_tools" / "golden" / "chat.json").read_text())["cases"]


def chat_tests(p: Page, srv: Server):
    cases = golden_chat()

    # --- the key, asked once
    p.open(srv.url + "/")
    p.wait(lambda: p.one("#key-dialog").is_displayed(), "the API key dialog")
    check(True, "with --api-key the page asks for the key before anything else")
    p.shot("api-key")
    p.one("#key-input").send_keys("wrong-key")
    p.one("#key-ok").click()
    p.wait(lambda: p.one("#key-dialog").is_displayed() and p.one("#key-error").is_displayed(), "the wrong key to be refused")
    check(True, "a wrong key is refused and asked again")
    p.one("#key-input").send_keys(KEY)
    p.one("#key-ok").click()
    p.ready()
    p.wait(lambda: p.text("#model-name") == "chat_tools", "the model's name")
    check("512" in p.text("#model-ctx"), f"the model's name and context size shown ({p.text('#model-ctx')})")
    p.wait(lambda: "queued" in (p.text("#server-state") or ""), "the queue state from /metrics")
    check(re.search(r"\d+ running · \d+ queued", p.text("#server-state")) is not None,
          f"the server's queue state from /metrics ({p.text('#server-state')})")
    check(p.q("#attach")[0].is_displayed() is False, "no attach button on a text-only model")
    p.shot("empty")

    # --- a streamed answer with its thought (real model output)
    p.setting("temperature", "0")
    p.close_settings()
    p.set_thinking(True)
    p.send("What is 2+2?")
    a = p.last_answer_done(1)
    want = srv.ask("What is 2+2?", chat_template_kwargs={"enable_thinking": True})
    check(want["reasoning_content"] == "Two plus two." and want["content"] == "The answer is 4.",
          "the API's answer is the fixture's golden completion")
    content = a.find_element(By.CSS_SELECTOR, ".content").text
    check(content == want["content"], f"the streamed answer is the API's ({content!r})")
    think = a.find_elements(By.CSS_SELECTOR, "details.thinking")
    check(len(think) == 1 and not think[0].get_attribute("open"),
          "the thought is a collapsed block apart from the answer")
    think[0].find_element(By.TAG_NAME, "summary").click()
    check(think[0].find_element(By.CSS_SELECTOR, ".thinking-body").text == want["reasoning_content"],
          "opened, it holds the model's thought")
    stats = a.find_element(By.CSS_SELECTOR, ".stats").text
    check(re.search(r"TTFT [\d.]+ s · [\d.]+ tok/s · \d+ tokens", stats) is not None,
          f"time to first token and tokens/s under the answer ({stats})")
    p.shot("thinking")

    # --- thinking off goes into the request: the page's answer is the API's without it
    p.one("#new-chat").click()
    check(p.one("#thinking").is_selected(), "a new chat starts from the last one's settings")
    p.set_thinking(False)
    p.send("What is 2+2?")
    a = p.last_answer_done(1)
    want = srv.ask("What is 2+2?", chat_template_kwargs={"enable_thinking": False})
    shown = a.find_elements(By.CSS_SELECTOR, "details.thinking")
    check(a.find_element(By.CSS_SELECTOR, ".content").text == (want["content"] or "").strip()
          and bool(shown) == bool(want.get("reasoning_content")),
          "with thinking off the answer is the API's with enable_thinking false")

    # --- a tool call, its result, and the answer after it
    p.one("#new-chat").click()
    p.setting("tools", json.dumps(cases[0]["tools"]))
    p.close_settings()
    p.set_thinking(True)
    p.send("Weather in Paris?")
    a = p.last_answer_done(1)
    call = a.find_elements(By.CSS_SELECTOR, ".tool-call")
    check(len(call) == 1 and call[0].find_element(By.CSS_SELECTOR, ".tool-name").text == "get_weather"
          and json.loads(call[0].find_element(By.CSS_SELECTOR, ".tool-args").text) == {"city": "Paris"},
          "the model's tool call is shown with its arguments")
    a.find_element(By.CSS_SELECTOR, "details.thinking summary").click()
    check(a.find_element(By.CSS_SELECTOR, ".thinking-body").text == "I need the weather tool.",
          "beside the thought that led to it")
    p.shot("tool-call")
    a.find_element(By.CSS_SELECTOR, ".tool-input").send_keys("sunny")
    a.find_element(By.CSS_SELECTOR, ".send-tool-results").click()
    a = p.last_answer_done(2)
    check(a.find_element(By.CSS_SELECTOR, ".content").text == cases[1]["completion"].replace("<turn|>", ""),
          f"the tool's result goes back and the model answers from it ({a.text.splitlines()[1:2]})")
    check(len(p.q("#messages .tool-result")) == 1, "the tool's result is shown in the conversation")
    p.shot("tool-result")

    # --- edit a user message and resend; the system prompt setting
    p.one("#new-chat").click()
    p.setting("tools", "")
    p.setting("system", "Be kind.")
    p.close_settings()
    p.set_thinking(False)
    p.send("Hello")
    p.last_answer_done(1)
    user = p.q("#messages .msg.user")[0]
    p.js("arguments[0].scrollIntoView()", user)
    user.find_element(By.CSS_SELECTOR, ".actions .edit").click()
    box = user.find_element(By.CSS_SELECTOR, ".edit-box")
    box.clear()
    box.send_keys("Hello there")
    user.find_element(By.CSS_SELECTOR, ".save-edit").click()
    a = p.last_answer_done(1)
    check(len(p.answers()) == 1 and a.find_element(By.CSS_SELECTOR, ".content").text == "Hello! How can I help?",
          "an edited message is resent in place, with the conversation's system prompt")
    a.find_element(By.CSS_SELECTOR, ".actions .regenerate").click()
    a = p.last_answer_done(1)
    check(len(p.answers()) == 1 and a.find_element(By.CSS_SELECTOR, ".content").text == "Hello! How can I help?",
          "regenerate replaces the answer (greedy: the same)")

    # --- stop a long generation; the stream is seen growing first
    # Sampled past the end of its turn, the trained model writes on (visible text).
    p.one("#new-chat").click()
    p.setting("system", "")
    p.setting("temperature", "1")
    p.setting("max_tokens", "480")
    p.setting("extra", '{"ignore_eos": true, "seed": 3}')
    p.close_settings()
    # Every length the answer's text takes in the page, as it is rendered.
    p.js("""window.__lengths = [];
        new MutationObserver(() => {
            const c = document.querySelectorAll('#messages .msg.assistant .content');
            const n = c.length ? c[c.length - 1].textContent.length : 0;
            if (n && n !== window.__lengths[window.__lengths.length - 1]) window.__lengths.push(n);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});""")
    p.send("Tell me a long story")
    p.wait(lambda: len(p.js("return window.__lengths")) >= 3, "the streamed text to grow")
    p.one("#stop").click()
    a = p.last_answer_done(1)
    stopped = len(a.find_element(By.CSS_SELECTOR, ".content").text)
    lengths = p.js("return window.__lengths")
    time.sleep(0.5)
    check(len(lengths) >= 3 and lengths == sorted(lengths), f"the answer streams in ({lengths[:8]}... characters)")
    check(len(a.find_element(By.CSS_SELECTOR, ".content").text) == stopped
          and "stopped" in a.find_element(By.CSS_SELECTOR, ".stats").text,
          f"Stop ends the generation ({a.find_element(By.CSS_SELECTOR, '.stats').text})")
    p.wait(lambda: srv.metric("running_sequences") == 0, "the server to free the stopped sequence", 10)
    check(True, "the server cancelled the stopped request (running_sequences 0)")
    p.shot("stopped")

    # --- conversations: rename, reload, still there
    titles = [e.text for e in p.q("#conversations .title")]
    check(len(titles) == 5, f"five conversations in the list ({titles})")
    li = p.q("#conversations li.active")[0]
    p.js("arguments[0].querySelector('.rename').click()", li)
    # The old title is selected: typing replaces it (clearing would blur the field,
    # which ends the rename).
    p.one("#conversations .rename-input").send_keys("Kind greetings\n")
    p.wait(lambda: "Kind greetings" in [e.text for e in p.q("#conversations .title")], "the renamed conversation")
    errors = p.console_errors()
    check(not errors, f"nothing in the console is an error ({errors})")
    p.d.refresh()
    p.ready()
    check(not p.one("#key-dialog").is_displayed(), "after a reload the key is not asked again")
    titles = [e.text for e in p.q("#conversations .title")]
    check("Kind greetings" in titles and "What is 2+2?" in titles and "Weather in Paris?" in titles,
          f"after a reload the conversations are still there ({titles})")
    for e in p.q("#conversations li"):
        if e.find_element(By.CSS_SELECTOR, ".title").text == "Weather in Paris?":
            e.find_element(By.CSS_SELECTOR, ".title").click()
            break
    p.wait(lambda: len(p.q("#messages .tool-call")) == 1, "the tool-call conversation")
    check(p.text("#messages .msg.assistant:last-of-type .content") == "It is sunny in Paris."
          and json.loads(p.one("#set-tools").get_attribute("value"))[0]["function"]["name"] == "get_weather",
          "its messages and its settings came back with it")
    p.shot("reloaded")

    # --- export, delete, import
    p.one("#export").click()
    p.wait(lambda: list(p.downloads.glob("gemma4-conversations-*.json")), "the export download")
    exported = json.loads(next(p.downloads.glob("gemma4-conversations-*.json")).read_text())
    check(len(exported["conversations"]) == 5, "export writes every conversation as JSON")
    li = p.q("#conversations li.active")[0]
    p.js("arguments[0].querySelector('.delete').click()", li)
    p.d.switch_to.alert.accept()
    p.wait(lambda: len(p.q("#conversations li")) == 4, "the deleted conversation to go")
    check("Weather in Paris?" not in [e.text for e in p.q("#conversations .title")], "delete removes a conversation")
    path = p.downloads / "one.json"
    path.write_text(json.dumps({"conversations": [c for c in exported["conversations"] if c["title"] == "Weather in Paris?"]}))
    p.upload("import-file", path)
    p.wait(lambda: "Weather in Paris?" in [e.text for e in p.q("#conversations .title")], "the imported conversation")
    check(len(p.q("#messages .tool-call")) == 1, "import brings a conversation back, opened")
    errors = p.console_errors()
    check(not errors, f"nothing in the console is an error ({errors})")

    # --- a server error is a message in the conversation
    p.one("#new-chat").click()
    p.setting("extra", '{"temperature": "hot"}')
    p.close_settings()
    p.send("Hello there")
    a = p.last_answer_done(1)
    err = a.find_elements(By.CSS_SELECTOR, ".error-text")
    check(err and "temperature" in err[0].text and p.one("#composer").is_displayed(),
          f"a server error is shown in the conversation ({err[0].text if err else None})")
    p.shot("error")
    errors = [e for e in p.console_errors() if "status of 400" not in e["message"]]
    check(not errors, f"no console error but the provoked 400 ({errors})")


MARKDOWN = """## Steps

1. Install **gemma4** with `cargo`
2. Run it:

```bash
gemma4 serve --model DIR
```

| size | layers |
|---|---|
| E2B | 35 |

> A quote with a [link](https://example.com/) and a [bad one](javascript:alert(1)).

<img src=x onerror="window.__pwned = 1">"""


def markdown_tests(p: Page, srv: Server):
    """The page's markdown: structure, code blocks that copy, and model text that never
    becomes markup."""
    p.open(srv.url + "/")
    p.ready()
    html = p.js("const d = document.createElement('div'); d.appendChild(renderMarkdown(arguments[0]));"
                "return d.innerHTML;", MARKDOWN)
    check("<h2>Steps</h2>" in html and "<ol><li>Install <strong>gemma4</strong> with <code>cargo</code></li>" in html
          and "<table><thead><tr><th>size</th>" in html and "<blockquote>" in html,
          "markdown: headings, lists, emphasis, inline code, tables, quotes")
    check('<a href="https://example.com/" target="_blank" rel="noopener noreferrer">link</a>' in html
          and "javascript:" not in html.split("[bad one]")[0].replace("(javascript:alert(1))", ""),
          "links only to http(s) and mailto addresses")
    check("<img" not in html and "&lt;img src=x" in html, "HTML in model text stays text")
    # A conversation holding that answer, as if the model had written it.
    conv = {"id": "md", "title": "Markdown", "created": 1, "updated": 2**40, "settings": {}, "messages": [
        {"role": "user", "content": "How do I run it?", "attachments": []},
        {"role": "assistant", "content": MARKDOWN, "reasoning": "", "tool_calls": [], "stats": {"finish": "stop", "tokens": 60}}]}
    # (Imported: the page writes its own state back to storage when it unloads.)
    path = p.downloads / "markdown.json"
    path.write_text(json.dumps({"conversations": [conv]}))
    p.upload("import-file", path)
    p.wait(lambda: p.q("#messages .code-block"), "the markdown conversation")
    check(p.js("return window.__pwned") is None, "nothing in an answer runs as script")
    p.d.execute_cdp_cmd("Browser.grantPermissions", {"origin": srv.url, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    p.one("#messages .code-block .copy-code").click()
    copied = p.d.execute_async_script("navigator.clipboard.readText().then(arguments[0], e => arguments[0]('error: ' + e))")
    check(copied == "gemma4 serve --model DIR", f"a code block's Copy puts its code on the clipboard ({copied!r})")
    p.shot("markdown")
    p.js("document.querySelector('#conversations li.active .delete').click()")
    p.d.switch_to.alert.accept()


def media_tests(p: Page, srv: Server):
    p.open(srv.url + "/")
    p.ready()
    p.wait(lambda: p.one("#attach").is_displayed(), "the attach button")
    check(p.one("#record").is_displayed(), "attach and record buttons on a model with both towers")
    p.setting("temperature", "0")
    p.setting("max_tokens", "6")
    p.close_settings()
    image = FIXTURES / "images" / "landscape.png"
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    want_tokens = srv.post("/tokenize", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}]}]})["image_tokens"][0]
    p.upload("file-input", image)
    p.wait(lambda: p.q("#attachments .attachment img") and "… tokens" not in p.text("#attachments .attachment-tokens"),
           "the image's thumbnail and token cost")
    check(p.text("#attachments .attachment-tokens") == f"{want_tokens} tokens",
          f"an attached image shows its thumbnail and its token cost ({p.text('#attachments .attachment-tokens')})")
    p.one("#input").send_keys("Describe this.")
    p.shot("image-attached")
    p.one("#send").click()
    a = p.last_answer_done(1)
    want = srv.post("/v1/chat/completions", {"temperature": 0, "max_tokens": 6, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe this."}]}],
        "chat_template_kwargs": {"enable_thinking": False}})
    check(a.find_element(By.CSS_SELECTOR, ".content").text == want["choices"][0]["message"]["content"].strip()
          and f"{want['usage']['prompt_tokens']} prompt" in a.find_element(By.CSS_SELECTOR, ".stats").text,
          "the image is sent: the answer is the API's for the same image and text")
    check(len(p.q("#messages .msg.user .attachment img")) == 1, "the sent image stays in the conversation")
    p.shot("image")

    # Drag-and-drop and paste, then an audio clip and a recording.
    p.one("#new-chat").click()
    p.drop_file(FIXTURES / "images" / "portrait.jpg", "image/jpeg", "drop")
    p.wait(lambda: len(p.q("#attachments .attachment img")) == 1, "the dropped image")
    p.drop_file(FIXTURES / "images" / "tiny.png", "image/png", "paste")
    p.wait(lambda: len(p.q("#attachments .attachment img")) == 2, "the pasted image")
    check(True, "an image can be dropped on the conversation or pasted")
    clip = FIXTURES / "audio" / "hello_16k.wav"
    p.upload("file-input", clip)
    p.wait(lambda: p.q("#attachments .attachment audio"), "the audio clip's player")
    want_audio = srv.post("/tokenize", {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": base64.b64encode(clip.read_bytes()).decode(), "format": "wav"}}]}]})["audio_tokens"][0]
    p.wait(lambda: all("… tokens" not in e.text for e in p.q("#attachments .attachment-tokens")), "every token cost")
    check(p.q("#attachments .attachment.audio .attachment-tokens")[0].text == f"{want_audio} tokens",
          f"an audio clip shows a player and its token cost ({want_audio})")
    p.one("#record").click()
    time.sleep(1.0)
    p.one("#record").click()
    p.wait(lambda: len(p.q("#attachments .attachment.audio")) == 2, "the recorded clip")
    p.wait(lambda: "… tokens" not in p.q("#attachments .attachment.audio .attachment-tokens")[1].text,
           "the recording's cost")
    rec = p.q("#attachments .attachment.audio")[1]
    check(re.fullmatch(r"recording-\d+\.wav", rec.find_element(By.CSS_SELECTOR, ".attachment-name").text)
          and re.fullmatch(r"\d+ tokens", rec.find_element(By.CSS_SELECTOR, ".attachment-tokens").text),
          f"a clip recorded from the microphone is attached as WAV ({rec.text})")
    p.shot("media-attached")
    p.one("#input").send_keys("What are these?")
    p.one("#send").click()
    a = p.last_answer_done(1)
    costs = sum(int(e.text.split()[0]) for e in p.q("#messages .msg.user .attachment-tokens"))
    prompt = re.search(r"(\d+) prompt", a.find_element(By.CSS_SELECTOR, ".stats").text)
    check(not a.find_elements(By.CSS_SELECTOR, ".error-text") and prompt and int(prompt.group(1)) > costs,
          f"two images and two clips go in one request ({prompt and prompt.group(1)} prompt tokens, {costs} of them media)")

    errors = p.console_errors()
    check(not errors, f"nothing in the console is an error ({errors})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary")
    ap.add_argument("--screenshots", default=str(ROOT / "target" / "webui-screenshots"))
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--chromedriver", default=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    args = ap.parse_args()
    shots = Path(args.screenshots) if args.screenshots else None
    media_dir = media_checkpoint()
    chat = Server(args.binary, FIXTURES / "chat_tools", "--api-key", KEY)
    media = Server(args.binary, media_dir)
    p = Page(args, shots)
    try:
        chat_tests(p, chat)
        # A fresh profile for the second server (another origin has its own storage anyway).
        media_tests(p, media)
        markdown_tests(p, media)
    finally:
        p.quit()
        chat.stop()
        media.stop()
        shutil.rmtree(media_dir.parent, ignore_errors=True)
    if FAILED:
        print(f"{len(FAILED)} check(s) failed", file=sys.stderr)
        sys.exit(1)
    print(f"all checks passed; screenshots in {shots}")


if __name__ == "__main__":
    main()
