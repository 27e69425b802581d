#!/usr/bin/env python3
"""LoRA training throughput and peak memory: `gemma4 finetune` against transformers + peft
on the same checkpoint, data and machine.

    python benches/train_bench.py --model /tmp/gemma4-e2b-text              # E2B shapes, seq 512
    python benches/train_bench.py --model DIR --engines gemma4-f32 transformers-f32 --steps 3
    (gemma4-FMT+keep: without recomputation, --no-recompute)

Every engine trains LoRA r=16 (alpha 32) on all linear projections of the text decoder, one
sequence of `--seq` tokens per optimizer step (a `text` row: every token supervised), AdamW,
for `--warmup` + `--steps` steps; tokens/s is the median of the measured steps (each
engine's own per-step timing), peak RSS that of its process. gemma4 recomputes each layer
in backward (its default); transformers runs as `Trainer` does by default, without
gradient checkpointing (more memory, less compute), so the comparison is conservative.
The reference stack is scripts/fixtures/requirements.txt plus peft 0.21.2; the checkpoint
is made by benches/make_checkpoint.py when missing (random weights, real shapes).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "gemma4"

WORDS = ("the model reads a prompt and writes an answer one token at a time while the engine "
         "keeps a cache of keys and values so that each new token costs only one step and "
         "sliding layers see a window while full layers see everything").split()


def make_rows(model: Path, seq: int, n: int) -> list[str]:
    """`n` texts of exactly `seq` tokens with the checkpoint's tokenizer (`<bos>` text)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    rows = []
    for k in range(n):
        words = [WORDS[(k * 7 + i * 13) % len(WORDS)] for i in range(seq * 2)]
        text = " ".join(words)
        ids = tok.encode(text, add_special_tokens=False).ids[: seq - 2]
        rows.append(tok.decode(ids))
    return rows


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def run_gemma4(model: Path, fmt: str, rows: list[str], a) -> dict:
    # `FMT+keep`: every layer's activations kept (--no-recompute).
    fmt, keep = fmt.removesuffix("+keep"), fmt.endswith("+keep")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        data.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
        cmd = [str(BIN), "--threads", str(a.threads), "finetune", "--model", str(model),
               "--data", str(data), "--out", str(Path(tmp) / "out"), "--steps",
               str(a.warmup + a.steps), "--batch", "1", "--r", "16", "--alpha", "32",
               "--targets", "all-linear", "--max-len", str(a.seq + 8), "--json"]
        cmd += ["--dtype", fmt] if fmt in ("f32", "bf16") else ["--quant", fmt]
        if keep:
            cmd.append("--no-recompute")
        out = subprocess.run([sys.executable, __file__, "--rss-child", "--", *cmd],
                             capture_output=True, text=True)
        if out.returncode != 0:
            # Killed for memory leaves no message: say so, and go on with the others.
            return {"engine": f"gemma4-{fmt}{'+keep' if keep else ''}",
                    "failed": f"exit {out.returncode}: {out.stderr[-500:].strip() or 'killed (out of memory?)'}"}
        rss = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]
        log = [json.loads(l) for l in (Path(tmp) / "out" / "train_log.jsonl").read_text().splitlines()]
        steps = [s for s in log if "loss" in s][a.warmup:]
        return {"engine": f"gemma4-{fmt}{'+keep' if keep else ''}", "tok_s": statistics.median(s["tokens_per_s"] for s in steps),
                "step_s": statistics.median(s["elapsed_s"] for s in steps),
                "tokens": steps[0]["tokens"], "loss": [s["loss"] for s in steps], "peak_rss_mb": rss}


def transformers_child(model: str, dtype: str, rows: list[str], warmup: int, steps: int,
                       threads: int) -> None:
    import time

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model)
    m = AutoModelForCausalLM.from_pretrained(
        model, dtype={"f32": torch.float32, "bf16": torch.bfloat16}[dtype])
    m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                     lora_dropout=0.0, task_type="CAUSAL_LM"))
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    times, losses, tokens = [], [], 0
    for k in range(warmup + steps):
        ids = tok(rows[k % len(rows)], return_tensors="pt").input_ids
        ids = torch.cat([ids, torch.tensor([[tok.eos_token_id]])], dim=1)
        t = time.perf_counter()
        loss = m(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        dt = time.perf_counter() - t
        if k >= warmup:
            times.append(dt)
            losses.append(loss.item())
        tokens = ids.shape[1]
    print(json.dumps({"step_s": statistics.median(times), "tokens": tokens, "loss": losses}))


def run_transformers(model: Path, dtype: str, rows: list[str], a) -> dict:
    cmd = [sys.executable, __file__, "--transformers-child", str(model), dtype,
           json.dumps(rows), str(a.warmup), str(a.steps), str(a.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    out = subprocess.run([sys.executable, __file__, "--rss-child", "--", *cmd],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"engine": f"transformers-{dtype}",
                "failed": f"exit {out.returncode}: {out.stderr[-500:].strip() or 'killed (out of memory?)'}"}
    lines = out.stdout.strip().splitlines()
    r = json.loads(lines[-2])
    rss = json.loads(lines[-1])["peak_rss_mb"]
    return {"engine": f"transformers-{dtype}", "tok_s": r["tokens"] / r["step_s"],
            "step_s": r["step_s"], "tokens": r["tokens"], "loss": r["loss"], "peak_rss_mb": rss}


def rss_child(cmd: list[str]) -> None:
    out = subprocess.run(cmd)
    if out.returncode != 0:
        sys.exit(out.returncode)
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--rss-child":
        rss_child(sys.argv[3:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--transformers-child":
        m, dtype, rows, warmup, steps, threads = sys.argv[2:8]
        transformers_child(m, dtype, json.loads(rows), int(warmup), int(steps), int(threads))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("/tmp/gemma4-e2b-text"))
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engines", nargs="+", default=["gemma4-f32", "transformers-f32",
                                                    "gemma4-bf16", "transformers-bf16",
                                                    "gemma4-q8_0", "gemma4-q4_k"])
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    a = p.parse_args()
    if not (a.model / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "benches" / "make_checkpoint.py"),
                        "--out", str(a.model)], check=True)
    if any(e.startswith("gemma4") for e in a.engines) and not BIN.exists():
        subprocess.run(["cargo", "build", "--release", "-p", "gemma4-cli"], cwd=ROOT, check=True)
    rows = make_rows(a.model, a.seq, a.warmup + a.steps)
    results = []
    for e in a.engines:
        kind, fmt = e.split("-", 1)
        r = run_gemma4(a.model, fmt, rows, a) if kind == "gemma4" else run_transformers(a.model, fmt, rows, a)
        results.append(r)
        if "failed" in r:
            print(f"{r['engine']:>18}: failed, {r['failed']}", flush=True)
            continue
        print(f"{r['engine']:>18}: {r['tok_s']:8.1f} tok/s  ({r['step_s']:.1f} s/step of {r['tokens']} tokens), "
              f"peak RSS {r['peak_rss_mb'] / 1024:.2f} GiB, loss {['%.3f' % l for l in r['loss']]}", flush=True)
    ok = [r for r in results if "failed" not in r]
    base = {r["engine"].split("-", 1)[1]: r for r in ok if r["engine"].startswith("transformers")}
    for dtype, ref in base.items():
        print(f"\nagainst transformers-{dtype} ({ref['tok_s']:.1f} tok/s):")
        for r in ok:
            if r["engine"].startswith("gemma4"):
                print(f"  {r['engine']:>18}: {r['tok_s'] / ref['tok_s']:.2f}x tok/s, "
                      f"{r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x peak RSS")
    if a.out:
        a.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
