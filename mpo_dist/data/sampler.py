"""Which samples each rank reads in an epoch, in which batches: pure functions, no I/O, no torch.distributed.

The recipe (webdataset's node splitting is not used: it gives ranks unequal sample counts, and
ranks that run out first hang the others in a collective):
1. one seeded global order per epoch, shared by all ranks: shards in a shuffled order, each
   shard's samples in file order (so reading stays sequential);
2. fixed batches (`batch_size`): the global order is shuffled within consecutive windows of
   `shuffle_window` samples (the same permutation at any world size), its tail padded with flagged
   duplicates (masked out of the loss) or dropped to a whole number of global batches
   (`global_batch` = batch_size x ranks x micro-batches per step), and cut into micro-batch rounds
   of batch_size x ranks samples, round i giving rank r its samples i*B*W + r*B ... + B - 1. So the
   samples of global batch k (= step k of the epoch) are positions [k*G, (k+1)*G) of the global
   order whatever the world size, and a position saved as "P samples of epoch e consumed" resumes
   exactly on any number of ranks (`samples_to_batches`);
3. token budgets (`max_tokens`): the tail padded or dropped to a multiple of the number of ranks,
   each rank takes a contiguous slice, shuffles within windows of `shuffle_window` consecutive
   samples of it and cuts batches of as many samples as fit the padded-token budget, with extra
   all-padding batches so every rank yields the same number of batches. These batches depend on
   the split over ranks: a position resumes exactly only at the same world size.

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
    micro_batches_per_step: int = 1  # fixed batches: an epoch is a whole number of steps of this many per rank

    def __post_init__(self):
        if (self.batch_size > 0) == (self.max_tokens > 0):
            raise InputError("set exactly one of batch_size (fixed batches) or max_tokens (token budget)")
        if self.shuffle_window < 1:
            raise InputError(f"shuffle_window must be >= 1, got {self.shuffle_window}")
        if self.micro_batches_per_step < 1:
            raise InputError(f"micro_batches_per_step must be >= 1, got {self.micro_batches_per_step}")

    def global_batch(self, dp_world_size: int) -> int:
        """Fixed batches: samples per step over all ranks (0 for token budgets)."""
        return self.batch_size * dp_world_size * self.micro_batches_per_step


@dataclass
class Batch:
    positions: np.ndarray  # indices into the rank's samples (EpochPlan.ids)
    is_pad: np.ndarray  # True where the sample only fills a shape and must not count


@dataclass
class EpochPlan:
    ids: np.ndarray  # global sample id (manifest order) at each position of this rank's samples
    is_pad: np.ndarray  # tail duplicates, per position
    batches: list[Batch]
    window: np.ndarray  # per position: the read window it belongs to (non-decreasing; read in one pass)


def epoch_order(shard_sizes: Sequence[int], seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Global sample ids of one epoch: shards in a seeded order, samples in file order within each."""
    offsets = np.concatenate([[0], np.cumsum(shard_sizes)])
    shard_order = np.arange(len(shard_sizes))
    if shuffle:
        shard_order = np.random.default_rng([seed, epoch, _SHARD_ORDER]).permutation(len(shard_sizes))
    return np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in shard_order] or [np.zeros(0, np.int64)])


def epoch_unit(spec: BatchSpec, dp_world_size: int) -> int:
    """An epoch's kept samples are a multiple of this: the global batch, or the ranks for token budgets."""
    return spec.global_batch(dp_world_size) if spec.batch_size else dp_world_size


