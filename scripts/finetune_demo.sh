#!/usr/bin/env bash
# A short real fine-tuning run, the one the README shows: the `kquant` fixture (an
# E2B-shaped model, 4 layers, 256 wide, trained on the tokenizer corpus) learns six chat
# answers with a LoRA adapter. Prints its answers before and after, and leaves the loss
# curve in OUT/loss.png.
#
#     bash scripts/finetune_demo.sh [OUT]        (default /tmp/gemma4-finetune-demo)
#
# It is a demonstration of the machinery on a model small enough to train in a minute on
# two cores: the model memorises its six answers; it does not learn to answer new ones.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/gemma4-finetune-demo}
BIN=target/release/gemma4
MODEL=tests/fixtures/kquant
[ -x "$BIN" ] || cargo build --release -p gemma4-cli
rm -rf "$OUT"
mkdir -p "$OUT"

QUESTIONS=(
  "What colour is the sky?"
  "What do cats say?"
  "How many legs does a spider have?"
  "What is the capital of France?"
  "What do bees make?"
  "What is frozen water called?"
)
ANSWERS=(
  "The sky is blue."
  "Cats say meow."
  "A spider has eight legs."
  "Paris is the capital of France."
  "Bees make honey."
  "Frozen water is called ice."
)
for i in "${!QUESTIONS[@]}"; do
  printf '{"messages": [{"role": "user", "content": "%s"}, {"role": "assistant", "content": "%s"}]}\n' \
    "${QUESTIONS[$i]}" "${ANSWERS[$i]}"
done > "$OUT/data.jsonl"

ask() { # ask QUESTION [--lora DIR]
  local q=$1
  shift
  "$BIN" generate --model "$MODEL" "$@" --chat "$q" --greedy --max-new-tokens 24 2>/dev/null \
    | tr '\n' ' '
}

echo "== before"
for q in "${QUESTIONS[@]}"; do echo "$q -> $(ask "$q")"; done

"$BIN" finetune --model "$MODEL" --data "$OUT/data.jsonl" --out "$OUT/adapter" \
  --steps 60 --batch 3 --lr 2e-3 --r 8 --alpha 16 --warmup 5 --eval "$OUT/data.jsonl" \
  --eval-every 10 --json

echo "== after"
for q in "${QUESTIONS[@]}"; do echo "$q -> $(ask "$q" --lora "$OUT/adapter")"; done
echo "loss curve: $OUT/adapter/loss.png"
