#!/usr/bin/env bash
# Install mpo_dist into the current Python environment: the one install path, used by the
# Dockerfile (into the image's Python, whose CUDA torch is kept) and by .ci/run (into a fresh venv).
#   bash launch/install.sh          # the package and its dependencies
#   bash launch/install.sh dev      # also the test and lint tools
# TORCH_VERSION (default 2.13.0) is installed only when torch is missing, so a base image's CUDA
# build is never replaced, and pip never pulls CUDA wheels on a CPU machine.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$(command -v python || command -v python3 || true)}
if [[ -z "$PYTHON" ]]; then
    echo "launch/install.sh: neither python nor python3 is on PATH; set PYTHON=/path/to/python" >&2
    exit 1
fi
# A distribution's own Python refuses pip installs (PEP 668): say how to use a virtual environment
# rather than let pip fail half-way (PIP_BREAK_SYSTEM_PACKAGES=1 overrides, as it does for pip).
if [[ "${PIP_BREAK_SYSTEM_PACKAGES:-0}" != 1 ]] && "$PYTHON" -c '
import os, sys, sysconfig
managed = os.path.isfile(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
sys.exit(0 if managed and sys.prefix == sys.base_prefix else 1)'; then
    echo "launch/install.sh: $PYTHON is managed by the system (PEP 668) and refuses pip installs; install" \
        "into a virtual environment: python3 -m venv --system-site-packages .venv &&" \
        "PYTHON=.venv/bin/python bash launch/install.sh" >&2
    exit 1
fi
PIP=("$PYTHON" -m pip install --no-cache-dir --disable-pip-version-check -q)

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "${PIP[@]}" "torch==${TORCH_VERSION:-2.13.0}"
fi
target="$REPO"
if [[ "${1:-}" == dev ]]; then
    target="$REPO[dev]"
fi
# Editable in a checkout (tests and tools run from it), a regular install in an image build.
if [[ "${MPO_DIST_EDITABLE:-1}" == 1 ]]; then
    "${PIP[@]}" -e "$target"
else
    "${PIP[@]}" "$target"
fi
"$PYTHON" -c "import mpo_dist, torch, transformers, webdataset, torchdata; print(f'mpo_dist {mpo_dist.__version__} installed (torch {torch.__version__}, transformers {transformers.__version__}) in $SECONDS s')"