def check_batching(shard_sizes: Sequence[int], lengths: np.ndarray | None, spec: BatchSpec, dp_world_size: int) -> int:
    """Raise InputError if these shards cannot be cut into batches for `dp_world_size` ranks; without
    planning, so a stream can check at construction. Returns the samples an epoch keeps (all ranks)."""
    total = int(sum(shard_sizes))
    unit = epoch_unit(spec, dp_world_size)
    kept = (total // unit) * unit if spec.drop_tail else -(-total // unit) * unit
    if kept == 0:
        what = (f"{dp_world_size} ranks x {spec.batch_size} x {spec.micro_batches_per_step} micro-batches per step"
                if spec.batch_size else f"{dp_world_size} ranks x 1")
        raise InputError(
            f"{total} samples are fewer than one batch on every rank ({unit} = {what}); "
            "use more data, fewer ranks or a smaller batch"
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
    if spec.batch_size:
        return _fixed_plan(global_order(shard_sizes, spec, seed=seed, epoch=epoch), kept, spec, dp_rank, dp_world_size)
    order = epoch_order(shard_sizes, seed, epoch, spec.shuffle)
    total = len(order)
    padded = np.resize(order, kept)  # wraps around: duplicates of the epoch's first samples
    pad = np.arange(kept) >= total
    per_rank = kept // dp_world_size

    def rank_batches(rank: int) -> list[Batch]:
        start = rank * per_rank
        ids, is_pad = padded[start : start + per_rank], pad[start : start + per_rank]
        return _token_batches(ids, is_pad, lengths, spec, seed, epoch, rank)

    batches = rank_batches(dp_rank)
    # Every rank must run the same number of steps: pad with one-sample, all-padding batches
    # up to the largest count, computed from the lengths in the manifests without any I/O.
    most = max(len(rank_batches(rank)) if rank != dp_rank else len(batches) for rank in range(dp_world_size))
    filler = Batch(np.zeros(1, np.int64), np.ones(1, bool))
    batches += [filler] * (most - len(batches))
    start = dp_rank * per_rank
    return EpochPlan(padded[start : start + per_rank], pad[start : start + per_rank], batches,
                     np.arange(per_rank) // spec.shuffle_window)


def global_order(shard_sizes: Sequence[int], spec: BatchSpec, *, seed: int, epoch: int) -> np.ndarray:
    """Fixed batches: the epoch's samples in the order they are consumed, at any world size (before
    the tail is padded or dropped): the shard order, shuffled within windows of `shuffle_window`."""
    order = epoch_order(shard_sizes, seed, epoch, spec.shuffle)
    if spec.shuffle:
        rng = np.random.default_rng([seed, epoch, _WINDOW_ORDER])
        for start in range(0, len(order), spec.shuffle_window):
            window = order[start : start + spec.shuffle_window]
            window[:] = rng.permutation(window)
    return order


def _fixed_plan(order, kept: int, spec: BatchSpec, dp_rank: int, dp_world_size: int) -> EpochPlan:
    total = len(order)
    padded = np.resize(order, kept)  # wraps around: duplicates of the epoch's first (shuffled) samples
    size, rounds = spec.batch_size, kept // (spec.batch_size * dp_world_size)
    # This rank's share of micro-batch round i: global positions i*B*W + r*B ... + B - 1.
    positions = (np.arange(rounds)[:, None] * size * dp_world_size + dp_rank * size + np.arange(size)).reshape(-1)
    is_pad = positions >= total
    batches = [Batch(np.arange(i * size, (i + 1) * size), is_pad[i * size : (i + 1) * size]) for i in range(rounds)]
    return EpochPlan(padded[positions], is_pad, batches, positions // spec.shuffle_window)


def samples_to_batches(samples: int, spec: BatchSpec, dp_world_size: int) -> tuple[int, int]:
    """Fixed batches: (micro-batches each rank has done, samples it leaves to repeat) for a position of
    `samples` consumed of the epoch's global order (the micro-batch round is batch_size x ranks)."""
    round_size = spec.batch_size * dp_world_size
    return samples // round_size, samples % round_size


def token_samples_done(shard_sizes: Sequence[int], lengths: np.ndarray, spec: BatchSpec, *, seed: int, epoch: int,
                       batches: int, dp_world_size: int) -> tuple[int, int]:
    """Token budgets: (real samples of `epoch` in the first `batches` batches of every one of
    `dp_world_size` ranks, real samples of the epoch that are trained on)."""
    done = total = 0
    for rank in range(dp_world_size):
        plan = plan_epoch(shard_sizes, lengths, spec, seed=seed, epoch=epoch, dp_rank=rank, dp_world_size=dp_world_size)
        for index, batch in enumerate(plan.batches):
            real = int((~batch.is_pad).sum())
            total += real
            done += real if index < batches else 0
    return done, total


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
