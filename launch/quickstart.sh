#!/usr/bin/env bash
# Quickstart on CPU: make the toy preference task (digit sorting, known ground truth), tokenize it
# into pairs shards with 2 processes, and stream it through the data loader.
#   bash launch/quickstart.sh [OUTPUT_DIR]      (default outputs/quickstart)
set -euo pipefail
OUT=${1:-outputs/quickstart}
cd "$(dirname "$0")/.."
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::UserWarning}

rm -rf "$OUT/pairs"
python tools/make_toy_data.py --out "$OUT/toy" --records 4000
torchrun --standalone --nproc-per-node 2 tools/prepare_pairs.py \
    --input "$OUT/toy/pairs.jsonl" --tokenizer "$OUT/toy/tokenizer" --out "$OUT/pairs" \
    --samples-per-shard 500 --max-length 64 --max-prompt-length 32
python tools/bench_loader.py --pairs "$OUT/pairs" --batch-size 16 --max-tokens 1024
echo "quickstart: pairs shards in $OUT/pairs (manifest: $OUT/pairs/manifest.json)"
