"""Reading DCP checkpoints without running code from them.

torch.distributed.checkpoint stores tensors in files that it reads with `torch.load(weights_only=True)`,
but its `.metadata` file is a plain pickle, and `pickle.load` of a hostile file runs whatever the file
asks for. `SafeFileSystemReader` reads that file with `load_dcp_metadata`, an unpickler that knows
exactly the globals DCP's own metadata is made of (`METADATA_GLOBALS`: explicit (module, name) pairs,
looked up in a table, so nothing is imported and no dotted name is followed) and gates each opcode
that calls or mutates: REDUCE calls only the five constructors metadata needs, NEWOBJ makes only DCP's
metadata classes, BUILD fills in only their instances; INST, OBJ, NEWOBJ_EX, extension codes and
persistent ids (never in DCP metadata) are refused. A checkpoint folder from elsewhere is data, not
code: see docs/threat-model.md.

It is the pure-Python unpickler (`pickle._Unpickler`), because only its opcodes can be gated (the C one
would let BUILD set attributes on an allowed class itself); metadata is small enough for that.
"""

from __future__ import annotations

import dataclasses
import enum
import pathlib
import pickle
import reprlib
from types import MappingProxyType
from typing import Any, BinaryIO, Callable

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

# What NEWOBJ may make and BUILD may fill in: the dataclasses DCP's metadata is made of.
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", "Metadata"): dcp_metadata.Metadata,
    ("torch.distributed.checkpoint.metadata", "StorageMeta"): dcp_metadata.StorageMeta,
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"): dcp_metadata.MetadataIndex,
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"): dcp_metadata.TensorStorageMetadata,
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"): dcp_metadata.BytesStorageMetadata,
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"): dcp_metadata.ChunkStorageMetadata,
    ("torch.distributed.checkpoint.metadata", "TensorProperties"): dcp_metadata.TensorProperties,  # has __setstate__
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,  # where each item's bytes lie
}
_ENUMS = (dcp_metadata._MEM_FORMAT_ENCODING,)  # TensorProperties' memory format
_LAYOUTS = {str(value): value for value in vars(torch).values() if isinstance(value, torch.layout)}


def _is_one_of(value: Any, known: Any) -> bool:
    return any(value is item for item in known)  # by identity: a file's object never gets to compare itself


def _layout(name: Any) -> torch.layout:
    """What torch pickles a layout as (`torch.serialization._get_layout("torch.strided")`), without its cache."""
    if not isinstance(name, str) or name not in _LAYOUTS:
        raise pickle.UnpicklingError(f"refusing the layout {_shown(name)}: not one of torch's layouts")
    return _LAYOUTS[name]


def _enum_member(cls: Any, name: Any) -> enum.Enum:
    """What `getattr` may do in DCP metadata: some Python releases (3.11.0 to 3.11.4, as Debian bookworm
    ships) pickle an enum member as `getattr(EnumClass, name)`."""
    if not _is_one_of(cls, _ENUMS) or not isinstance(name, str):
        raise pickle.UnpicklingError(f"refusing to call getattr on {_shown(cls)}: DCP metadata only looks up enum members")
    return cls[name]


# REDUCE's callables and how many arguments each takes (None: any number of strings, a path's parts).
_CONSTRUCTORS: tuple[tuple[Callable, int | None], ...] = (
    (torch.Size, 1), (_layout, 1), (_enum_member, 2), (pathlib.PosixPath, None), *((cls, 1) for cls in _ENUMS))

