"""torchrun's own restarts (`--max-restarts`): a rank killed mid-run, again and again, and the job
still ends bitwise equal to an uninterrupted one, in bounded time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from support import REPO, SUBPROCESS_ENV, TRAIN_CONFIG, flat_checkpoint, toy_overrides, train, worker_pids
from mpo_dist.metrics_file import METRICS_FILE, read_metrics

pytestmark = pytest.mark.e2e

KILLS = 5
STEPS = 20  # each life is killed once it has saved a step beyond its start: steps 1-5, then 6-20 in one go


def newest_step(run: Path) -> int:
    steps = [int(p.name.removeprefix("step-")) for p in (run / "checkpoints").glob("step-*[0-9]")
             if (p / "checkpoint.json").is_file()]
    return max(steps, default=0)


def test_a_rank_killed_five_times_restarts_and_ends_bitwise_equal(toy_inputs, tmp_path):
    steps = {"training.steps": STEPS, "checkpoint.interval": 1, "checkpoint.keep": 2, "optim.warmup_steps": 4}
    train(*toy_overrides(toy_inputs, tmp_path / "full", **steps))

    run = tmp_path / "elastic"
    command = [sys.executable, "-m", "mpo_dist.launcher", "--standalone", "--nproc-per-node", "2",
               "--max-restarts", str(KILLS), "--monitor-interval", "0.2", "-m", "mpo_dist.train", "--config",
               str(TRAIN_CONFIG), *toy_overrides(toy_inputs, run, **steps)]
    start = time.monotonic()
    job = subprocess.Popen(command, env=SUBPROCESS_ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    killed: set[int] = set()
    resumed_from = 0
    try:
        for kill in range(KILLS):
            # Wait until this life of the job has trained and saved a step beyond where it resumed.
            while True:
                assert job.poll() is None, f"the job ended before kill {kill + 1}"
                assert time.monotonic() - start < 400, f"no progress before kill {kill + 1}"
                workers = [pid for pid in worker_pids(job.pid) if pid not in killed]
                if len(workers) == 2 and newest_step(run) > resumed_from:
                    break
                time.sleep(0.05)
            victim = workers[kill % 2]  # rank 0 and rank 1 in turn
            os.kill(victim, signal.SIGKILL)
            killed.update(workers)  # the survivor is stopped by torchrun too: the next life is new processes
            resumed_from = newest_step(run)
        output, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    seconds = time.monotonic() - start
    assert job.returncode == 0, output[-5000:]
    assert seconds < 400
    assert output.count("resumed from") >= KILLS, output[-5000:]

    full = flat_checkpoint(tmp_path / "full" / "checkpoints" / f"step-{STEPS:08d}", tmp_path)
    elastic = flat_checkpoint(run / "checkpoints" / f"step-{STEPS:08d}", tmp_path)
    # Every saved tensor: model, optimizer, loader positions and each rank's RNG.
    tensors = [key for key, value in full.items() if isinstance(value, torch.Tensor)]
    assert any(".exp_avg_sq" in key for key in tensors) and any(key.startswith("rng/") for key in tensors)
    assert sorted(full) == sorted(elastic)
    for key in tensors:
        assert torch.equal(full[key], elastic[key]), key
    assert elastic["train_state.step"] == STEPS and elastic["train_state.pairs_seen"] == full["train_state.pairs_seen"]
    steps_logged = [record["step"] for record in read_metrics(run)]
    assert steps_logged == sorted(set(steps_logged)) and steps_logged[-1] == STEPS  # each step once, in order
    # The raw lines too: read_metrics skips a line cut by a kill, and the resumed run must have dropped it.
    assert len((run / METRICS_FILE).read_text().splitlines()) == len(steps_logged)
