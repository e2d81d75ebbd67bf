"""Moving a micro-batch to the device in ONE non-blocking copy.

A micro-batch is a dozen small tensors (token ids, positions, masks, head indices, the varlen
pieces, per-pair labels and reference log-probs); moving each with its own `.to()` costs a copy
(and, from pageable memory, a staging copy) each. Here they are gathered on the host into one byte
buffer, each at an offset aligned to `ALIGNMENT` bytes (pinned memory when the target is a GPU, so
the copy is asynchronous and the host goes on enqueueing work), the buffer goes over in one
`non_blocking` copy, and each tensor comes back as a view of its bytes on the device
(`.view(dtype).view(shape)`): no further copy, no sync.

`to_device` walks a dataclass (MicroBatch, ModelInput, VarlenDescriptors, PairTensors, ...) and
its nested dataclasses; fields that are not tensors (counts, keys, sizes) stay as they are.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import torch

ALIGNMENT = 16  # bytes: every dtype's element size divides it, so each view is aligned for its dtype
_ZEROS = torch.zeros(ALIGNMENT, dtype=torch.uint8)  # padding between tensors in the buffer


def _tensors_of(value, found: list[torch.Tensor]) -> None:
    """The tensors of `value` (a dataclass, possibly nested), in field order."""
    for field in dataclasses.fields(value):
        item = getattr(value, field.name)
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            _tensors_of(item, found)


def _rebuilt(value, moved: Iterator[torch.Tensor]):
    """`value` with each tensor replaced by the next of `moved` (the order of `_tensors_of`)."""
    changes = {}
    for field in dataclasses.fields(value):
        item = getattr(value, field.name)
        if isinstance(item, torch.Tensor):
            changes[field.name] = next(moved)
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            changes[field.name] = _rebuilt(item, moved)
    return dataclasses.replace(value, **changes) if changes else value


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def pack(tensors: list[torch.Tensor], pin_memory: bool = False) -> tuple[torch.Tensor, list[int]]:
    """One uint8 host buffer holding every tensor's bytes (row-major), tensor i at offsets[i], a
    multiple of ALIGNMENT; gathered by one `torch.cat` into the buffer (pinned when asked)."""
    parts, offsets, size = [], [], 0
    for tensor in tensors:
        offsets.append(size)
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes:
            parts.append(tensor.detach().contiguous().reshape(-1).view(torch.uint8))
        padding = _round_up(nbytes, ALIGNMENT) - nbytes
        if padding:
            parts.append(_ZEROS[:padding])
        size += nbytes + padding
    buffer = torch.empty(size, dtype=torch.uint8, pin_memory=pin_memory)
    if parts:
        torch.cat(parts, out=buffer)
    return buffer, offsets


def unpack(buffer: torch.Tensor, offsets: list[int], like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of `buffer` (on any device) with the dtypes and shapes of `like`, tensor i at offsets[i]."""
    views = []
    for tensor, offset in zip(like, offsets):
        nbytes = tensor.numel() * tensor.element_size()
        views.append(buffer[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape))
    return views


def to_device(value, device: torch.device, always_pack: bool = False):
    """`value` (a dataclass) with its host tensors on `device`, in one non-blocking copy of one
    buffer (module docstring). Already there (CPU to CPU): returned as it is, unless `always_pack`
    (which tests use to run the packing on CPU). Tensors on another device move one by one."""
    device = torch.device(device)
    tensors: list[torch.Tensor] = []
    _tensors_of(value, tensors)
    on_host = [tensor.device.type == "cpu" for tensor in tensors]
    if device.type == "cpu" and not always_pack and all(on_host):
        return value
    host = [tensor for tensor, here in zip(tensors, on_host) if here]
    buffer, offsets = pack(host, pin_memory=device.type == "cuda" and torch.cuda.is_available())
    # copy=True: a copy even to the CPU (always_pack), so the views never alias the caller's tensors.
    views = iter(unpack(buffer.to(device, non_blocking=True, copy=True), offsets, host))
    moved = [next(views) if here else tensor.to(device, non_blocking=True) for tensor, here in zip(tensors, on_host)]
    return _rebuilt(value, iter(moved))
