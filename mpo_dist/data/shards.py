"""Shard files: one packed record per sample, atomic tar writing, manifests, and a tar cursor.

A shard set is a folder of webdataset tars (`shard-000000.tar`, ...) plus `manifest.json`.
Every sample is a single tar member `KEY.EXT` holding one packed record (a JSON header and raw
1-D arrays): one member per sample reads much faster than one member per field
(the per-member cost of tar dominates small fields).

Records (`MPO2 | crc32 | header length | header | arrays`, little-endian uint32s): the CRC32 covers
everything after it, so a flipped bit anywhere in a record is found when it is read. The manifest's
`format_version` is that of the whole set (3: every record checksummed, and nothing older is read);
a set of another version is refused in one line naming the tool that re-makes it.
Shard names in a manifest are plain file names inside its folder (checked when it is read).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tarfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import webdataset as wds

from mpo_dist.errors import InputError

MANIFEST_NAME = "manifest.json"
JOB_FILE = ".job.json"  # what a shard job's output folder is made from (producers/job.py)
FORMAT_VERSION = 3
_MAGIC = b"MPO2"  # the record layout, unchanged since format 2 introduced its checksum
_UINT32 = struct.Struct("<I")
_TAR_BLOCK = 512

# The three shard sets of the data contracts (docs/data.md): manifest kind -> tar member extension.
KIND_EXTENSIONS = {"pairs": "pair", "ref_logps": "ref", "dref": "dref"}


class ShardError(InputError):
    """A shard or manifest that cannot be used; the message names the file (and key) at fault."""


class DamagedRecordError(ShardError):
    """One sample's record is damaged (checksum, truncation, format) but the tar around it is sound."""


def manifest_fingerprint(shard_dir: Path) -> str:
    """What a shard set is, in one string: a hash of its manifest (shard names, counts, lengths, how
    it was made). Shards made from a shard set record it; the trainer compares (`check_provenance`)."""
    return "sha256:" + hashlib.sha256((Path(shard_dir) / MANIFEST_NAME).read_bytes()).hexdigest()[:32]


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


# ---------------------------------------------------------------------------- records


