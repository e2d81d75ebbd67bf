"""Counting the host syncs of a region of code: what would make the host wait for a GPU.

A GPU step runs at the device's pace only while the host enqueues work ahead of it; every point
where the host needs a device value (`.item()`, `.tolist()`, `if tensor:`), an output shape that
depends on device data (`nonzero`, boolean-mask indexing, `bincount`, `unique`), a blocking copy,
or a tensor made from host data in the middle of the step (a blocking copy from pageable memory)
stalls the pipeline. `count_host_syncs()` records each such operation with where it happened, so a
test can assert the number of syncs of a training step and name the line that added one.

It works on CPU too, where nothing ever waits: it counts what WOULD sync if the tensors lived on a
GPU, so every tensor touched inside the region is treated as a device tensor. Host work therefore
belongs before the region (the data pipeline lays a batch out in numpy before it moves), and a host
read inside it is counted whatever the device. A blocking copy to the device is seen only where
there is a device: on a CPU, moving a tensor to the CPU dispatches nothing. Two mechanisms, each
sync counted once:

- a `TorchDispatchMode` sees the aten ops: `_local_scalar_dense` (item, bool, int, float), the ops
  whose output shape depends on values, device-to-host and blocking host-to-device copies, and
  `lift_fresh` (a tensor built from Python or numpy data: `torch.tensor(...)`, `torch.as_tensor`);
- `Tensor.tolist`, `Tensor.numpy` and `Tensor.cpu` do not dispatch for CPU tensors (torch 2.13), so
  they are wrapped while the region runs (the copy they dispatch on a GPU is then not counted again).

On CUDA, `cuda_sync_debug=True` also turns on torch's own check (`torch.cuda.set_sync_debug_mode("warn")`)
and keeps its warnings, the driver-side view, in `HostSyncs.cuda_warnings`.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

PACKAGE_DIR = Path(__file__).resolve().parent
_THIS_FILE = str(Path(__file__).resolve())
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)

aten = torch.ops.aten
# Ops that always read device values on the host, or whose output size depends on them.
_ALWAYS = {
    aten._local_scalar_dense: "reads a value on the host (item, bool, int, float)",
    aten.nonzero: "output shape depends on values",
    aten.masked_select: "output shape depends on values",
    aten._unique: "output shape depends on values",
    aten._unique2: "output shape depends on values",
    aten.unique_dim: "output shape depends on values",
    aten.unique_consecutive: "output shape depends on values",
    aten.unique_dim_consecutive: "output shape depends on values",
    aten.bincount: "output shape depends on values",
    aten.equal: "returns a host bool",
    aten.lift_fresh: "a tensor made from host data (a blocking copy from pageable memory on a GPU)",
}
_INDEXING = (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_)


@dataclass(frozen=True)
class HostSync:
    op: str  # e.g. "aten._local_scalar_dense", "Tensor.tolist"
    why: str
    where: str  # the innermost mpo_dist frame: "mpo_dist/finite_guard.py:45 in step_is_finite" ("" if none)
    origin: str  # the innermost frame outside torch and this module (may be a test, or torch's optimizer)

    def __str__(self) -> str:
        at = self.where or self.origin
        return f"{self.op} at {at}" + (f" (called from {self.origin})" if self.origin != at else "") + f": {self.why}"


@dataclass
class HostSyncs:
    """What `count_host_syncs` saw, in order."""

    syncs: list[HostSync] = field(default_factory=list)
    cuda_warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.syncs)

    def at(self, fragment: str) -> list[HostSync]:
        """The syncs whose mpo_dist location (or origin) contains `fragment`, e.g. "finite_guard.py"."""
        return [sync for sync in self.syncs if fragment in sync.where or fragment in sync.origin]

    def report(self) -> str:
        return f"{len(self.syncs)} host sync(s)" + "".join(f"\n  {sync}" for sync in self.syncs)


def _frame_text(frame) -> str:
    path = Path(frame.f_code.co_filename)
    try:
        shown = path.resolve().relative_to(PACKAGE_DIR.parent)
    except ValueError:
        shown = path.name
    return f"{shown}:{frame.f_lineno} in {frame.f_code.co_name}"


def _locate() -> tuple[str, str]:
    """(innermost frame in mpo_dist, innermost frame outside torch and this module)."""
    where = origin = ""
    frame = sys._getframe(1)
    while frame is not None and not (where and origin):
        filename = frame.f_code.co_filename
        filename = "" if filename.startswith("<") else str(Path(filename).resolve())  # "<stdin>", "<string>"
        if filename and filename != _THIS_FILE:
            if not where and filename.startswith(str(PACKAGE_DIR)):
                where = _frame_text(frame)
            if not origin and not filename.startswith(_TORCH_DIR):
                origin = _frame_text(frame)
        frame = frame.f_back
    return where, origin


def _has_mask_index(indices) -> bool:
    return any(isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8) for index in indices or ())


def _device_of(value) -> torch.device | None:
    return value.device if isinstance(value, torch.Tensor) else None


def _sync_reason(func, args, kwargs) -> str | None:
    """Why this aten call would make the host wait for a GPU, or None."""
    packet = func.overloadpacket
    if packet in _ALWAYS:
        return _ALWAYS[packet]
    if packet is aten.repeat_interleave and kwargs.get("output_size") is None:
        return "output shape depends on values (no output_size)"
    if packet in _INDEXING and _has_mask_index(args[1] if len(args) > 1 else kwargs.get("indices")):
        return "boolean-mask indexing: output shape depends on values"
    if packet is aten._to_copy:
        source, target = _device_of(args[0]), kwargs.get("device")
        target = source if target is None else torch.device(target)
        return _copy_reason(source, target, kwargs.get("non_blocking", False))
    if packet is aten.copy_:
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        return _copy_reason(_device_of(args[1]), _device_of(args[0]), non_blocking)
    return None


def _copy_reason(source: torch.device | None, target: torch.device | None, non_blocking: bool) -> str | None:
    if source is None or target is None or source.type == target.type:
        return None
    if target.type == "cpu":
        return "a device-to-host copy"
    if source.type == "cpu" and not non_blocking:
        return "a blocking host-to-device copy"
    return None


class _Counter(TorchDispatchMode):
    def __init__(self, found: HostSyncs):
        super().__init__()
        self.found = found
        self.quiet = threading.local()  # inside a wrapped host read: its own dispatches are the same sync

    def record(self, op: str, why: str) -> None:
        self.found.syncs.append(HostSync(op, why, *_locate()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not getattr(self.quiet, "on", False):
            why = _sync_reason(func, args, kwargs)
            if why is not None:
                self.record(f"aten.{func.overloadpacket.__name__}", why)
        return func(*args, **kwargs)


_HOST_READS = {"tolist": "reads values on the host", "numpy": "reads values on the host",
               "cpu": "a device-to-host copy"}


@contextlib.contextmanager
def _wrapped_host_reads(counter: _Counter):
    originals = {name: getattr(torch.Tensor, name) for name in _HOST_READS}

    def wrap(name, original):
        def host_read(self, *args, **kwargs):
            if getattr(counter.quiet, "on", False):
                return original(self, *args, **kwargs)
            counter.record(f"Tensor.{name}", _HOST_READS[name])
            counter.quiet.on = True
            try:
                return original(self, *args, **kwargs)
            finally:
                counter.quiet.on = False

        return host_read

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@contextlib.contextmanager
def _cuda_sync_warnings(found: HostSyncs, enabled: bool):
    if not (enabled and torch.cuda.is_available()):
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        found.cuda_warnings += [str(w.message) for w in caught if "synchronizing" in str(w.message)]
    finally:
        torch.cuda.set_sync_debug_mode(previous)


_ACTIVE: list[_Counter] = []  # the counters of the enclosing count_host_syncs blocks


@contextlib.contextmanager
def not_counted():
    """A part of a counted block left out: host work that is host work on a GPU too (e.g. torch's AdamW
    reading its step counters, which it keeps on the CPU, with `.item()`)."""
    previous = [getattr(counter.quiet, "on", False) for counter in _ACTIVE]
    for counter in _ACTIVE:
        counter.quiet.on = True
    try:
        yield
    finally:
        for counter, was in zip(_ACTIVE, previous):
            counter.quiet.on = was


@contextlib.contextmanager
def count_host_syncs(cuda_sync_debug: bool = False):
    """`with count_host_syncs() as found: ...`: `found` (HostSyncs) lists every operation in the block
    that would make the host wait for a GPU, with its location; `found.report()` says which lines."""
    found = HostSyncs()
    counter = _Counter(found)
    _ACTIVE.append(counter)
    try:
        with _cuda_sync_warnings(found, cuda_sync_debug), _wrapped_host_reads(counter), counter:
            yield found
    finally:
        _ACTIVE.remove(counter)
