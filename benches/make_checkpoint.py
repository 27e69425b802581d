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

`--assistant` writes a random-weight drafter (`gemma4_assistant`) for the size instead:
4 query-only layers of width 256 over the target's K/V geometry, the centroid head of
E2B/E4B (2048 clusters, top 32) or a dense tied head. The published drafters' exact
widths are not in the reference; these are assumed, and a drafter this small costs little
beside the target either way. transformers 5.23.0 cannot build an all-shared config
(`kv_sharing_modes` raises); the patch is the one in scripts/fixtures/make_drafter_fixtures.py.

    python benches/make_checkpoint.py --size e2b --assistant --out /tmp/gemma4-e2b-assistant
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


def assistant(size: str, out: Path, seed: int) -> None:
    """A random-weight drafter for `size` (see the module doc)."""
    from transformers import Gemma4AssistantConfig, Gemma4AssistantForCausalLM

    original = Gemma4TextConfig.kv_sharing_modes.fget
    Gemma4TextConfig.kv_sharing_modes = property(
        lambda c: ["reuse"] * c.num_hidden_layers if c.num_kv_shared_layers == c.num_hidden_layers else original(c))
    t = SIZES[size]
    text = Gemma4TextConfig(
        vocab_size=t["vocab_size"], hidden_size=256, intermediate_size=2048, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=t["num_key_value_heads"], head_dim=t["head_dim"],
        global_head_dim=t["global_head_dim"], attention_k_eq_v=t.get("attention_k_eq_v", False),
        num_global_key_value_heads=t.get("num_global_key_value_heads"),
        layer_types=["sliding_attention"] * 3 + ["full_attention"], sliding_window=t["sliding_window"],
        hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, num_kv_shared_layers=4,
        final_logit_softcapping=None, max_position_embeddings=t["max_position_embeddings"], rms_norm_eps=1e-6,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=[1, 106],
    )
    centroids = size in ("e2b", "e4b")
    cfg = Gemma4AssistantConfig(text_config=text, backbone_hidden_size=t["hidden_size"],
                                use_ordered_embeddings=centroids, num_centroids=2048,
                                centroid_intermediate_top_k=32, tie_word_embeddings=True)
    model = Gemma4AssistantForCausalLM(cfg).to(torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 1:
            p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g))
        else:
            p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
    for name, b in model.named_buffers():
        if name.endswith("layer_scalar"):
            b.fill_(1.0)
        if name.endswith("token_ordering"):
            b.copy_(torch.randperm(t["vocab_size"], generator=g))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").write_text(json.dumps({"num_assistant_tokens": 4}) + "\n")
    print(f"wrote {out}: a {size} drafter, {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters")


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="e2b")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, help="keep only the first N layers (sizes without KV sharing)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--assistant", action="store_true", help="write a drafter for --size instead")
    a = ap.parse_args()
    if a.assistant:
        return assistant(a.size, a.out, a.seed)
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
