"""A load test for `gemma4 serve` (standard library only).

    python scripts/server_load.py PATH/TO/gemma4 tests/fixtures/text_only [CLIENTS] [REQUESTS]

CLIENTS threads (default 32) each send REQUESTS chat requests (default 20), whole or
streamed, at temperature 0 over a few prompts; one in five is a stream the client drops
after its first bytes. Every answer that completes must equal that prompt's solo answer
(none lost, none crossed with another's), and the server's resident memory after the
second half of the run may not exceed the first half's by more than 32 MB (kept caches
are bounded by --cache-mb). Prints the counts and the memory, exits non-zero on a failure.
"""

import http.client
import json
import random
import subprocess
import sys
import threading
import time
import urllib.request

PROMPTS = ["one fish", "two fish", "red fish", "blue fish", "a story", "the sea", "hello", "why?"]


def start(binary, model):
    proc = subprocess.Popen(
        [binary, "--threads", "2", "serve", "--model", model, "--port", "0",
         "--parallel", "4", "--max-queue", "256", "--cache-mb", "16"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    addr = None
    for line in proc.stderr:
        if line.startswith("listening on http://"):
            addr = line.split()[2][len("http://"):]
            break
    if addr is None:
        raise SystemExit("the server did not start")
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://{addr}/health") as r:
                if r.status == 200:
                    return proc, addr
        except Exception:
            time.sleep(0.05)
    raise SystemExit("the model never loaded")


def body(prompt, stream):
    return json.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": 12,
                       "temperature": 0, "stream": stream})


def post(addr, prompt, stream=False, drop=False):
    host, port = addr.split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=120)
    c.request("POST", "/v1/chat/completions", body(prompt, stream),
              {"Content-Type": "application/json"})
    r = c.getresponse()
    if drop:
        r.read(16)
        c.sock.close()
        return None
    data = r.read().decode()
    c.close()
    if r.status != 200:
        raise AssertionError(f"status {r.status}: {data}")
    if not stream:
        return json.loads(data)["choices"][0]["message"]["content"]
    text = ""
    for event in data.split("\n\n"):
        if event.startswith("data: ") and event != "data: [DONE]":
            for ch in json.loads(event[6:])["choices"]:
                text += ch["delta"].get("content") or ""
    return text


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main():
    binary, model = sys.argv[1], sys.argv[2]
    clients = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    requests = int(sys.argv[4]) if len(sys.argv) > 4 else 20
    proc, addr = start(binary, model)
    try:
        solo = {p: post(addr, p) for p in PROMPTS}
        failures, counts, lock = [], {"ok": 0, "dropped": 0}, threading.Lock()

        def client(seed, n):
            rng = random.Random(seed)
            for _ in range(n):
                p = rng.choice(PROMPTS)
                kind = rng.random()
                try:
                    if kind < 0.2:
                        post(addr, p, stream=True, drop=True)
                        with lock:
                            counts["dropped"] += 1
                        continue
                    got = post(addr, p, stream=kind < 0.6)
                    with lock:
                        if got != solo[p]:
                            failures.append(f"{p!r}: {got!r} != {solo[p]!r}")
                        counts["ok"] += 1
                except Exception as e:
                    with lock:
                        failures.append(f"{p!r}: {e}")

        def wave(first_seed, n):
            threads = [threading.Thread(target=client, args=(first_seed + i, n))
                       for i in range(clients)]
            [t.start() for t in threads]
            [t.join() for t in threads]

        t = time.time()
        wave(0, requests // 2)
        half = rss_kb(proc.pid)
        wave(1000, requests - requests // 2)
        end = rss_kb(proc.pid)
        print(f"{counts['ok']} answered, {counts['dropped']} dropped by the client, "
              f"{len(failures)} wrong, in {time.time() - t:.1f} s; "
              f"RSS {half / 1024:.0f} MB after half, {end / 1024:.0f} MB at the end")
        for f in failures[:10]:
            print("FAIL", f)
        if failures:
            raise SystemExit(1)
        if end > half + 32 * 1024:
            raise SystemExit(f"memory grew by {(end - half) / 1024:.0f} MB in the second half")
        print("load test passed")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
