#!/usr/bin/env python3
"""What speculative decoding with an assistant drafter gains on this machine.

1. On real-size shapes (E2B by default; random weights, so acceptance is not measured
   there): `gemma4 bench --verify-max K --draft DRAFTER` per format times one target pass
   over k + 1 tokens against one decode step at the same context (k = 1..K) and one
   drafter step, and derives the speedup those costs allow at acceptance rates 0.5, 0.7
   and 0.9 (k drafts kept with probability a each up to the first miss:
   (1 + a + ... + a^k) tokens per round, for one pass of k + 1 tokens and k drafter steps).
2. On the trained pair (the `kquant` fixture and the drafter distilled from it,
   tests/fixtures/drafters/kquant): `gemma4 generate` on corpus prompts with and without
   the drafter, the medians of the decode tokens/s and the acceptance measured.

    python benches/spec_bench.py --model /tmp/gemma4-e2b-text --drafter /tmp/gemma4-e2b-assistant
    python benches/spec_bench.py --formats q4_k --verify-max 8 --runs 5 --json out.json

Makes the checkpoints with benches/make_checkpoint.py when they are missing (the
reference environment of scripts/fixtures/requirements.txt) and builds the release binary.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "gemma4"
PAIR = ROOT / "tests" / "fixtures" / "kquant"
PAIR_DRAFTER = ROOT / "tests" / "fixtures" / "drafters" / "kquant"
# Corpus sentences the pair was trained on (scripts/fixtures/make_fixtures.py's corpus).
PAIR_PROMPTS = [
    "The quick brown fox",
    "The engine keeps a cache",
    "Rust is fast and safe.",
    "What is the capital of France?",
]


def ensure(a) -> None:
    if not BIN.exists() or a.build:
        subprocess.run(["cargo", "build", "--release", "-p", "gemma4-cli"], cwd=ROOT, check=True)
    make = [sys.executable, str(ROOT / "benches" / "make_checkpoint.py"), "--size", a.size]
    if not (a.model / "config.json").exists():
        subprocess.run(make + ["--out", str(a.model)], check=True)
    if not (a.drafter / "config.json").exists():
        subprocess.run(make + ["--assistant", "--out", str(a.drafter)], check=True)


def bench(a, fmt: str) -> dict:
    flag = ["--dtype", "bf16"] if fmt == "bf16" else ["--quant", fmt]
    cmd = [str(BIN), "--threads", str(a.threads), "bench", "--model", str(a.model), *flag,
           "--prompt-len", str(a.prompt_len), "--gen", "4", "--runs", str(a.runs), "--warmup", "1",
           "--verify-max", str(a.verify_max), "--draft", str(a.drafter), "--json"]
    print("+", " ".join(cmd), file=sys.stderr)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def pair(a) -> dict:
    """Median decode tok/s over the corpus prompts, with and without the drafter."""
    res = {}
    for name, extra in [("plain", []), ("draft", ["--draft", str(PAIR_DRAFTER)])]:
        rates, drafted, accepted = [], 0, 0
        for _ in range(a.runs):
            for p in PAIR_PROMPTS:
                cmd = [str(BIN), "--threads", str(a.threads), "generate", "--model", str(PAIR), "--dtype", "f32",
                       "--prompt", p, "--max-new-tokens", str(a.pair_tokens), "--greedy", "--json", *extra]
                v = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                rates.append(v["decode_tok_s"])
                if v.get("draft"):
                    drafted += v["draft"]["drafted"]
                    accepted += v["draft"]["accepted"]
        res[name] = {"decode_tok_s": statistics.median(rates), "runs": rates}
        if drafted:
            res[name]["acceptance_rate"] = accepted / drafted
    res["speedup"] = res["draft"]["decode_tok_s"] / res["plain"]["decode_tok_s"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("/tmp/gemma4-e2b-text"))
    ap.add_argument("--drafter", type=Path, default=Path("/tmp/gemma4-e2b-assistant"))
    ap.add_argument("--size", default="e2b")
    ap.add_argument("--formats", nargs="*", default=["q4_k", "q8_0", "bf16"])
    ap.add_argument("--verify-max", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--pair-tokens", type=int, default=48)
    ap.add_argument("--no-pair", action="store_true", help="skip the trained pair")
    ap.add_argument("--build", action="store_true", help="rebuild the release binary first")
    ap.add_argument("--json", type=Path, help="also write every result here")
    a = ap.parse_args()
    ensure(a)
    results = {"formats": {f: bench(a, f) for f in a.formats}}
    if not a.no_pair:
        results["pair"] = pair(a)

    k = a.verify_max
    print(f"\n{a.model.name} with {a.drafter.name}, {a.threads} threads, context {a.prompt_len}, "
          f"median of {a.runs} runs\n")
    print("| format | decode step | drafter step | " + " | ".join(f"k={i}" for i in range(1, k + 1)) +
          " | at 0.5 | at 0.7 | at 0.9 |")
    print("|---|---|---|" + "---|" * k + "---|---|---|")
    for f, r in results["formats"].items():
        s = r["speculative"]
        cells = [f"{v['over_decode']:.2f}×" for v in s["verify"]]
        best = [s["expected_speedup"][x] for x in ("0.5", "0.7", "0.9")]
        print(f"| {f} | {s['decode_step_s'] * 1e3:.1f} ms | {(s['draft_step_s'] or 0) * 1e3:.2f} ms | "
              + " | ".join(cells) + " | "
              + " | ".join(f"{b['speedup']:.2f}× (k={b['best_k']})" for b in best) + " |")
    if "pair" in results:
        p = results["pair"]
        print(f"\ntrained pair (kquant + distilled drafter, {a.pair_tokens} tokens, corpus prompts): "
              f"{p['plain']['decode_tok_s']:.1f} tok/s plain, {p['draft']['decode_tok_s']:.1f} tok/s with the drafter "
              f"({p['speedup']:.2f}×), acceptance {p['draft'].get('acceptance_rate', 0):.2f}")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
