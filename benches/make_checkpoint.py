#!/usr/bin/env python3
"""A random-weight checkpoint with the real text shapes of a released Gemma 4 size, made by
the reference (`transformers` 5.23.0, pinned in scripts/fixtures/requirements.txt), for
benchmarks. Text decoder only (`gemma4_text`, `Gemma4ForCausalLM` layout), bf16 weights as
released. The values are random (normal, std 0.02; norms in [0.5, 1.5]); speed does not
depend on them.

    python benches/make_checkpoint.py --size e2b --out /tmp/gemma4-e2b-text

E2B: 35 layers, hidden 1536, PLE 256 per layer, 20 KV-shared layers with the double-wide
MLP, vocab 262144: 4.6 B parameters (9.3 GB in bf16; the PLE table is 2.35 B of them).
Needs about 12 GB of RAM and as much disk. E4B: 42 layers, hidden 2560: 7.5 B parameters
(15 GB in bf16 and of RAM, 3.5 min; the PLE table is 2.8 B of them). 26B-A4B: 30 layers,
hidden 2816, 128 experts of width 704 (top 8) beside a dense MLP of width 2112: 25 B
parameters, 51 GB in bf16, so `--layers 6` keeps the first six layers (one sliding/full
period, every per-layer shape as released): 5.6 B parameters, 11 GB; a token reads ~0.6 B
of the layers (8 of 128 experts) and the 0.74 B head.

    python benches/make_checkpoint.py --size 26b-a4b --layers 6 --out /tmp/gemma4-26b-a4b-6l
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from transformers import Gemma4ForCausalLM, Gemma4TextConfig

# Released text configs (../shared/reference/gemma4-spec.md §2.6).
SIZES = {
    "e2b": dict(
        vocab_size=262144, hidden_size=1536, intermediate_size=6144, num_hidden_layers=35,
        num_attention_heads=8, num_key_value_heads=1, head_dim=256, global_head_dim=512,
        hidden_size_per_layer_input=256, vocab_size_per_layer_input=262144,
        num_kv_shared_layers=20, use_double_wide_mlp=True, sliding_window=512,
        layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 7,
        max_position_embeddings=131072, final_logit_softcapping=30.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=[1, 106],
    ),
    "e4b": dict(
        vocab_size=262144, hidden_size=2560, intermediate_size=10240, num_hidden_layers=42,
        num_attention_heads=8, num_key_value_heads=2, head_dim=256, global_head_dim=512,
        hidden_size_per_layer_input=256, vocab_size_per_layer_input=262144,
        num_kv_shared_layers=18, use_double_wide_mlp=False, sliding_window=512,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 7,
        max_position_embeddings=131072, final_logit_softcapping=30.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=[1, 106],
    ),
    "26b-a4b": dict(
        vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
        num_attention_heads=16, num_key_value_heads=8, num_global_key_value_heads=2, head_dim=256,
        global_head_dim=512, attention_k_eq_v=True, hidden_size_per_layer_input=0,
        num_kv_shared_layers=0, enable_moe_block=True, num_experts=128, top_k_experts=8,
        moe_intermediate_size=704, sliding_window=1024,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 5,
        use_bidirectional_attention="vision", max_position_embeddings=262144,
        final_logit_softcapping=30.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=[1, 106],
    ),
}


def text_config(size: str, layers: int | None) -> dict:
    """The released config of `size`, optionally cut to its first `layers` layers (only
    for sizes without KV sharing, whose consumer layers would otherwise lose their
    producers)."""
    cfg = dict(SIZES[size])
    if layers is None or layers == cfg["num_hidden_layers"]:
        return cfg
    if cfg["num_kv_shared_layers"]:
        raise SystemExit(f"--layers: {size} shares KV across its last layers; only its full depth is kept")
    if not 1 <= layers <= cfg["num_hidden_layers"]:
        raise SystemExit(f"--layers must be in 1..{cfg['num_hidden_layers']} for {size}")
    cfg["num_hidden_layers"] = layers
    cfg["layer_types"] = cfg["layer_types"][:layers]
    return cfg


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="e2b")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, help="keep only the first N layers (sizes without KV sharing)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    cfg = Gemma4TextConfig(**text_config(a.size, a.layers))
    with torch.device("meta"):
        model = Gemma4ForCausalLM(cfg)
    # Cast on the meta device so the weights are allocated once, in bf16 (E4B in f32 would
    # need 30 GB).
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    # Materialising breaks the tie between the embedding and the LM head; released
    # checkpoints store no `lm_head.weight`, so neither does this one.
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    g = torch.Generator().manual_seed(a.seed)
    for name, p in model.named_parameters():
        if p.ndim == 1:
            p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g))
        else:
            # Row blocks keep the f32 temporary small for the big tables.
            for rows in torch.split(torch.arange(p.shape[0]), 16384):
                p[rows] = (torch.randn((len(rows), *p.shape[1:]), generator=g) * 0.02).to(p.dtype)
    # `layer_scalar` is the only persistent buffer (the RoPE tables and embedding scales are
    # not saved; the engines derive them from the config).
    for name, b in model.named_buffers():
        if name.endswith("layer_scalar"):
            b.fill_(1.0)
    a.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(a.out, safe_serialization=True, max_shard_size="4GB")
    n = sum(p.numel() for p in model.parameters())
    (a.out / "bench_checkpoint.json").write_text(json.dumps({"size": a.size, "layers": cfg.num_hidden_layers, "parameters": n}) + "\n")
    print(f"wrote {a.out}: {n / 1e9:.2f} B parameters")


if __name__ == "__main__":
    main()
