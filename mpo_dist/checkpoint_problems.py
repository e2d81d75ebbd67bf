"""What can be wrong with a checkpoint, told apart so that each gets its own one-line answer.

Damage (`checkpoint_problem`: files truncated, missing or unreadable; resume=auto passes over it), an
intact checkpoint of another model (`shape_mismatches`: never called damage, never overwritten) or of
another checkpoint format (`refuse_other_format`: refused, never misread), a save that found the
disk full (`DiskFullError`), and a SIGTERM or Ctrl-C that DCP caught and wrapped on every rank
(`interruption`: neither damage nor a failed save). Reads metadata only, never tensors.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

from mpo_dist.dcp_reader import SafeFileSystemReader
from mpo_dist.errors import InputError, Terminated

INFO_NAME = "checkpoint.json"
HF_FILES_DIR = "hf"  # config.json, generation config and tokenizer: what conversion to Hugging Face needs
MODEL_PREFIX = "model_optimizer.model."  # where the model's tensors live in a checkpoint
# What checkpoint.json's "format" says. 2: the data position of both streams under one key ("data").
# Earlier layouts were never released; they are refused, not read (`refuse_other_format`).
CHECKPOINT_FORMAT = 2


def checkpoint_problem(folder: str | Path) -> str | None:
    """What makes a complete checkpoint unloadable, in a few words, or None when it looks intact.

    Cheap (no tensor is read): checkpoint.json parses, DCP's `.metadata` loads (under the allowlist
    of `SafeFileSystemReader`), and every byte range it lists lies within its
    `.distcp` file: a truncated, zero-byte or missing data file is found here. Bits flipped inside a
    tensor are not (there are no checksums); a load that fails is caught by `Checkpointer.resume`.
    """
    folder = Path(folder)
    try:
        info = json.loads((folder / INFO_NAME).read_text())
        int(info["step"]), int(info["dp_world_size"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{INFO_NAME} cannot be read ({type(error).__name__}: {error})"
    try:
        metadata = SafeFileSystemReader(str(folder)).read_metadata()
        ranges = list(metadata.storage_data.values())
    except Exception as error:  # unpickling a damaged file raises almost anything
        return f".metadata cannot be read ({type(error).__name__}: {error})"
    sizes: dict[str, int] = {}
    for item in ranges:
        name = item.relative_path
        if name not in sizes:
            try:
                sizes[name] = (folder / name).stat().st_size
            except OSError:
                return f"{name} is missing"
        if sizes[name] < item.offset + item.length:
            return f"{name} is truncated ({sizes[name]} bytes, the metadata needs {item.offset + item.length})"
    return None


class DamagedCheckpointError(InputError):
    """A checkpoint folder that cannot be loaded: files truncated, missing or unreadable."""


class DiskFullError(InputError):
    """A save that ran out of disk space: an InputError, so that it ends the run with one line saying
    what to free, not a traceback (nothing in the run is at fault)."""


DISK_FULL_BYTES = 2**20  # free space below this after a failed save: it failed because the disk is full


def is_out_of_space(error: BaseException) -> bool:
    """An ENOSPC or EDQUOT anywhere in `error`: its causes, and each rank's failure DCP gathered."""
    pending, visited = [error], set()
    while pending:
        current = pending.pop()
        if id(current) in visited:
            continue
        visited.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        pending += rank_failures(current) + [e for e in (current.__cause__, current.__context__) if e is not None]
    return False


def rank_failures(error: BaseException) -> list[BaseException]:
    """The ranks' exceptions a CheckpointException gathered (DCP keeps each with its stack)."""
    if not isinstance(error, CheckpointException):
        return []
    return [failure[0] if isinstance(failure, tuple) else failure for failure in error.failures.values()]


def interruption(error: BaseException) -> BaseException | None:
    """A SIGTERM (`Terminated`) or Ctrl-C that DCP caught and wrapped (it catches BaseException on every
    rank), or None: it is no damage and no failed save, and must end the run as itself."""
    return next((failure for failure in rank_failures(error) if isinstance(failure, (Terminated, KeyboardInterrupt))),
                None)


