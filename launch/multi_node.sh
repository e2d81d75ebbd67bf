#!/usr/bin/env bash
# Train on several machines with torchrun's c10d rendezvous. Run the SAME command once on EVERY node:
#   NNODES=2 RDZV_ENDPOINT=node0:29500 JOB_ID=run42 bash launch/multi_node.sh CONFIG [section.key=value ...]
# Environment:
#   NNODES          (required) number of nodes, or MIN:MAX for an elastic range
#   RDZV_ENDPOINT   (required) host:port of the rendezvous store; any one node's address, reachable by all
#                   (the node whose address it is hosts the store)
#   JOB_ID          rendezvous id, the same on every node and new for every job (default: mpo_dist)
#   NPROC_PER_NODE  processes per node (default: number of GPUs from nvidia-smi -L, or 1 without a GPU)
#   MAX_RESTARTS    times torchrun restarts the workers after a failure (default: 3); a restart resumes
#                   from the newest checkpoint since checkpoint.resume defaults to auto
#   RDZV_JOIN_TIMEOUT  seconds an agent waits in the rendezvous for all NNODES nodes (default: 600,
#                   torchrun's): at the start, and after a failure, when it restarts and waits for a lost
#                   node to come back (started again with this same command). Past it the agent gives
#                   up: "mpo_dist.launcher: the rendezvous ... did not gather ..." and exit code 1; the
#                   newest checkpoint stays. Keep it above the time your nodes take to start and restart.
#   NODE_RANK is not needed: c10d assigns node ranks (global rank 0 may be on any node).
# To try it on one machine after the quickstart, run in two shells:
#   OMP_NUM_THREADS=1 NNODES=2 NPROC_PER_NODE=1 RDZV_ENDPOINT=localhost:29500 bash launch/multi_node.sh configs/tiny_cpu.yaml \
#       job.output_dir=outputs/two-nodes
# torchrun runs as python -m mpo_dist.launcher ($PYTHON, default python): input errors end in one line
# per rank and exit code 2.
# HSDP: set parallel.dp_replicate to the number of nodes (replicate across nodes, shard within one).
# Addresses: each node must resolve its own hostname to the address the others reach (torchrun announces
# it, and the node at RDZV_ENDPOINT finds by it that it hosts the store); gloo (CPU) and NCCL pick their
# interface by it too, or by GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME (e.g. GLOO_SOCKET_IFNAME=eth1).
# A lost node's peers fail at their next collective; with MAX_RESTARTS left they wait in the rendezvous.
# launch/test_two_hosts.sh runs this on two network namespaces (HSDP, a node lost and back, lost for good).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$REPO/launch/_common.sh"
usage_unless_config "$0" "$@"
CONFIG=$1
shift

die() { echo "multi_node.sh: $*" >&2; exit 2; }
[[ -n "${NNODES:-}" ]] || die "set NNODES (the number of nodes, e.g. NNODES=2)"
[[ "$NNODES" =~ ^[0-9]+(:[0-9]+)?$ ]] || die "NNODES must be a number or MIN:MAX, got '$NNODES'"
[[ -n "${RDZV_ENDPOINT:-}" ]] || die "set RDZV_ENDPOINT to host:port of the rendezvous (one node's address, the same on every node), e.g. RDZV_ENDPOINT=node0:29500"
[[ "$RDZV_ENDPOINT" =~ ^.+:[0-9]+$ ]] || die "RDZV_ENDPOINT must look like host:port, got '$RDZV_ENDPOINT'"
JOB_ID=${JOB_ID:-mpo_dist}
MAX_RESTARTS=${MAX_RESTARTS:-3}
RDZV_JOIN_TIMEOUT=${RDZV_JOIN_TIMEOUT:-600}
[[ "$RDZV_JOIN_TIMEOUT" =~ ^[1-9][0-9]*$ ]] || die "RDZV_JOIN_TIMEOUT must be a whole number of seconds, got '$RDZV_JOIN_TIMEOUT'"
NPROC_PER_NODE=${NPROC_PER_NODE:-$(gpu_count)}

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

exec "${PYTHON:-python}" -m mpo_dist.launcher \
    --nnodes "$NNODES" \
    --nproc-per-node "$NPROC_PER_NODE" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$RDZV_ENDPOINT" \
    --rdzv-id "$JOB_ID" \
    --rdzv-conf "join_timeout=$RDZV_JOIN_TIMEOUT" \
    --max-restarts "$MAX_RESTARTS" \
    -m mpo_dist.train --config "$CONFIG" "$@"
