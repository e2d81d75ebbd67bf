"""Reliability: the finite-value guard of the step, damaged checkpoints on resume, saves that never
prune towards a bad checkpoint, and the run lock of job.output_dir. In-process where possible (the
trainer in one process with a one-process gloo group, NaN injected by monkeypatching), torchrun
only for what needs several ranks to agree."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import mpo_dist.objective as objective_module
from support import Counter, QUIET, TRAIN_CONFIG, toy_overrides, train
from mpo_dist.checkpoint import Checkpointer, DamagedCheckpointError, ModelOptimizerState, complete_checkpoints
from mpo_dist.config import load_config
from mpo_dist.errors import InputError
from mpo_dist.metrics_file import read_metrics
from mpo_dist.optim import lr_multiplier
from mpo_dist.run_lock import LOCK_NAME, OutputDirLockedError, RunLock
from mpo_dist.finite_guard import NonFiniteError
from mpo_dist.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


# ---------------------------------------------------------------------------------------- helpers

@pytest.fixture()
def make_trainer(toy_inputs, one_process_group):
    """`make_trainer(run, **overrides)`: a Trainer on the toy inputs in this process (closed at the end)."""
    made = []

    def make(run: Path, **extra) -> Trainer:
        values = {"data.num_workers": 0, "metrics.tensorboard": "false", "training.steps": 3, **extra}
        trainer = Trainer(load_config(str(TRAIN_CONFIG), toy_overrides(toy_inputs, run, **values)))
        made.append(trainer)
        return trainer

    yield make
    for trainer in made:
        trainer.close()


def state_of(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Parameters and optimizer state, copied (one process: the local shard is the whole tensor)."""
    local = lambda t: (t.to_local() if hasattr(t, "to_local") else t).detach().clone()  # noqa: E731
    out = {f"param.{name}": local(p) for name, p in trainer.model.named_parameters()}
    for index, p in enumerate(trainer.model.parameters()):
        for key, value in trainer.optimizer.state.get(p, {}).items():
            out[f"optim.{index}.{key}"] = local(torch.as_tensor(value))
    return out


def inject_nan(monkeypatch, trainer: Trainer, steps: set[int], snapshots: dict[int, dict] | None = None) -> None:
    """Make the policy log-probs NaN in `steps` (1-based); record state_of(trainer) as each step starts."""
    real = objective_module.batch_logprobs  # the objective's forward: the trainer's step

    def poisoned(model, *args, **kwargs):
        step = trainer.step + 1
        if snapshots is not None and step not in snapshots:
            snapshots[step] = state_of(trainer)
        out = real(model, *args, **kwargs)
        return dataclasses.replace(out, logps=out.logps + float("nan")) if step in steps else out

    monkeypatch.setattr(objective_module, "batch_logprobs", poisoned)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bitwise


# ---------------------------------------------------------------------------------------- the step

@pytest.mark.unit
def test_a_non_finite_step_is_skipped_counted_and_resumed(make_trainer, monkeypatch, tmp_path):
    run = tmp_path / "run"
    trainer = make_trainer(run, **{"training.steps": 3, "optim.warmup_steps": 0})
    snapshots: dict[int, dict] = {}
    inject_nan(monkeypatch, trainer, {2}, snapshots)
    trainer.train()
    assert_same(snapshots[2], snapshots[3])  # step 2 changed neither parameters nor optimizer state
    assert not all(torch.equal(snapshots[1][k], snapshots[2][k]) for k in snapshots[1] if k.startswith("param."))
    assert {int(v) for k, v in snapshots[3].items() if k.endswith(".step")} == {1}  # AdamW stepped once
    logged = read_metrics(run)
    assert [r["optim/skipped_steps"] for r in logged] == [0, 1, 1]
    assert "loss/total" not in logged[1] and all(torch.isfinite(torch.tensor(r["loss/total"])) for r in (logged[0], logged[2]))
    # The schedule kept stepping: step 3's learning rate is the one it has without a skip.
    assert trainer.scheduler.last_epoch == 3
    assert logged[2]["optim/lr"] == pytest.approx(3e-3 * lr_multiplier(3, trainer.config.optim, 3))
    trainer.close()  # gives the run lock back, so the same folder can be resumed

    resumed = make_trainer(run, **{"training.steps": 4, "optim.warmup_steps": 0})
    assert resumed.step == 3 and resumed.guard.skipped_steps == 1 and resumed.guard.in_a_row == 0


