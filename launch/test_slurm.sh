#!/usr/bin/env bash
# launch/slurm.sbatch on a one-machine SLURM started here (as root; Debian/Ubuntu packages):
#   bash launch/test_slurm.sh                       # PYTHON=.venv/bin/python bash launch/test_slurm.sh
# 1. slurm-wlm and munge installed with apt-get when missing; a munged of its own (own key, own
#    socket, so a munged already running is left alone), a slurm.conf for this machine (one node,
#    its CPUs, JobRequeue=1, KillWait=60 for the save) in a temp folder, slurmctld and slurmd on free
#    ports; the node idle within 60 s.
# 2. The toy inputs (tests/cluster_support.py), then three 2-process jobs of 16 steps, each submitted
#    as `sbatch --nodes=1 --gpus-per-node=0 --cpus-per-task=2 ... launch/slurm.sbatch CONFIG ...`
#    (command-line options override the script's #SBATCH lines):
#    a) uninterrupted: job COMPLETED with exit code 0, checkpoint step 16, 16 steps in metrics.jsonl;
#    b) preempted mid-training with `scontrol requeue` (SIGTERM to the job): the ranks save the step in
#       progress N, the batch shell outlives the SIGTERM and reports srun's exit code 143; the requeued
#       job (released after 2 s: SLURM holds a requeued job back for CredExpire, 120 s) starts again
#       with Restarts=1, resumes from step N, completes, and its step-16 checkpoint is bitwise equal
#       to a)'s;
#    c) the time-limit warning path (`--signal=B:USR1@300`, sent here with `scancel --signal=USR1
#       --batch`): the batch shell forwards SIGUSR1 to srun, the ranks save step N, the job requeues
#       itself, resumes from N, completes, bitwise equal to a).
# Everything it started (jobs, job steps, slurmd, slurmctld, munged) is stopped at the end, and the
# temp folder removed. Environment: PYTHON (the Python with the project's dependencies, default
# python; passed to the jobs), TMPDIR.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STEPS=16
CHECK_NAME=test_slurm
source "$REPO/launch/_checks.sh"
resolve_python
export PYTHON  # the jobs run it
[[ $(id -u) == 0 ]] || fail "needs root: it starts its own slurmctld, slurmd and munged"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mpo-dist-slurm.XXXXXX")
chmod 755 "$WORK"  # munged (user munge) must reach its socket in here
export SLURM_CONF="$WORK/slurm.conf"
daemon_pids=()  # started here, in order: munged, slurmctld, slurmd
jobs_submitted=()