def raise_if_interrupted(error: BaseException) -> None:
    interrupt = interruption(error)
    if interrupt is not None:
        raise interrupt


def free_bytes(folder: Path) -> int | None:
    """Free bytes on the file system of `folder` (or its nearest existing parent)."""
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def refuse_other_format(folder: Path, info: dict[str, Any], option: str) -> None:
    """An InputError unless `info` (checkpoint.json) is of this version's CHECKPOINT_FORMAT."""
    found = info.get("format")
    if found != CHECKPOINT_FORMAT:
        raise InputError(
            f"{option}: {folder} was written by another mpo_dist version (checkpoint format {found or 'none'}; this "
            f"one reads format {CHECKPOINT_FORMAT} only: earlier formats were never released, so they are not "
            "converted); start a new run in another job.output_dir, or set checkpoint.resume=none "
            "job.overwrite_output_dir=true to delete these checkpoints")


class CheckpointMismatchError(InputError):
    """An intact checkpoint of another model (parameter names or shapes differ): not damage."""


# Config fields that say which model a checkpoint holds (its hf/config.json against the run's model).
_MODEL_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "n_embd", "n_layer", "n_head", "n_inner", "tie_word_embeddings")


def shape_mismatches(folder: Path, states: dict[str, Stateful]) -> list[str]:
    """What keeps the model in `states` from loading `folder` although its files are intact: a parameter
    whose shape differs, one the checkpoint lacks or one it holds beyond the model's. Names a few at most,
    from the metadata alone (no tensor is read). (Other state, e.g. data positions, may legitimately
    change shape with the world size: it is not compared.)"""
    model_states = {name: state for name, state in states.items() if MODEL_PREFIX.startswith(name + ".")}
    stored = SafeFileSystemReader(str(folder)).read_metadata().state_dict_metadata
    held = {key for key in stored if key.startswith(MODEL_PREFIX)}
    if not (model_states and held):  # no model on one side: nothing to compare (`load` reports what is missing)
        return []
    expected, _ = flatten_state_dict({name: state.state_dict() for name, state in model_states.items()})
    expected = {key: value for key, value in expected.items() if key.startswith(MODEL_PREFIX)}
    found: list[str] = []
    for key, value in expected.items():
        size = getattr(stored.get(key), "size", None)
        if isinstance(value, torch.Tensor) and size is not None and tuple(size) != tuple(value.shape):
            found.append(f"{key.removeprefix(MODEL_PREFIX)} is {list(size)} there and {list(value.shape)} in this run")
    wanted = set(expected)
    for key in sorted(wanted - held)[:3]:
        found.append(f"it has no {key.removeprefix(MODEL_PREFIX)}")
    for key in sorted(held - wanted)[:3]:
        found.append(f"it holds {key.removeprefix(MODEL_PREFIX)}, which this model lacks")
    return found


def model_differences(folder: Path, run_model_config: dict[str, Any] | None) -> str:
    """', the checkpoint's model has hidden_size 96 (this run's: 64), ...' from its hf/config.json, or ''."""
    path = Path(folder) / HF_FILES_DIR / "config.json"
    if not run_model_config or not path.is_file():
        return ""
    try:
        theirs = json.loads(path.read_text())
    except ValueError:
        return ""
    differing = [f"{key} {theirs[key]} (this run's: {run_model_config[key]})" for key in _MODEL_FIELDS
                 if key in theirs and key in run_model_config and theirs[key] != run_model_config[key]]
    return f"; the checkpoint's model has {', '.join(differing)}" if differing else ""


def short_error(error: BaseException) -> str:
    """One line for a load failure: DCP's CheckpointException holds the ranks' tracebacks; keep their last lines."""
    if isinstance(error, CheckpointException):
        causes = map(one_line, rank_failures(error))
        return "loading failed: " + ("; ".join(dict.fromkeys(causes)) or "CheckpointException")
    return f"loading failed: {one_line(error)}"


def one_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
