"""Training checkpoint (DCP, any world size) -> Hugging Face model folder with safetensors weights.

Runs in one CPU process without a process group. The model tensors are read from the DCP files a
group at a time (DCP reads only the byte ranges asked for, whatever world size wrote them) and
each group is written as one safetensors file by DCP's own Hugging Face storage writer, so peak
memory stays near one output shard, not the model. Tied weights (e.g. `lm_head.weight` tied to
the embeddings) are stored once, and tensors transformers fuses in memory (a mixture-of-experts
layer's experts) are written piece by piece under the files' names (hf_layout.py), as transformers'
own save_pretrained writes them. The folder is assembled under a temp
name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException

from mpo_dist.checkpoint import read_info
from mpo_dist.checkpoint_problems import HF_FILES_DIR, MODEL_PREFIX, raise_if_interrupted, rank_failures
from mpo_dist.dcp_reader import SafeFileSystemReader
from mpo_dist.distributed import barrier, is_main
from mpo_dist.errors import InputError, MissingInputError
from mpo_dist.hf_layout import FileLayout
from mpo_dist.model import DTYPES
from mpo_dist.progress import Progress, stdout_log
from mpo_dist.tokenizer import load_tokenizer

INDEX_NAME = "model.safetensors.index.json"

# How the inputs of convert_checkpoint are named in its error messages.
TOOL_NAMES = {"checkpoint": "--checkpoint", "out": "--out", "dtype": "--dtype"}
EXPORT_NAMES = {"checkpoint": "the final checkpoint", "out": "checkpoint.export_hf's folder",
                "dtype": "checkpoint.export_dtype"}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes (decimal units as Hugging Face uses them)."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    value = text.strip().upper()
    size = next((int(float(value[: -len(unit)]) * factor) for unit, factor in units.items() if value.endswith(unit)), None)
    size = int(value) if size is None else size
    if size < 1:
        raise ValueError(f"a size must be at least 1 byte, got {text!r}")
    return size


def _expected_tensors(hf_dir: Path) -> tuple[dict[str, torch.Size], set[str], FileLayout]:
    """The model's state-dict names and shapes (built on the meta device from config.json), the tied
    ones, and where its tensors go in the files (hf_layout.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mpo_dist.model import tied_parameter_names

    config = AutoConfig.from_pretrained(str(hf_dir), local_files_only=True, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return ({name: tensor.shape for name, tensor in model.state_dict().items()}, tied_parameter_names(model),
            FileLayout(model))


# What reading a truncated, zero-byte or overwritten DCP file raises (an OSError is the machine's, not the file's).
_DAMAGE = (EOFError, pickle.UnpicklingError, CheckpointException, RuntimeError)


def _read(read: Callable, name: str, checkpoint: Path):
    """`read()`, with damage to the checkpoint's files reported as an input error naming it."""
    try:
        return read()
    except _DAMAGE as error:
        raise_if_interrupted(error)
        cause = (rank_failures(error) or [error])[0]
        raise InputError(f"{name} {checkpoint} is damaged: reading its DCP files failed ({_first_line(cause)}); "
                         "convert an earlier checkpoint") from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return type(error).__name__ + (f": {text.splitlines()[0][:200]}" if text else "")


def _check_tokenizer(hf_dir: Path, what: str) -> None:
    """A checkpoint that carries a tokenizer must carry one that loads, or the converted folder would not."""
    if not any((hf_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return  # a random-init model without a tokenizer: nothing to check
    try:
        load_tokenizer(hf_dir)
    except (InputError, OSError) as error:
        why = "tokenizer.json is missing" if not (hf_dir / "tokenizer.json").is_file() else _first_line(error)
        raise InputError(f"{what}: the tokenizer in {hf_dir} cannot be loaded ({why}), so the converted folder "
                         "would not load either") from error


def _groups(names: list[str], sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    used = 0
    for name in names:
        if groups[-1] and used + sizes[name] > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += sizes[name]
    return groups


def convert_checkpoint(checkpoint: str | Path, out_dir: str | Path, dtype: str = "float32",
                       max_shard_bytes: int = 5 * 10**9, log: Callable[[str], None] = stdout_log,
                       names: dict[str, str] = TOOL_NAMES) -> Path:
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    name_checkpoint, name_out, name_dtype = names["checkpoint"], names["out"], names["dtype"]
    if not checkpoint.is_dir():
        raise MissingInputError(f"{name_checkpoint} {checkpoint} does not exist")
    if not (checkpoint / ".metadata").is_file() and not (checkpoint / "checkpoint.json").is_file():
        raise InputError(f"{name_checkpoint} {checkpoint} is not a training checkpoint (no DCP .metadata); "
                         "pass a folder like OUTPUT_DIR/checkpoints/step-00000100")
    info = read_info(checkpoint)  # refuses a save that crashed before completing
    if not (checkpoint / ".metadata").is_file():
        raise MissingInputError(f"{name_checkpoint} {checkpoint} has checkpoint.json but no DCP .metadata file, so its "
                                "tensors cannot be found (a copy that left out hidden files?); copy the whole folder")
    hf_dir = checkpoint / HF_FILES_DIR
    if not (hf_dir / "config.json").is_file():
        raise InputError(f"{name_checkpoint} {checkpoint} has no {HF_FILES_DIR}/config.json describing the model")
    if dtype not in DTYPES:
        raise InputError(f"{name_dtype} must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"{name_out} {out_dir} exists and is not empty; choose a new folder")

    _check_tokenizer(hf_dir, f"{name_checkpoint} {checkpoint}")
    stored = _read(lambda: SafeFileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata, name_checkpoint, checkpoint)
    expected, tied, layout = _expected_tensors(hf_dir)
    names = [name for name in expected if name not in tied]
    missing = [name for name in names if MODEL_PREFIX + name not in stored]
    wrong = [f"{name} {tuple(stored[MODEL_PREFIX + name].size)} vs {tuple(expected[name])}" for name in names
             if name not in missing and tuple(stored[MODEL_PREFIX + name].size) != tuple(expected[name])]
    if missing or wrong:
        raise InputError(f"{name_checkpoint} {checkpoint} does not hold the model its config.json describes: "
                         f"{len(missing)} tensors missing (e.g. {missing[:3]}), {len(wrong)} of other shapes ({wrong[:3]})")

    target = DTYPES[dtype]
    element = torch.empty((), dtype=target).element_size()
    sizes = {name: expected[name].numel() * element for name in names}
    groups = _groups(names, sizes, max_shard_bytes)
    pieces = {name: layout.pieces(name, expected[name]) for name in names}  # file tensors, as save_pretrained writes them
    index_of = {piece.key: number for number, group in enumerate(groups, 1) for name in group for piece in pieces[name]}
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        weight_map: dict[str, str] = {}
        # Files written and MiB, the share done by bytes; the first file is reported at once (its rate).
        progress = Progress("convert_checkpoint", "files", log, total=len(groups), work_unit="MiB", first_after_s=0.0)
        written = 0
        for number, group in enumerate(groups, 1):
            tensors = {MODEL_PREFIX + name: torch.empty(expected[name], dtype=stored[MODEL_PREFIX + name].properties.dtype)
                       for name in group}
            _read(partial(dcp.load, tensors, storage_reader=SafeFileSystemReader(str(checkpoint)), no_dist=True),
                  name_checkpoint, checkpoint)
            shard = {piece.key: tensors[MODEL_PREFIX + name][piece.index].to(target).contiguous()
                     for name in group for piece in pieces[name]}
            del tensors
            # The writer names files model-XXXXX-of-NNNNN after the largest index in the mapping: add the last one.
            mapping = {key: index_of[key] for key in shard} | {"": len(groups)}
            writer = HuggingFaceStorageWriter(str(tmp), fqn_to_index_mapping=mapping)
            dcp.save(shard, storage_writer=writer, no_dist=True)
            files = sorted(p.name for p in tmp.glob(f"model-{number:05d}-of-*.safetensors"))
            weight_map.update(dict.fromkeys(shard, files[0]))
            written += sum(sizes[n] for n in group)
            progress.update(number, work=written / 2**20, fraction=written / max(sum(sizes.values()), 1))
            del shard
        progress.close()
        total = sum(sizes.values())
        (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        for extra in hf_dir.iterdir():  # config, generation config, tokenizer files
            shutil.copy2(extra, tmp / extra.name)
        config = json.loads((tmp / "config.json").read_text())
        config["dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"convert_checkpoint: step {info['step']} -> {out_dir} ({len(groups)} safetensors files, {total / 2**20:.1f} MiB, {dtype})")
    return out_dir


def write_hf_files(folder: Path, model, source_dir: str | None, tokenizer) -> None:
    """The model's config, generation config and tokenizer into `folder/hf`, so that a checkpoint
    converts on its own. `source_dir`: the Hugging Face folder the model was loaded from, if any."""
    target = Path(folder) / HF_FILES_DIR
    config = model.config
    config.architectures = [type(model).__name__.removeprefix("FSDP")]
    config.save_pretrained(str(target))
    if source_dir and (Path(source_dir) / "generation_config.json").is_file():
        shutil.copy2(Path(source_dir) / "generation_config.json", target / "generation_config.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(target))


def export_hf(checkpoint: Path, target: Path, dtype: str, log: Callable[[str], None] = print) -> None:
    """The model of `checkpoint` as a Hugging Face folder at `target` (an earlier export there is
    replaced); rank 0 converts while the other ranks wait."""
    if is_main():
        if target.exists():
            shutil.rmtree(target)
        convert_checkpoint(checkpoint, target, dtype, log=log, names=EXPORT_NAMES)
    barrier()
