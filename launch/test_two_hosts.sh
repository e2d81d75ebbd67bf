#!/usr/bin/env bash
# launch/multi_node.sh on two "hosts" made on this machine: two network namespaces joined by a veth
# pair (10.77.0.1/24 and 10.77.0.2/24), each with its own hostname (node-b, node-a) resolved by its
# own /etc/hosts, as cluster DNS would. Needs root, `ip netns` (iproute2) and `unshare`/`mount`
# (util-linux):
#   sudo bash launch/test_two_hosts.sh                # PYTHON=.venv/bin/python bash launch/test_two_hosts.sh
# Every run: one torchrun agent per namespace (NNODES=2, NPROC_PER_NODE=1, RDZV_ENDPOINT=10.77.0.1:29500,
# a JOB_ID per run, GLOO_SOCKET_IFNAME=the namespace's veth, MAX_RESTARTS=1), HSDP with
# parallel.dp_replicate=2 so the gradient all-reduce crosses the veth; both write one output folder
# (a shared filesystem). The toy inputs come from tests/cluster_support.py; STEPS steps, a checkpoint
# every 3 (all kept). Host 1 hosts the rendezvous store; host 2, the one lost below, holds global rank
# 0 (c10d numbers the nodes by hostname), so the rank that holds the run lock and writes the metrics dies too.
# Checks:
# 1. HSDP across two hosts equals one host: the checkpoint of step STEPS is bitwise equal to that of
#    the same training on this machine (`python -m mpo_dist.launcher --standalone --nproc-per-node 2`).
# 2. A node lost and back: once checkpoint 3 exists, every process of host 2 is SIGKILLed at once (a
#    node dying); host 1's worker fails at its next collective, its agent restarts it and waits in the
#    rendezvous; host 2's agent is started again with the same command (as a scheduler would), under
#    another hostname (a replacement node, node-0: rank 0 again, so it finds the lost rank 0's run
#    lock and takes it over once that lock's heartbeat has stopped for two beats); both
#    agents exit 0, the ranks resumed from a checkpoint, and step STEPS is bitwise equal to the one-host run's.
# 3. A node lost for good (RDZV_JOIN_TIMEOUT=LOST_TIMEOUT_S): host 1's agent gives up within the join
#    timeout plus a margin, with exit code 1 and mpo_dist.launcher's one line, no process left in its
#    namespace, and its newest checkpoint intact (bitwise equal to the one-host run's of that step).
# Everything it started (the agents and their workers, the namespaces and veth, the one-host run) is
# stopped or deleted at the end, and the temp folder removed. Environment: PYTHON (the Python with the
# project's dependencies, default python), TMPDIR.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STEPS=24           # enough that the node dies mid-run: the kill comes right after checkpoint 3
LOST_TIMEOUT_S=30  # RDZV_JOIN_TIMEOUT of check 3
JOIN_TIMEOUT_S=120 # RDZV_JOIN_TIMEOUT of checks 1-2: a bound, should anything hang
ENDPOINT=10.77.0.1:29500
CHECK_NAME=test_two_hosts
source "$REPO/launch/_checks.sh"
resolve_python
[[ $(id -u) == 0 ]] || fail "needs root: it creates network namespaces and a veth pair"
for tool in ip unshare mount; do command -v "$tool" >/dev/null || fail "$tool is missing (iproute2 / util-linux)"; done

# Names with this shell's pid, so that two runs (or one left by a killed run) never collide; the
# addresses live inside the pair's own namespaces only. veth names: at most 15 characters.
NETNS=("" "mpo-h1-$$" "mpo-h2-$$")
VETH=("" "mpo-v1-$$" "mpo-v2-$$")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mpo-dist-two-hosts.XXXXXX")
AGENT=("" "" "")   # per host, the pid of the bash that waits for its running agent
one_host_pid=""    # the one-host run (its own process group, see below)
stage_logs=()      # the logs whose tails a failure shows

namespace_pids() { ip netns pids "$1" 2>/dev/null || true; }
namespace_empty() { [[ -z "$(namespace_pids "$1")" ]]; }

