#!/usr/bin/env bash
# The GPU check in one command (tools/gpu_check.py says what it runs and reports):
#
#   bash tools/gpu_check.sh OUTPUT_DIR [--budget-s 480] [--skip STAGE,...] [--cpu]
#
# Python: $PYTHON, else this checkout's .venv when it has one, else python3 (a GPU image's own,
# with its CUDA torch). The repository is put on PYTHONPATH, so nothing needs installing where
# the image already has the dependencies. Those it lacks (a GPU image usually has no webdataset
# or torchdata) are installed from wheel files in $WHEELS, with no index and no dependencies, into
# OUTPUT_DIR/work/deps; fill such a folder on a machine with a package index with
#
#   bash tools/gpu_check.sh --download-wheels DIR
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
# Pure-Python packages that a CUDA PyTorch image may lack (module:distribution).
optional_deps=(webdataset:webdataset braceexpand:braceexpand torchdata:torchdata yaml:pyyaml safetensors:safetensors
               pyarrow:pyarrow tensorboard:tensorboard transformers:transformers pytest:pytest)

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    exit 2
fi
if [[ -n "${PYTHON:-}" ]]; then python=$PYTHON
elif [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"
else python=python3
fi

if [[ "$1" == --download-wheels ]]; then
    [[ $# -eq 2 ]] || { echo "gpu_check.sh: error: --download-wheels needs one folder" >&2; exit 2; }
    # Pure-Python wheels only: they install on any Python the GPU image has. Compiled packages
    # (pyyaml, pyarrow, safetensors) must come with the image, as they do with PyTorch's images.
    "$python" -m pip download --no-deps --only-binary=:all: --dest "$2" webdataset braceexpand torchdata
    echo "gpu_check.sh: wheels in $2 (webdataset, braceexpand, torchdata; carry the folder and set WHEELS=$2)"
    exit 0
fi

out=$1
mkdir -p "$out/work"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
missing=()
for dep in "${optional_deps[@]}"; do
    "$python" -c "import ${dep%%:*}" 2>/dev/null || missing+=("${dep#*:}")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    if [[ -z "${WHEELS:-}" ]]; then
        echo "gpu_check.sh: error: $python lacks ${missing[*]}: set WHEELS to a folder of their wheels" \
             "(bash tools/gpu_check.sh --download-wheels DIR, on a machine with a package index)" >&2
        exit 2
    fi
    "$python" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" --target "$out/work/deps" "${missing[@]}"
    export PYTHONPATH="$PYTHONPATH:$(cd "$out/work/deps" && pwd)"
fi
exec "$python" "$repo/tools/gpu_check.py" "$@"
