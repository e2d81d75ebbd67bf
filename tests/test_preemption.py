"""Preemption (issue 25): SIGTERM to the launcher of a 2-process run, at five points; the run ends
with a checkpoint of the step in progress (or, before step 1, with none), exit 143, and a restart
ends bitwise equal to the uninterrupted run. The pauses come from tests/pause_points_train.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from support import REPO, SUBPROCESS_ENV, TRAIN_CONFIG, flat_checkpoint, toy_overrides
from mpo_dist.metrics_file import read_metrics, training_records
from mpo_dist.launcher import DEFAULT_GRACE_S, FORWARDED_SIGNALS, _with_defaults, launch_command
from mpo_dist.preemption import Preemption, parse_signals


STEPS = 8
SETTINGS = {"training.steps": STEPS, "checkpoint.interval": 3, "checkpoint.keep": 10, "eval.interval": 4,
            "eval.max_batches": 2, "eval.require_held_out": "false", "metrics.tensorboard": "false",
            "metrics.log_interval": 4, "checkpoint.export_hf": "true"}


def overrides(toy: dict, out: Path) -> list[str]:
    held_out = {"eval.pairs": toy["pairs"], "eval.reference": toy["reference"], "eval.dref": toy["dref"]}
    return [*toy_overrides(toy, out, **SETTINGS), *(f"{key}={value}" for key, value in held_out.items())]


def run(module: str, toy: dict, out: Path, env: dict | None = None, entrypoint: bool = False,
        extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """The launcher on 2 processes; with `entrypoint`, through the container's entrypoint script (which
    execs the launcher, so a signal to it reaches torchrun, as `docker stop` or a pod eviction does)."""
    target = ["-m", module, "--config", str(TRAIN_CONFIG), *overrides(toy, out), *extra]
    command = (["bash", str(REPO / "launch" / "entrypoint.sh"), "--nproc-per-node", "2", *target] if entrypoint
               else launch_command(2, target))
    env = {**SUBPROCESS_ENV, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), SUBPROCESS_ENV.get("PYTHONPATH", "")]),
           "PYTHON": sys.executable, **(env or {})}
    return subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def steps_saved(out: Path) -> list[int]:
    return sorted(int(folder.name.split("-")[1]) for folder in (out / "checkpoints").glob("step-*"))


@pytest.mark.unit
def test_launcher_forwards_the_preemption_signals_and_waits_the_grace_period_unless_told_otherwise(monkeypatch):
    assert _with_defaults(["--standalone", "x.py"]) == [
        "--signals-to-handle", FORWARDED_SIGNALS, "--shutdown-timeout", str(DEFAULT_GRACE_S), "--standalone", "x.py"]
    assert "SIGUSR1" in FORWARDED_SIGNALS.split(",")  # what SLURM's --signal=B:USR1@300 sends
    given = ["--shutdown-timeout=90", "--signals-to-handle", "SIGTERM", "x.py"]
    assert _with_defaults(given) == given
    # The script's own arguments are not torchrun's; torchrun's environment variables count as given.
    script_flag = ["--standalone", "-m", "tool", "--shutdown-timeout", "5"]
    assert _with_defaults(script_flag)[:4] == ["--signals-to-handle", FORWARDED_SIGNALS,
                                               "--shutdown-timeout", str(DEFAULT_GRACE_S)]
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "1200")
    monkeypatch.setenv("PET_SIGNALS_TO_HANDLE", "SIGTERM")
    assert _with_defaults(["x.py"]) == ["x.py"]


@pytest.mark.unit
def test_preemption_records_the_first_signal_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with Preemption(["SIGUSR1", "TERM"]) as preemption:
        assert not preemption.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # recorded, not acted on: the process goes on
        assert preemption.received == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before
    with pytest.raises(ValueError, match="'SIGFOO' is not a signal name"):
        parse_signals(["SIGFOO"])
    for unusable in ("SIGKILL", "CHLD", "SIGUSR2"):  # uncatchable, the DataLoader's, not forwarded by torchrun
        with pytest.raises(ValueError, match=f"'{unusable}' cannot ask for preemption: use some of SIGTERM, "):
            parse_signals([unusable])


@pytest.fixture(scope="module")
def uninterrupted(toy_inputs, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("uninterrupted")
    code, output = finished(run("mpo_dist.train", toy_inputs, out))
    assert code == 0, output[-3000:]
    return flat_checkpoint(out / "checkpoints" / f"step-{STEPS:08d}", out)


LAST = "the run completes"


@pytest.mark.e2e
@pytest.mark.parametrize("pause_at,saved_step,entrypoint,extra", [
    ("preflight", None, False, ()),  # before step 1: stopped at once, nothing saved
    ("step:2", 2, True, ()),  # mid-run: step 2 finishes and is saved (signal sent to the container entrypoint)
    ("step:2", 2, False, ("data.num_workers=1",)),  # the loader's worker gets the signal too, and must survive it
    ("save:3", 3, False, ()),  # during step 3's periodic save: it completes and the run stops on it
    ("after_save:3", 3, False, ()),
    ("eval:4", 5, False, ()),  # during the evaluation after step 4 (no save due): step 5 is saved
    (f"step:{STEPS}", LAST, False, ()),  # during the last step: the run finishes, export and all
], ids=["preflight", "mid-step-entrypoint", "mid-step-data-worker", "in-save", "after-save", "in-eval", "last-step"])
def test_sigterm_saves_the_step_in_progress_and_a_restart_ends_as_uninterrupted(toy_inputs, uninterrupted, tmp_path,
                                                                                pause_at, saved_step, entrypoint, extra):
    out, marker = tmp_path / "run", tmp_path / "paused"
    process = run("pause_points_train", toy_inputs, out, {"MPO_TEST_PAUSE_AT": pause_at, "MPO_TEST_MARKER": str(marker)},
                  entrypoint=entrypoint, extra=extra)
    deadline = time.monotonic() + 240
    while not (Path(f"{marker}.rank0").exists() and Path(f"{marker}.rank1").exists()):
        assert process.poll() is None and time.monotonic() < deadline, finished(process)[1][-3000:]
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    code, output = finished(process)
    assert code == 143, output[-3000:]
    assert "mpo_dist.launcher: stopped by SIGTERM" in output
    if saved_step is None:
        assert not (out / "checkpoints").exists() or steps_saved(out) == [], output[-3000:]
        assert "stopped by SIGTERM (rank 0); what was saved before it is kept" in output
        return
    if saved_step == LAST:
        assert "mpo_dist: SIGTERM came after the last step; the run is complete" in output, output[-3000:]
        assert (out / "hf" / "config.json").is_file(), output[-3000:]  # the export was written whole
    else:
        assert steps_saved(out)[-1] == saved_step, output[-3000:]
        assert f"mpo_dist: SIGTERM at step {saved_step}: checkpoint" in output
        # The steps since the last logged window are logged before stopping (log_interval 4 would skip them).
        assert training_records(read_metrics(out))[-1]["step"] == saved_step
        code, output = finished(run("mpo_dist.train", toy_inputs, out))  # the restart a scheduler makes
        assert code == 0, output[-3000:]
    resumed = flat_checkpoint(out / "checkpoints" / f"step-{STEPS:08d}", tmp_path)
    assert resumed.keys() == uninterrupted.keys()
    differing = [key for key, value in uninterrupted.items()
                 if not (torch.equal(resumed[key], value) if torch.is_tensor(value) else resumed[key] == value)]
    assert differing == []


SILENT_PEER = """
import os, sys, time
import torch, torch.distributed as dist
from mpo_dist.distributed import init_distributed
init_distributed(backend="gloo")
if dist.get_rank() == 1:
    time.sleep(60)  # a peer that goes silent (a frozen host, a partitioned network) without closing its sockets
    sys.exit(0)