@pytest.mark.unit
def test_non_finite_steps_in_a_row_stop_the_run_and_the_last_finite_checkpoint_survives(make_trainer, monkeypatch, tmp_path):
    run = tmp_path / "run"
    trainer = make_trainer(run, **{"training.steps": 8, "checkpoint.interval": 1, "checkpoint.keep": 1,
                                   "training.max_nonfinite_steps": 3})
    snapshots: dict[int, dict] = {}
    inject_nan(monkeypatch, trainer, {3, 4, 5, 6, 7, 8}, snapshots)
    with pytest.raises(NonFiniteError) as caught:
        trainer.train()
    message = str(caught.value)
    assert not isinstance(caught.value, InputError)
    assert message.startswith("step 5: the loss or gradient norm was NaN or inf in 3 steps in a row "
                              "(training.max_nonfinite_steps=3)"), message
    assert "step-00000004" in message  # the newest checkpoint, named
    # Skipped steps do not corrupt: steps 3 and 4 were saved (state as after step 2), step 5 was not.
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["step-00000004"]
    assert read_metrics(run)[-1]["step"] == 5 and read_metrics(run)[-1]["optim/skipped_steps"] == 3
    trainer.close()
    monkeypatch.undo()
    resumed = make_trainer(run, **{"training.steps": 8})
    state = state_of(resumed)
    assert all(torch.isfinite(value).all() for value in state.values())
    assert_same(state, snapshots[3])  # the checkpoint holds the state after step 2, the last update


@pytest.mark.unit
def test_non_finite_parameters_are_never_saved(make_trainer, tmp_path):
    """An update that overflows with a finite gradient (not a skipped step) must not be saved: with
    checkpoint.keep=1 its pruning would delete the last finite checkpoint."""
    run = tmp_path / "run"
    trainer = make_trainer(run, **{"training.steps": 3, "checkpoint.interval": 1, "checkpoint.keep": 1})

    def overflow(optimizer, args, kwargs) -> None:  # after the optimizer step of step 2
        if trainer.step + 1 == 2:
            with torch.no_grad():
                next(iter(trainer.model.parameters())).to_local().fill_(float("inf"))

    trainer.optimizer.register_step_post_hook(overflow)
    with pytest.raises(NonFiniteError, match=r"^step 2: the parameters or optimizer state hold NaN or inf; no checkpoint "
                                             r"is saved, so the newest one \(.*step-00000001\) stays the last finite one"):
        trainer.train()
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["step-00000001"]


# ---------------------------------------------------------------------------------------- checkpoints

def small_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def saved_steps(root: Path, steps=(1, 2), keep: int = 2) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model, optimizer = small_model()
    saver = Checkpointer(root, keep, rank=0, dp_rank=0, dp_world_size=1, log=QUIET)
    for step in steps:
        with torch.no_grad():
            model.weight.fill_(float(step))
        saver.save(step, {"model_optimizer": ModelOptimizerState(model, optimizer), "counter": Counter(step)}, {})
    return model, optimizer