def encode_record(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    """Pack JSON-able `meta` and 1-D numpy `arrays` into one checksummed bytes object."""
    specs, blobs = [], []
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        if array.ndim != 1:
            raise ValueError(f"array {name!r} must be 1-D, got shape {array.shape}")
        specs.append([name, array.dtype.str, int(array.shape[0])])
        blobs.append(array.tobytes())
    header = json.dumps({"meta": meta, "arrays": specs}, ensure_ascii=False).encode()
    body = b"".join([_UINT32.pack(len(header)), header, *blobs])
    return b"".join([_MAGIC, _UINT32.pack(zlib.crc32(body)), body])


def decode_record(data: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Inverse of `encode_record`; raises ValueError on anything malformed, a checksum mismatch included."""
    try:
        return _decode(memoryview(data))
    except ValueError:
        raise
    except (struct.error, KeyError, TypeError, IndexError) as error:
        raise ValueError(f"malformed record header ({type(error).__name__}: {error})") from error


def _decode(data: memoryview) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    if bytes(data[:4]) != _MAGIC:
        raise ValueError("not a packed mpo_dist record (bad magic bytes)")
    (stored,) = _UINT32.unpack_from(data, 4)
    actual = zlib.crc32(data[8:])
    if actual != stored:
        raise ValueError(f"checksum mismatch (stored crc32 {stored:08x}, content has {actual:08x})")
    start = 8
    (header_len,) = _UINT32.unpack_from(data, start)
    start += _UINT32.size
    if start + header_len > len(data):
        raise ValueError("record header runs past the end of the record")
    header = json.loads(bytes(data[start : start + header_len]))
    if not isinstance(header, dict) or not isinstance(header.get("meta"), dict):
        raise ValueError("record header has no 'meta' object")
    offset = start + header_len
    arrays = {}
    for name, dtype, length in header["arrays"]:
        dtype = np.dtype(dtype)
        end = offset + dtype.itemsize * length
        if length < 0 or end > len(data):
            raise ValueError(f"array {name!r} runs past the end of the record")
        arrays[name] = np.frombuffer(data, dtype=dtype, count=length, offset=offset)
        offset = end
    if offset != len(data):
        raise ValueError(f"{len(data) - offset} trailing bytes after the arrays")
    return header["meta"], arrays


# ---------------------------------------------------------------------------- manifest


@dataclass
class ShardInfo:
    name: str
    num_samples: int
    # Per-sample padded-cost length (longest sequence of the sample, in tokens): lets every
    # rank plan token-budget batches for all ranks without reading any data.
    lengths: list[int] | None = None


@dataclass
class Manifest:
    kind: str
    tokenizer_hash: str
    shards: list[ShardInfo]
    info: dict[str, Any] = field(default_factory=dict)  # provenance: source, model, params, seed
    format_version: int = FORMAT_VERSION

    @property
    def num_samples(self) -> int:
        return sum(shard.num_samples for shard in self.shards)

    def write(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / MANIFEST_NAME
        payload = {"format": f"mpo_dist.{self.kind}", **asdict(self), "num_samples": self.num_samples}
        # One line per shard keeps a manifest of per-sample lengths readable.
        shards = ",\n  ".join(json.dumps(shard) for shard in payload.pop("shards"))
        text = json.dumps(payload, indent=1)[:-2] + f',\n "shards": [\n  {shards}\n ]\n}}\n'
        atomic_write_bytes(path, text.encode())
        return path

    @classmethod
    def read(cls, directory: str | os.PathLike, expected_kind: str | None = None) -> "Manifest":
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise ShardError(f"{path}: no manifest; is {directory} a shard folder written by mpo_dist tools?")
        try:
            raw = json.loads(path.read_text())
            shards = [ShardInfo(**shard) for shard in raw["shards"]]
            manifest = cls(
                kind=raw["kind"],
                tokenizer_hash=raw["tokenizer_hash"],
                shards=shards,
                info=raw.get("info", {}),
                format_version=raw["format_version"],
            )
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ShardError(f"{path}: malformed manifest ({type(error).__name__}: {error})") from error
        if manifest.format_version != FORMAT_VERSION:
            raise ShardError(f"{path}: shard format version {manifest.format_version}, but this mpo_dist reads version "
                             f"{FORMAT_VERSION} only; re-make the set with {_maker_of(manifest)}")
        if expected_kind is not None and manifest.kind != expected_kind:
            raise ShardError(f"{path}: holds '{manifest.kind}' shards, expected '{expected_kind}'")
        seen = set()
        for shard in manifest.shards:
            check_shard_name(shard.name, path)
            if shard.name in seen:
                raise ShardError(f"{path}: shard {shard.name} is listed twice")
            seen.add(shard.name)
            if not isinstance(shard.num_samples, int) or shard.num_samples < 0:
                raise ShardError(f"{path}: shard {shard.name} lists {shard.num_samples!r} samples")
            if shard.lengths is not None and len(shard.lengths) != shard.num_samples:
                raise ShardError(f"{path}: shard {shard.name} lists {len(shard.lengths)} lengths for {shard.num_samples} samples")
        return manifest


# Who makes each kind of set, for a manifest that does not say (`info.created_by`).
_MAKERS = {"pairs": "tools/prepare_pairs.py", "ref_logps": "tools/score_reference.py",
           "dref": "tools/sample_reference.py (or tools/import_dref.py)"}


def _maker_of(manifest: Manifest) -> str:
    made_by = manifest.info.get("created_by") if isinstance(manifest.info, dict) else None
    return made_by if isinstance(made_by, str) and made_by else _MAKERS.get(manifest.kind, "the tool that made it")


def check_shard_name(name: Any, manifest: str | os.PathLike) -> None:
    """A shard name from a manifest must be a plain file name inside its folder: never a path."""
    plain = (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
             and "\0" not in name and not os.path.isabs(name) and Path(name).name == name)
    if not plain:
        raise ShardError(f"{manifest}: shard name {name!r} is not a plain file name in the manifest's folder "
                         "(no path separators, '..' or absolute paths); the manifest is damaged or hostile")


# ---------------------------------------------------------------------------- writing


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temp name and rename, so readers never see a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Writes one tar shard under a temp name; it appears under its real name only on success."""

    def __init__(self, path: str | os.PathLike, kind: str):
        self.path = Path(path)
        self.extension = KIND_EXTENSIONS[kind]
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._file = open(self._tmp, "wb")
        # mtime=0: no PAX headers (smaller files, faster reads) and byte-identical reruns.
        self._tar = wds.TarWriter(self._file, mtime=0)

    def write(self, key: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        check_key(key)
        self._tar.write({"__key__": key, self.extension: encode_record(meta, arrays)})

    def close(self) -> None:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        try:
            self._tar.close()  # else the tar stream's __del__ later writes to the closed file
        except Exception:
            pass
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def is_plain_key(key: str) -> bool:
    """A sample key as writers write it and readers accept it: a plain name. webdataset splits member
    names at the first dot (a dotted key would split one sample in two); a '/' makes it a path."""
    return bool(key) and "." not in key and "/" not in key


def check_key(key: str) -> None:
    if not is_plain_key(key):
        raise ValueError(f"invalid sample key {key!r}: must be non-empty, without '.' or '/'")


# ---------------------------------------------------------------------------- reading


class _LeanTarInfo(tarfile.TarInfo):
    """tarfile's member header, parsed fast for what shard writers produce (a checksummed ustar
    header of a regular file with a plain name); anything else goes to tarfile's own parser, which
    also raises its errors (a bad checksum, a short block, the end of the archive)."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        if (len(buf) != _TAR_BLOCK or buf[156:157] not in (b"0", b"\0") or buf[345] or buf[124] & 0x80
                or buf[148:156].strip(b" \0").strip(b"01234567")):
            return super().frombuf(buf, encoding, errors)
        stored = buf[148:156].strip(b" \0")
        if not stored or int(stored, 8) != sum(buf) - sum(buf[148:156]) + 256:
            return super().frombuf(buf, encoding, errors)
        obj = cls()
        obj.name = buf[:100].split(b"\0", 1)[0].decode(encoding, errors)
        obj.size = int(buf[124:136].strip(b" \0") or b"0", 8)
        obj.type = tarfile.REGTYPE
        return obj


class ShardCursor:
    """Forward reader over one shard's samples; skipped members are seeked over, not read.

    `read(index)` returns (key, meta, arrays) of the sample at `index`; asking for an earlier
    index than the last one reopens the file. Any tar damage raises ShardError naming the file
    (and the key, when a sample is damaged). `in_memory` reads the whole file at once: faster for
    a pass over every sample (the pre-flight check), wasteful for a few samples.
    """

    def __init__(self, path: str | os.PathLike, kind: str, num_samples: int, in_memory: bool = False):
        self.path = Path(path)
        self.extension = KIND_EXTENSIONS[kind]
        self.num_samples = num_samples
        self.in_memory = in_memory
        self._tar: tarfile.TarFile | None = None
        self._data: bytes | None = None
        self._next_index = 0

    def _open(self) -> None:
        self.close()
        try:
            if self.in_memory:
                self._data = self.path.read_bytes()
            elif self.path.stat().st_size == 0:
                raise ShardError(f"{self.path}: shard file is empty (0 bytes); it is truncated")
            if self._data is not None and not self._data:
                raise ShardError(f"{self.path}: shard file is empty (0 bytes); it is truncated")
            fileobj = io.BytesIO(self._data) if self._data is not None else None
            self._tar = tarfile.open(self.path if fileobj is None else None, mode="r:", fileobj=fileobj,
                                     tarinfo=_LeanTarInfo)
        except FileNotFoundError:
            raise ShardError(f"{self.path}: shard file is missing") from None
        except (tarfile.TarError, OSError) as error:
            raise ShardError(f"{self.path}: not a readable tar file ({error})") from error
        self._next_index = 0

    def _block_at(self, offset: int) -> bytes:
        if self._data is not None:
            return self._data[offset : offset + _TAR_BLOCK]
        with open(self.path, "rb") as handle:
            handle.seek(offset)
            return handle.read(_TAR_BLOCK)

    def _no_member(self) -> ShardError:
        """tarfile ends an archive at a damaged header as it does at a real end: the block tells which."""
        offset, count = self._tar.offset, self._next_index
        block = self._block_at(offset)
        if len(block) == _TAR_BLOCK and block.count(0) != _TAR_BLOCK:
            return ShardError(f"{self.path}: damaged tar header at byte {offset} (after {count} samples); "
                              "the file is corrupt")
        why = "the file is truncated" if len(block) < _TAR_BLOCK else "the tar ends there: the manifest is stale"
        return ShardError(f"{self.path}: ends after {count} samples but its manifest lists {self.num_samples}; {why}")

    def _next_member(self) -> tarfile.TarInfo | None:
        try:
            return self._tar.next()
        except (tarfile.TarError, OSError, EOFError) as error:
            raise ShardError(f"{self.path}: corrupt or truncated tar after sample {self._next_index} ({error})") from error

    def _sample_member(self) -> tarfile.TarInfo:
        member = self._next_member()
        if member is None:
            raise self._no_member()
        key, _, extension = member.name.partition(".")
        # A name that is a path (`/abs/x.pair`, `sub/x.pair`) is no sample a writer of ours made.
        if extension != self.extension or not member.isfile() or not is_plain_key(key):
            raise ShardError(f"{self.path}: unexpected member '{member.name}' at index {self._next_index} "
                             f"(expected KEY.{self.extension}, KEY a plain name without '.' or '/')")
        return member

    def _payload(self, member: tarfile.TarInfo) -> bytes:
        if self._data is not None:
            data = self._data[member.offset_data : member.offset_data + member.size]
        else:
            data = self._tar.extractfile(member).read()
        if len(data) != member.size:
            raise EOFError(f"read {len(data)} of {member.size} bytes: the file is truncated")
        return data

    def read(self, index: int) -> tuple[str, dict[str, Any], dict[str, np.ndarray]]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"{self.path}: sample index {index} outside 0..{self.num_samples - 1}")
        if self._tar is None or index < self._next_index:
            self._open()
        while True:
            member = self._sample_member()
            self._next_index += 1
            if self._next_index - 1 == index:
                break
        key = member.name.partition(".")[0]
        try:
            meta, arrays = decode_record(self._payload(member))
        except (tarfile.TarError, OSError, EOFError, ValueError) as error:
            raise DamagedRecordError(f"{self.path}: sample '{key}' (index {index}) is corrupt or truncated ({error})") from error
        if index == self.num_samples - 1:
            self._check_end()
        return key, meta, arrays

    def _check_end(self) -> None:
        extra = self._next_member()
        if extra is not None:
            raise ShardError(
                f"{self.path}: holds more samples than the {self.num_samples} its manifest lists "
                f"(next member '{extra.name}'); the manifest is stale"
            )
        block = self._block_at(self._tar.offset)
        if block.count(0) != len(block):
            raise ShardError(f"{self.path}: damaged tar block at byte {self._tar.offset} after its last sample; "
                             "the file is corrupt")

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any], dict[str, np.ndarray]]]:
        if self.num_samples == 0:
            self._open()
            self._check_end()
        for index in range(self.num_samples):
            yield self.read(index)

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        self._data = None
