# mpo_dist for GPU clusters: CUDA, NCCL and PyTorch come from the base image (swap it with
# --build-arg BASE_IMAGE=...); the project is installed by launch/install.sh, the same script CI runs.
# CI builds this file on a small local Debian base with the CPU torch wheel (launch/test_container.sh).
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

# The project goes into a virtual environment that sees the base's packages (its CUDA torch is kept),
# so a base whose Python belongs to the distribution (PEP 668) works as well as a conda one.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    MPO_DIST_HOME=/opt/mpo_dist \
    MPO_DIST_EDITABLE=0 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/workspace/.cache/huggingface \
    TORCH_NCCL_ASYNC_ERROR_HANDLING=3 \
    NCCL_DEBUG=WARN

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /opt/mpo_dist
COPY pyproject.toml README.md ./
COPY mpo_dist ./mpo_dist
COPY launch/install.sh ./launch/
# The non-editable install builds in the source folder: its build/ and egg-info are not kept.
RUN python3 -m venv --system-site-packages /opt/venv \
    && bash launch/install.sh \
    && rm -rf build ./*.egg-info \
    && useradd --create-home --uid 10001 mpo \
    && mkdir -p /workspace \
    && chown mpo:mpo /workspace
# Scripts and configs last: editing them does not redo the install.
COPY launch ./launch
COPY tools ./tools
COPY configs ./configs

USER 10001
WORKDIR /workspace
ENTRYPOINT ["/opt/mpo_dist/launch/entrypoint.sh"]
CMD ["--help"]
