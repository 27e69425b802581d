#!/usr/bin/env python3
"""An adapter trained by `gemma4 finetune` loads in peft and gives the engine's logits.

Trains a few steps on a committed fixture, then compares `gemma4 logits --lora OUT` with
`PeftModel.from_pretrained(base, OUT)` (transformers + peft from
scripts/fixtures/requirements.txt, plus peft 0.21.2) on every prompt of the fixture, in
f32; passes within 1e-4 max-abs.

    python scripts/check_peft_roundtrip.py target/debug/gemma4 tests/fixtures/e2b_like
    python scripts/check_peft_roundtrip.py target/debug/gemma4 tests/fixtures/moe --targets q_proj,experts

Arguments after the checkpoint go to `gemma4 finetune`.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from transformers import AutoConfig, Gemma4ForCausalLM, Gemma4ForConditionalGeneration


def main() -> None:
    binary, base, extra = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in [
            {"messages": [{"role": "user", "content": "What is the capital of France?"},
                          {"role": "assistant", "content": "Paris is the capital."}]},
            {"prompt": "The quick brown fox", "completion": " jumps over the lazy dog."},
            {"text": "Rust is fast and safe."},
        ]))
        out = tmp / "adapter"
        subprocess.run([binary, "finetune", "--model", str(base), "--data", str(data), "--out",
                        str(out), "--steps", "4", "--lr", "1e-2", "--r", "4", "--alpha", "8",
                        "--dtype", "f32", *extra], check=True)
        arch = AutoConfig.from_pretrained(base).architectures[0]
        cls = Gemma4ForCausalLM if arch == "Gemma4ForCausalLM" else Gemma4ForConditionalGeneration
        model = PeftModel.from_pretrained(cls.from_pretrained(base, dtype=torch.float32), out).eval()
        cases = json.loads((base / "golden" / "prompts.json").read_text())["cases"]
        worst = 0.0
        for k, c in enumerate(cases):
            ids = c["prompt_ids"]
            npy = tmp / f"logits_{k}.npy"
            subprocess.run([binary, "logits", "--model", str(base), "--dtype", "f32", "--lora", str(out),
                            "--prompt-ids", ",".join(map(str, ids)), "--out", str(npy)],
                           check=True, capture_output=True)
            ours = np.load(npy)
            with torch.no_grad():
                theirs = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].numpy()
            d = float(np.abs(ours - theirs).max())
            worst = max(worst, d)
            print(f"prompt {k}: {len(ids)} tokens, max |Δ| {d:.2e}")
        # The adapter must do something, or the comparison proves nothing.
        with torch.no_grad(), model.disable_adapter():
            plain = model(input_ids=torch.tensor([cases[0]["prompt_ids"]]), use_cache=False).logits[0].numpy()
        moved = float(np.abs(np.load(tmp / "logits_0.npy") - plain).max())
        print(f"the adapter moves the logits by up to {moved:.3f}")
        if worst > 1e-4 or moved < 1e-2:
            sys.exit(f"FAILED: max |Δ| {worst:.2e}, adapter effect {moved:.3f}")
        print("ok: peft reads the adapter and computes the engine's logits")


if __name__ == "__main__":
    main()
