"""A stateful, resumable stream of collated batches over a shard set, for one data-parallel rank.

The rank's batches per epoch come from `sampler.plan_epoch`. Numbering the rank's batches across
epochs 0, 1, 2, ..., batch `g` is made by DataLoader worker `g % num_workers`: the order in which
the loader interleaves its workers, so the stream does not depend on the number of workers, and no
worker sits idle (or waits forever) in an epoch with fewer batches than workers. In epoch `e` a
worker therefore starts at the epoch's batch `(worker_id - offset) % num_workers`, where `offset`
is the number of batches of the epochs before `e`, modulo `num_workers`.

The state is (epoch, batches this worker has yielded in it, offset), read eagerly at the start of
`__iter__`, so a resumed stream continues exactly where the saved one stopped. Every batch carries
`epoch` and `epoch_progress`: the epoch plus the fraction of its batches done, this one included.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from functools import partial
from typing import Any, Callable, Iterator

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from mpo_dist.data.sampler import BatchSpec, EpochPlan, check_batching, plan_epoch
from mpo_dist.data.shards import Manifest
from mpo_dist.errors import InputError


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
        self.source, self.collate, self.spec = source, collate, spec
        self.seed, self.dp_rank, self.dp_world_size, self.num_epochs = seed, dp_rank, dp_world_size, num_epochs
        self._sizes = source.shards.sizes
        self._lengths = source.shards.lengths() if spec.max_tokens else None
        check_batching(self._sizes, self._lengths, spec, dp_world_size)  # bad settings fail here, not in a worker
        self._plan = partial(plan_epoch, self._sizes, self._lengths, spec, seed=seed, dp_rank=dp_rank, dp_world_size=dp_world_size)
        self._epoch, self._yielded, self._offset = 0, 0, 0  # this worker's position
        # What the saved position means: the same shards and batching, or the position is meaningless.
        names = [shard.name for shard in self.manifest.shards]
        self._plan_id = hashlib.sha256(json.dumps([names, self._sizes, asdict(spec)]).encode()).hexdigest()[:16]

    @property
    def manifest(self) -> Manifest:
        """The manifest of the shards this stream reads (pairs or D_ref)."""
        return self.source.shards.manifest

    # ------------------------------------------------------------------ Stateful
    # The position is per worker: the loader (loader.ShardLoader) refuses another number of workers.

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "yielded": self._yielded,
            "offset": self._offset,
            "plan": self._plan_id,
            "dp_rank": self.dp_rank,
            "dp_world_size": self.dp_world_size,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {"dp_world_size": self.dp_world_size, "dp_rank": self.dp_rank, "seed": self.seed}
        for key, value in expected.items():
            if state[key] != value:
                raise InputError(
                    f"cannot resume the data stream: it was saved with {key}={state[key]}, now {key}={value}. "
                    "The data position is defined per rank and worker; resume with the same data.num_workers, "
                    "number of data-parallel ranks and seed (model and optimizer state can still be resharded)"
                )
        if state["plan"] != self._plan_id:
            raise InputError(
                "cannot resume the data stream: the shards or the batching settings (data.batch_size, "
                "data.batching, data.max_tokens, data.shuffle, data.shuffle_window, data.tail) differ from "
                "those the position was saved with; restore them to resume, or start a new run"
            )
        self._epoch, self._yielded, self._offset = int(state["epoch"]), int(state["yielded"]), int(state["offset"])

    def restart_at_epoch(self, epoch: int) -> None:
        """Start at the beginning of `epoch` (when a saved position cannot be used)."""
        self._epoch, self._yielded, self._offset = epoch, 0, 0

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[dict]:
        worker_id, num_workers = _worker()
        # Eager: a lazy read of the position can skip a whole epoch.
        epoch, skip, offset = self._epoch, self._yielded, self._offset
        while self.num_epochs is None or epoch < self.num_epochs:
            plan = self._plan(epoch=epoch)
            first = (worker_id - offset) % num_workers  # this worker's first batch of the epoch
            mine = plan.batches[first::num_workers]
            reader = _WindowReader(self.source, plan, mine, self.spec.shuffle_window)
            for index in range(skip, len(mine)):
                batch = mine[index]
                samples = [reader.get(int(position)) for position in batch.positions]
                out = self.collate(samples, batch.is_pad)
                out["epoch"] = epoch
                done = first + index * num_workers + 1  # the epoch's batches up to this one, on this rank
                out["epoch_progress"] = epoch + done / len(plan.batches)
                self._epoch, self._yielded, self._offset = epoch, index + 1, offset
                yield out
            epoch, skip, offset = epoch + 1, 0, (offset + len(plan.batches)) % num_workers
            self._epoch, self._yielded, self._offset = epoch, 0, offset


class _WindowReader:
    """Serves samples by slice position, loading whole windows in one forward pass over the shards.

    Batches visit a window's positions in shuffled order; reading the window's needed positions in
    file order first keeps every shard cursor moving forwards. At most two windows stay in memory.
    """

    def __init__(self, source, plan: EpochPlan, batches, window: int):
        self.source, self.plan, self.window = source, plan, window
        self.needed = np.unique(np.concatenate([b.positions for b in batches])) if batches else np.zeros(0, np.int64)
        self.cache: dict[int, dict] = {}
        self.loaded: list[int] = []

    def get(self, position: int) -> dict:
        if position not in self.cache:
            self._load(position // self.window)
        return self.cache[position]

    def _load(self, window: int) -> None:
        if len(self.loaded) >= 2:
            stale = self.loaded.pop(0)
            for position in [p for p in self.cache if p // self.window == stale]:
                del self.cache[position]
        lo, hi = window * self.window, (window + 1) * self.window
        positions = self.needed[(self.needed >= lo) & (self.needed < hi)]
        for position in positions[np.argsort(self.plan.ids[positions], kind="stable")]:
            self.cache[int(position)] = self.source.read(int(self.plan.ids[position]))
        self.loaded.append(window)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def identity(batch):
    """The loader's collate_fn: batches are already collated in the workers."""
    return batch

