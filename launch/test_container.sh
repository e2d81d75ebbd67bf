#!/usr/bin/env bash
# Build the image and run the pipeline inside it, offline (no container registry needed); .ci/run
# runs it after the tests:
#   bash launch/test_container.sh
# 1. Docker: the running daemon, or dockerd started here (the distribution's docker.io installed
#    first when missing, as root) and stopped at the end.
# 2. A small local base image, made once and then reused: Debian bookworm's own Python
#    (debootstrap from the distribution's mirror, then docker import) with this machine's CA
#    certificates (so pip in the image reaches the package index through the same TLS setup) and
#    the CPU torch wheel that `pip download torch==$TORCH_VERSION` finds here.
# 3. The project's Dockerfile built on it with --build-arg BASE_IMAGE=...
# 4. Through the entrypoint, each result checked: --help; the tools (toy task, prepare, score,
#    sample) and a 2-process MPO run of a few steps, in float32 on any CPU, on a mounted folder owned by
#    the image's user (uid 10001), a config given relative to the repository; a bad config's exit code
#    2; the conversion of the run's checkpoint, loaded back with transformers; the quickstart run as
#    another user (--user) into a mounted folder, in whatever --dtype auto picks there (it must say).
#    Also: install.sh's PEP 668 message on the base's Python, and no build leftovers in the image.
# Environment: BASE_IMAGE (build on this existing image instead of step 2), IMAGE (the project image's
# tag, default mpo-dist:test), TORCH_VERSION (2.13.0), TORCH_WHEEL (a CPU torch wheel file to put in
# the base instead of pip download's), DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
LOCAL_BASE="mpo-dist-test-base:bookworm-torch$TORCH_VERSION"
BASE_IMAGE=${BASE_IMAGE:-}
IMAGE=${IMAGE:-mpo-dist:test}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mpo-dist-container.XXXXXX")
started_daemon=""
CHECK_NAME=test_container
source "$REPO/launch/_checks.sh"
is_root() { [[ $(id -u) == 0 ]]; }

cleanup() {
    local status=$?
    if [[ -n "$started_daemon" ]]; then
        kill "$started_daemon" 2>/dev/null || true
        for _ in $(seq 60); do kill -0 "$started_daemon" 2>/dev/null || break; sleep 0.5; done
        echo "test_container: stopped the Docker daemon it started"
    fi
    rm -rf "$WORK"
    echo "test_container: $([[ $status == 0 ]] && echo passed || echo failed) in $((SECONDS - script_start)) s"
    exit "$status"
}
trap cleanup EXIT

apt_install() {
    is_root && command -v apt-get >/dev/null || fail "$1 is missing: install it (Debian/Ubuntu package $1) or run this as root"
    echo "installing $1 from the distribution's packages"
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$1" >/dev/null
}

# A docker run whose output is kept, and shown when it fails: run NAME [docker run options] IMAGE [args].
run() {
    local name=$1
    shift
    if ! docker run --rm "$@" >"$WORK/$name.log" 2>&1; then
        tail -n 40 "$WORK/$name.log" >&2
        fail "$name: docker run $* exited non-zero"
    fi
}
expect_file() { [[ -s "$1" ]] || fail "$2: $1 was not written"; }

stage "Docker daemon"
if docker info >/dev/null 2>&1; then
    echo "using the running Docker daemon"
else
    command -v dockerd >/dev/null || apt_install docker.io
    is_root || fail "no Docker daemon runs and only root can start one here"
    dockerd >"$WORK/dockerd.log" 2>&1 &
    started_daemon=$!
    for _ in $(seq 120); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || { tail -n 20 "$WORK/dockerd.log" >&2; fail "dockerd did not start"; }
    echo "started dockerd (pid $started_daemon)"
fi
passed "Docker $(docker version --format '{{.Server.Version}}')"

stage "base image"
if [[ -n "$BASE_IMAGE" ]]; then
    docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || fail "BASE_IMAGE=$BASE_IMAGE is not a local image"
    echo "building on $BASE_IMAGE"
