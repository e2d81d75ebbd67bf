"""Data loaders the trainer uses: pairs (with reference log-probs) and D_ref, each a StatefulDataLoader."""

from __future__ import annotations

from functools import partial

from torchdata.stateful_dataloader import StatefulDataLoader

from mpo_dist.config import DataConfig
from mpo_dist.data.collate import collate_dref, collate_pairs
from mpo_dist.data.dataset import ShardStream, identity
from mpo_dist.data.sampler import BatchSpec
from mpo_dist.data.samples import DrefSource, PairSource
from mpo_dist.data.shards import Manifest, ShardError
from mpo_dist.errors import InputError


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
    """StatefulDataLoader whose state also records num_workers: the saved position is per worker,
    so resuming with another count must fail clearly rather than inside torchdata."""

    dataset: ShardStream

    @property
    def manifest(self) -> Manifest:
        """The manifest of the shards this loader reads: the pairs' or D_ref's."""
        return self.dataset.manifest

    def restart_at_epoch(self, epoch: int) -> None:
        """Start at the beginning of `epoch` (when a saved position cannot be used)."""
        self.dataset.restart_at_epoch(epoch)

    def state_dict(self) -> dict:
        return {"num_workers": self.num_workers, "loader": super().state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_workers") != self.num_workers:
            raise InputError(
                f"cannot resume the data stream: it was saved with data.num_workers={state.get('num_workers')}, "
                f"now data.num_workers={self.num_workers}; resume with the same value"
            )
        super().load_state_dict(state["loader"])


def _loader(stream: ShardStream, num_workers: int) -> ShardLoader:
    # batch_size=None: each item is already a batch. persistent_workers stays off: workers are
    # re-created per iteration so a loaded state always reaches them.
    return ShardLoader(
        stream, batch_size=None, collate_fn=identity, num_workers=num_workers,
        prefetch_factor=4 if num_workers else None,
    )


def build_pair_loader(data: DataConfig, *, seed: int, dp_rank: int, dp_world_size: int, pad_token_id: int,
                      num_epochs: int | None = None) -> ShardLoader:
    """Pairs joined with their reference log-probs (when data.reference is set), collated for one forward."""
    try:
        source = PairSource(data.pairs, data.reference or None)
    except (ShardError, FileNotFoundError) as error:
        raise ShardError(f"data.pairs={data.pairs} / data.reference={data.reference}: {error}") from error
    collate = partial(collate_pairs, pad_token_id=pad_token_id, padding_side=data.padding_side,
                      pad_to_multiple_of=data.pad_to_multiple_of)
    stream = ShardStream(source, collate, batch_spec(data, 2, data.batch_size), seed=seed, dp_rank=dp_rank,
                         dp_world_size=dp_world_size, num_epochs=num_epochs)
    return _loader(stream, data.num_workers)


def build_dref_loader(data: DataConfig, *, seed: int, dp_rank: int, dp_world_size: int, pad_token_id: int,
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
    collate = partial(collate_dref, pad_token_id=pad_token_id, padding_side=data.padding_side,
                      pad_to_multiple_of=data.pad_to_multiple_of)
    stream = ShardStream(source, collate, batch_spec(data, 1, data.dref_batch_size), seed=seed + 1, dp_rank=dp_rank,
                         dp_world_size=dp_world_size, num_epochs=None)
    return _loader(stream, data.num_workers)
