"""The compute dtype of a model: `auto` resolved for the device at hand, for the trainer and the tools alike.

`auto` is bfloat16 where the hardware computes it (a CUDA GPU with bf16 support; a CPU with
AVX512_BF16, AMX or Arm BF16 instructions and oneDNN's bf16 kernels) and float32 elsewhere: on a
CPU without them torch emulates bf16 matmuls, many times slower than float32 (about 10-50x for a
training step). Every program resolves the name once, at start, logs what it chose and why, and
uses and records the resolved name (manifests, the trainer's provenance check), never `auto`.
"""

from __future__ import annotations

from typing import Callable

import torch

from mpo_dist.errors import InputError

DTYPE_CHOICES = ("auto", "float32", "bfloat16")
DTYPE_HELP = ("the model's compute dtype; auto: bfloat16 on a GPU or a CPU that computes it natively, float32 on a "
              "CPU that would emulate it (the reference and the trainer's model.dtype=auto agree on one machine)")
# Capability names (torch.cpu.get_capabilities) of instructions that compute bf16 products in hardware.
NATIVE_BF16_FEATURES = ("amx_bf16", "avx512_bf16", "sve_bf16", "bf16")


def _probe(read: Callable, fallback):
    """A capability reading that never fails: torch builds differ in what they expose."""
    try:
        return read()
    except Exception:  # a missing op or attribute, an unsupported platform
        return fallback


def cpu_bf16_support() -> tuple[bool, str]:
    """Whether this CPU computes bfloat16 natively, and what was seen (e.g. 'AVX2' or 'AVX512 with avx512_bf16').

    Native needs both bf16 instructions and torch's oneDNN bf16 kernels (which use them); without
    either, torch falls back to emulated kernels."""
    level = _probe(lambda: torch.backends.cpu.get_cpu_capability(), "unknown")
    features = _probe(lambda: dict(torch.cpu.get_capabilities()), {})
    kernels = bool(_probe(lambda: torch.ops.mkldnn._is_mkldnn_bf16_supported(), False))
    if not features:  # a torch without the feature list: oneDNN's own check (AVX512 or Arm BF16) alone
        return kernels, f"{level}, oneDNN bf16 kernels {'usable' if kernels else 'unusable'}"
    found = [name for name in NATIVE_BF16_FEATURES if features.get(name)]
    if found and kernels:
        return True, f"{level} with {', '.join(found)}"
    if found:
        return False, f"{level} with {', '.join(found)}, but this torch has no oneDNN bf16 kernels"
    return False, level


def native_bf16(device: torch.device | str) -> tuple[bool, str]:
    """Whether `device` computes bfloat16 natively, and what was seen there (for the log line)."""
    device = torch.device(device)
    if device.type == "cpu":
        return cpu_bf16_support()
    if device.type == "cuda":
        return bool(_probe(lambda: torch.cuda.is_bf16_supported(including_emulation=False), True)), "this GPU"
    return True, f"this {device.type} device"


def resolve_dtype(name: str, device: torch.device | str) -> tuple[str, str]:
    """(`float32` or `bfloat16`, why) for the dtype option `name` (auto, float32 or bfloat16) on `device`."""
    if name not in DTYPE_CHOICES:
        raise InputError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}")
    native, seen = native_bf16(device)
    if native:
        why = f"{seen} computes bfloat16 natively"
    elif torch.device(device).type == "cpu":
        why = f"this CPU has no native bfloat16: {seen}; bfloat16 would be emulated, 10-50x slower"
    else:
        why = f"{seen} has no native bfloat16; bfloat16 would be emulated, much slower"
    if name == "auto":
        return ("bfloat16" if native else "float32"), why
    return name, "as set" if native or name == "float32" else why


def choose_dtype(name: str, device: torch.device | str, option: str, program: str, log: Callable[[str], None]) -> str:
    """`resolve_dtype`, with one line to `log` saying what `option` (e.g. 'model.dtype', '--dtype') of
    `program` became and why: a warning when bfloat16 is set where it is emulated."""
    resolved, why = resolve_dtype(name, device)
    if name == "auto":
        log(f"{program}: {option}=auto -> {resolved} ({why})")
    elif why != "as set":
        log(f"{program}: WARNING: {option}=bfloat16, but {why}; {option}=auto picks float32 here")
    else:
        log(f"{program}: {option}={resolved} (as set)")
    return resolved
