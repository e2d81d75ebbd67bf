# mpo_dist for GPU clusters: CUDA, NCCL and PyTorch come from the base image (swap it with
# --build-arg BASE_IMAGE=...); the project is installed by launch/install.sh, the same script CI runs.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
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
COPY launch ./launch
COPY tools ./tools
COPY configs ./configs
RUN bash launch/install.sh \
    && useradd --create-home --uid 10001 mpo \
    && mkdir -p /workspace \
    && chown mpo:mpo /workspace

USER 10001
WORKDIR /workspace
ENTRYPOINT ["/opt/mpo_dist/launch/entrypoint.sh"]
CMD ["--help"]
