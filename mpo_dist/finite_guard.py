"""The finite-value guard: no NaN or inf ever reaches the weights or a checkpoint.

A step whose global loss or gradient norm is NaN or inf is skipped (no optimizer update), counted,
and warned about; after `training.max_nonfinite_steps` such steps in a row the run stops with
`NonFiniteError`. Before every save, parameters and optimizer state are checked too: a checkpoint is
never written from non-finite state, so pruning can never delete the last finite one.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from mpo_dist.distributed import all_ranks_succeeded, all_reduce_sum


class NonFiniteError(RuntimeError):
    """Training produced NaN or inf that skipping steps did not cure (not an input error: a traceback)."""


class FiniteGuard:
    """Counts skipped steps (saved with the train state, so a resumed run counts on)."""

    def __init__(self, max_in_a_row: int, log: Callable[[str], None] = print):
        self.max_in_a_row, self.log = max_in_a_row, log
        self.skipped_steps = self.in_a_row = 0
        self.last_skipped = False
        self.stop_agreed = False  # some rank asked to stop after this step (preemption.py)

    def state_dict(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped_steps, "nonfinite_in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps, self.in_a_row = int(state["skipped_steps"]), int(state["nonfinite_in_a_row"])

    def step_is_finite(self, step: int, loss_share: torch.Tensor, grad_norm: torch.Tensor, stop: bool = False) -> bool:
        """Whether step `step` may update: its global loss (this rank's share, summed over ranks) and its
        global gradient norm are finite. A collective, and the step's one host sync outside logging
        steps, accepted so that no NaN or inf reaches the weights; every rank gets the same two numbers,
        so every rank decides alike."""
        # `stop` (a preemption signal this rank received) rides on the same all-reduce: the ranks agree
        # on it without another collective or host read.
        summed = all_reduce_sum(torch.cat([loss_share.detach().float().reshape(1),
                                           torch.full((1,), float(stop), device=loss_share.device)]))
        loss_value, stops, norm_value = torch.cat([summed, grad_norm.detach().float().reshape(1)]).tolist()
        self.stop_agreed = stops > 0
        self.last_skipped = not (math.isfinite(loss_value) and math.isfinite(norm_value))
        if not self.last_skipped:
            self.in_a_row = 0
            return True
        self.skipped_steps += 1
        self.in_a_row += 1
        self.log(f"mpo_dist: WARNING: step {step}: non-finite loss {loss_value} or gradient norm {norm_value}; update "
                 f"skipped ({self.in_a_row} in a row, training.max_nonfinite_steps={self.max_in_a_row})")
        return False

    @property
    def should_stop(self) -> bool:
        return self.in_a_row >= self.max_in_a_row

    def stop_error(self, step: int, newest_checkpoint) -> NonFiniteError:
        return NonFiniteError(
            f"step {step}: the loss or gradient norm was NaN or inf in {self.in_a_row} steps in a row "
            f"(training.max_nonfinite_steps={self.max_in_a_row}); each update was skipped and the run stops here, "
            f"its newest checkpoint being {newest_checkpoint or 'none'}. Find what makes the loss non-finite (the "
            "inputs, optim.lr, loss.beta), or raise training.max_nonfinite_steps")


def refuse_non_finite_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, newest_checkpoint) -> None:
    """Raise NonFiniteError when a parameter or optimizer-state tensor holds NaN or inf on any rank (a
    collective, at checkpoint steps only). Skipped steps never get there; an update that overflowed
    with a finite gradient could, and saving it would let pruning delete the last finite checkpoint."""
    tensors = list(model.parameters())
    tensors += [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
    # One flag per tensor, stacked per device: on a GPU the parameters and moments are CUDA tensors
    # while AdamW keeps its `step` counters on the CPU, and torch.stack refuses to mix devices.
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for tensor in tensors:
        if tensor.is_floating_point():
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            flags.setdefault(local.device, []).append(torch.isfinite(local).all())
    finite = all(bool(torch.stack(device_flags).all()) for device_flags in flags.values())  # one sync per device
    if not all_ranks_succeeded(finite):
        raise NonFiniteError(
            f"step {step}: the parameters or optimizer state hold NaN or inf; no checkpoint is saved, so the newest "
            f"one ({newest_checkpoint or 'none'}) stays the last finite one. Lower optim.lr or set "
            "training.max_grad_norm, and resume from it")