def truncate(folder: Path) -> None:
    data = next(folder.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


DAMAGE = {
    "truncated .distcp": truncate,
    "zero-byte .distcp": lambda folder: next(folder.glob("*.distcp")).write_bytes(b""),
    "unreadable .metadata": lambda folder: (folder / ".metadata").write_bytes(b"\x80\x04garbage"),
    "missing .metadata": lambda folder: (folder / ".metadata").unlink(),
    "unreadable checkpoint.json": lambda folder: (folder / "checkpoint.json").write_text("{"),
}


@pytest.mark.unit
@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_auto_falls_back_past_a_damaged_checkpoint(tmp_path, damage):
    model, optimizer = saved_steps(tmp_path)
    DAMAGE[damage](tmp_path / "step-00000002")
    warnings: list[str] = []
    loader = Checkpointer(tmp_path, 2, rank=0, dp_rank=0, dp_world_size=1, log=warnings.append)
    counter = Counter()
    folder, info = loader.resume("auto", {"model_optimizer": ModelOptimizerState(model, optimizer), "counter": counter}, {})
    assert folder == tmp_path / "step-00000001" and info["step"] == 1
    assert counter.value == 1 and torch.equal(model.weight, torch.ones_like(model.weight))
    assert len(warnings) == 2 and f"checkpoint {tmp_path / 'step-00000002'} is damaged" in warnings[0]
    assert "trying the previous one" in warnings[0]
    set_aside = tmp_path / "step-00000002.damaged"  # kept for a look, no longer a checkpoint to resume or count
    assert f"set the damaged checkpoint aside as {set_aside}" in warnings[1]
    assert complete_checkpoints(tmp_path) == [tmp_path / "step-00000001"]

    # Named explicitly, the damaged one is an input error naming it.
    with pytest.raises(DamagedCheckpointError, match=f"checkpoint.resume={set_aside}: this checkpoint is damaged"):
        loader.resume(set_aside, {"model_optimizer": ModelOptimizerState(model, optimizer), "counter": Counter()}, {})


@pytest.mark.unit
def test_resume_auto_with_every_checkpoint_damaged_is_an_input_error(tmp_path):
    model, optimizer = saved_steps(tmp_path)
    for folder in complete_checkpoints(tmp_path):
        truncate(folder)
    loader = Checkpointer(tmp_path, 2, rank=0, dp_rank=0, dp_world_size=1, log=QUIET)
    with pytest.raises(InputError, match=r"every checkpoint under .* is damaged \(step-00000002, step-00000001\).*"
                                         r"checkpoint.resume=none"):
        loader.resume("auto", {"model_optimizer": ModelOptimizerState(model, optimizer)}, {})
    assert Checkpointer(tmp_path / "none", 2, 0, 0, 1, log=QUIET).resume("auto", {}, {}) == (None, {})


@pytest.mark.unit
def test_a_save_that_does_not_complete_prunes_nothing(tmp_path):
    model, optimizer = saved_steps(tmp_path, steps=(1,), keep=1)
    saver = Checkpointer(tmp_path, 1, rank=0, dp_rank=0, dp_world_size=1, log=QUIET)

    def fail(folder: Path) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        saver.save(2, {"model_optimizer": ModelOptimizerState(model, optimizer)}, {}, write_extra=fail)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000001"]
    saver.save(2, {"model_optimizer": ModelOptimizerState(model, optimizer)}, {})  # the next save completes and prunes
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000002"]


@pytest.mark.e2e
def test_two_ranks_agree_to_fall_back_past_a_damaged_checkpoint(toy_inputs, tmp_path):
    run = tmp_path / "run"
    train(*toy_overrides(toy_inputs, run, **{"training.steps": 2, "checkpoint.interval": 1}))
    truncate(run / "checkpoints" / "step-00000002")
    result = train(*toy_overrides(toy_inputs, run, **{"training.steps": 3, "checkpoint.interval": 1}))
    assert f"checkpoint {run / 'checkpoints' / 'step-00000002'} is damaged" in result.stdout
    assert f"resumed from {run / 'checkpoints' / 'step-00000001'}" in result.stdout
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["step-00000002", "step-00000003"]
    assert (run / "checkpoints" / "step-00000002" / "checkpoint.json").is_file()  # re-saved over the damaged one


@pytest.mark.unit
def test_after_a_fallback_pruning_keeps_the_new_checkpoints_not_the_damaged_later_one(tmp_path):
    model, optimizer = saved_steps(tmp_path, steps=(1, 2, 3), keep=3)
    truncate(tmp_path / "step-00000003")  # the run falls back to step 2 and goes on
    saver = Checkpointer(tmp_path, 1, rank=0, dp_rank=0, dp_world_size=1, log=QUIET)
    folder, _ = saver.resume("auto", {"model_optimizer": ModelOptimizerState(model, optimizer)}, {})
    assert folder.name == "step-00000002"
    saver.save(3, {"model_optimizer": ModelOptimizerState(model, optimizer)}, {})  # replaces the damaged one
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000003"]
    assert saver.resume("auto", {"model_optimizer": ModelOptimizerState(model, optimizer)}, {})[0].name == "step-00000003"


@pytest.mark.unit
def test_a_damaged_later_checkpoint_is_set_aside_so_pruning_keeps_the_intact_one(tmp_path):
    """Resumed past a damaged step 3, the run saves step 4 (not 3): with keep=2 the intact step 2 must
    stay, not be pruned in favour of the damaged one."""
    model, optimizer = saved_steps(tmp_path, steps=(1, 2, 3), keep=3)
    truncate(tmp_path / "step-00000003")
    saver = Checkpointer(tmp_path, 2, rank=0, dp_rank=0, dp_world_size=1, log=QUIET)
    folder, _ = saver.resume("auto", {"model_optimizer": ModelOptimizerState(model, optimizer)}, {})
    assert folder.name == "step-00000002" and (tmp_path / "step-00000003.damaged").is_dir()
    saver.save(4, {"model_optimizer": ModelOptimizerState(model, optimizer)}, {})
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000002", "step-00000004"]


# ---------------------------------------------------------------------------------------- the run lock

def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(folder: Path, pid: int, host: str, age_s: float = 0.0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    beat = time.time() - age_s
    (folder / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host, "started": beat, "token": "x", "heartbeat": beat}))
    os.utime(folder / LOCK_NAME, (beat, beat))


@pytest.mark.unit
def test_a_second_lock_on_one_folder_is_refused_until_released(tmp_path):
    first = RunLock(tmp_path, log=QUIET)
    first.acquire()
    try:
        with pytest.raises(OutputDirLockedError) as caught:
            RunLock(tmp_path, log=QUIET).acquire()
        message = str(caught.value)
        assert message.startswith(f"job.output_dir {tmp_path} is in use by another run")
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
    finally:
        first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    second = RunLock(tmp_path, log=QUIET)
    second.acquire()
    second.release()


