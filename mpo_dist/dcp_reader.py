"""Reading DCP checkpoints without running code from them.

torch.distributed.checkpoint stores tensors in files that it reads with `torch.load(weights_only=True)`,
but its `.metadata` file is a plain pickle, and `pickle.load` of a hostile file runs whatever the file
asks for. `SafeFileSystemReader` reads that file with an unpickler that only builds what DCP's own
metadata is made of (its dataclasses and enums, `torch.Size`, dtypes, layouts, paths, containers)
and refuses any other global, so a checkpoint folder from elsewhere is data, not code.
"""

from __future__ import annotations

import enum
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

_DCP_MODULES = ("torch.distributed.checkpoint.",)
_ALLOWED = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex"),
}


def _enum_member(cls: Any, name: str) -> enum.Enum:
    """What `getattr` may do in DCP metadata: some Python releases (3.11.0 to 3.11.4, as Debian bookworm
    ships) pickle an enum member as `getattr(EnumClass, name)`; the class itself passed `find_class`."""
    if not (isinstance(cls, type) and issubclass(cls, enum.Enum) and isinstance(name, str)):
        raise pickle.UnpicklingError(f"refusing to call getattr on {cls!r}: DCP metadata only looks up enum members")
    return cls[name]


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("builtins", "getattr"):
            return _enum_member
        allowed = (module, name) in _ALLOWED
        if not allowed and module.startswith(_DCP_MODULES):
            allowed = isinstance(super().find_class(module, name), type)  # DCP's dataclasses and enums, no functions
        if not allowed and module == "torch":
            allowed = isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format, torch.layout))
        if not allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: DCP metadata holds no such object")
        return super().find_class(module, name)


class SafeFileSystemReader(FileSystemReader):
    """DCP's file-system reader, with the metadata unpickled under an allowlist."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        with self.fs.create_stream(self._get_metadata_path(rank), "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"the metadata file holds a {type(metadata).__name__}, not DCP Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
