#!/usr/bin/env bash
# The container's entrypoint: torchrun (as python -m mpo_dist.launcher, which turns an input error into
# one line per rank and exit code 2) with every argument passed through, so one image serves
# single-node and multi-node training and the tools:
#   docker run IMAGE --nproc-per-node 8 -m mpo_dist.train --config configs/llama-1b.yaml optim.lr=5e-7
#   docker run IMAGE --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node0:29500 \
#       --rdzv-id job1 -m mpo_dist.train --config configs/llama-8b.yaml
#   docker run IMAGE tools/convert_checkpoint.py --checkpoint /data/run/checkpoints/step-00001000 --out /data/hf
# Without rendezvous options it runs as one standalone node; NPROC_PER_NODE (when set) gives the
# process count unless --nproc-per-node is passed. A script path like tools/x.py that is not in the
# working directory is taken from the installed repository (MPO_DIST_HOME).
set -euo pipefail
HOME_DIR=${MPO_DIST_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}

launcher=()
has() { local flag; for flag in "$@"; do [[ " ${args[*]-} " == *" $flag"* ]] && return 0; done; return 1; }
args=("$@")
if ! has --standalone --rdzv-endpoint --rdzv_endpoint --master-addr --master_addr --nnodes; then
    launcher+=(--standalone)
fi
if [[ -n "${NPROC_PER_NODE:-}" ]] && ! has --nproc-per-node --nproc_per_node; then
    launcher+=(--nproc-per-node "$NPROC_PER_NODE")
fi
for i in "${!args[@]}"; do
    if [[ "${args[$i]}" == *.py && ! -e "${args[$i]}" && -e "$HOME_DIR/${args[$i]}" ]]; then
        args[$i]="$HOME_DIR/${args[$i]}"
        break
    fi
done
exec "${PYTHON:-python}" -m mpo_dist.launcher "${launcher[@]}" "${args[@]}"
