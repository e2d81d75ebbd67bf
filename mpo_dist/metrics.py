"""Throughput, MFU, memory, and the logger: a console line and TensorBoard events on rank 0."""

from __future__ import annotations

import time
from pathlib import Path

import torch

# Peak dense bf16 TFLOP/s per device, for MFU when metrics.peak_tflops is 0.
KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                     "B200": 2250.0, "GH200": 989.0}


def peak_tflops(configured: float, device: torch.device) -> float | None:
    if configured > 0:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in KNOWN_PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def flops_per_token(num_params_without_embeddings: int, num_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6N for the matmuls with the weights, plus
    attention scores and values, 12 * layers * hidden * sequence length (PaLM, appendix B)."""
    return 6 * num_params_without_embeddings + 12 * num_layers * hidden * seq_len


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated device memory on CUDA; peak resident memory of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class MetricLogger:
    """Rank 0 writes; other ranks only keep time. Values are plain floats (reduced by the caller)."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool, total_steps: int, log=print):
        self.enabled, self.total_steps, self.log = enabled, total_steps, log
        self.tensorboard_dir = Path(output_dir) / "tensorboard"
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.tensorboard_dir))
        self.start = time.monotonic()

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()
        elapsed = time.monotonic() - self.start
        done = step / self.total_steps
        eta = elapsed / max(done, 1e-9) * (1 - done) if step else float("nan")
        parts = [f"step {step}/{self.total_steps}", f"loss {values['loss/total']:.4f}",
                 f"acc {values['reward/accuracy']:.3f}", f"margin {values['reward/margin']:+.3f}",
                 f"p {values['reward/p']:.3f}"]
        if "loss/dref_kl" in values:
            parts.append(f"kl(ref|pol) {values['loss/dref_kl']:.3f}")
        parts += [f"lr {values['optim/lr']:.2e}", f"gnorm {values['optim/grad_norm']:.3f}",
                  f"{values['throughput/tokens_per_s']:,.0f} tok/s"]
        if "throughput/mfu" in values:
            parts.append(f"mfu {values['throughput/mfu']:.1%}")
        parts += [f"mem {values['memory/peak_gib']:.2f}GiB", f"eta {_duration(eta)}"]
        self.log(" | ".join(parts))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN before the first step
        return "-"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