cleanup() {
    local status=$? index log
    set +e
    if [[ $status != 0 ]]; then
        for log in "${stage_logs[@]}"; do
            [[ -f "$log" ]] || continue
            echo "---- last lines of $log" >&2
            grep -v '^frame #' "$log" | tail -n 25 >&2
        done
    fi
    [[ -n "$one_host_pid" ]] && kill -KILL -- "-$one_host_pid" 2>/dev/null
    for index in 1 2; do  # an agent's `ip netns exec` may not be in its namespace yet
        [[ -n "${AGENT[$index]}" ]] && pkill -KILL -P "${AGENT[$index]}" 2>/dev/null
    done
    for index in 1 2; do
        ip netns list | grep -qw "${NETNS[$index]}" || continue
        namespace_pids "${NETNS[$index]}" | xargs -r kill -KILL 2>/dev/null
        for _ in $(seq 50); do [[ -z "$(namespace_pids "${NETNS[$index]}")" ]] && break; sleep 0.2; done
        ip netns del "${NETNS[$index]}"  # takes its end of the veth pair, and so the pair, with it
    done
    wait 2>/dev/null
    rm -rf "$WORK"
    echo "test_two_hosts: $([[ $status == 0 ]] && echo passed || echo failed) in $((SECONDS - script_start)) s"
    exit "$status"
}
trap cleanup EXIT

# wait_exit PID SECONDS WHAT: wait up to SECONDS for PID (a child of this shell) to end; its exit code
# in $exit_code, or fail when it is still running.
wait_exit() {
    local pid=$1 seconds=$2 what=$3
    for _ in $(seq $((seconds * 5))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && fail "$what still runs after $seconds s"
    exit_code=0
    wait "$pid" || exit_code=$?
}
# wait_until SECONDS WHAT COMMAND...: poll COMMAND every 0.1 s, fail after SECONDS.
wait_until() {
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq $((seconds * 10))); do "$@" && return 0; sleep 0.1; done
    fail "$what: not within $seconds s"
}

stage "two hosts: network namespaces ${NETNS[1]}, ${NETNS[2]} joined by a veth pair"
ip netns add "${NETNS[1]}"
ip netns add "${NETNS[2]}"
ip link add "${VETH[1]}" netns "${NETNS[1]}" type veth peer name "${VETH[2]}" netns "${NETNS[2]}"
for index in 1 2; do
    ip -n "${NETNS[$index]}" addr add "10.77.0.$index/24" dev "${VETH[$index]}"
    ip -n "${NETNS[$index]}" link set lo up
    ip -n "${NETNS[$index]}" link set "${VETH[$index]}" up
done
# Each host resolves both names to their veth addresses: the agent at 10.77.0.1 knows by it that it
# hosts the rendezvous store, and the rank-0 agent announces its hostname as MASTER_ADDR. With this
# machine's name (resolving to 127.0.0.1) in both, neither would host the store.
HOSTNAME_OF=("" node-b node-a)  # sorted by name, host 2 comes first: it gets global rank 0
REPLACEMENT=node-0  # check 2's host 2 when it comes back: a replacement node, another name, rank 0 again
printf '127.0.0.1 localhost\n10.77.0.1 %s\n10.77.0.2 %s %s\n' "${HOSTNAME_OF[1]}" "${HOSTNAME_OF[2]}" "$REPLACEMENT" >"$WORK/hosts"
# Reachable: a connection to a closed port is refused (not timed out).
ip netns exec "${NETNS[1]}" "$PYTHON" -c '
import socket
try:
    socket.create_connection(("10.77.0.2", 9), timeout=5)
except ConnectionRefusedError:
    pass' || fail "host 1 does not reach 10.77.0.2 over the veth pair"
passed "${HOSTNAME_OF[1]} 10.77.0.1 <-> ${HOSTNAME_OF[2]} 10.77.0.2"

stage "toy inputs"
cd "$REPO"
export PYTHONPATH="$REPO" OMP_NUM_THREADS=1
"$PYTHON" tests/cluster_support.py inputs "$WORK/inputs" >"$WORK/inputs.log" 2>&1 \
    || { stage_logs=("$WORK/inputs.log"); fail "tests/cluster_support.py inputs"; }
mapfile -t toy < <("$PYTHON" tests/cluster_support.py overrides "$WORK/inputs" "$WORK/unused" | grep -v '^job.output_dir=')
training=("${toy[@]}" "training.steps=$STEPS" checkpoint.interval=3 checkpoint.keep=10 metrics.tensorboard=false
          parallel.dp_replicate=2)
passed "tests/cluster_support.py inputs"

