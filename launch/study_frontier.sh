#!/usr/bin/env bash
# The reward/KL frontier study on CPU: DPO, IPO and MPO (scaled, with and without its tau term, with its
# other options) on a story task with a known reward, from the real pretrained stories260K model, every
# configuration on 3 seeds, the main ones evaluated along 480-step runs, with hard and soft labels.
#   bash launch/study_frontier.sh OUTPUT_DIR [--size default|tiny] [--seeds N] [--methods dpo,ipo,...]
#        [--jobs 1] [--nproc 1] [--background] [--model DIR]
# Makes the data with the project's tools, trains every run under torchrun (configs/study_frontier.yaml),
# evaluates checkpoints on held-out prompts on the policy's own samples (true reward and
# KL(pi_theta || pi_ref), tools/evaluate.py), and writes OUTPUT_DIR/results.csv, runs.csv, results.json,
# tables.md, frontier.png and trajectories.png. The default size is 57 runs (docs/frontier/README.md gives
# its time); --size tiny checks the pipeline in about 3 minutes; --jobs 2 runs independent steps two at a
# time; --background detaches it (output in OUTPUT_DIR/study.log). A rerun resumes what is unfinished
# (tools/study_frontier.py). The plots need matplotlib: pip install -e '.[study]'.
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
