#!/usr/bin/env python3
"""`gemma4 serve` against llama-server under concurrent streaming clients, on one
checkpoint and one machine.

    python benches/serve_bench.py --model /tmp/gemma4-e2b-text     # makes the E2B checkpoint if missing
    python benches/serve_bench.py --model DIR --formats q4_k --clients 1 4 8 --runs 3

Both servers get the same load through their OpenAI-compatible `/v1/completions`: N
clients at once, each streaming one completion of --gen tokens (`ignore_eos`, greedy) from
its own --prompt-len-token prompt (token ids, distinct for every request, so no prompt
is cached between requests). Reported per N, median over --runs rounds: aggregate
generated tok/s (all tokens over the round's wall time) and time to first token at p50
and p95 over every request of every round.

Then a conversation, one client: turn 1 streams the prompt's answer; turn 2 sends the
prompt, that answer's ids and 16 new ids, as a chat's next turn does. With a prefix
cache, turn 2's time to first token is far below turn 1's. These two stream with
`logprobs: 1`, so that the first token sends a chunk even when its text is held back
(part of a UTF-8 character): the time is that of the first token itself, not of the
first printable one, which on random weights can be a step or two later. (`--clients`
with no value runs the conversation alone.) (The answer's ids come from
a second, non-streamed request for turn 1 (greedy: the same answer), which leaves the
server's cache as turn 1 did: `return_token_ids` on ours, `return_tokens` on llama-server's
`/completion`.)

llama-server is built from the same llama.cpp source as benches/bench.py's tools (the
`llama-cpp-python==0.3.36` sdist, AMX off), with its server enabled, and serves the GGUF
files bench.py makes (llama.cpp's own converter and quantizer); ours serves the same
checkpoint quantized by `gemma4 quantize` (q4_k is compared with llama.cpp's Q4_K_M). Both
get --threads threads, --clients' largest N as parallel slots, and a context that fits.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the llama.cpp build, GGUF files and our quantized checkpoints)

# Prompt ids drawn from the middle of the vocabulary: ordinary text tokens, never the
# control or media-placeholder ids.
LOW, HIGH = 1000, 200_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server(a) -> Path:
    src = bench.llama_cpp_tree(a)
    exe = src / "build" / "bin" / "llama-server"
    if not exe.exists():
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        subprocess.run(["cmake", "-B", "build", "-DLLAMA_BUILD_SERVER=ON"], cwd=src, env=env, check=True)
        subprocess.run(["cmake", "--build", "build", "-j", str(os.cpu_count()), "--target", "llama-server"],
                       cwd=src, env=env, check=True)
    return exe


class Server:
    """One server process, up until `stop`."""

    def __init__(self, kind: str, fmt: str, a):
        self.kind, self.port = kind, free_port()
        slots = max(a.clients, default=4)
        if kind == "gemma4":
            model = bench.gemma4_quantized(a.model, fmt, a)
            cmd = [str(bench.BIN), "--threads", str(a.threads), "serve", "--model", str(model),
                   "--port", str(self.port), "--parallel", str(slots), "--max-queue", "64"]
        else:
            gguf = bench.llama_gguf(a.model, fmt, a)
            # -c is shared by the slots: each gets the conversation test's longest prompt.
            ctx = slots * (2 * (a.prompt_len + a.gen) + 64)
            cmd = [str(llama_server(a)), "-m", str(gguf), "-t", str(a.threads), "-tb", str(a.threads),
                   "-c", str(ctx), "-np", str(slots), "--port", str(self.port), "--no-webui"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(a.log, "ab"))
        t = time.time()
        while True:
            if self.proc.poll() is not None:
                sys.exit(f"{kind} server exited (see {a.log}): {' '.join(cmd)}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() - t > 600:
                sys.exit(f"{kind} server did not come up")
            time.sleep(0.5)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=3600) as r:
            return json.loads(r.read())

    def stream(self, ids: list[int], gen: int, per_token: bool = False) -> tuple[float, float, int]:
        """Streams one completion: (time to first token, total time, chunks). The first
        token is the first chunk with text; with `per_token`, log-probabilities are asked
        for so that every token sends a chunk (one whose text is held back, such as part
        of a UTF-8 character, too), and the first chunk counts."""
        body = {"prompt": ids, "max_tokens": gen, "temperature": 0, "stream": True, "ignore_eos": True}
        if per_token:
            body["logprobs"] = 1
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/completions",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        first, chunks = None, 0
        with urllib.request.urlopen(req, timeout=3600) as r:
            for line in r:
                line = line.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    raise RuntimeError(ev["error"])
                choices = ev.get("choices") or []
                if choices and (choices[0].get("text") or (per_token and choices[0].get("logprobs"))):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter() - t0
        return first if first is not None else float("nan"), time.perf_counter() - t0, chunks

    def answer_ids(self, ids: list[int], gen: int) -> list[int]:
        if self.kind == "gemma4":
            r = self.post("/v1/completions", {"prompt": ids, "max_tokens": gen, "temperature": 0,
                                              "ignore_eos": True, "return_token_ids": True})
            return r["choices"][0]["token_ids"]
        r = self.post("/completion", {"prompt": ids, "n_predict": gen, "temperature": 0, "ignore_eos": True,
                                      "return_tokens": True, "cache_prompt": True})
        return r["tokens"]


def prompt(rng: random.Random, n: int) -> list[int]:
    return [2] + [rng.randrange(LOW, HIGH) for _ in range(n - 1)]


def round_of(server: Server, n: int, a, rng: random.Random) -> tuple[float, list[float]]:
    """n clients at once: aggregate generated tok/s and each one's time to first token."""
    prompts = [prompt(rng, a.prompt_len) for _ in range(n)]
    results: list = [None] * n

    def client(i):
        try:
            results[i] = server.stream(prompts[i], a.gen)
        except Exception as e:  # noqa: BLE001 (reported below)
            results[i] = e

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for r in results:
        if isinstance(r, Exception):
            raise r
    return n * a.gen / wall, [r[0] for r in results]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def measure(kind: str, fmt: str, a) -> dict:
    print(f"{kind} {fmt}: starting", file=sys.stderr)
    server = Server(kind, fmt, a)
    rng = random.Random(f"{kind}-{fmt}")
    try:
        round_of(server, 1, a, rng)  # warm-up
        rows = []
        for n in a.clients:
            agg, ttft = [], []
            for _ in range(a.runs):
                tok_s, firsts = round_of(server, n, a, rng)
                agg.append(tok_s)
                ttft += firsts
            rows.append({"clients": n, "tok_s": statistics.median(agg), "runs_tok_s": agg,
                         "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95)})
            print(f"  {kind} {fmt} N={n}: {json.dumps(rows[-1])}", file=sys.stderr)
        turns = []
        for _ in range(a.runs):
            p = prompt(rng, a.prompt_len)
            first = server.stream(p, a.gen, per_token=True)[0]
            answer = server.answer_ids(p, a.gen)
            second = server.stream(p + answer + [rng.randrange(LOW, HIGH) for _ in range(16)], a.gen,
                                   per_token=True)[0]
            turns.append((first, second))
        conv = {"turn1_ttft": statistics.median(t[0] for t in turns),
                "turn2_ttft": statistics.median(t[1] for t in turns)}
        print(f"  {kind} {fmt} conversation: {json.dumps(conv)}", file=sys.stderr)
        return {"engine": kind, "format": fmt, "rows": rows, **conv}
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--size", default="e2b", help="make_checkpoint.py --size, when --model is missing")
    ap.add_argument("--formats", nargs="*", default=["q4_k", "q8_0"])
    ap.add_argument("--clients", type=int, nargs="*", default=[1, 4, 8])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--llama-dir", type=Path, default=Path("/tmp/gemma4-llamacpp"))
    ap.add_argument("--log", type=Path, default=Path("/tmp/serve_bench.log"), help="the servers' stderr")
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--locked", "-p", "gemma4-cli"], cwd=bench.ROOT, check=True)
    if not (a.model / "config.json").exists():
        subprocess.run([sys.executable, str(bench.ROOT / "benches" / "make_checkpoint.py"), "--size", a.size,
                        "--out", str(a.model)], check=True)
    if not (a.model / "tokenizer.json").exists():
        subprocess.run([sys.executable, str(bench.ROOT / "benches" / "make_tokenizer.py"), "--out", str(a.model)],
                       check=True)
    results = []
    for fmt in a.formats:
        llama_fmt = {"q4_k": "q4_k_m"}.get(fmt, fmt)
        results.append(measure("gemma4", fmt, a))
        results.append(measure("llama-server", llama_fmt, a))
    print(f"\n{a.model.name}: {a.prompt_len}-token prompts, {a.gen} generated each (streamed, greedy, "
          f"ignore_eos), {a.threads} threads, median of {a.runs} rounds; time to first token over every request")
    print("| engine | format | clients | aggregate tok/s | TTFT p50 | TTFT p95 | our tok/s × | our p50 × |")
    print("|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(results):
        ours = results[i - 1] if r["engine"] == "llama-server" else None
        for row in r["rows"]:
            o = next((x for x in ours["rows"] if x["clients"] == row["clients"]), None) if ours else None
            ratio = (f"{o['tok_s'] / row['tok_s']:.2f}× | {o['ttft_p50'] / row['ttft_p50']:.2f}×" if o
                     else "– | –")
            print(f"| {r['engine']} | {r['format']} | {row['clients']} | {row['tok_s']:.2f} "
                  f"| {row['ttft_p50']:.2f} s | {row['ttft_p95']:.2f} s | {ratio} |")
    print("\n| engine | format | turn 1 TTFT | turn 2 TTFT (prefix cache) | turn 2 / turn 1 |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['engine']} | {r['format']} | {r['turn1_ttft']:.2f} s | {r['turn2_ttft']:.2f} s "
              f"| {r['turn2_ttft'] / r['turn1_ttft']:.2f} |")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
