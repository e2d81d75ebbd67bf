"""The objective of one micro-batch: one forward over its rows, then the loss terms.

The trainer's step, the held-out evaluation and the offline pass of tools/evaluate.py all compute
the loss here, and reference scoring uses the same forward (`policy_logprobs`), so the policy's
log-probs and the stored reference log-probs are computed the same way.

Weights make sums over micro-batches and ranks exact global means: a real pair weighs
1 / `pair_total` (the real pairs of the whole step or pass, over all ranks), a padding duplicate 0;
D_ref samples likewise with `dref_total`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from mpo_dist.batch import MicroBatch
from mpo_dist.logprobs import SequenceLogprobs, batch_logprobs
from mpo_dist.losses import LossOutput

Total = float | torch.Tensor  # a count of real samples: a Python number, or a device tensor (no host sync)


def policy_logprobs(model: torch.nn.Module, batch: MicroBatch) -> SequenceLogprobs:
    """Per output sequence of `batch` (on the model's device): the response's log-prob sum and token count."""
    return batch_logprobs(model, batch.inputs)


@dataclass
class ObjectiveOutput:
    logps: torch.Tensor  # [sequences] float32, in the batch's order (MicroBatch.chosen / rejected / dref_part)
    loss: LossOutput | None  # None for a batch without pairs (D_ref only: log-probs alone)


class Objective:
    """`loss_fn` (losses.build_loss) applied to a micro-batch's forward."""

    def __init__(self, loss_fn: Callable[..., LossOutput]):
        self.loss_fn = loss_fn

    def __call__(self, model: torch.nn.Module, batch: MicroBatch, *, pair_total: Total,
                 dref_total: Total | None = None) -> ObjectiveOutput:
        """The forward and, when the batch has pairs, the loss; its D_ref term when it has D_ref samples."""
        logps = policy_logprobs(model, batch).logps
        if batch.pairs is None:
            return ObjectiveOutput(logps, None)
        pairs, dref = batch.pairs, batch.dref
        dref_terms = {}
        if dref is not None:
            dref_terms = {"dref_policy_logps": batch.dref_part(logps), "dref_ref_logps": dref.ref_logps,
                          "dref_weight": dref.real.to(torch.float32) / dref_total,
                          "dref_lengths": dref.response_lengths}
        loss = self.loss_fn(batch.chosen(logps), batch.rejected(logps), pairs.ref_chosen_logps, pairs.ref_rejected_logps,
                            label=pairs.label, weight=pairs.real.to(torch.float32) / pair_total,
                            chosen_lengths=pairs.chosen_lengths, rejected_lengths=pairs.rejected_lengths, **dref_terms)
        return ObjectiveOutput(logps, loss)