# Bounded stop: SIGTERM to each PID, up to SECONDS_ s for all of them, then SIGKILL to those left.
stop_processes() {
    local seconds=$1 pid alive
    shift
    [[ $# -gt 0 ]] || return 0
    kill -TERM "$@" 2>/dev/null || true
    for _ in $(seq $((seconds * 5))); do
        alive=()
        for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
        [[ ${#alive[@]} -gt 0 ]] || return 0
        sleep 0.2
    done
    echo "test_slurm: ${alive[*]} still running $seconds s after SIGTERM: SIGKILL"
    kill -KILL "${alive[@]}" 2>/dev/null || true
}

# Processes of this test's SLURM jobs (slurmstepd and the jobs' processes): SLURM_CONF=this test's in
# their environment (from slurmd or the submitting shell), so never another SLURM's; not the daemons
# nor slurmctld's helper (slurmscriptd), which go with them.
own_job_processes() {
    local environ pid parent
    for environ in /proc/[0-9]*/environ; do
        pid=${environ#/proc/}
        pid=${pid%/environ}
        parent=$(awk '/^PPid:/ { print $2 }' "/proc/$pid/status" 2>/dev/null) || continue
        [[ $pid != "$$" && $pid != "$BASHPID" && " ${daemon_pids[*]} " != *" $pid "* && " ${daemon_pids[*]} " != *" $parent "* ]] || continue
        { tr '\0' '\n' <"$environ" | grep -qxF "SLURM_CONF=$SLURM_CONF"; } 2>/dev/null && echo "$pid"
    done
    return 0
}

cleanup() {
    local status=$? index log job_processes
    set +e
    trap - EXIT INT TERM
    if [[ ${#jobs_submitted[@]} -gt 0 ]]; then
        scancel "${jobs_submitted[@]}" 2>/dev/null
    fi
    # Job steps first: slurmd waits for its slurmstepd before it exits.
    mapfile -t job_processes < <(own_job_processes)
    stop_processes 20 "${job_processes[@]}"
    for ((index = ${#daemon_pids[@]} - 1; index >= 0; index--)); do  # slurmd, slurmctld, munged
        stop_processes 20 "${daemon_pids[index]}"
        wait "${daemon_pids[index]}" 2>/dev/null
    done
    if [[ $status != 0 ]]; then
        for log in "$WORK"/log/slurmctld.log "$WORK"/log/slurmd.log; do
            [[ -s $log ]] && { echo "--- last lines of $log" >&2; tail -n 15 "$log" >&2; }
        done
    fi
    rm -rf "$WORK"
    echo "test_slurm: $([[ $status == 0 ]] && echo passed || echo failed) in $((SECONDS - script_start)) s"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }

stage "SLURM and munge"
missing=()
command -v munged >/dev/null || missing+=(munge)
for tool in slurmctld slurmd sbatch; do command -v "$tool" >/dev/null || { missing+=(slurm-wlm); break; }; done
if [[ ${#missing[@]} -gt 0 ]]; then
    command -v apt-get >/dev/null || fail "missing ${missing[*]}: install them (Debian/Ubuntu packages slurm-wlm, munge)"
    echo "installing ${missing[*]} from the distribution's packages"
    # Their install scripts would start the system's munged, slurmctld and slurmd: policy-rc.d says no.
    policy=""
    [[ -e /usr/sbin/policy-rc.d ]] || { policy=/usr/sbin/policy-rc.d; printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; }
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
        || { [[ -z $policy ]] || rm -f "$policy"; fail "apt-get install ${missing[*]}"; }
    [[ -z $policy ]] || rm -f "$policy"
fi
id munge >/dev/null 2>&1 || fail "no user munge (the munge package creates it)"
mkdir -p "$WORK"/{munge,state,spool,log,runs}
chown munge:munge "$WORK/munge"
head -c 1024 /dev/urandom >"$WORK/munge/munge.key"
chown munge:munge "$WORK/munge/munge.key"
chmod 600 "$WORK/munge/munge.key"
# setpriv execs munged (-F: in the foreground), so $! is munged itself.
setpriv --reuid munge --regid munge --clear-groups munged -F --socket "$WORK/munge/munge.socket" \
    --key-file "$WORK/munge/munge.key" --pid-file "$WORK/munge/munged.pid" --seed-file "$WORK/munge/munged.seed" \
    --log-file "$WORK/munge/munged.log" >"$WORK/log/munged.out" 2>&1 &
daemon_pids+=($!)
for _ in $(seq 50); do [[ -S $WORK/munge/munge.socket ]] && break; sleep 0.2; done
munge --socket "$WORK/munge/munge.socket" --no-input | unmunge --socket "$WORK/munge/munge.socket" >/dev/null \
    || { cat "$WORK/log/munged.out" >&2; fail "munged did not start"; }

host=$(hostname -s)
cpus=$(nproc)
memory_mb=$(awk '/^MemTotal:/ { print int($2 / 1024 * 0.9) }' /proc/meminfo)
cat >"$SLURM_CONF" <<EOF
ClusterName=mpotest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$WORK/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/log/slurmctld.log
SlurmdLogFile=$WORK/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobRequeue=1
# Seconds between SIGTERM and SIGKILL: the ranks' save of the step in progress fits well inside.
KillWait=60
# Finished jobs stay visible to scontrol (no accounting database here).
MinJobAge=3600
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
slurmctld -D -f "$SLURM_CONF" >"$WORK/log/slurmctld.out" 2>&1 &
daemon_pids+=($!)
slurmd -D -f "$SLURM_CONF" >"$WORK/log/slurmd.out" 2>&1 &
daemon_pids+=($!)
node_state=""
for _ in $(seq 120); do
    node_state=$(sinfo --noheader --format=%T 2>/dev/null || true)
    [[ $node_state == idle ]] && break
    sleep 0.5
done
[[ $node_state == idle ]] || { cat "$WORK/log/slurmctld.out" "$WORK/log/slurmd.out" >&2; fail "node not idle after 60 s (state: ${node_state:-none})"; }
passed "$(sinfo --version), node $host ($cpus CPUs) idle"

stage "toy inputs"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" tests/cluster_support.py inputs "$WORK/inputs" >"$WORK/inputs.log" 2>&1 \
    || { tail -n 20 "$WORK/inputs.log" >&2; fail "tests/cluster_support.py inputs"; }
passed "toy inputs built"

# The jobs' environment (sbatch --export=ALL): 2 processes, 1 thread each, a free rendezvous port.
RDZV_PORT=$(free_port)
export NPROC_PER_NODE=2 OMP_NUM_THREADS=1 RDZV_PORT
cpus_per_task=$((cpus < 2 ? cpus : 2))

# submit NAME: sbatch launch/slurm.sbatch into $WORK/runs/NAME; prints the job id.
submit() {
    local name=$1 overrides
    overrides=$("$PYTHON" tests/cluster_support.py overrides "$WORK/inputs" "$WORK/runs/$name") || return 1
    mapfile -t overrides <<<"$overrides"
    sbatch --parsable --job-name="mpo-$name" --nodes=1 --gpus-per-node=0 --cpus-per-task="$cpus_per_task" --time=10 \
        --output="$WORK/runs/$name.out" --export=ALL \
        launch/slurm.sbatch configs/tiny_cpu.yaml "${overrides[@]}" training.steps=$STEPS checkpoint.interval=3 \
        checkpoint.keep=10 metrics.tensorboard=false
}
job_field() { scontrol --oneliner show job "$1" | grep -o " $2=[^ ]*" | cut -d= -f2; }
show_log() { echo "--- last lines of $1" >&2; tail -n 30 "$1" >&2; }
# wait_for_state JOB STATE SECONDS
wait_for_state() {
    local job=$1 wanted=$2 seconds=$3 state=""
    for _ in $(seq $((seconds * 2))); do
        state=$(job_field "$job" JobState)
        [[ $state == "$wanted" ]] && return 0
        case $state in COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE) break ;; esac
        sleep 0.5
    done
    echo "job $job: state ${state:-unknown}, not $wanted after at most $seconds s" >&2
    return 1
}
# Mid-training: at least 3 steps logged (of 16), so the signal lands before the last step.
wait_for_training() {
    local name=$1 seconds=$2
    for _ in $(seq $((seconds * 5))); do
        [[ -f $WORK/runs/$name/metrics.jsonl && $(wc -l <"$WORK/runs/$name/metrics.jsonl") -ge 3 ]] && return 0
        sleep 0.2
    done
    show_log "$WORK/runs/$name.out"
    fail "$name: no 3 steps logged within $seconds s"
}
expect_finished() {
    local name=$1 job=$2 restarts=$3 log=$WORK/runs/$1.out
    wait_for_state "$job" COMPLETED 300 || { show_log "$log"; fail "$name: job $job did not complete"; }
    [[ $(job_field "$job" ExitCode) == 0:0 ]] || { show_log "$log"; fail "$name: exit code $(job_field "$job" ExitCode), not 0:0"; }
    [[ $(job_field "$job" Restarts) == "$restarts" ]] || fail "$name: Restarts=$(job_field "$job" Restarts), not $restarts"
    [[ -d $WORK/runs/$name/checkpoints/step-$(printf %08d $STEPS) ]] || { show_log "$log"; fail "$name: no checkpoint of step $STEPS"; }
    [[ $(wc -l <"$WORK/runs/$name/metrics.jsonl") == "$STEPS" ]] || fail "$name: metrics.jsonl has not $STEPS step records"
}
# expect_resumed NAME SIGNAL: the first start saved step N on SIGNAL (resumed_step=N), the second
# resumed from it and ends bitwise equal to the uninterrupted run.
expect_resumed() {
    local name=$1 signal=$2 log=$WORK/runs/$1.out saved checkpoint last
    last=step-$(printf %08d $STEPS)
    saved=$(grep -m1 -o "mpo_dist: $signal at step [0-9]*: checkpoint [^ ]* saved" "$log") \
        || { show_log "$log"; fail "$name: no 'mpo_dist: $signal at step N: checkpoint ... saved' line"; }
    resumed_step=$(sed -E 's/.* at step ([0-9]+):.*/\1/' <<<"$saved")
    ((resumed_step >= 1 && resumed_step < STEPS)) || fail "$name: saved at step $resumed_step, not mid-training"
    checkpoint=$WORK/runs/$name/checkpoints/step-$(printf %08d "$resumed_step")
    [[ -d $checkpoint ]] || fail "$name: $checkpoint is missing"
    grep -qF "mpo_dist: srun exited 143 (stopped after saving the step in progress)" "$log" \
        || { show_log "$log"; fail "$name: the batch shell did not wait for srun's exit code 143"; }
    grep -qF "SLURM_RESTART_COUNT=1)" "$log" || { show_log "$log"; fail "$name: no second start (SLURM_RESTART_COUNT=1)"; }
    grep -qF "mpo_dist: resumed from $checkpoint at step $resumed_step" "$log" \
        || { show_log "$log"; fail "$name: the second start did not resume from $checkpoint"; }
    "$PYTHON" tests/cluster_support.py equal "$WORK/runs/plain/checkpoints/$last" "$WORK/runs/$name/checkpoints/$last" \
        >"$WORK/equal-$name.log" 2>&1 || { cat "$WORK/equal-$name.log" >&2; fail "$name: $last differs from the uninterrupted run's"; }
}
# release NAME JOB: a requeued job waits CredExpire (120 s) with Reason=BeginTime; start it 2 s from
# now instead. Not at once: slurmd rejects a launch credential issued in the same second as the
# requeue's kill ("Job credential revoked"), and the job then fails.
release() {
    wait_for_state "$2" PENDING 120 || { show_log "$WORK/runs/$1.out"; fail "$1: job $2 was not requeued"; }
    scontrol update JobId="$2" StartTime=now+2
}

stage "uninterrupted job"
job=$(submit plain) || fail "sbatch refused the job"
jobs_submitted+=("$job")
expect_finished plain "$job" 0
passed "job $job COMPLETED, exit code 0:0, $STEPS steps, checkpoint step $STEPS"

stage "job preempted with scontrol requeue (SIGTERM)"
job=$(submit requeued) || fail "sbatch refused the job"
jobs_submitted+=("$job")
wait_for_training requeued 120
scontrol requeue "$job"
release requeued "$job"
expect_finished requeued "$job" 1
expect_resumed requeued SIGTERM
passed "job $job: saved step $resumed_step on SIGTERM, requeued (Restarts=1), resumed from it, step $STEPS bitwise equal"

stage "job warned of its time limit (SIGUSR1 to the batch shell)"
job=$(submit warned) || fail "sbatch refused the job"
jobs_submitted+=("$job")
wait_for_training warned 120
scancel --signal=USR1 --batch "$job"
release warned "$job"
grep -q "mpo_dist: USR1 (time limit near): the ranks saved and stopped (exit 143); requeueing job $job" "$WORK/runs/warned.out" \
    || { show_log "$WORK/runs/warned.out"; fail "warned: the batch shell did not requeue the job after the ranks saved"; }
expect_finished warned "$job" 1
expect_resumed warned SIGUSR1
passed "job $job: USR1 forwarded, saved step $resumed_step, requeued itself (Restarts=1), resumed from it, step $STEPS bitwise equal"
