#!/usr/bin/env python3
"""Side-by-side throughput on one checkpoint and one machine: `gemma4 bench` in each
format, and transformers in bf16 (the reference, from scripts/fixtures/requirements.txt).

    python benches/bench.py --model /tmp/gemma4-e2b-text            # make it with make_checkpoint.py
    python benches/bench.py --model DIR --engines gemma4-f32 transformers-bf16 --runs 5

Every engine gets the same pseudo-random prompt length, number of generated tokens
(greedy, no stop), thread count, warm-up run and number of measured runs; the table shows
medians. Each engine runs in its own process, so peak RSS is its own. The llama.cpp rows
of issue 5 are not wired in yet.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "gemma4"


def run_gemma4(model: Path, dtype: str, a) -> dict:
    out = subprocess.run(
        [str(BIN), "--threads", str(a.threads), "bench", "--model", str(model), "--dtype", dtype,
         "--prompt-len", str(a.prompt_len), "--gen", str(a.gen), "--runs", str(a.runs), "--json"],
        check=True, capture_output=True, text=True)
    r = json.loads(out.stdout)
    return {"engine": "gemma4", "format": dtype, "prefill_tok_s": r["prefill_tok_s"],
            "decode_tok_s": r["decode_tok_s"], "peak_rss_bytes": r["peak_rss_bytes"],
            "load_s": r["load_s"], "decode_fraction_of_bound": r["decode_fraction_of_bound"],
            "read_bandwidth_bytes_s": r["read_bandwidth_bytes_s"]}


def transformers_child(model: str, prompt_len: int, gen: int, runs: int, threads: int) -> None:
    """Runs in a subprocess: prints one JSON line."""
    import resource

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    t = time.time()
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()
    load_s = time.time() - t
    vocab = m.config.vocab_size
    state, ids = 0x9E3779B97F4A7C15, [2]
    while len(ids) < prompt_len:  # the same prompt as `gemma4 bench`
        state ^= (state << 13) & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 7
        state ^= (state << 17) & 0xFFFFFFFFFFFFFFFF
        ids.append(3 + state % (vocab - 3))
    x = torch.tensor([ids])
    pre, dec = [], []
    with torch.no_grad():
        for i in range(runs + 1):
            t = time.time()
            out = m(input_ids=x, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tp = time.time() - t
            past = out.past_key_values
            t = time.time()
            for _ in range(gen):
                out = m(input_ids=nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            td = time.time() - t
            if i > 0:
                pre.append(prompt_len / tp)
                dec.append(gen / td)
    print(json.dumps({"engine": "transformers", "format": "bf16", "prefill_tok_s": statistics.median(pre),
                      "decode_tok_s": statistics.median(dec), "load_s": load_s,
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def run_transformers(model: Path, a) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(model), str(a.prompt_len), str(a.gen), str(a.runs),
         str(a.threads)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, model, p, g, r, t = sys.argv
        transformers_child(model, int(p), int(g), int(r), int(t))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--engines", nargs="*", default=["gemma4-f32", "gemma4-bf16", "transformers-bf16"])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", type=Path, help="also write the rows here")
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--locked", "-p", "gemma4-cli"], cwd=ROOT, check=True)
    rows = []
    for e in a.engines:
        print(f"running {e} ...", file=sys.stderr)
        rows.append(run_gemma4(a.model, e.split("-", 1)[1], a) if e.startswith("gemma4-")
                    else run_transformers(a.model, a))
    ours = max((r for r in rows if r["engine"] == "gemma4"), key=lambda r: r["decode_tok_s"], default=None)
    print(f"\n{a.model.name}: prompt {a.prompt_len}, {a.gen} generated, {a.threads} threads, "
          f"median of {a.runs} runs after 1 warm-up")
    print(f"{'engine':<13} {'format':<7} {'prefill tok/s':>13} {'decode tok/s':>12} {'peak RSS':>9} "
          f"{'our decode ×':>12}")
    for r in rows:
        ratio = ours["decode_tok_s"] / r["decode_tok_s"] if ours else float("nan")
        print(f"{r['engine']:<13} {r['format']:<7} {r['prefill_tok_s']:>13.1f} {r['decode_tok_s']:>12.2f} "
              f"{r['peak_rss_bytes'] / 2**30:>7.2f} G {ratio:>11.2f}×")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
