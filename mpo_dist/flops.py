"""The one cost model: the FLOPs of a forward and backward, and MFU against a device's peak.

A causal LM's training FLOPs (forward + backward) are counted as the hardware computes them:

- the body (every matmul weight but the output head): 6 x body parameters per position computed,
  padding included;
- attention scores and values: 12 x layers x hidden x width per position when the attention runs
  under a mask over the full width (packed rows, padded rows with padding), 6 x ... when it does
  not (padded rows without padding: SDPA's causal kernels skip the upper triangle), PaLM appendix
  B's term halved for the causal case; with model.attention=varlen, packed rows compute only their
  pieces' (query, key) pairs (varlen.VarlenDescriptors.attended_pairs), 12 x layers x hidden each,
  whatever the row width (FlexAttention's rows are counted as the dense mask's: an upper bound, as
  it skips only 128 x 128 blocks that are wholly masked);
- the output head (vocab x hidden): 6 x head parameters per predicted position only, since
  logprobs.py runs it on response tokens alone.

`layout_cost` (body + attention, no head: the head runs on the same targets in every layout) is what
data/layout.py compares to choose padded or packed rows; `training_flops` (the same plus the head)
is what the trainer logs as `throughput/flops_per_pair` and `throughput/mfu`, and what
tools/bench_train.py reads back, so the layout choice, the trainer and the benchmark count alike.

Earlier the trainer charged attention at full width for every forward; a forward of padded rows
without padding (every sequence the same length) now counts half the attention, which lowers its
FLOPs and MFU by (6N + 6LHw) / (6N + 12LHw) on the body (N body parameters, L layers, H hidden,
w width); the head's share and every masked forward are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mpo_dist.data.layout import ModelInput

# Peak dense bf16 TFLOP/s per device, for MFU when metrics.peak_tflops is 0. The first name that
# the device's name contains counts, so the PCIe H100 (756) comes before the SXM one.
KNOWN_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "GH200": 989.0, "H200": 989.0, "H100": 989.0,
                     "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "B200": 2250.0}


@dataclass(frozen=True)
class CostModel:
    """The sizes of a causal LM that its FLOPs depend on (see the module docstring)."""

    body_params: int  # matmul weights but the output head (count_parameters(exclude_embeddings=True) - head)
    head_params: int  # the output head, vocab x hidden
    layers: int
    hidden: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> "CostModel":
        """The cost model of a (possibly FSDP-wrapped) Hugging Face causal LM."""
        from mpo_dist.model import count_parameters

        config = model.config
        head = config.vocab_size * config.hidden_size
        return cls(count_parameters(model, exclude_embeddings=True) - head, head, config.num_hidden_layers,
                   config.hidden_size)

    def layout_cost(self, rows: int, width: int, dense_attention: bool, attended_pairs: int | None = None) -> float:
        """Body and attention FLOPs of `rows` x `width` positions (no head): data/layout.py's cost.
        `attended_pairs` (the varlen path's pieces) replaces the attention over the width."""
        if attended_pairs is not None:
            return float(rows * width * 6 * self.body_params + 12 * self.layers * self.hidden * attended_pairs)
        attention = (12 if dense_attention else 6) * self.layers * self.hidden * width
        return float(rows * width * (6 * self.body_params + attention))

    def training_flops(self, inputs: "ModelInput") -> float:
        """FLOPs of one forward and backward over `inputs`: body over every row x width position,
        attention as `layout_cost` counts it, the head at each predicted position (len(inputs.targets))."""
        rows, width = inputs.input_ids.shape
        pairs = inputs.varlen.attended_pairs if inputs.varlen is not None else None
        return self.layout_cost(rows, width, inputs.dense_attention, pairs) + 6.0 * self.head_params * len(inputs.targets)


def known_peak_tflops(device_name: str) -> float | None:
    """The datasheet's dense bf16 TFLOP/s of a GPU by its name (torch.cuda.get_device_name), if known."""
    return next((value for key, value in KNOWN_PEAK_TFLOPS.items() if key in device_name), None)


def peak_tflops(configured: float, device: torch.device) -> float | None:
    """metrics.peak_tflops when set, else a known GPU's datasheet peak, else None (no MFU)."""
    if configured > 0:
        return configured
    if device.type == "cuda":
        return known_peak_tflops(torch.cuda.get_device_name(device))
    return None


def mfu(flops: float, seconds: float, devices: int, peak_tflops: float) -> float:
    """Model FLOPs utilisation: `flops` done in `seconds` on `devices`, as a fraction of their peak
    (`peak_tflops` TFLOP/s each)."""
    return flops / seconds / devices / (peak_tflops * 1e12)
