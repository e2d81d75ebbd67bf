"""One micro-batch: the rows of one forward and everything the objective reads beside them.

A micro-batch holds B preference pairs and, for MPO's tau term, D reference samples (D_ref), run
as ONE forward whose output sequences are numbered

    chosen 0 .. B-1,   rejected B .. 2B-1,   D_ref 2B .. 2B+D-1.

That numbering (the sequence-index contract) lives in this module only: `documents` gives each
response its index, and `chosen`, `rejected` and `dref_part` read per-sequence values back. Built
once, where the data is loaded (data/stream.py for training, evaluation.py, producers/score.py),
so every consumer receives typed tensors and counts, never a collated dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from mpo_dist.data.layout import Document, ModelInput
from mpo_dist.transfer import to_device

Layout = Callable[[Sequence[Document]], ModelInput]  # data/layout.py's `layout_for(...)`


def pair_documents(prompts: Sequence[np.ndarray], chosen: Sequence[np.ndarray], rejected: Sequence[np.ndarray],
                   first_index: int = 0) -> list[Document]:
    """B pairs -> B documents (a prompt with its two responses); sequence indices: chosen
    first_index + i, rejected first_index + B + i."""
    size = len(prompts)
    return [Document(prompt, [(first_index + i, good), (first_index + size + i, bad)])
            for i, (prompt, good, bad) in enumerate(zip(prompts, chosen, rejected))]


def single_documents(prompts: Sequence[np.ndarray], responses: Sequence[np.ndarray], first_index: int = 0) -> list[Document]:
    """One response per prompt (D_ref samples); sequence indices first_index + i."""
    return [Document(prompt, [(first_index + i, response)]) for i, (prompt, response) in enumerate(zip(prompts, responses))]


def documents(pairs: dict | None, dref: dict | None = None) -> list[Document]:
    """The documents of one forward from collated pairs and D_ref samples (data/collate.py): chosen
    0..B-1, rejected B..2B-1, D_ref from 2B."""
    out = [] if pairs is None else pair_documents(pairs["prompt_ids"], pairs["chosen_ids"], pairs["rejected_ids"])
    if dref is not None:
        out += single_documents(dref["prompt_ids"], dref["response_ids"], first_index=2 * len(out))  # 2 per pair
    return out


@dataclass
class PairTensors:
    """Per pair, [B] each."""

    label: torch.Tensor  # float32: probability that chosen is preferred
    ref_chosen_logps: torch.Tensor | None  # float32 reference log-prob sums (None: pairs not scored yet)
    ref_rejected_logps: torch.Tensor | None
    chosen_lengths: torch.Tensor  # float32 response token counts (for length-normalised losses)
    rejected_lengths: torch.Tensor
    real: torch.Tensor  # bool: False for the flagged duplicates that pad a batch (weight 0)
    keys: list[str]


@dataclass
class DrefTensors:
    """Per D_ref sample, [D] each."""

    ref_logps: torch.Tensor  # float32 reference log-prob sums (stored with the sample)
    response_lengths: torch.Tensor  # float32 response token counts
    real: torch.Tensor  # bool
    keys: list[str]


@dataclass(frozen=True)
class BatchCounts:
    """What the micro-batch holds, known on the host without a sync."""

    pairs: int  # real pairs
    dref: int  # real D_ref samples
    tokens: int  # tokens of the sequences as data: prompt + response per output sequence
    positions: int  # positions the forward computes, padding included
    real_positions: int  # non-padding positions (a packed pair's prompt once)
    head_targets: int  # positions the output head runs on


@dataclass(frozen=True)
class StreamPosition:
    """Where the batch's samples came from: the epoch of each stream and the pairs' progress."""

    pairs_epoch: int = 0
    pairs_progress: float = 0.0  # the epoch plus the fraction of its batches done, this one included
    dref_epoch: int | None = None


@dataclass
class MicroBatch:
    inputs: ModelInput
    pairs: PairTensors | None
    dref: DrefTensors | None
    counts: BatchCounts
    position: StreamPosition

    @classmethod
    def build(cls, pairs: dict | None, dref: dict | None, layout: Layout) -> "MicroBatch":
        """From collated pairs and/or D_ref samples (data/collate.py), laid out by `layout`."""
        inputs = layout(documents(pairs, dref))
        pair_tensors = dref_tensors = None
        if pairs is not None:
            pair_tensors = PairTensors(
                label=pairs["label"], ref_chosen_logps=pairs.get("ref_chosen_logps"),
                ref_rejected_logps=pairs.get("ref_rejected_logps"), chosen_lengths=pairs["chosen_lengths"],
                rejected_lengths=pairs["rejected_lengths"], real=~pairs["is_pad"], keys=pairs["keys"])
        if dref is not None:
            dref_tensors = DrefTensors(ref_logps=dref["ref_logps"], response_lengths=dref["response_lengths"],
                                       real=~dref["is_pad"], keys=dref["keys"])
        counts = BatchCounts(
            pairs=int(pair_tensors.real.sum()) if pair_tensors is not None else 0,
            dref=int(dref_tensors.real.sum()) if dref_tensors is not None else 0,
            tokens=inputs.num_tokens,
            positions=inputs.num_positions, real_positions=inputs.num_real_positions,
            head_targets=len(inputs.targets))
        position = StreamPosition(
            pairs_epoch=pairs.get("epoch", 0) if pairs is not None else 0,
            pairs_progress=pairs.get("epoch_progress", 0.0) if pairs is not None else 0.0,
            dref_epoch=dref.get("epoch", 0) if dref is not None else None)
        return cls(inputs, pair_tensors, dref_tensors, counts, position)

    def to(self, device: torch.device) -> "MicroBatch":
        """On `device`: every tensor (inputs, varlen pieces, pairs, D_ref) in ONE non-blocking copy
        (transfer.py); counts, keys and positions stay on the host."""
        return to_device(self, device)

    @property
    def num_pairs(self) -> int:
        """B: pairs in the batch, padding duplicates included."""
        return 0 if self.pairs is None else len(self.pairs.keys)

    def chosen(self, per_sequence: torch.Tensor) -> torch.Tensor:
        """The chosen responses' values of a per-output-sequence tensor (e.g. log-probs)."""
        return per_sequence[: self.num_pairs]

    def rejected(self, per_sequence: torch.Tensor) -> torch.Tensor:
        return per_sequence[self.num_pairs : 2 * self.num_pairs]

    def dref_part(self, per_sequence: torch.Tensor) -> torch.Tensor:
        """The D_ref samples' values (after every pair's two responses)."""
        return per_sequence[2 * self.num_pairs :]