@pytest.mark.dist
@pytest.mark.parametrize("case", ["dead process on this host", "no heartbeat from another host"])
def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, case):
    if case == "dead process on this host":
        pid = dead_pid()
        write_lock(tmp_path, pid, socket.gethostname())
        expected = f"its process {pid} on {socket.gethostname()} is dead"
    else:
        write_lock(tmp_path, os.getppid(), "elsewhere", age_s=700)
        expected = "no heartbeat for 700 s"
    warnings: list[str] = []
    lock = RunLock(tmp_path, log=warnings.append)
    lock.acquire()
    try:
        assert warnings == [f"mpo_dist: WARNING: taking over the run lock {tmp_path / LOCK_NAME} ({expected})"]
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


@pytest.mark.unit
def test_a_live_lock_of_another_host_is_respected_and_the_heartbeat_keeps_ours_fresh(tmp_path):
    write_lock(tmp_path / "theirs", 12345, "elsewhere", age_s=30)
    with pytest.raises(OutputDirLockedError, match=r"held by pid 12345 on host elsewhere .*last heartbeat 30 s ago"):
        RunLock(tmp_path / "theirs", log=QUIET).acquire()
    lock = RunLock(tmp_path / "ours", heartbeat_s=0.05, log=QUIET)
    lock.acquire()
    try:
        first = json.loads((tmp_path / "ours" / LOCK_NAME).read_text())["heartbeat"]
        time.sleep(0.3)
        assert json.loads((tmp_path / "ours" / LOCK_NAME).read_text())["heartbeat"] > first
    finally:
        lock.release()


@pytest.mark.unit
@pytest.mark.parametrize("holder_beats", [True, False])
def test_a_lock_of_this_torchrun_job_on_another_host_is_taken_over_only_once_its_heartbeat_stops(
        tmp_path, monkeypatch, holder_beats):
    """A node lost and started again under another hostname: the new rank 0 finds the old one's lock,
    written at the same restart count (each node's agent counts its own)."""
    write_lock(tmp_path, 12345, "node-a")
    record = json.loads((tmp_path / LOCK_NAME).read_text())
    (tmp_path / LOCK_NAME).write_text(json.dumps({**record, "run_id": "job-7", "attempt": 0}))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    stop = threading.Event()

    def beat():  # a live holder: another job that reuses the id (it writes as RunLock does: whole files)
        while not stop.wait(0.05):
            (tmp_path / "beat.tmp").write_text(json.dumps({**record, "run_id": "job-7", "heartbeat": time.time()}))
            os.replace(tmp_path / "beat.tmp", tmp_path / LOCK_NAME)

    beating = threading.Thread(target=beat, daemon=True)
    if holder_beats:
        beating.start()
    warnings: list[str] = []
    lock = RunLock(tmp_path, heartbeat_s=0.4, log=warnings.append)
    try:
        if holder_beats:
            with pytest.raises(OutputDirLockedError, match="held by pid 12345 on host node-a"):
                lock.acquire()
            return
        started = time.monotonic()
        lock.acquire()
        assert 0.9 <= time.monotonic() - started < 5
        assert "waiting up to 1 s for its heartbeat" in warnings[0]
        assert warnings[1].endswith("(left by this torchrun job job-7 on node-a, no heartbeat for 1 s)")
        assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.token
    finally:
        stop.set()
        lock.release()


@pytest.mark.e2e
def test_trainer_refuses_a_locked_output_dir_on_every_rank(toy_inputs, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        write_lock(tmp_path / "run", holder.pid, socket.gethostname())
        result = train(*toy_overrides(toy_inputs, tmp_path / "run", **{"training.steps": 1}), check=False)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("mpo_dist: error")]
    assert len(errors) == 2 and all(f"job.output_dir {tmp_path / 'run'}" in line for line in errors), result.stderr[-3000:]
    assert any(f"held by pid {holder.pid} on host {socket.gethostname()}" in line for line in errors)
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_NAME]  # nothing written by the refused run


@pytest.mark.unit
def test_a_lock_left_by_an_earlier_attempt_of_the_same_torchrun_job_is_taken_over(tmp_path, monkeypatch):
    """After --max-restarts the new rank 0 may be on another host than the one that held the lock."""
    write_lock(tmp_path, 12345, "elsewhere")
    record = json.loads((tmp_path / LOCK_NAME).read_text())
    (tmp_path / LOCK_NAME).write_text(json.dumps({**record, "run_id": "job-7", "attempt": 0}))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    warnings: list[str] = []
    lock = RunLock(tmp_path, log=warnings.append)
    lock.acquire()
    try:
        assert "left by attempt 0 of this torchrun job job-7, now attempt 1" in warnings[0]
        assert json.loads((tmp_path / LOCK_NAME).read_text())["attempt"] == 1
    finally:
        lock.release()
