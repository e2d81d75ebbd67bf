"""A resumable stream of collated batches over a shard set, for one data-parallel rank.

The rank's batches per epoch come from `sampler.plan_epoch`. Numbering the batches one iteration
makes 0, 1, 2, ... (across epochs, from where it starts), batch `c` is made by DataLoader worker
`c % num_workers`: the order in which the loader interleaves its workers, so the stream does not
depend on the number of workers, and no worker sits idle (or waits forever) in an epoch with fewer
batches than workers.

The position is global, not per rank or worker: (epoch, batches every rank has done in it); every
rank does the same number. With fixed batches it is saved as the samples of the epoch's global
order consumed (`samples` = batches x batch_size x ranks, `global_batches` = samples / global
batch), which a stream on any number of ranks turns back into its own batches (`resume`). Every
batch carries `epoch`, `epoch_batch` (its index in the epoch on this rank) and `epoch_progress`:
the epoch plus the fraction of its batches done, this one included.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from functools import partial
from typing import Any, Callable, Iterator

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from mpo_dist.data.sampler import BatchSpec, EpochPlan, check_batching, plan_epoch, samples_to_batches, token_samples_done
from mpo_dist.data.shards import Manifest
from mpo_dist.errors import InputError

STATE_FORMAT = 2  # 1: per-rank, per-worker positions pickled by the checkpointer (before global positions)


class ShardStream(IterableDataset):
    def __init__(
        self,
        source,  # PairSource or DrefSource
        collate: Callable[[list[dict], np.ndarray], dict],
        spec: BatchSpec,
        *,
        seed: int,
        dp_rank: int,
        dp_world_size: int,
        num_epochs: int | None = None,  # None: cycle forever (D_ref)
    ):
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank {dp_rank} outside 0..{dp_world_size - 1}")
        self.source, self.collate = source, collate
        self.seed, self.dp_rank, self.dp_world_size, self.num_epochs = seed, dp_rank, dp_world_size, num_epochs
        self._sizes = source.shards.sizes
        self._lengths = source.shards.lengths() if spec.max_tokens else None
        self._set_spec(spec)
        self._epoch, self._start = 0, 0  # where the next iteration starts: epoch, batches of it already done

    def _set_spec(self, spec: BatchSpec) -> None:
        self._kept = check_batching(self._sizes, self._lengths, spec, self.dp_world_size)  # bad settings fail here, not in a worker
        self.spec = spec
        self._plan = partial(plan_epoch, self._sizes, self._lengths, spec, seed=self.seed, dp_rank=self.dp_rank,
                             dp_world_size=self.dp_world_size)

    def set_micro_batches_per_step(self, count: int) -> None:
        """Fixed batches: each step takes `count` micro-batches per rank, so an epoch is padded (or cut)
        to whole global batches of batch_size x ranks x count and the samples of every step are the
        same at any world size. Call before iterating or resuming."""
        self._set_spec(replace(self.spec, micro_batches_per_step=count))

    @property
    def manifest(self) -> Manifest:
        """The manifest of the shards this stream reads (pairs or D_ref)."""
        return self.source.shards.manifest

    @property
    def plan_id(self) -> int:
        """What a saved position means: the same shards, seed and batching, or the position is meaningless.
        Neither the world size nor (fixed batches) the batch size is part of it: the position converts."""
        spec = self.spec
        names = [shard.name for shard in self.manifest.shards]
        batching = (["fixed", spec.shuffle, spec.shuffle_window, spec.drop_tail] if spec.batch_size else
                    ["tokens", spec.max_tokens, spec.sequences_per_sample, spec.shuffle, spec.shuffle_window, spec.drop_tail])
        digest = hashlib.sha256(json.dumps([names, self._sizes, self.seed, batching]).encode()).hexdigest()
        return int(digest[:15], 16)  # fits an int64

    # ------------------------------------------------------------------ position

    def start_at(self, epoch: int, batches: int = 0) -> None:
        """The next iteration starts at `epoch` with its first `batches` batches (of this rank) done."""
        self._epoch, self._start = int(epoch), int(batches)

    @property
    def start(self) -> tuple[int, int]:
        """Where the next iteration starts: (epoch, batches of it already done on every rank)."""
        return self._epoch, self._start

    def position_state(self, epoch: int, batches: int) -> dict[str, int]:
        """The saved form of a position: plain ints, equal on every rank."""
        if self.spec.batch_size and batches >= self._kept // (self.spec.batch_size * self.dp_world_size):
            epoch, batches = epoch + 1, 0  # an epoch done is the next one's start
        state = {"format": STATE_FORMAT, "epoch": epoch, "batches": batches, "dp_world_size": self.dp_world_size,
                 "plan": self.plan_id, "samples": -1, "global_batch": 0, "global_batches": -1}
        if self.spec.batch_size:
            samples, size = batches * self.spec.batch_size * self.dp_world_size, self.spec.global_batch(self.dp_world_size)
            state.update(samples=samples, global_batch=size, global_batches=samples // size)
        return state

    def resume(self, state: dict[str, Any]) -> str | None:
        """Start at a saved position (`position_state`, maybe written by another number of ranks).
        Returns None when it resumes as if never interrupted, else one line saying what happened."""
        if "format" not in state or int(state["format"]) != STATE_FORMAT:
            raise InputError(f"cannot resume the data stream: unknown position format {state.get('format')} "
                             f"(expected {STATE_FORMAT}: a position written by another mpo_dist version)")
        state = {key: int(value) for key, value in state.items()}
        if state["plan"] != self.plan_id:
            raise InputError(
                "cannot resume the data stream: the shards, job.seed or the batching settings (data.batching, "
                "data.max_tokens, data.shuffle, data.shuffle_window, data.tail) differ from those the position was "
                "saved with; restore them to resume, or start a new run"
            )
        epoch, saved_world, world = state["epoch"], state["dp_world_size"], self.dp_world_size
        ranks = f"written by {saved_world} data-parallel ranks, now {world}"
        if self.spec.batch_size:
            samples, saved_size, size = state["samples"], state["global_batch"], self.spec.global_batch(world)
            batches, repeated = samples_to_batches(samples, self.spec, world)
            per_epoch = self._kept // (self.spec.batch_size * world)
            if batches >= per_epoch:  # the saved position lies in padding this epoch no longer has
                self.start_at(epoch + 1, 0)
            else:
                self.start_at(epoch, batches)
            if saved_world == world and saved_size == size and not repeated:
                return None
            done = f"{samples} samples ({samples // max(saved_size, 1)} global batches of {saved_size}) of epoch {epoch} done"
            if repeated:
                return (f"{ranks}: {done}; that is not a whole number of micro-batches of {self.spec.batch_size} x {world}, "
                        f"so the last {repeated} samples before it are trained on again, every later sample of the "
                        f"epoch once (keep training.global_batch_size to resume exactly)")
            note = f"{ranks}: {done}; resumes exactly at the next sample: every remaining sample of the epoch once, none repeated"
            if saved_size != size:
                note += (f" (the global batch changed from {saved_size} to {size}: the epoch's tail padding changes and "
                         "steps no longer end with it)")
            return note
        if saved_world == world:
            self.start_at(epoch, state["batches"])
            return None
        done, total = token_samples_done(self._sizes, self._lengths, self.spec, seed=self.seed, epoch=epoch,
                                         batches=state["batches"], dp_world_size=saved_world)
        self.start_at(epoch + 1, 0)
        return (f"{ranks}: token-budget batches depend on how an epoch is split over ranks, so this position has no "
                f"equivalent on {world} ranks: the {total - done} samples of epoch {epoch} not yet trained on (of "
                f"{total}) are skipped, none is repeated; data restarts at the beginning of epoch {epoch + 1}")

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[dict]:
        worker_id, num_workers = _worker()
        epoch, start = self._epoch, self._start
        made = 0  # batches this iteration made (all workers) in the epochs before `epoch`
        while self.num_epochs is None or epoch < self.num_epochs:
            plan = self._plan(epoch=epoch)
            count = len(plan.batches)
            first = start + (worker_id - made) % num_workers  # this worker's first batch of the epoch
            mine = list(range(first, count, num_workers))
            reader = _WindowReader(self.source, plan, [plan.batches[index] for index in mine])
            for index in mine:
                batch = plan.batches[index]
                samples = [reader.get(int(position)) for position in batch.positions]
                out = self.collate(samples, batch.is_pad)
                out["epoch"], out["epoch_batch"] = epoch, index
                out["epoch_progress"] = epoch + (index + 1) / count
                yield out
            made += max(count - start, 0)
            epoch, start = epoch + 1, 0


class _WindowReader:
    """Serves samples by position, loading whole read windows (`EpochPlan.window`) in one forward pass.

    Batches visit a window's positions in shuffled order; reading the window's needed positions in
    file order first keeps every shard cursor moving forwards. At most two windows stay in memory.
    """

    def __init__(self, source, plan: EpochPlan, batches):
        self.source, self.plan = source, plan
        self.needed = np.unique(np.concatenate([b.positions for b in batches])) if batches else np.zeros(0, np.int64)
        self.cache: dict[int, dict] = {}
        self.loaded: list[int] = []

    def get(self, position: int) -> dict:
        if position not in self.cache:
            self._load(int(self.plan.window[position]))
        return self.cache[position]

    def _load(self, window: int) -> None:
        if len(self.loaded) >= 2:
            stale = self.loaded.pop(0)
            for position in [p for p in self.cache if self.plan.window[p] == stale]:
                del self.cache[position]
        positions = self.needed[self.plan.window[self.needed] == window]
        for position in positions[np.argsort(self.plan.ids[positions], kind="stable")]:
            self.cache[int(position)] = self.source.read(int(self.plan.ids[position]))
        self.loaded.append(window)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def identity(batch):
    """The loader's collate_fn: batches are already collated in the workers."""
    return batch

