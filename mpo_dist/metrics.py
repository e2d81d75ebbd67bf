"""What a run reports and where: logged names, a step-window accumulator, throughput/MFU/memory
formulas, and the writer (console line, TensorBoard and `metrics.jsonl`, on rank 0).

The losses return short metric names (`preference_accuracy`, `kl_pair`, ...); `logged_name` is the one
place that maps them to the names users read (`preference/accuracy`, `loss/kl_pair`, ...).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import torch

from mpo_dist.distributed import all_reduce_sum

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

# Loss metric -> logged name; any other loss metric (a loss term) is logged as loss/<name>.
_LOSS_METRIC_NAMES = {
    "loss": "loss/total",
    "reward_accuracy": "reward/accuracy",  # implicit reward z - z_ref > 0 (TRL's reward accuracy)
    "preference_accuracy": "preference/accuracy",  # z > 0: the policy prefers chosen
    "reward_margin": "reward/margin",
    "p": "reward/p",
    "chosen_logps": "logps/chosen",
    "rejected_logps": "logps/rejected",
    "grad_norm": "optim/grad_norm",
}

# The console line: (logged name, label, format), in order; absent values are left out.
_CONSOLE_FIELDS = [
    ("loss/total", "loss", "{:.4f}"), ("reward/accuracy", "acc", "{:.3f}"), ("preference/accuracy", "pacc", "{:.3f}"),
    ("reward/margin", "margin", "{:+.3f}"),
    ("reward/p", "p", "{:.3f}"), ("loss/dref_kl", "kl(ref|pol)", "{:.3f}"), ("optim/lr", "lr", "{:.2e}"),
    ("optim/grad_norm", "gnorm", "{:.3f}"), ("throughput/tokens_per_s", "tok/s", "{:,.0f}"),
    ("throughput/mfu", "mfu", "{:.1%}"), ("memory/peak_gib", "mem GiB", "{:.2f}"),
    ("optim/skipped_steps", "skipped", "{:.0f}"),
]
_CONSOLE_IF_NONZERO = {"optim/skipped_steps"}  # shown only once something happened

# Peak dense bf16 TFLOP/s per device, for MFU when metrics.peak_tflops is 0. The first name that
# the device's name contains counts, so the PCIe H100 (756) comes before the SXM one.
KNOWN_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "GH200": 989.0, "H200": 989.0, "H100": 989.0,
                     "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "B200": 2250.0}


def logged_name(metric: str) -> str:
    return _LOSS_METRIC_NAMES.get(metric, f"loss/{metric}")


def known_peak_tflops(device_name: str) -> float | None:
    """The datasheet's dense bf16 TFLOP/s of a GPU by its name (torch.cuda.get_device_name), if known."""
    return next((value for key, value in KNOWN_PEAK_TFLOPS.items() if key in device_name), None)


def peak_tflops(configured: float, device: torch.device) -> float | None:
    if configured > 0:
        return configured
    if device.type == "cuda":
        return known_peak_tflops(torch.cuda.get_device_name(device))
    return None


def flops_per_token(num_params_without_embeddings: int, num_layers: int, hidden: int, seq_len: float) -> float:
    """Training FLOPs per token (forward + backward): 6N for the matmuls with the weights, plus
    attention scores and values, 12 * layers * hidden * sequence length (PaLM, appendix B)."""
    return 6 * num_params_without_embeddings + 12 * num_layers * hidden * seq_len


def row_flops(num_params_without_embeddings: int, num_layers: int, hidden: int, rows: int, width: int) -> float:
    """Training FLOPs of `rows` rows of `width` positions (padding included: the hardware computes
    it; a packed row's attention is computed densely under its mask, so it counts the full width)."""
    return rows * width * flops_per_token(num_params_without_embeddings, num_layers, hidden, width)


def layout_cost(num_body_params: int, num_layers: int, hidden: int) -> Callable[[int, int, bool], float]:
    """What data/layout.py compares to choose padded or packed rows (data.packing=auto): the FLOPs of
    rows x width positions, with the attention at full width under a mask (packed rows, padded rows
    with padding) and at half width without one (SDPA's causal kernels skip the upper triangle). The
    output head is left out: it runs on the same response tokens in every layout."""

    def cost(rows: int, width: int, dense_attention: bool) -> float:
        attention = (12 if dense_attention else 6) * num_layers * hidden * width
        return rows * width * (6 * num_body_params + attention)

    return cost


def flop_counts(model) -> tuple[int, int, int, int]:
    """(body parameters, head parameters, layers, hidden) of a causal LM for the FLOPs formulas: the
    output head (vocab x hidden) is counted apart, since it runs only where a token is predicted."""
    from mpo_dist.model import count_parameters

    config = model.config
    head = config.vocab_size * config.hidden_size
    return count_parameters(model, exclude_embeddings=True) - head, head, config.num_hidden_layers, config.hidden_size


def model_layout_cost(model) -> Callable[[int, int, bool], float]:
    """`layout_cost` for this causal LM: what the trainer, its held-out evaluation and reference
    scoring use to choose padded or packed rows."""
    body_params, _, layers, hidden = flop_counts(model)
    return layout_cost(body_params, layers, hidden)


def mfu(flops: float, seconds: float, devices: int, peak_tflops_: float) -> float:
    """Model FLOPs utilisation: `flops` done in `seconds` on `devices`, as a fraction of their peak."""
    return flops / seconds / devices / (peak_tflops_ * 1e12)


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
        self.steps = 0
        self.summed: dict[str, torch.Tensor] = {}
        self.replicated: dict[str, torch.Tensor] = {}
        self.counts: dict[str, float] = {}
        self.start = time.monotonic()

    def add_step(self, summed: dict[str, torch.Tensor], replicated: dict[str, torch.Tensor],
                 counts: dict[str, float], skipped: bool = False) -> None:
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
        under their own names and its `seconds` (a collective: every rank calls it)."""
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
        if start_step and self.jsonl_path.is_file():
            for line in self.jsonl_path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line)
                except (ValueError, KeyError):
                    continue  # a line cut by a crash
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
        parts = [f"step {step}/{self.total_steps}"]
        parts += [f"{label} {fmt.format(values[name])}" for name, label, fmt in _CONSOLE_FIELDS
                  if name in values and (values[name] or name not in _CONSOLE_IF_NONZERO)]
        parts.append(f"eta {_duration(eta)}")
        return " | ".join(parts)

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
