#!/usr/bin/env bash
# The reward/KL frontier study on CPU: DPO, IPO and MPO (tau off and on, with and without its options)
# over a sweep of beta, on a story task with a known reward, from the real pretrained stories260K model.
#   bash launch/study_frontier.sh OUTPUT_DIR [--tiny] [--methods dpo,ipo,...] [--nproc 2] [--jobs 1] [--model DIR]
# Makes the data with the project's tools (story-opening prompts, two reference samples per pair
# labelled by Bradley-Terry on mpo_dist/study/story_reward.py, prepare, score, D_ref), trains every run under
# torchrun (configs/study_frontier.yaml), evaluates each final policy on held-out prompts on its own
# samples (true reward and KL(pi_theta || pi_ref) with standard errors, tools/evaluate.py), and writes
# OUTPUT_DIR/results.csv, results.json, frontier.png and kl_steps.png. 24 runs, 27 minutes on a 2-core
# CPU (longer when other jobs share it); --tiny checks the pipeline in under 3 minutes (6 runs; --jobs 2
# runs independent steps two at a time). A rerun skips what is finished (tools/study_frontier.py).
# The plots need matplotlib: pip install -e '.[study]'.
set -euo pipefail
if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    exit 2
fi
OUT=$1
shift
[[ "$OUT" == /* ]] || OUT="$PWD/$OUT"  # the caller's folder: the study runs from the repository
cd "$(dirname "$0")/.."
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
exec python tools/study_frontier.py --out "$OUT" "$@"
