#!/usr/bin/env bash
# Train on one machine: one process per GPU, rendezvous on this host only.
# (torchrun runs as python -m mpo_dist.launcher: input errors end in one line per rank and exit 2.)
#   bash launch/single_node.sh CONFIG [NPROC] [section.key=value ...]
# NPROC defaults to the number of GPUs (nvidia-smi -L), or 1 without a GPU. Equivalent to:
#   torchrun --standalone --nproc-per-node NPROC -m mpo_dist.train --config CONFIG [overrides ...]
# Example: bash launch/single_node.sh configs/llama-1b.yaml 8 training.steps=200
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$REPO/launch/_common.sh"
usage_unless_config "$0" "$@"
CONFIG=$1
shift

if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then
    NPROC=$1
    shift
else
    NPROC=$(gpu_count)
fi
# Make the package importable without installing it (the config path stays relative to the caller).
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

exec "${PYTHON:-python}" -m mpo_dist.launcher --standalone --nproc-per-node "$NPROC" -m mpo_dist.train --config "$CONFIG" "$@"
