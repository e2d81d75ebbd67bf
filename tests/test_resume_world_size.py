"""Resuming at another world size: the data position is global (samples of the epoch's global order
consumed), so 2 -> 1 and 1 -> 2 ranks see every remaining sample of the epoch exactly once and none
twice; with fixed batches every step even takes the same samples as the uninterrupted run."""

from __future__ import annotations

import collections
import json
import re
import shutil
from pathlib import Path

import pytest

from support import QUIET, toy_overrides, train
from mpo_dist.checkpoint import Checkpointer
from mpo_dist.config import DataConfig
from mpo_dist.data.loader import build_pair_loader
from mpo_dist.metrics_file import read_metrics
from shard_factory import make_pairs, make_reference

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

UNEVEN = [7, 13, 5, 11, 2]  # 38 samples


@pytest.fixture()
def shards(tmp_path: Path):
    keys = make_pairs(tmp_path / "pairs", UNEVEN)
    make_reference(tmp_path / "ref", tmp_path / "pairs")
    return tmp_path, keys


def loaders(root: Path, world: int, batch_size: int, accum: int = 1, workers: int = 0, **overrides):
    """One loader per simulated data-parallel rank; each step takes `accum` micro-batches per rank."""
    values = dict(pairs=str(root / "pairs"), reference=str(root / "ref"), batch_size=batch_size,
                  num_workers=workers, shuffle_window=8, **overrides)
    out = []
    for rank in range(world):
        loader = build_pair_loader(DataConfig(**values), seed=5, dp_rank=rank, dp_world_size=world,
                                   num_epochs=2)
        loader.set_micro_batches_per_step(accum)
        out.append(loader)
    return out


def steps(ranks, accum: int, limit: int | None = None) -> list[list[tuple[str, bool, int]]]:
    """Run ranks in lockstep: per step, every rank's (key, is_pad, epoch) samples, sorted."""
    iterators = [iter(loader) for loader in ranks]
    out = []
    while limit is None or len(out) < limit:
        step = []
        try:
            for _ in range(accum):
                for iterator in iterators:
                    batch = next(iterator)
                    step += [(key, bool(pad), batch["epoch"]) for key, pad in zip(batch["keys"], batch["is_pad"])]
        except StopIteration:
            assert not step, "ranks ran out at different steps"
            break
        out.append(sorted(step))
    return out


def saved_state(ranks) -> dict:
    states = [loader.state_dict() for loader in ranks]
    assert all(state.keys() == states[0].keys() and all(int(state[k]) == int(states[0][k]) for k in state)
               for state in states)  # the position is global: equal on every rank
    return states[0]


def real_per_epoch(all_steps, epoch: int) -> collections.Counter:
    return collections.Counter(key for step in all_steps for key, pad, e in step if e == epoch and not pad)


# global batch 6: (ranks, batch_size, micro-batches per step) before and after
LAYOUTS = [((2, 3, 1), (1, 3, 2)), ((2, 3, 1), (1, 6, 1)), ((1, 3, 2), (2, 3, 1)), ((1, 6, 1), (2, 3, 1))]


@pytest.mark.dist
@pytest.mark.parametrize("before,after", LAYOUTS, ids=lambda layout: "x".join(map(str, layout)))
@pytest.mark.parametrize("workers", [0, 2])
def test_fixed_batches_resume_exactly_at_another_world_size(shards, before, after, workers):
    root, keys = shards
    (n, batch_n, accum_n), (m, batch_m, accum_m) = before, after
    full = steps(loaders(root, n, batch_n, accum_n), accum_n)
    assert len(full) == 2 * 7  # 38 samples padded to 42 = 7 global batches of 6, per epoch
    # The uninterrupted run on the other layout takes the same samples at every step.
    assert steps(loaders(root, m, batch_m, accum_m), accum_m) == full
    for cut in (1, 3, 6, 7, 9):  # mid-epoch, the last step of epoch 0, into epoch 1
        first = loaders(root, n, batch_n, accum_n, workers)
        done = steps(first, accum_n, limit=cut)
        state = saved_state(first)
        assert int(state["global_batches"]) == cut % 7 and int(state["epoch"]) == cut // 7
        resumed = loaders(root, m, batch_m, accum_m, workers)
        for loader in resumed:
            loader.load_state_dict(state)
        note = resumed[0].resume_note
        assert f"written by {n} data-parallel ranks, now {m}" in note and "none repeated" in note
        rest = steps(resumed, accum_m)
        assert done + rest == full, f"cut {cut}"  # step by step, the same samples
        for epoch in (0, 1):  # every sample of each epoch exactly once, none repeated
            assert real_per_epoch(done + rest, epoch) == collections.Counter(keys), f"cut {cut}, epoch {epoch}"


@pytest.mark.unit
@pytest.mark.parametrize("n,m", [(2, 1), (1, 2)])
def test_token_budget_at_another_world_size_skips_the_rest_of_the_epoch_and_says_how_much(shards, n, m):
    root, keys = shards
    tokens = {"batching": "tokens", "max_tokens": 200}
    first = loaders(root, n, 3, **tokens)
    done = steps(first, 1, limit=2)
    state = saved_state(first)
    resumed = loaders(root, m, 3, **tokens)
    for loader in resumed:
        loader.load_state_dict(state)
    note = resumed[0].resume_note
    seen = real_per_epoch(done, 0)
    skipped = len(keys) - sum(seen.values())
    assert f"the {skipped} samples of epoch 0 not yet trained on (of {len(keys)}) are skipped" in note
    assert "data restarts at the beginning of epoch 1" in note
    rest = steps(resumed, 1)
    assert real_per_epoch(rest, 0) == collections.Counter()  # nothing of epoch 0 is repeated
    assert max(seen.values()) == 1
    assert real_per_epoch(rest, 1) == collections.Counter(keys)  # the next epoch whole


