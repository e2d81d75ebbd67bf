"""Which samples each rank reads in an epoch, in which batches: pure functions, no I/O, no torch.distributed.

The recipe (webdataset's node splitting is not used: it gives ranks unequal sample counts, and
ranks that run out first hang the others in a collective):
1. one seeded global order per epoch, shared by all ranks: shards in a shuffled order, each
   shard's samples in file order (so reading stays sequential);
2. the tail padded with flagged duplicates (masked out of the loss) or dropped, so that every rank
   gets the same number of samples; each rank takes a contiguous slice;
3. inside its slice a rank shuffles within windows of `shuffle_window` consecutive samples (a
   window is read in one forward pass) and cuts batches: `batch_size` samples, or as many as fit
   a padded-token budget (`max_tokens`), with extra all-padding batches so every rank yields the
   same number of batches.

Which DataLoader worker makes which of a rank's batches is decided by the stream (dataset.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mpo_dist.errors import InputError

# Distinct streams of randomness derived from (seed, epoch[, rank]).
_SHARD_ORDER, _WINDOW_ORDER, _BATCH_ORDER = 0, 1, 2


@dataclass(frozen=True)
class BatchSpec:
    """How to cut batches. Exactly one of `batch_size` (fixed) or `max_tokens` (token budget) is > 0."""

    batch_size: int = 0
    max_tokens: int = 0
    sequences_per_sample: int = 1  # 2 for pairs (chosen and rejected are padded together)
    shuffle: bool = True
    shuffle_window: int = 1024
    drop_tail: bool = False

    def __post_init__(self):
        if (self.batch_size > 0) == (self.max_tokens > 0):
            raise InputError("set exactly one of batch_size (fixed batches) or max_tokens (token budget)")
        if self.shuffle_window < 1:
            raise InputError(f"shuffle_window must be >= 1, got {self.shuffle_window}")


@dataclass
class Batch:
    positions: np.ndarray  # indices into the rank's slice (EpochPlan.ids)
    is_pad: np.ndarray  # True where the sample only fills a shape and must not count


@dataclass
class EpochPlan:
    ids: np.ndarray  # global sample id (manifest order) at each position of this rank's slice
    is_pad: np.ndarray  # tail duplicates, per position
    batches: list[Batch]


def epoch_order(shard_sizes: Sequence[int], seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Global sample ids of one epoch: shards in a seeded order, samples in file order within each."""
    offsets = np.concatenate([[0], np.cumsum(shard_sizes)])
    shard_order = np.arange(len(shard_sizes))
    if shuffle:
        shard_order = np.random.default_rng([seed, epoch, _SHARD_ORDER]).permutation(len(shard_sizes))
    return np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in shard_order] or [np.zeros(0, np.int64)])


def check_batching(shard_sizes: Sequence[int], lengths: np.ndarray | None, spec: BatchSpec, dp_world_size: int) -> int:
    """Raise InputError if these shards cannot be cut into batches for `dp_world_size` ranks; without
    planning, so a stream can check at construction. Returns the samples an epoch keeps (all ranks)."""
    total = int(sum(shard_sizes))
    unit = dp_world_size * (spec.batch_size or 1)
    kept = (total // unit) * unit if spec.drop_tail else -(-total // unit) * unit
    if kept == 0:
        raise InputError(
            f"{total} samples are fewer than one batch on every rank ({unit} = {dp_world_size} ranks x "
            f"{spec.batch_size or 1}); use more data, fewer ranks or a smaller batch"
        )
    if spec.max_tokens:
        if lengths is None:
            raise InputError("token-budget batching needs per-sample lengths in the shard manifests")
        longest = int(np.max(lengths))
        if spec.sequences_per_sample * longest > spec.max_tokens:
            raise InputError(
                f"a sample of {longest} tokens x {spec.sequences_per_sample} sequences exceeds "
                f"data.max_tokens={spec.max_tokens}; raise it or prepare with a smaller --max-length"
            )
    return kept


def plan_epoch(
    shard_sizes: Sequence[int],
    lengths: np.ndarray | None,
    spec: BatchSpec,
    *,
    seed: int,
    epoch: int,
    dp_rank: int,
    dp_world_size: int,
) -> EpochPlan:
    """This rank's samples and batches for `epoch`. `lengths[id]` (tokens) is needed for token budgets."""
    kept = check_batching(shard_sizes, lengths, spec, dp_world_size)
    order = epoch_order(shard_sizes, seed, epoch, spec.shuffle)
    total = len(order)
    padded = np.resize(order, kept)  # wraps around: duplicates of the epoch's first samples
    pad = np.arange(kept) >= total
    per_rank = kept // dp_world_size

    def rank_batches(rank: int) -> list[Batch]:
        start = rank * per_rank
        ids, is_pad = padded[start : start + per_rank], pad[start : start + per_rank]
        if spec.batch_size:
            positions = _window_shuffled(per_rank, spec, seed, epoch, rank)
            return [Batch(chunk, is_pad[chunk]) for chunk in np.split(positions, per_rank // spec.batch_size)]
        return _token_batches(ids, is_pad, lengths, spec, seed, epoch, rank)

    batches = rank_batches(dp_rank)
    if spec.max_tokens:
        # Every rank must run the same number of steps: pad with one-sample, all-padding batches
        # up to the largest count, computed from the lengths in the manifests without any I/O.
        most = max(len(rank_batches(rank)) if rank != dp_rank else len(batches) for rank in range(dp_world_size))
        filler = Batch(np.zeros(1, np.int64), np.ones(1, bool))
        batches += [filler] * (most - len(batches))
    start = dp_rank * per_rank
    return EpochPlan(padded[start : start + per_rank], pad[start : start + per_rank], batches)


def _window_shuffled(count: int, spec: BatchSpec, seed: int, epoch: int, rank: int) -> np.ndarray:
    positions = np.arange(count)
    if not spec.shuffle:
        return positions
    rng = np.random.default_rng([seed, epoch, _WINDOW_ORDER, rank])
    for start in range(0, count, spec.shuffle_window):
        window = positions[start : start + spec.shuffle_window]
        window[:] = rng.permutation(window)
    return positions


def _token_batches(ids, is_pad, lengths, spec: BatchSpec, seed: int, epoch: int, rank: int) -> list[Batch]:
    """Greedy packing under the padded-token budget, longest first within each window (every sample
    fits the budget alone: `check_batching`)."""
    rng = np.random.default_rng([seed, epoch, _BATCH_ORDER, rank])
    sample_lengths = lengths[ids]
    batches: list[Batch] = []
    for start in range(0, len(ids), spec.shuffle_window):
        window = np.arange(start, min(start + spec.shuffle_window, len(ids)))
        if spec.shuffle:
            window = rng.permutation(window)  # ties in length are broken at random
        window = window[np.argsort(-sample_lengths[window], kind="stable")]
        window_batches, current, longest = [], [], 0
        for position in window:
            length = int(sample_lengths[position])
            if current and spec.sequences_per_sample * (len(current) + 1) * max(longest, length) > spec.max_tokens:
                window_batches.append(np.array(current))
                current, longest = [], 0
            current.append(position)
            longest = max(longest, length)
        if current:
            window_batches.append(np.array(current))
        if spec.shuffle:
            window_batches = [window_batches[i] for i in rng.permutation(len(window_batches))]
        batches += [Batch(positions, is_pad[positions]) for positions in window_batches]
    return batches