started = time.monotonic()
try:
    dist.all_reduce(torch.ones(1))
except Exception as error:
    print(f"failed after {time.monotonic() - started:.1f} s: {type(error).__name__}", flush=True)
    os._exit(3)
"""


@pytest.mark.dist
def test_a_silent_peer_fails_the_collective_after_the_configured_timeout(tmp_path):
    from support import free_port

    port = free_port()
    processes = [subprocess.Popen([sys.executable, "-c", SILENT_PEER], cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True,
                                  env={**SUBPROCESS_ENV, "MPO_DIST_COLLECTIVE_TIMEOUT_S": "4", "RANK": str(rank),
                                       "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
                 for rank in range(2)]
    try:
        output, _ = processes[0].communicate(timeout=50)  # well before the silent peer wakes (60 s)
    finally:
        for process in processes:
            process.kill()
            process.wait()
    assert processes[0].returncode == 3, output[-2000:]
    seconds = float(output.split("failed after ")[1].split(" s")[0])
    assert 3.5 <= seconds <= 30, output[-2000:]


@pytest.mark.unit
@pytest.mark.parametrize("value", ["0", "soon", "-5", "inf", "nan"])
def test_a_bad_collective_timeout_is_an_input_error_naming_the_variable(monkeypatch, value):
    from mpo_dist.distributed import collective_timeout_s
    from mpo_dist.errors import InputError

    monkeypatch.setenv("MPO_DIST_COLLECTIVE_TIMEOUT_S", value)
    with pytest.raises(InputError, match=f"MPO_DIST_COLLECTIVE_TIMEOUT_S={value!r}: expected a number of seconds > 0"):
        collective_timeout_s()