@pytest.mark.dist
def test_same_world_size_token_budget_resumes_exactly(shards):
    root, keys = shards
    tokens = {"batching": "tokens", "max_tokens": 200}
    full = steps(loaders(root, 2, 3, workers=2, **tokens), 1)
    first = loaders(root, 2, 3, workers=2, **tokens)
    done = steps(first, 1, limit=3)
    resumed = loaders(root, 2, 3, **tokens)
    for loader in resumed:
        loader.load_state_dict(saved_state(first))
    assert resumed[0].resume_note is None
    assert done + steps(resumed, 1) == full


@pytest.mark.unit
def test_position_through_a_checkpoint_written_by_two_ranks(shards, tmp_path):
    """The position is int64 tensors in DCP's shared state: written once (by rank 0 here) for 2 ranks,
    read by 1 rank, which goes on with the next sample."""
    root, keys = shards
    first = loaders(root, 2, 3)
    done = steps(first, 1, limit=4)
    saver = Checkpointer(tmp_path / "ckpt", 2, rank=0, dp_rank=0, dp_world_size=2, log=QUIET)
    folder = saver.save(4, {"pair_loader": first[0]}, {})
    (resumed,) = loaders(root, 1, 3, accum=2)
    info = Checkpointer(tmp_path / "ckpt", 2, rank=0, dp_rank=0, dp_world_size=1, log=QUIET).load(
        folder, {"pair_loader": resumed}, {})
    assert info["missing"] == [] and "now 1" in resumed.resume_note
    rest = steps([resumed], 2)
    assert real_per_epoch(done + rest, 0) == collections.Counter(keys)


# ------------------------------------------------------------------------------------ end to end


def loader_position(folder: Path) -> dict[str, int]:
    import torch.distributed.checkpoint as dcp

    from mpo_dist.checkpoint import SafeLoadPlanner

    keys = ["epoch", "samples", "global_batches", "global_batch"]
    state = {"data": {"pairs": {key: __import__("torch").tensor(0) for key in keys}}}
    dcp.load(state, checkpoint_id=str(folder), planner=SafeLoadPlanner(), no_dist=True)
    return {key: int(value) for key, value in state["data"]["pairs"].items()}


@pytest.mark.e2e
def test_trainer_resumes_2_to_1_to_2_ranks_with_every_pair_once(toy_inputs, tmp_path):
    """A 2-rank run checkpointed mid-epoch goes on with 1 rank, whose checkpoint goes on with 2 again:
    at the end of the epoch exactly every pair has been trained on once (pairs_seen), and the data
    position and per-step metrics match the uninterrupted 2-rank run."""
    pairs = json.loads((toy_inputs["pairs"] / "manifest.json").read_text())
    total = sum(shard["num_samples"] for shard in pairs["shards"])
    per_epoch = -(-total // 64)
    settings = {"training.global_batch_size": 64, "data.batch_size": 32, "training.steps": per_epoch,
                "checkpoint.interval": 7, "checkpoint.keep": 5, "optim.warmup_steps": 2}
    train(*toy_overrides(toy_inputs, tmp_path / "full", **settings))
    full = read_metrics(tmp_path / "full")
    assert full[-1]["progress/pairs_seen"] == total and full[-1]["progress/epoch"] == pytest.approx(1.0)

    def resume(source: Path, step: int, out: Path, nproc: int):
        (out / "checkpoints").mkdir(parents=True)
        shutil.copytree(source / "checkpoints" / f"step-{step:08d}", out / "checkpoints" / f"step-{step:08d}")
        return train(*toy_overrides(toy_inputs, out, **settings), nproc=nproc)

    one = resume(tmp_path / "full", 7, tmp_path / "one", 1)  # 2 -> 1
    assert "written by 2 data-parallel ranks, now 1" in one.stdout
    assert re.search(r"pairs data position written by 2 data-parallel ranks, now 1: 448 samples \(7 global batches "
                     r"of 64\) of epoch 0 done; resumes exactly", one.stdout), one.stdout
    two = resume(tmp_path / "one", 14, tmp_path / "two", 2)  # 1 -> 2
    assert "written by 1 data-parallel ranks, now 2" in two.stdout and "resumes exactly" in two.stdout
    for run, first in ((tmp_path / "one", 8), (tmp_path / "two", 15)):
        got = read_metrics(run)
        assert [r["step"] for r in got] == list(range(first, per_epoch + 1))
        assert got[-1]["progress/pairs_seen"] == total  # every pair once: none skipped, none repeated
        for mine, theirs in zip(got, full[first - 1 :]):  # the same pairs at every step
            assert mine["progress/pairs_seen"] == theirs["progress/pairs_seen"]
            assert mine["loss/total"] == pytest.approx(theirs["loss/total"], rel=0.05, abs=0.02)
    position = loader_position(tmp_path / "one" / "checkpoints" / "step-00000014")
    assert position == loader_position(tmp_path / "full" / "checkpoints" / "step-00000014")
    assert position == {"epoch": 0, "samples": 14 * 64, "global_batches": 14, "global_batch": 64}
