#!/usr/bin/env bash
# mpo_dist container entrypoint. Every argument goes to torchrun (run as python -m mpo_dist.launcher,
# which turns an input error into one line per rank and exit code 2), so one image serves
# single-node and multi-node training and the tools:
#   docker run IMAGE --nproc-per-node 8 -m mpo_dist.train --config configs/llama-1b.yaml optim.lr=5e-7
#   docker run IMAGE --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node0:29500 \
#       --rdzv-id job1 -m mpo_dist.train --config configs/llama-8b.yaml
#   docker run IMAGE tools/convert_checkpoint.py --checkpoint /data/run/checkpoints/step-00001000 --out /data/hf
#   docker run --user "$(id -u):$(id -g)" -v "$PWD/outputs:/workspace/outputs" IMAGE quickstart
# Without rendezvous options it runs as one standalone node; NPROC_PER_NODE (when set) gives the
# process count unless --nproc-per-node is passed. A relative path under configs/, tools/ or
# launch/ that is not in the working directory (/workspace) is taken from the image's copy of the
# repository (MPO_DIST_HOME, /opt/mpo_dist), as the script or as an option's value (--config X or
# --config=X). `quickstart [OUTPUT_DIR]` runs launch/quickstart.sh (default outputs/quickstart,
# relative to the working directory). Folders the job writes to must be writable by the container's
# user: uid 10001 unless docker run --user gives another.
set -euo pipefail
HOME_DIR=${MPO_DIST_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
PYTHON=${PYTHON:-python}

if [[ $# -eq 0 || "$1" == --help || "$1" == -h || "$1" == help ]]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
    echo
    echo "torchrun's options (python -m mpo_dist.launcher):"
    exec "$PYTHON" -m mpo_dist.launcher --help
fi
if [[ "$1" == quickstart ]]; then
    exec bash "$HOME_DIR/launch/quickstart.sh" "${@:2}"
fi

# The image's copy of a repository-relative path (configs/..., tools/..., launch/...) when the working
# directory has none.
from_image() {
    local path=$1
    if [[ "$path" == configs/* || "$path" == tools/* || "$path" == launch/* ]] \
        && [[ ! -e "$path" && -e "$HOME_DIR/$path" ]]; then
        path="$HOME_DIR/$path"
    fi
    printf '%s' "$path"
}

launcher=()
args=()
original=("$@")
has() { local flag; for flag in "$@"; do [[ " ${original[*]} " == *" $flag"* ]] && return 0; done; return 1; }
for arg in "$@"; do
    if [[ "$arg" == --*=* ]]; then
        args+=("${arg%%=*}=$(from_image "${arg#*=}")")
    else
        args+=("$(from_image "$arg")")
    fi
done
if ! has --standalone --rdzv-endpoint --rdzv_endpoint --master-addr --master_addr --nnodes; then
    launcher+=(--standalone)
fi
if [[ -n "${NPROC_PER_NODE:-}" ]] && ! has --nproc-per-node --nproc_per_node; then
    launcher+=(--nproc-per-node "$NPROC_PER_NODE")
fi
exec "$PYTHON" -m mpo_dist.launcher "${launcher[@]}" "${args[@]}"
