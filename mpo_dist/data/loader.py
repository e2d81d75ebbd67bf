"""Data loaders the trainer uses: pairs (with reference log-probs) and D_ref, each a StatefulDataLoader."""

from __future__ import annotations

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from mpo_dist.config import DataConfig
from mpo_dist.data.collate import collate_dref, collate_pairs
from mpo_dist.data.dataset import ShardStream, identity
from mpo_dist.data.sampler import BatchSpec
from mpo_dist.data.samples import DrefSource, PairSource
from mpo_dist.data.shards import Manifest, ShardError
from mpo_dist.errors import InputError
from mpo_dist.preemption import ignore_in_data_workers


def batch_spec(data: DataConfig, sequences_per_sample: int, batch_size: int) -> BatchSpec:
    tokens = data.batching == "tokens"
    return BatchSpec(
        batch_size=0 if tokens else batch_size,
        max_tokens=data.max_tokens if tokens else 0,
        sequences_per_sample=sequences_per_sample,
        shuffle=data.shuffle,
        shuffle_window=data.shuffle_window,
        drop_tail=data.tail == "drop",
    )


class ShardLoader(StatefulDataLoader):
    """A StatefulDataLoader over a ShardStream whose state is the global data position (dataset.py):
    the epoch and the batches every rank has taken from it, as int64 tensors equal on every rank,
    so it is saved once for all ranks and restored on any number of ranks and workers (`resume_note`
    then says what, if anything, is not exact)."""

    dataset: ShardStream

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._position = (0, 0)  # (epoch, batches of it this rank's consumer has taken)
        self.resume_note: str | None = None  # what `load_state_dict` did, when not an exact resume
        self.resume_error: InputError | None = None  # why it could not resume (raised when iterating)

    @property
    def manifest(self) -> Manifest:
        """The manifest of the shards this loader reads: the pairs' or D_ref's."""
        return self.dataset.manifest

    def set_micro_batches_per_step(self, count: int) -> None:
        """Each step takes `count` batches per rank (fixed batches: epochs become whole global batches)."""
        self.dataset.set_micro_batches_per_step(count)

    def __iter__(self):
        """Not a generator: the underlying iterator is made here, when `iter()` is called, so its draw
        from the CPU generator (DataLoader's base seed) happens then, not at the first batch."""
        if self.resume_error is not None:
            raise self.resume_error
        self.dataset.start_at(*self._position)  # a new iteration goes on where the last batch taken left off
        return self._tracked(super().__iter__())

    def _tracked(self, batches):
        for batch in batches:
            self._position = (batch["epoch"], batch["epoch_batch"] + 1)
            yield batch

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: torch.tensor(value, dtype=torch.int64)
                for key, value in self.dataset.position_state(*self._position).items()}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position. A position this stream cannot use (other shards, seed or batching
        settings) is kept as `resume_error` and raised when iterating: while loading a checkpoint it is
        not mistaken for a damaged file."""
        self.resume_note = self.resume_error = None
        try:
            self.resume_note = self.dataset.resume(state)
        except InputError as error:
            self.resume_error = error
            return
        self._position = self.dataset.start


def _loader(stream: ShardStream, num_workers: int) -> ShardLoader:
    # batch_size=None: each item is already a batch. persistent_workers stays off: workers are
    # re-created per iteration so a loaded state always reaches them.
    return ShardLoader(
        stream, batch_size=None, collate_fn=identity, num_workers=num_workers,
        prefetch_factor=4 if num_workers else None, worker_init_fn=ignore_in_data_workers,
    )


def build_pair_loader(data: DataConfig, *, seed: int, dp_rank: int, dp_world_size: int,
                      num_epochs: int | None = None) -> ShardLoader:
    """Pairs joined with their reference log-probs (when data.reference is set), collated (collate.py)."""
    try:
        source = PairSource(data.pairs, data.reference or None)
    except (ShardError, FileNotFoundError) as error:
        raise ShardError(f"data.pairs={data.pairs} / data.reference={data.reference}: {error}") from error
    stream = ShardStream(source, collate_pairs, batch_spec(data, 2, data.batch_size), seed=seed, dp_rank=dp_rank,
                         dp_world_size=dp_world_size, num_epochs=num_epochs)
    return _loader(stream, data.num_workers)


def build_dref_loader(data: DataConfig, *, seed: int, dp_rank: int, dp_world_size: int,
                      tokenizer_hash: str | None = None) -> ShardLoader:
    """D_ref samples, cycled forever; their tokenizer must be the pairs' (`tokenizer_hash`)."""
    try:
        source = DrefSource(data.dref)
    except (ShardError, FileNotFoundError) as error:
        raise ShardError(f"data.dref={data.dref}: {error}") from error
    manifest = source.shards.manifest
    if tokenizer_hash is not None and manifest.tokenizer_hash != tokenizer_hash:
        raise ShardError(f"data.dref {data.dref}: tokenizer {manifest.tokenizer_hash} differs from "
                         f"the pairs' {tokenizer_hash}; resample D_ref with the policy's tokenizer")
    stream = ShardStream(source, collate_dref, batch_spec(data, 1, data.dref_batch_size), seed=seed + 1, dp_rank=dp_rank,
                         dp_world_size=dp_world_size, num_epochs=None)
    return _loader(stream, data.num_workers)