elif docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
    BASE_IMAGE=$LOCAL_BASE
    echo "reusing $BASE_IMAGE"
else
    BASE_IMAGE=$LOCAL_BASE
    command -v debootstrap >/dev/null || apt_install debootstrap
    rootfs="$WORK/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$rootfs" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -n 20 "$WORK/debootstrap.log" >&2; fail "debootstrap from $DEBIAN_MIRROR"; }
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/usr/share/{doc,man,info}
    tar -C "$rootfs" -c . | docker import - "$LOCAL_BASE-rootfs" >/dev/null
    rm -rf "$rootfs"
    context="$WORK/base-context"
    mkdir -p "$context"
    if [[ -n "${TORCH_WHEEL:-}" ]]; then
        cp "$TORCH_WHEEL" "$context/"
    else
        # The wheel for the base's Python (bookworm: 3.11), whatever Python runs this script.
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
            --platform "manylinux_2_28_$(uname -m)" -d "$context" "torch==$TORCH_VERSION"
    fi
    wheel=$(cd "$context" && ls torch-*.whl)
    [[ "$wheel" == *+cpu* ]] || fail "the torch wheel $wheel is not a CPU build (a CUDA one pulls several GB):" \
        "set TORCH_WHEEL to a CPU wheel's file"
    docker build -q -t "$LOCAL_BASE" -f - "$context" >/dev/null <<EOF
FROM $LOCAL_BASE-rootfs
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt PIP_CERT=/etc/ssl/certs/ca-certificates.crt
COPY $wheel /tmp/
RUN python3 -m pip install -q --no-cache-dir --break-system-packages /tmp/$wheel && rm /tmp/$wheel
CMD ["python3"]
EOF
    docker rmi "$LOCAL_BASE-rootfs" >/dev/null
    echo "made $BASE_IMAGE: Debian bookworm's Python with $wheel"
fi
passed "base $BASE_IMAGE ($(docker run --rm --entrypoint python3 "$BASE_IMAGE" -W ignore -c 'import torch; print("torch", torch.__version__)'))"

stage "image build"
docker build --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$IMAGE" "$REPO" >"$WORK/build.log" 2>&1 \
    || { tail -n 40 "$WORK/build.log" >&2; fail "docker build of $REPO/Dockerfile on $BASE_IMAGE"; }
passed "built $IMAGE"

stage "inside the container"
DATA="$WORK/data"   # the tools' and the training's mounted folder, owned by the image's user
QUICK="$WORK/outputs"  # the quickstart's, owned by the user given with --user
mkdir -p "$DATA" "$QUICK"
if is_root; then
    chown 10001:10001 "$DATA"
    chown 4321:4321 "$QUICK"
    data_user=()
    quick_user=(--user 4321:4321)
else  # a non-root caller cannot hand folders to other uids: the containers run as the caller
    data_user=(--user "$(id -u):$(id -g)")
    quick_user=("${data_user[@]}")
fi
in_image=(-v "$DATA:/data" "${data_user[@]}" "$IMAGE")

run help "$IMAGE"
grep -q "mpo_dist container entrypoint" "$WORK/help.log" && grep -q -- "--nproc-per-node" "$WORK/help.log" \
    || fail "help: the entrypoint's usage and torchrun's options were not printed"
passed "--help"

run make_toy "${in_image[@]}" tools/make_toy_data.py --out /data/toy --records 600
run prepare "${in_image[@]}" --nproc-per-node 2 tools/prepare_pairs.py --input /data/toy/pairs.jsonl \
    --tokenizer /data/toy/model --out /data/pairs --samples-per-shard 200 --max-length 64 --max-prompt-length 32
expect_file "$DATA/pairs/manifest.json" prepare
run score "${in_image[@]}" --nproc-per-node 2 tools/score_reference.py --model /data/toy/model \
    --pairs /data/pairs --out /data/reference --batch-size 64 --dtype float32
expect_file "$DATA/reference/manifest.json" score
run sample "${in_image[@]}" --nproc-per-node 2 tools/sample_reference.py --model /data/toy/model \
    --pairs /data/pairs --out /data/dref --num-samples 1 --max-new-tokens 12 --batch-size 100 --dtype float32
