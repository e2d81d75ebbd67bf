"""Where a run's metrics go: a step-window accumulator, peak memory, and the writer (console line,
TensorBoard and `metrics.jsonl`, on rank 0). The names are metric_names.py's, the FLOPs and MFU
flops.py's, and metrics_file.py reads the file back.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import torch

from mpo_dist.distributed import all_reduce_sum
from mpo_dist.metric_names import TRAIN_CONSOLE, console_line, logged_name
from mpo_dist.metrics_file import METRICS_FILE, parse_records

__all__ = ["METRICS_FILE", "TENSORBOARD_DIR", "MetricLogger", "StepWindow", "peak_memory_bytes"]

TENSORBOARD_DIR = "tensorboard"


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
    """Rank 0 writes a console line, TensorBoard scalars and one JSON object per logged step to
    `metrics.jsonl`; other ranks write nothing. Values are plain floats (reduced by the caller).

    On a resumed run (`start_step` > 0) points after `start_step` left by the interrupted run are
    dropped from both files, so each step appears once."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool, total_steps: int, start_step: int = 0,
                 log: Callable[[str], None] = print):
        self.enabled, self.total_steps, self.start_step, self.log = enabled, total_steps, start_step, log
        self.tensorboard_dir = Path(output_dir) / TENSORBOARD_DIR
        self.jsonl_path = Path(output_dir) / METRICS_FILE
        self.writer = None
        self._jsonl = None
        if enabled:
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.tensorboard_dir), purge_step=start_step + 1 if start_step else None)
            self._jsonl = self._open_jsonl(start_step)
        self.start = time.monotonic()

    def _open_jsonl(self, start_step: int):
        kept = []
        if start_step and self.jsonl_path.is_file():  # a line cut by a crash is dropped
            kept = [json.dumps(record) for record in parse_records(self.jsonl_path.read_text())
                    if record["step"] <= start_step]
        self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.jsonl_path, "w")
        handle.writelines(line + "\n" for line in kept)
        handle.flush()
        return handle

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        self.log(self.console_line(step, values))

    def console_line(self, step: int, values: dict[str, float]) -> str:
        elapsed = time.monotonic() - self.start
        done = (step - self.start_step) / max(self.total_steps - self.start_step, 1)
        eta = elapsed / max(done, 1e-9) * (1 - done) if step > self.start_step else math.nan
        return console_line(values, TRAIN_CONSOLE, before=[f"step {step}/{self.total_steps}"],
                            after=[f"eta {_duration(eta)}"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self._jsonl is not None:
            self._jsonl.close()


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN before the first step
        return "-"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
