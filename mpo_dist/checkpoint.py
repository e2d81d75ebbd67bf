"""Training checkpoints with torch.distributed.checkpoint (DCP): resharded on load, atomic on save.

A checkpoint is a folder `checkpoints/step-00000100/` holding DCP files plus `checkpoint.json`.
It is written as `step-00000100.tmp/` and renamed by rank 0 only after every rank has finished
and the metadata is written, so a crash during a save never leaves something that looks complete
and never touches the previous checkpoint. The newest complete ones are kept (`checkpoint.keep`).

What is saved is handed in by name as Stateful objects; the checkpointer never looks inside them.
Global state (model, optimizer, scheduler, train state) is shared by all ranks and resharded by
DCP when the world size changes. Rank-local state (data loader position, RNG) is saved per
data-parallel rank as bytes; it can only be restored at the same data-parallel size.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from mpo_dist.distributed import barrier, has_process_group, world_size
from mpo_dist.errors import MissingInputError

INFO_NAME = "checkpoint.json"
HF_FILES_DIR = "hf"  # config.json, generation config and tokenizer: what conversion to Hugging Face needs
MODEL_PREFIX = "model_optimizer.model."  # where the model's tensors live in a checkpoint
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class ModelOptimizerState(Stateful):
    """Model and optimizer state in DCP's sharding-agnostic form (fully qualified names)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optimizer_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=StateDictOptions(strict=True))


class RNGState(Stateful):
    """This process's torch (CPU and CUDA) RNG state."""

    def state_dict(self) -> dict[str, Any]:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


def step_folder(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temp folders of crashed saves are ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / INFO_NAME).is_file()]
    return sorted(found, key=lambda p: p.name)


def read_info(folder: Path) -> dict[str, Any]:
    info_path = Path(folder) / INFO_NAME
    if not info_path.is_file():
        raise MissingInputError(
            f"{folder}: not a complete mpo_dist checkpoint (no {INFO_NAME}); a save may have crashed, "
            "or this is not a checkpoint folder"
        )
    return json.loads(info_path.read_text())


class Checkpointer:
    def __init__(self, root: str | Path, keep: int, rank: int, dp_rank: int, dp_world_size: int,
                 log: Callable[[str], None] = print):
        self.root, self.keep = Path(root), keep
        self.rank, self.dp_rank, self.dp_world_size = rank, dp_rank, dp_world_size
        self.log = log

    def _rank_key(self, name: str, dp_rank: int) -> str:
        return f"{name}/dp_rank_{dp_rank}"

    def save(self, step: int, states: dict[str, Stateful], rank_local: dict[str, Stateful],
             write_extra: Callable[[Path], None] | None = None) -> Path:
        """Save atomically; rank 0 calls `write_extra(folder)` for small side files before completing it."""
        final = step_folder(self.root, step)
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a save that crashed
            tmp.mkdir(parents=True)
        barrier()
        payload: dict[str, Any] = {name: state.state_dict() for name, state in states.items()}
        for name, state in rank_local.items():
            payload[self._rank_key(name, self.dp_rank)] = io.BytesIO(pickle.dumps(state.state_dict()))
        dcp.save(payload, checkpoint_id=str(tmp), no_dist=not has_process_group())
        if self.rank == 0:
            info = {"step": step, "dp_world_size": self.dp_world_size,
                    "world_size": world_size(),
                    "rank_local": sorted(rank_local)}
            if write_extra is not None:
                write_extra(tmp)
            (tmp / INFO_NAME).write_text(json.dumps(info, indent=1))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        for old in complete_checkpoints(self.root)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        found = complete_checkpoints(self.root)
        return found[-1] if found else None

    def load(self, folder: str | Path, states: dict[str, Stateful], rank_local: dict[str, Stateful]) -> dict[str, Any]:
        """Load everything; rank-local state only when the data-parallel size is the same.
        Returns the checkpoint's info, with `rank_local_restored` telling which happened."""
        folder = Path(folder)
        info = read_info(folder)
        payload: dict[str, Any] = {name: state.state_dict() for name, state in states.items()}
        same_dp = info["dp_world_size"] == self.dp_world_size
        if same_dp:
            for name in rank_local:
                payload[self._rank_key(name, self.dp_rank)] = io.BytesIO()
        dcp.load(payload, checkpoint_id=str(folder), no_dist=not has_process_group())
        for name, state in states.items():
            state.load_state_dict(payload[name])
        if same_dp:
            for name, state in rank_local.items():
                buffer = payload[self._rank_key(name, self.dp_rank)]
                buffer.seek(0)
                state.load_state_dict(pickle.loads(buffer.read()))
        return {**info, "rank_local_restored": same_dp}