expect_file "$DATA/dref/manifest.json" sample
passed "tools: toy task, prepare, score, sample (2 processes each)"

train=(--nproc-per-node 2 -m mpo_dist.train --config configs/tiny_cpu.yaml job.output_dir=/data/run
       model.path=/data/toy/model data.pairs=/data/pairs data.reference=/data/reference data.dref=/data/dref
       eval.pairs= eval.reference= eval.dref= eval.interval=0 training.steps=4 checkpoint.interval=2 model.dtype=float32
       metrics.log_interval=1)
run train "${in_image[@]}" "${train[@]}"
grep -q "on 2 x cpu" "$WORK/train.log" || fail "train: not 2 processes"
expect_file "$DATA/run/checkpoints/step-00000004/checkpoint.json" train
[[ $(wc -l <"$DATA/run/metrics.jsonl") == 4 ]] || fail "train: metrics.jsonl has not 4 steps"
passed "2-process MPO training, 4 steps, checkpoint written"

status=0
docker run --rm "${in_image[@]}" -m mpo_dist.train --config configs/missing.yaml >"$WORK/bad.log" 2>&1 || status=$?
[[ $status == 2 ]] && grep -q "config file not found" "$WORK/bad.log" \
    || { cat "$WORK/bad.log" >&2; fail "a missing config: expected exit code 2 and 'config file not found', got $status"; }
passed "a missing config: exit code 2, one-line error"

run convert "${in_image[@]}" tools/convert_checkpoint.py --checkpoint /data/run/checkpoints/step-00000004 --out /data/hf
expect_file "$DATA/hf/model.safetensors.index.json" convert
run load --entrypoint python "${in_image[@]}" -c '
import torch
from transformers import AutoModelForCausalLM
trained = AutoModelForCausalLM.from_pretrained("/data/hf")
start = AutoModelForCausalLM.from_pretrained("/data/toy/model")
a, b = trained.state_dict(), start.state_dict()
assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a), "architecture differs"
moved = sum(not torch.equal(a[k].float(), b[k].float()) for k in a)
assert moved > 0, "the converted weights equal the starting ones"
print(f"converted model loads: {sum(v.numel() for v in a.values())} parameters, {moved}/{len(a)} tensors trained")'
passed "$(tail -n 1 "$WORK/load.log")"

run quickstart "${quick_user[@]}" -v "$QUICK:/workspace/outputs" "$IMAGE" quickstart
expect_file "$QUICK/quickstart/run/checkpoints/step-00000120/checkpoint.json" quickstart
last_step=$(tail -n 1 "$QUICK/quickstart/run/metrics.jsonl" | python3 -c 'import json, sys; print(json.load(sys.stdin)["step"])')
[[ $last_step == 120 ]] || fail "quickstart: the last logged step is $last_step, not 120"
grep -q "model.dtype=auto -> " "$WORK/quickstart.log" || fail "quickstart: no line saying what model.dtype=auto chose"
passed "quickstart as uid ${quick_user[1]:-$(id -u)} into a mounted folder: $(grep -m1 -o 'step *120.*' "$WORK/quickstart.log" | cut -c1-100)"

if [[ "$BASE_IMAGE" == "$LOCAL_BASE" ]]; then
    if docker run --rm --entrypoint bash -e PYTHON=/usr/bin/python3 "$IMAGE" /opt/mpo_dist/launch/install.sh \
        >"$WORK/pep668.log" 2>&1 || ! grep -q "PEP 668" "$WORK/pep668.log"; then
        cat "$WORK/pep668.log" >&2
        fail "install.sh on the distribution's Python: expected its PEP 668 message"
    fi
    passed "install.sh on the distribution's Python: PEP 668 message"
fi
leftovers=$(docker run --rm --entrypoint bash "$IMAGE" -c 'cd /opt/mpo_dist && ls -d build ./*.egg-info 2>/dev/null' || true)
[[ -z "$leftovers" ]] || fail "the image keeps build leftovers: $leftovers"
passed "no build/ or egg-info in the image"