checkpoint() { printf '%s/checkpoints/step-%08d' "$1" "$2"; }
# expect_equal A B WHAT: the two checkpoint folders are bitwise equal.
expect_equal() {
    "$PYTHON" tests/cluster_support.py equal "$1" "$2" >"$WORK/equal.log" 2>&1 \
        || { cat "$WORK/equal.log" >&2; fail "$3: $1 differs from $2"; }
}

# start_agent HOST OUT LOG [VAR=value ...]: host HOST's multi_node.sh agent in the background, in its
# namespace with its hostname and hosts file (unshare: its own UTS and mount namespaces); pid in AGENT[HOST]:
# a bash outside the namespace that waits for it and exits with its code (137 when it was SIGKILLed,
# without this shell's "Killed" line).
start_agent() {
    local host=$1 out=$2 log=$3
    shift 3
    bash -c '"$@"; exit $?' agent ip netns exec "${NETNS[$host]}" unshare --uts --mount --propagation private \
        sh -c 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"' sh "$WORK/hosts" "${HOSTNAME_OF[$host]}" \
        env PYTHON="$PYTHON" NNODES=2 NPROC_PER_NODE=1 RDZV_ENDPOINT="$ENDPOINT" MAX_RESTARTS=1 \
        GLOO_SOCKET_IFNAME="${VETH[$host]}" RDZV_JOIN_TIMEOUT="$JOIN_TIMEOUT_S" "$@" \
        bash launch/multi_node.sh configs/tiny_cpu.yaml "${training[@]}" "job.output_dir=$out" >"$log" 2>&1 &
    AGENT[$host]=$!
}
# kill_host HOST: SIGKILL to every process in the host's namespace at once, as when the node dies.
kill_host() {
    namespace_pids "${NETNS[$1]}" | xargs -r kill -KILL
    wait_exit "${AGENT[$1]}" 30 "host $1's agent after SIGKILL"
    [[ $exit_code == 137 ]] || fail "host $1's agent: exit code $exit_code after SIGKILL, expected 137"
}
has_checkpoint() { [[ -f "$(checkpoint "$1" "$2")/checkpoint.json" ]]; }
worker_failed() { grep -q 'failed (exitcode' "$1"; }  # torchrun's line when a worker exits non-zero

stage "one host: $STEPS steps, 2 processes, parallel.dp_replicate=2"
stage_logs=("$WORK/one_host.log")
# setsid: its own process group, so that cleanup can stop its workers with it.
setsid "$PYTHON" -m mpo_dist.launcher --standalone --nproc-per-node 2 -m mpo_dist.train --config configs/tiny_cpu.yaml \
    "${training[@]}" "job.output_dir=$WORK/one_host" >"$WORK/one_host.log" 2>&1 &
one_host_pid=$!
wait_exit "$one_host_pid" 300 "the one-host run"
one_host_pid=""
[[ $exit_code == 0 ]] || fail "the one-host run: exit code $exit_code"
has_checkpoint "$WORK/one_host" "$STEPS" || fail "the one-host run wrote no checkpoint of step $STEPS"
passed "one host, checkpoint of step $STEPS"

stage "1. HSDP across two hosts equals one host"
stage_logs=("$WORK/hsdp.h1.log" "$WORK/hsdp.h2.log")
start_agent 1 "$WORK/hsdp" "$WORK/hsdp.h1.log" JOB_ID="two-hosts-$$-hsdp"
start_agent 2 "$WORK/hsdp" "$WORK/hsdp.h2.log" JOB_ID="two-hosts-$$-hsdp"
for host in 1 2; do
    wait_exit "${AGENT[$host]}" 300 "host $host's agent"
    [[ $exit_code == 0 ]] || fail "host $host's agent: exit code $exit_code"
done
grep -q "on 2 x cpu" "$WORK/hsdp.h1.log" "$WORK/hsdp.h2.log" || fail "the two-host run did not train on 2 processes"
expect_equal "$(checkpoint "$WORK/one_host" "$STEPS")" "$(checkpoint "$WORK/hsdp" "$STEPS")" "two hosts vs one"
passed "both agents exit 0; step $STEPS bitwise equal to the one-host run"

