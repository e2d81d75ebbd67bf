"""A save that runs out of disk space: one line saying the disk is full, where, at which step and which
checkpoint is intact; no half-written folder left; the run resumes once there is space. On a real full
file system: a small tmpfs mounted for the test (root, as on this project's machines and CI)."""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from support import toy_overrides, train
from test_checkpointer import checkpointer, model_and_optimizer, snapshot
from mpo_dist.checkpoint import DiskFullError, ModelOptimizerState, checkpoint_problem, complete_checkpoints

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]


@contextmanager
def small_disk(folder: Path, size: str):
    """A tmpfs of `size` (e.g. '256k') mounted at `folder` for the block."""
    if os.geteuid() != 0:
        pytest.fail("this test mounts a small tmpfs to fill a real file system: run it as root (as CI does)",
                    pytrace=False)
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


@pytest.mark.parametrize("left_kib", [0, 8, 24])
def test_a_save_on_a_full_disk_says_so_and_keeps_the_last_checkpoint(tmp_path, left_kib):
    with small_disk(tmp_path / "disk", "256k") as disk:
        model, optimizer = model_and_optimizer(0)
        saver = checkpointer(disk / "checkpoints")
        first = saver.save(1, {"model_optimizer": ModelOptimizerState(model, optimizer)}, {})
        saved = snapshot(model, optimizer)
        # The rest of the disk filled, but for left_kib: the next save (about 47 KiB) fails part-way.
        (disk / "filler").write_bytes(b"\0" * max(shutil.disk_usage(disk).free - left_kib * 1024, 0))
        with pytest.raises(DiskFullError) as caught:
            saver.save(2, {"model_optimizer": ModelOptimizerState(model, optimizer)}, {})
        message = str(caught.value)
        assert message.startswith(f"checkpoint of step 2: the disk is full under {disk / 'checkpoints'} (")
        assert f"the half-written step-00000002.tmp was removed and the newest complete checkpoint, {first}, is intact" \
               in message and "\n" not in message
        assert sorted(p.name for p in (disk / "checkpoints").iterdir()) == ["step-00000001"]
        assert checkpoint_problem(first) is None
        model2, optimizer2 = model_and_optimizer(1)
        saver.load(first, {"model_optimizer": ModelOptimizerState(model2, optimizer2)}, {})
        restored = snapshot(model2, optimizer2)
        assert restored.keys() == saved.keys() and all((restored[k] == saved[k]).all() for k in saved)


def test_training_on_a_full_disk_ends_with_one_line_per_rank_and_resumes_once_there_is_room(toy_inputs, tmp_path):
    steps = {"model.dtype": "float32", "metrics.tensorboard": "false", "training.steps": 3, "checkpoint.interval": 1,
             "checkpoint.keep": 2}
    # One checkpoint of the toy model is about 1.4 MiB: the first fits, the second does not.
    with small_disk(tmp_path / "disk", "2200k") as disk:
        run = disk / "run"
        full = train(*toy_overrides(toy_inputs, run, **steps), check=False)
        assert full.returncode == 2, full.stderr[-3000:]
        lines = [line for line in full.stderr.splitlines() if "the disk is full" in line]
        assert len(lines) == 2 and all(line.startswith("mpo_dist: error (rank ") for line in lines), full.stderr[-3000:]
        assert "checkpoint of step 2" in lines[0] and "step-00000001, is intact" in lines[0]
        assert "Traceback" not in full.stderr
        assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["step-00000001"]
        assert not (run / "checkpoints" / "step-00000002.tmp").exists() and not (run / "run.lock").exists()

        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        resumed = train(*toy_overrides(toy_inputs, run, **steps))
        assert f"resumed from {run / 'checkpoints' / 'step-00000001'}" in resumed.stdout
        assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["step-00000002", "step-00000003"]
