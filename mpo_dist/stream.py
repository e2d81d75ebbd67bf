"""The trainer's data: ready micro-batches from the pair stream and the D_ref stream, with one state.

Each micro-batch is the next batch of pairs and, for MPO with tau > 0, the next batch of D_ref
samples, laid out for one forward (batch.MicroBatch). Both loaders' positions are global (equal
on every rank, data/dataset.py), so the state saved under one checkpoint key, `{"pairs": ...,
"dref": ...}`, resumes at any world size.
"""

from __future__ import annotations

from typing import Iterator

from torch.distributed.checkpoint.stateful import Stateful

from mpo_dist.batch import Layout, MicroBatch
from mpo_dist.data.loader import ShardLoader
from mpo_dist.data.shards import Manifest


class TrainingStream(Stateful):
    # A checkpoint may lack a stream its run did not read (D_ref, when a DPO or tau=0 run is resumed
    # with MPO's tau term): checkpoint.load then loads the rest, and that stream starts at its beginning.
    parts_may_be_missing = True

    def __init__(self, pairs: ShardLoader, dref: ShardLoader | None, layout: Layout):
        self.loaders = {"pairs": pairs, **({"dref": dref} if dref is not None else {})}
        self.layout = layout
        self.not_in_checkpoint: list[str] = []

    @property
    def manifest(self) -> Manifest:
        """The pairs' manifest."""
        return self.loaders["pairs"].manifest

    def set_micro_batches_per_step(self, count: int) -> None:
        """Fixed batches: every epoch becomes whole steps of `count` micro-batches per rank, so a step
        takes the same samples at any world size (the same global batch) and positions convert."""
        for loader in self.loaders.values():
            loader.set_micro_batches_per_step(count)

    def __iter__(self) -> Iterator[MicroBatch]:
        """Not a generator: both loaders' iterators are made here, when `iter()` is called, so their
        draws from the CPU generator happen then (the trainer restores the RNG state after them)."""
        iterators = {name: iter(loader) for name, loader in self.loaders.items()}
        return self._batches(iterators["pairs"], iterators.get("dref"))

    def _batches(self, pairs: Iterator[dict], dref: Iterator[dict] | None) -> Iterator[MicroBatch]:
        for batch in pairs:
            yield MicroBatch.build(batch, next(dref) if dref is not None else None, self.layout)

    def state_dict(self) -> dict:
        return {name: loader.state_dict() for name, loader in self.loaders.items()}

    def load_state_dict(self, state: dict) -> None:
        if "pairs" not in state:
            raise KeyError("the checkpoint holds no pairs data position")  # never partial: the pairs are every run's
        self.not_in_checkpoint = [name for name in self.loaders if name not in state]
        for name, loader in self.loaders.items():
            if name in state:
                loader.load_state_dict(state[name])

    def resumed(self) -> list[tuple[str, str]]:
        """After `load_state_dict`: (stream, what is not exact) for each stream not resumed as if never
        interrupted. Raises the InputError of a position a stream cannot use (other shards, seed or
        batching settings), kept while the checkpoint loaded so it is not mistaken for damage."""
        for loader in self.loaders.values():
            if loader.resume_error is not None:
                raise loader.resume_error
        notes = [(name, "is not in the checkpoint (the run that wrote it did not read this stream): it starts at its "
                  "beginning") for name in self.not_in_checkpoint]
        return notes + [(name, loader.resume_note) for name, loader in self.loaders.items()
                        if loader.resume_note is not None]
