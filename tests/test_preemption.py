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
from mpo_dist.launcher import DEFAULT_GRACE_S, FORWARDED_SIGNALS, _with_defaults, launch_command
from mpo_dist.preemption import Preemption, parse_signals


STEPS = 8
SETTINGS = {"training.steps": STEPS, "checkpoint.interval": 3, "checkpoint.keep": 10, "eval.interval": 4,
            "eval.max_batches": 2, "eval.require_held_out": "false", "metrics.tensorboard": "false"}


def overrides(toy: dict, out: Path) -> list[str]:
    held_out = {"eval.pairs": toy["pairs"], "eval.reference": toy["reference"], "eval.dref": toy["dref"]}
    return [*toy_overrides(toy, out, **SETTINGS), *(f"{key}={value}" for key, value in held_out.items())]


def run(module: str, toy: dict, out: Path, env: dict | None = None, entrypoint: bool = False) -> subprocess.Popen:
    """The launcher on 2 processes; with `entrypoint`, through the container's entrypoint script (which
    execs the launcher, so a signal to it reaches torchrun, as `docker stop` or a pod eviction does)."""
    target = ["-m", module, "--config", str(TRAIN_CONFIG), *overrides(toy, out)]
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
def test_launcher_forwards_the_preemption_signals_and_waits_the_grace_period_unless_told_otherwise():
    assert _with_defaults(["--standalone", "x.py"]) == [
        "--signals-to-handle", FORWARDED_SIGNALS, "--shutdown-timeout", str(DEFAULT_GRACE_S), "--standalone", "x.py"]
    assert "SIGUSR1" in FORWARDED_SIGNALS.split(",")  # what SLURM's --signal=B:USR1@300 sends
    given = ["--shutdown-timeout=90", "--signals-to-handle", "SIGTERM", "x.py"]
    assert _with_defaults(given) == given


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


@pytest.fixture(scope="module")
def uninterrupted(toy_inputs, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("uninterrupted")
    code, output = finished(run("mpo_dist.train", toy_inputs, out))
    assert code == 0, output[-3000:]
    return flat_checkpoint(out / "checkpoints" / f"step-{STEPS:08d}", out)


@pytest.mark.e2e
@pytest.mark.parametrize("pause_at,saved_step,entrypoint", [
    ("preflight", None, False),  # before step 1: stopped at once, nothing saved
    ("step:2", 2, True),  # mid-run: step 2 finishes and is saved (signal sent to the container entrypoint)
    ("save:3", 4, False),  # during step 3's periodic save: it completes, step 4 is the step in progress
    ("after_save:3", 4, False),
    ("eval:4", 5, False),  # during the evaluation after step 4
])
def test_sigterm_saves_the_step_in_progress_and_a_restart_ends_as_uninterrupted(toy_inputs, uninterrupted, tmp_path,
                                                                                pause_at, saved_step, entrypoint):
    out, marker = tmp_path / "run", tmp_path / "paused"
    process = run("pause_points_train", toy_inputs, out, {"MPO_TEST_PAUSE_AT": pause_at, "MPO_TEST_MARKER": str(marker)},
                  entrypoint=entrypoint)
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
    assert steps_saved(out)[-1] == saved_step, output[-3000:]
    assert f"mpo_dist: SIGTERM at step {saved_step}: checkpoint" in output
    code, output = finished(run("mpo_dist.train", toy_inputs, out))  # the restart a scheduler makes
    assert code == 0, output[-3000:]
    resumed = flat_checkpoint(out / "checkpoints" / f"step-{STEPS:08d}", tmp_path)
    assert resumed.keys() == uninterrupted.keys()
    differing = [key for key, value in uninterrupted.items()
                 if not (torch.equal(resumed[key], value) if torch.is_tensor(value) else resumed[key] == value)]
    assert differing == []