METADATA_GLOBALS = MappingProxyType({
    **_METADATA_CLASSES,
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"): dcp_metadata._MEM_FORMAT_ENCODING,
    ("torch", "Size"): torch.Size,  # tensor sizes and chunk offsets
    ("torch.serialization", "_get_layout"): _layout,
    ("builtins", "getattr"): _enum_member,
    ("pathlib", "PosixPath"): pathlib.PosixPath,  # StorageMeta.checkpoint_id, the folder it was saved to
    ("pathlib._local", "PosixPath"): pathlib.PosixPath,  # the same, pickled by Python 3.13+
    **{("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)},  # values only
})
"""Every global DCP metadata loads, by the exact (module, name) its pickle names: nothing else is found."""


def _shown(value: Any) -> str:
    """For an error message: the repr of a plain value or an allowed object (none of the file's code), shortened."""
    try:
        return reprlib.repr(value)
    except Exception:  # e.g. a metadata object made without its fields
        return f"a {type(value).__name__}"


def _refuse(opcode: str) -> Callable[[Any], None]:
    def refuse(unpickler: Any) -> None:
        raise pickle.UnpicklingError(f"refusing the {opcode} opcode: DCP metadata never uses it")
    return refuse


class _Opcodes(dict):
    def __missing__(self, code: int) -> Callable[[Any], None]:
        raise pickle.UnpicklingError(f"invalid load key {bytes([code])!r}: not a pickle")


class _MetadataUnpickler(pickle._Unpickler):
    dispatch = _Opcodes(pickle._Unpickler.dispatch)
    _base = pickle._Unpickler.dispatch

    def find_class(self, module: str, name: str) -> Any:
        found = METADATA_GLOBALS.get((module, name))  # both are str: the unpickler checks
        if found is None:
            raise pickle.UnpicklingError(f"refusing to load {module[:200]}.{name[:200]}: DCP metadata holds no such object")
        return found

    def load_reduce(self) -> None:
        function, arguments = self.stack[-2], self.stack[-1]
        if not _is_one_of(function, (known for known, _ in _CONSTRUCTORS)):
            raise pickle.UnpicklingError(f"refusing to call {_shown(function)}: DCP metadata only calls its constructors")
        arity = next(count for known, count in _CONSTRUCTORS if function is known)
        fits = isinstance(arguments, tuple) and (len(arguments) == arity if arity is not None
                                                 else all(isinstance(part, str) for part in arguments))
        if not fits:
            raise pickle.UnpicklingError(f"refusing to call {_shown(function)} with {_shown(arguments)}")
        self._base[pickle.REDUCE[0]](self)

    def load_newobj(self) -> None:
        cls = self.stack[-2]
        if not _is_one_of(cls, _METADATA_CLASSES.values()):
            raise pickle.UnpicklingError(f"refusing to make a {_shown(cls)}: DCP metadata only makes its own classes")
        self._base[pickle.NEWOBJ[0]](self)

    def load_build(self) -> None:
        instance, state = self.stack[-2], self.stack[-1]
        cls = type(instance)
        if not _is_one_of(cls, _METADATA_CLASSES.values()):
            raise pickle.UnpicklingError(f"refusing to set the state of {_shown(instance)}: "
                                         "only DCP metadata objects have one")
        if "__setstate__" in vars(cls):  # TensorProperties: a 5-tuple (dtype, layout, requires_grad, format, pin)
            fits = isinstance(state, tuple) and len(state) == 5
        else:  # a dataclass: a dict of its own fields only (no instance attribute such as __setstate__)
            fits = isinstance(state, dict) and set(state) <= {field.name for field in dataclasses.fields(cls)}
        if not fits:
            raise pickle.UnpicklingError(f"refusing the state {_shown(state)} of a {cls.__name__}: "
                                         "DCP metadata sets only its fields")
        self._base[pickle.BUILD[0]](self)

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.BUILD[0]] = load_build
    dispatch.update({getattr(pickle, opcode)[0]: _refuse(opcode)
                     for opcode in ("INST", "OBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID")})


def load_dcp_metadata(stream: BinaryIO) -> Metadata:
    """DCP `Metadata` from the pickle in `stream`, under the allowlist; anything else, hostile or
    damaged, is a `pickle.UnpicklingError` saying what was refused or what broke."""
    try:
        metadata = _MetadataUnpickler(stream).load()
    except pickle.UnpicklingError:
        raise
    except EOFError as error:
        raise pickle.UnpicklingError("the file ends mid-pickle (EOFError)") from error
    except Exception as error:  # the stack machine of a damaged file trips over almost anything
        raise pickle.UnpicklingError(f"not a DCP metadata pickle ({type(error).__name__}: {error})") from error
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"the metadata file holds a {type(metadata).__name__}, not DCP Metadata")
    _check_structure(metadata)
    return metadata


def _check_structure(metadata: Metadata) -> None:
    """What the readers of `Metadata` rely on: its entries and storage records of the right kinds."""
    entries = getattr(metadata, "state_dict_metadata", None)
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(entries, dict) or not all(
            isinstance(value, (dcp_metadata.TensorStorageMetadata, dcp_metadata.BytesStorageMetadata))
            for value in entries.values()):
        raise pickle.UnpicklingError("the metadata's state_dict_metadata is not a dict of DCP storage entries")
    if storage is not None and not (isinstance(storage, dict) and all(isinstance(value, _StorageInfo)
                                                                      for value in storage.values())):
        raise pickle.UnpicklingError("the metadata's storage_data is not a dict of DCP storage records")


class SafeFileSystemReader(FileSystemReader):
    """DCP's file-system reader, with the metadata unpickled under an allowlist."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        with self.fs.create_stream(self._get_metadata_path(rank), "rb") as handle:
            metadata = load_dcp_metadata(handle)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