stage "2. host 2 lost after checkpoint 3, then started again"
out="$WORK/lost_and_back"
stage_logs=("$out.h1.log" "$out.h2.log" "$out.h2-again.log")
start_agent 1 "$out" "$out.h1.log" JOB_ID="two-hosts-$$-back"
start_agent 2 "$out" "$out.h2.log" JOB_ID="two-hosts-$$-back"
wait_until 240 "checkpoint 3 of the two-host run" has_checkpoint "$out" 3
kill_host 2
killed_at=$SECONDS
grep -q "pre-flight: rank 0 of 2" "$out.h2.log" || fail "global rank 0 was not on host 2"
has_checkpoint "$out" "$STEPS" && fail "the run had finished before host 2 was killed: raise STEPS"
wait_until 120 "host 1's worker failing after host 2's loss" worker_failed "$out.h1.log"
failed_after=$((SECONDS - killed_at))
kill -0 "${AGENT[1]}" 2>/dev/null || fail "host 1's agent ended instead of restarting its worker (MAX_RESTARTS=1)"
HOSTNAME_OF[2]=$REPLACEMENT
start_agent 2 "$out" "$out.h2-again.log" JOB_ID="two-hosts-$$-back"
HOSTNAME_OF[2]=node-a
for host in 1 2; do
    wait_exit "${AGENT[$host]}" 300 "host $host's agent after the restart"
    [[ $exit_code == 0 ]] || fail "host $host's agent after the restart: exit code $exit_code"
done
resumed=$(grep -ho 'resumed from .* at step [0-9]*' "$out.h1.log" "$out.h2-again.log" | head -n 1 || true)
[[ -n "$resumed" ]] || fail "the restarted ranks did not resume from a checkpoint"
# The lost rank 0's run lock (host node-a, same torchrun job, no heartbeat since) was taken over.
grep -q "taking over the run lock .*(left by this torchrun job two-hosts-$$-back on node-a" "$out.h2-again.log" \
    || fail "the replacement node's rank 0 did not take over the lost node's run lock"
expect_equal "$(checkpoint "$WORK/one_host" "$STEPS")" "$(checkpoint "$out" "$STEPS")" "lost and back vs one host"
passed "host 1's worker failed ${failed_after} s after host 2 (global rank 0) was killed ($(grep -m 1 -o 'Connection [a-z ]*by peer' "$out.h1.log" || echo 'gloo error')); host 2 back as $REPLACEMENT took over the lost rank 0's run lock; both agents exit 0; resumed at step ${resumed##* }; step $STEPS bitwise equal"

stage "3. host 2 lost for good (RDZV_JOIN_TIMEOUT=$LOST_TIMEOUT_S)"
out="$WORK/lost"
stage_logs=("$out.h1.log" "$out.h2.log")
start_agent 1 "$out" "$out.h1.log" JOB_ID="two-hosts-$$-lost" RDZV_JOIN_TIMEOUT="$LOST_TIMEOUT_S"
start_agent 2 "$out" "$out.h2.log" JOB_ID="two-hosts-$$-lost" RDZV_JOIN_TIMEOUT="$LOST_TIMEOUT_S"
wait_until 240 "checkpoint 3 of the two-host run" has_checkpoint "$out" 3
kill_host 2
killed_at=$SECONDS
bound=$((LOST_TIMEOUT_S + 30))  # the worker's failure, the workers' stop, the rendezvous' 5 s rollback
wait_exit "${AGENT[1]}" "$bound" "host 1's agent, $bound s after host 2's loss,"
took=$((SECONDS - killed_at))
[[ $exit_code == 1 ]] || fail "host 1's agent: exit code $exit_code, expected 1"
((took >= LOST_TIMEOUT_S)) || fail "host 1's agent ended $took s after the kill, before the join timeout ($LOST_TIMEOUT_S s)"
message="mpo_dist.launcher: the rendezvous at $ENDPOINT did not gather 2 nodes within $LOST_TIMEOUT_S s"
grep -qF "$message" "$out.h1.log" || fail "host 1's agent did not say: $message ..."
wait_until 10 "no process left in host 1's namespace" namespace_empty "${NETNS[1]}"
newest=$(ls -d "$out"/checkpoints/step-* 2>/dev/null | grep -v '\.tmp$' | sort | tail -n 1 || true)
[[ -n "$newest" && -f "$newest/checkpoint.json" ]] || fail "no complete checkpoint left in $out/checkpoints"
step=$((10#${newest##*step-}))
expect_equal "$(checkpoint "$WORK/one_host" "$step")" "$newest" "the newest checkpoint after the loss"
passed "host 1's agent ended $took s after the kill (bound $bound s), exit code 1, one line; checkpoint $step intact"
