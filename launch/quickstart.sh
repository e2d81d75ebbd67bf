#!/usr/bin/env bash
# Quickstart on CPU, a few minutes: MPO on a toy preference task with a known ground truth.
#   bash launch/quickstart.sh [OUTPUT_DIR]      (default outputs/quickstart, relative to the working directory)
# 1. make the task (sort the digits: chosen is sorted, rejected has two neighbours swapped) and a
#    tiny random-init Llama, which is the starting policy and the reference;
# 2. tokenize the pairs into shards (10% of the prompts held out for evaluation), score both splits
#    with the reference, and sample D_ref responses from it: for MPO's second KL term (training
#    prompts) and for the KL monitor (held-out prompts); 2 processes each, in --dtype auto like the
#    training config's model.dtype (bfloat16 on a CPU that computes it natively, else float32: each
#    says which), so that policy and reference log-probs agree at step 1;
# 3. train with MPO under torchrun (python -m mpo_dist.launcher) on 2 processes (FSDP2, gloo), with a
#    held-out evaluation every 10 steps: preference accuracy rises, on held-out pairs too.
set -euo pipefail
OUT=${1:-outputs/quickstart}
[[ "$OUT" == /* ]] || OUT="$PWD/$OUT"  # the caller's folder: the scripts below run from the repository
cd "$(dirname "$0")/.."
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # what torchrun would pick for 2 processes, without its warning

# Only what an earlier quickstart made there is removed: OUTPUT_DIR may be a mounted folder.
rm -rf "${OUT:?}"/{toy,pairs,reference,dref,run}
python tools/make_toy_data.py --out "$OUT/toy" --records 4000
RUN=(python -m mpo_dist.launcher --standalone --nproc-per-node 2)
"${RUN[@]}" tools/prepare_pairs.py --input "$OUT/toy/pairs.jsonl" --tokenizer "$OUT/toy/model" --out "$OUT/pairs" \
    --samples-per-shard 500 --max-length 64 --max-prompt-length 32 --eval-fraction 0.1
for split in train eval; do
    "${RUN[@]}" tools/score_reference.py --model "$OUT/toy/model" --pairs "$OUT/pairs/$split" \
        --out "$OUT/reference/$split" --batch-size 64 --dtype auto
done
# D_ref for MPO's tau term (training prompts) and a held-out D_ref for the KL monitor (eval prompts).
"${RUN[@]}" tools/sample_reference.py --model "$OUT/toy/model" --pairs "$OUT/pairs/train" --out "$OUT/dref/train" \
    --num-samples 1 --max-new-tokens 12 --batch-size 100 --dtype auto
"${RUN[@]}" tools/sample_reference.py --model "$OUT/toy/model" --pairs "$OUT/pairs/eval" --out "$OUT/dref/eval" \
    --num-samples 2 --max-new-tokens 12 --batch-size 100 --dtype auto
"${RUN[@]}" -m mpo_dist.train --config configs/tiny_cpu.yaml job.output_dir="$OUT/run" model.path="$OUT/toy/model" \
    data.pairs="$OUT/pairs/train" data.reference="$OUT/reference/train" data.dref="$OUT/dref/train" \
    eval.pairs="$OUT/pairs/eval" eval.reference="$OUT/reference/eval" eval.dref="$OUT/dref/eval"
echo "quickstart: checkpoints in $OUT/run/checkpoints, metrics in $OUT/run/metrics.jsonl, TensorBoard: tensorboard --logdir $OUT/run/tensorboard"
