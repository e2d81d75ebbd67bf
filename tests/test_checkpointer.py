"""The checkpointer in one process without a process group: atomic saves, pruning, latest, exact restore."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.stateful import Stateful

from support import Counter, QUIET
from mpo_dist.checkpoint import (CHECKPOINT_FORMAT, INFO_NAME, Checkpointer, ModelOptimizerState, complete_checkpoints,
                                 read_info)
from mpo_dist.errors import InputError

# DCP says once per call that it saves/loads in a single process: that is what these tests do.
pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]


def model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):  # so that the optimizer has state (step, exp_avg, exp_avg_sq)
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"param.{name}": value.detach().clone() for name, value in model.named_parameters()}
    for index, parameter in enumerate(model.parameters()):
        for key, value in optimizer.state[parameter].items():
            out[f"optim.{index}.{key}"] = torch.as_tensor(value).clone()
    return out


def checkpointer(root: Path, keep: int = 2, dp_world_size: int = 1) -> Checkpointer:
    return Checkpointer(root, keep, rank=0, dp_rank=0, dp_world_size=dp_world_size, log=QUIET)


def test_save_is_atomic_and_ignores_a_crashed_save(tmp_path):
    model, optimizer = model_and_optimizer(0)
    crashed = tmp_path / "step-00000005.tmp"  # what a save that crashed leaves behind
    crashed.mkdir(parents=True)
    (crashed / "junk").write_text("x")
    assert checkpointer(tmp_path).latest() is None and complete_checkpoints(tmp_path) == []

    seen = {}

    def write_extra(folder: Path) -> None:  # called while the save is still in its temporary folder
        seen.update(folder=folder, final_exists=(tmp_path / "step-00000005").exists(),
                    info_exists=(folder / INFO_NAME).exists(), junk=(folder / "junk").exists())
        (folder / "extra.txt").write_text("side file")

    final = checkpointer(tmp_path).save(5, {"model_optimizer": ModelOptimizerState(model, optimizer)},
                                        {"counter": Counter(3)}, write_extra=write_extra)
    assert final == tmp_path / "step-00000005"
    assert seen == {"folder": crashed, "final_exists": False, "info_exists": False, "junk": False}
    assert not crashed.exists() and (final / "extra.txt").read_text() == "side file"
    info = read_info(final)
    assert info["step"] == 5 and info["dp_world_size"] == 1 and info["rank_local"] == ["counter"]

    (tmp_path / "step-00000009.tmp").mkdir()  # a newer crashed save, and a folder that was never completed
    (tmp_path / "step-00000008").mkdir()
    assert checkpointer(tmp_path).latest() == final
    assert complete_checkpoints(tmp_path) == [final]


@pytest.mark.parametrize("written", [None, 1, CHECKPOINT_FORMAT + 1])
def test_a_checkpoint_of_another_format_is_refused_in_one_line_not_skipped(tmp_path, written):
    """A checkpoint whose checkpoint.json records no format or another one (these were never released)
    is refused by name, with what to do, before anything is loaded; "auto" does not pass over it as damaged."""
    model, optimizer = model_and_optimizer(0)
    states = {"model_optimizer": ModelOptimizerState(model, optimizer)}
    older = checkpointer(tmp_path).save(1, states, {})
    newest = checkpointer(tmp_path).save(2, states, {})
    assert read_info(newest)["format"] == CHECKPOINT_FORMAT
    info = read_info(newest)
    if written is None:
        del info["format"]
    else:
        info["format"] = written
    (newest / INFO_NAME).write_text(json.dumps(info))
    before = snapshot(model, optimizer)
    for resume in ("auto", str(newest)):
        with pytest.raises(InputError) as refused:
            checkpointer(tmp_path).resume(resume, states, {})
        message = str(refused.value)
        assert "\n" not in message and message.startswith(f"checkpoint.resume={resume}: {newest} ")
        assert f"checkpoint format {written or 'none'}; this one reads format {CHECKPOINT_FORMAT} only" in message
        assert "never released" in message and "checkpoint.resume=none job.overwrite_output_dir=true" in message
    assert all(torch.equal(value, snapshot(model, optimizer)[key]) for key, value in before.items())
    assert complete_checkpoints(tmp_path) == [older, newest]  # nothing set aside as damaged
    assert checkpointer(tmp_path).resume(str(older), states, {})[0] == older  # its own format still loads


def test_prune_keeps_the_newest_and_latest_picks_the_newest(tmp_path):
    model, optimizer = model_and_optimizer(0)
    saver = checkpointer(tmp_path, keep=2)
    for step in (10, 20, 30):
        saver.save(step, {"model_optimizer": ModelOptimizerState(model, optimizer)}, {})
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000020", "step-00000030"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000020", "step-00000030"]
    assert saver.latest() == tmp_path / "step-00000030"


def test_load_restores_model_optimizer_and_rank_local_state_exactly(tmp_path):
    model, optimizer = model_and_optimizer(0)
    saved = snapshot(model, optimizer)
    folder = checkpointer(tmp_path).save(1, {"model_optimizer": ModelOptimizerState(model, optimizer)},
                                         {"counter": Counter(42)})

    other_model, other_optimizer = model_and_optimizer(1)  # other weights and optimizer moments
    assert any(not torch.equal(saved[k], v) for k, v in snapshot(other_model, other_optimizer).items())
    counter = Counter(0)
    info = checkpointer(tmp_path).load(folder, {"model_optimizer": ModelOptimizerState(other_model, other_optimizer)},
                                       {"counter": counter})
    restored = snapshot(other_model, other_optimizer)
    assert restored.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(restored[key], value), key  # bitwise
    assert counter.value == 42 and info["step"] == 1 and info["rank_local_restored"] is True

    # Another data-parallel size: global state is restored, the per-rank state is not.
    counter = Counter(0)
    info = checkpointer(tmp_path, dp_world_size=2).load(folder, {"model_optimizer": ModelOptimizerState(other_model, other_optimizer)},
                                                        {"counter": counter})
    assert counter.value == 0 and info["rank_local_restored"] is False


def test_a_folder_without_checkpoint_json_is_refused(tmp_path):
    model, optimizer = model_and_optimizer(0)
    folder = checkpointer(tmp_path).save(1, {"model_optimizer": ModelOptimizerState(model, optimizer)}, {})
    (folder / INFO_NAME).unlink()
    with pytest.raises(InputError, match="not a complete mpo_dist checkpoint"):
        read_info(folder)
    with pytest.raises(InputError, match="not a complete mpo_dist checkpoint"):
        checkpointer(tmp_path).load(folder, {"model_optimizer": ModelOptimizerState(model, optimizer)}, {})
    assert checkpointer(tmp_path).latest() is None
    assert folder.is_dir()  # refused, not removed


# ------------------------------------------------------------------------------------ nothing unpickled


def _ran(path):  # what a hostile pickle in a checkpoint would call on load
    Path(path).write_text("code ran")


class Hostile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return _ran, (str(self.marker),)


class Holder(Stateful):
    def __init__(self, value):
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def test_loading_never_runs_a_pickle_stored_in_the_checkpoint(tmp_path):
    """DCP stores a non-tensor value with torch.save and would read it with torch.load(weights_only=False);
    the checkpointer reads such values with weights_only=True, so a crafted payload is refused, not run."""
    marker = tmp_path / "marker"
    folder = checkpointer(tmp_path / "ckpt").save(1, {"train_state": Holder(Hostile(marker))}, {})
    assert not marker.exists()
    with pytest.raises(BaseException, match="(?i)weights.only|unpickl|global"):
        checkpointer(tmp_path / "ckpt").load(folder, {"train_state": Holder(0)}, {})
    assert not marker.exists()


def test_rank_local_state_is_tensors_and_comes_back_with_its_types(tmp_path):
    import torch.distributed.checkpoint as dcp

    from mpo_dist.checkpoint import RNGState

    torch.manual_seed(3)
    folder = checkpointer(tmp_path).save(1, {}, {"rng": RNGState(), "counter": Counter(7), "mixed": Holder({"n": 2, "x": 0.5})})
    expected = torch.rand(4)  # what the saved RNG gives next
    stored = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    rank_local = {key: value for key, value in stored.items() if "/dp_rank_" in key}
    assert sorted(rank_local) == ["counter/dp_rank_0.value", "mixed/dp_rank_0.value.n", "mixed/dp_rank_0.value.x",
                                  "rng/dp_rank_0.cpu"]
    assert all(isinstance(value, TensorStorageMetadata) for value in rank_local.values())  # no bytes: no pickle
    counter, mixed, rng = Counter(0), Holder({"n": 0, "x": 0.0}), RNGState()
    info = checkpointer(tmp_path).load(folder, {}, {"rng": rng, "counter": counter, "mixed": mixed})
    assert info["rank_local_restored"] and info["missing"] == []
    assert counter.value == 7 and type(counter.value) is int and mixed.value == {"n": 2, "x": 0.5}
    torch.rand(1)  # a draw between loading and restoring (the trainer's data iterators) does not count
    rng.restore()
    assert torch.equal(torch.rand(4), expected)
    with pytest.raises(TypeError, match="only tensors, ints, floats and bools"):
        checkpointer(tmp_path).save(2, {}, {"bad": Holder("a string")})


def test_state_the_checkpoint_does_not_hold_is_reported_not_loaded(tmp_path):
    """E.g. a checkpoint of an older version, whose per-rank state was a pickle: it is never read."""
    model, optimizer = model_and_optimizer(0)
    folder = checkpointer(tmp_path).save(1, {"model_optimizer": ModelOptimizerState(model, optimizer)}, {})
    counter, position = Counter(5), Counter(9)
    info = checkpointer(tmp_path).load(folder, {"model_optimizer": ModelOptimizerState(model, optimizer),
                                                "pair_loader": position}, {"rng": counter})
    assert info["missing"] == ["pair_loader", "rng/dp_rank_0"] and not info["rank_local_restored"]
    assert counter.value == 5 and position.value == 9


def test_the_best_checkpoint_is_kept_beside_the_newest(tmp_path):
    """checkpoint.keep_best: with keep=1 the newest checkpoint and the one with the best eval value
    stay; a new best releases the old one to pruning; the record survives a new Checkpointer."""
    model, optimizer = model_and_optimizer(0)
    saver = Checkpointer(tmp_path, 1, rank=0, dp_rank=0, dp_world_size=1, log=QUIET)
    losses = {1: 0.5, 2: 0.3, 3: 0.4, 4: float("nan"), 5: 0.35}
    for step, loss in losses.items():
        folder = saver.save(step, {"model_optimizer": ModelOptimizerState(model, optimizer)}, {})
        saver.consider_best(folder, "eval/loss/total", loss, "min")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000002", "step-00000005"]
    reopened = Checkpointer(tmp_path, 1, rank=0, dp_rank=0, dp_world_size=1, log=QUIET)
    assert reopened.best() == {"folder": "step-00000002", "step": 2, "metric": "eval/loss/total", "value": 0.3}
    folder = reopened.save(6, {"model_optimizer": ModelOptimizerState(model, optimizer)}, {})
    assert reopened.consider_best(folder, "eval/loss/total", 0.1, "min")  # a new best: step 2 may go now
    reopened.save(7, {"model_optimizer": ModelOptimizerState(model, optimizer)}, {})
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000006", "step-00000007"]
    assert not reopened.consider_best(folder, "eval/reward/accuracy", float("nan"), "max")  # NaN is never best


def test_a_sigterm_inside_dcp_is_no_damage_and_no_failed_save(tmp_path, monkeypatch):
    """DCP catches BaseException on every rank and wraps it: a SIGTERM (Terminated) during a load must not
    make the checkpoint look damaged (resume=auto would set it aside), nor a save look failed."""
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

    from mpo_dist.errors import Terminated

    model, optimizer = model_and_optimizer(0)
    saver = checkpointer(tmp_path, keep=3)
    for step in (1, 2):
        saver.save(step, {"model_optimizer": ModelOptimizerState(model, optimizer)}, {})

    def terminated(*args, **kwargs):
        raise Terminated("SIGTERM")

    monkeypatch.setattr(FileSystemReader, "read_data", terminated)
    with pytest.raises(Terminated):
        saver.resume("auto", {"model_optimizer": ModelOptimizerState(model, optimizer)}, {})
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000001", "step-00000002"]
    monkeypatch.setattr(FileSystemWriter, "write_data", terminated)
    with pytest.raises(Terminated):
        saver.save(3, {"model_optimizer": ModelOptimizerState(model, optimizer)}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001", "step-00000002"]
