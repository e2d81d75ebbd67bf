"""Where a run's metrics go: a step-window accumulator, peak memory, and the writer (console line and
the trackers of metrics.backends, trackers.py, on rank 0). The names are metric_names.py's, the FLOPs
and MFU flops.py's, and metrics_file.py reads metrics.jsonl back.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch

from mpo_dist.distributed import all_reduce_sum
from mpo_dist.metric_names import TRAIN_CONSOLE, console_line, logged_name
from mpo_dist.metrics_file import METRICS_FILE
from mpo_dist.trackers import TENSORBOARD_DIR, Tracker, Tracking, one_line, active_backends, open_trackers

__all__ = ["METRICS_FILE", "TENSORBOARD_DIR", "MetricLogger", "StepWindow", "peak_memory_bytes"]


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated device memory on CUDA; peak resident memory of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class StepWindow:
    """What the steps since the last log add up to on this rank, reduced over ranks once per log.

    `summed` metrics are this rank's shares of global values (summed over ranks they give the global
    value); `replicated` ones are equal on every rank (the clipped gradient norm) and are not summed.
    `counts` (tokens, positions, FLOPs, ...) are host numbers known without a device sync, summed
    over the window and the ranks. A step whose update was skipped (non-finite loss or gradient
    norm) adds its counts but not its metrics, so one NaN step does not make the window's means
    NaN; the means are over the other steps.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.steps = 0  # steps whose metrics count (not skipped)
        self.window_steps = 0  # every step of the window, skipped ones included
        self.summed: dict[str, torch.Tensor] = {}
        self.replicated: dict[str, torch.Tensor] = {}
        self.counts: dict[str, float] = {}
        self.start = time.monotonic()

    def add_step(self, summed: dict[str, torch.Tensor], replicated: dict[str, torch.Tensor],
                 counts: dict[str, float], skipped: bool = False) -> None:
        self.window_steps += 1
        for name, value in counts.items():
            self.counts[name] = self.counts.get(name, 0) + value
        if skipped:
            return
        for target, values in ((self.summed, summed), (self.replicated, replicated)):
            for name, value in values.items():
                target[name] = target.get(name, 0) + value.detach()
        self.steps += 1

    def reduce(self, device: torch.device) -> dict[str, float]:
        """Per-step means of the metrics under their logged names, plus the window's global counts
        under their own names, its `seconds` and its `steps` (skipped ones included; a collective:
        every rank calls it)."""
        summed, replicated, counted = sorted(self.summed), sorted(self.replicated), sorted(self.counts)
        counts = torch.tensor([self.counts[n] for n in counted], dtype=torch.float64, device=device)
        reduced = all_reduce_sum(torch.cat([torch.stack([self.summed[n].double() for n in summed]), counts])
                                 if summed else counts)
        local = [self.replicated[n].double().reshape(1) for n in replicated]
        values = torch.cat([reduced, *local]).tolist()  # the one host sync, at logging steps only
        metric_values = values[: len(summed)] + values[len(summed) + len(counted) :]
        out = {logged_name(name): value / self.steps for name, value in zip(summed + replicated, metric_values)}
        out.update(zip(counted, values[len(summed) : len(summed) + len(counted)]))
        out["seconds"] = time.monotonic() - self.start
        out["steps"] = self.window_steps
        return out


class MetricLogger:
    """Rank 0 hands each logged step's values (plain floats, reduced by the caller) to every tracker of
    the run (trackers.py: metrics.jsonl always, and what metrics.backends names) and prints a console
    line; other ranks write nothing. A tracker other than metrics.jsonl that fails (a tracking server
    that went down) is turned off with one warning and training goes on; metrics.jsonl keeps every step.

    On a resumed run (`start_step` > 0) the trackers go on from `start_step` (see trackers.py), so each
    step appears once. `tensorboard` adds the TensorBoard backend when `tracking` is not given."""

    def __init__(self, output_dir: Path, enabled: bool, total_steps: int, start_step: int = 0,
                 log: Callable[[str], None] = print, tracking: Tracking | None = None, tensorboard: bool = False):
        self.enabled, self.total_steps, self.start_step, self.log = enabled, total_steps, start_step, log
        self.trackers: list[Tracker] = []  # those still on; `opened` also holds the ones that failed
        if enabled:
            tracking = tracking or Tracking(active_backends([], tensorboard))
            self.trackers = open_trackers(Path(output_dir), tracking, start_step, log=log)
        self.opened = list(self.trackers)
        self.start = time.monotonic()

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for tracker in list(self.trackers):
            if tracker.required:
                tracker.log(step, values)
                continue
            try:
                tracker.log(step, values)
            except Exception as error:  # never a SIGTERM (Terminated is a BaseException): that stops the run
                self.trackers.remove(tracker)
                self.log(f"mpo_dist: WARNING: the {tracker.name} tracker failed at step {step} ({one_line(error)}); "
                         f"it gets nothing more from this run (a resume goes on in its run), training goes on, and "
                         f"metrics.jsonl has every step")
        self.log(self.console_line(step, values))

    def run_ids(self) -> dict[str, str]:
        """The tracker runs' ids (W&B, MLflow), for checkpoint.json: a resume goes on in them."""
        return {tracker.name: tracker.run_id() for tracker in self.opened if tracker.run_id() is not None}

    def locations(self) -> list[str]:
        """Where each tracker's metrics are, for the run's last line."""
        return [where for where in (tracker.where() for tracker in self.opened) if where]

    def console_line(self, step: int, values: dict[str, float]) -> str:
        elapsed = time.monotonic() - self.start
        done = (step - self.start_step) / max(self.total_steps - self.start_step, 1)
        eta = elapsed / max(done, 1e-9) * (1 - done) if step > self.start_step else math.nan
        return console_line(values, TRAIN_CONSOLE, before=[f"step {step}/{self.total_steps}"],
                            after=[f"eta {_duration(eta)}"])

    def close(self, completed: bool = False) -> None:
        """Close the trackers still on (`completed`: the run reached its last step); one that fails to
        close is reported, not raised: the run's outcome is not the tracker's."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            try:
                tracker.close(completed)
            except Exception as error:
                if tracker.required:
                    raise
                self.log(f"mpo_dist: WARNING: the {tracker.name} tracker could not close its run ({one_line(error)})")


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN before the first step
        return "-"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
