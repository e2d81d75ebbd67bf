"""Training checkpoints with torch.distributed.checkpoint (DCP): resharded on load, atomic on save.

A checkpoint is a folder `checkpoints/step-00000100/` holding DCP files plus `checkpoint.json`.
It is written as `step-00000100.tmp/` and renamed by rank 0 only after every rank has finished
and the metadata is written, so a crash during a save never leaves something that looks complete
and never touches the previous checkpoint. The newest complete ones are kept (`checkpoint.keep`), and
older ones are pruned only once the new one is complete. `Checkpointer.resume` loads the newest
intact one, passing over (with a warning) one whose files were damaged after it was completed;
what can be wrong with a checkpoint (damage, another model, a full disk, an interrupt) is told apart
in checkpoint_problems.py. `checkpoint.json` records the layout's version (`CHECKPOINT_FORMAT`): a
checkpoint of another version is refused in one line, never loaded as if it were this one.

What is saved is handed in by name as Stateful objects; the checkpointer never looks inside them.
Global state (model, optimizer, scheduler, train state) is shared by all ranks and resharded by
DCP when the world size changes (the data loaders' positions are global too: see data/dataset.py).
Rank-local state (RNG) is saved per data-parallel rank as tensors under `NAME/dp_rank_R`; it is
restored only at the same data-parallel size.

Nothing in a checkpoint runs code on load: DCP's `.metadata` pickle is read under an allowlist of
DCP's own metadata types (`dcp_reader.SafeFileSystemReader`), rank-local state is tensors (ints
and floats become 0-d tensors), and the plain values DCP stores for shared state (train-state
counters, optimizer hyper-parameters, the schedule) are read with `torch.load(weights_only=True)`
(`SafeLoadPlanner`), which builds only tensors and plain containers.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from mpo_dist.dcp_reader import SafeFileSystemReader
from mpo_dist.distributed import all_ranks_succeeded, barrier, has_process_group, raise_on_every_rank, world_size
from mpo_dist.checkpoint_problems import (CHECKPOINT_FORMAT, DISK_FULL_BYTES, HF_FILES_DIR, INFO_NAME,  # noqa: F401 (re-exported)
                                          MODEL_PREFIX, CheckpointMismatchError, DamagedCheckpointError, DiskFullError,
                                          checkpoint_problem, free_bytes, interruption, is_out_of_space,
                                          model_differences, one_line, rank_failures, raise_if_interrupted,
                                          refuse_other_format, shape_mismatches, short_error)
from mpo_dist.errors import InputError, MissingInputError

BEST_NAME = "best.json"  # beside the checkpoints: which one checkpoint.keep_best keeps
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
    """This process's torch (CPU and CUDA) RNG state: uint8 tensors (no pickle).

    Loading only records the state; `restore()` sets it. The trainer restores it once its data
    iterators exist, because creating a DataLoader iterator draws from the CPU generator: restored
    before that draw, a resumed run would go on from another RNG state than the uninterrupted one."""

    def __init__(self) -> None:
        self.loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = state

    def restore(self) -> None:
        """Set the loaded state (once; nothing when none was loaded)."""
        state, self.loaded = self.loaded, None
        if state is None:
            return
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():  # a checkpoint written on CPU has none
            torch.cuda.set_rng_state(state["cuda"])


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, except that the non-tensor values DCP stores (it writes them with
    torch.save) are read with `torch.load(weights_only=True)`: tensors and plain containers only,
    never code. (DCP's `.metadata` is read by `SafeFileSystemReader`, under an allowlist.)"""

    def load_bytes(self, read_item, value) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def _as_tensors(state: dict[str, Any], what: str) -> dict[str, Any]:
    """Rank-local state for DCP: tensors as they are, ints, floats and bools as 0-d tensors, dicts
    recursively; anything else (which DCP would pickle) is refused."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out[key] = _as_tensors(value, f"{what}.{key}")
        elif isinstance(value, torch.Tensor):
            out[key] = value
        elif isinstance(value, (bool, int, float)):
            out[key] = torch.tensor(value)
        else:
            raise TypeError(f"rank-local state {what}.{key} is a {type(value).__name__}: only tensors, ints, floats "
                            "and bools are saved (nothing is pickled)")
    return out


def _like(template: dict[str, Any], loaded: dict[str, Any]) -> dict[str, Any]:
    """`loaded` (tensors, as read) with the plain types of `template` (the state_dict it was saved from)."""
    out: dict[str, Any] = {}
    for key, value in loaded.items():
        kind = template[key]
        if isinstance(kind, dict):
            out[key] = _like(kind, value)
        elif isinstance(kind, torch.Tensor):
            out[key] = value
        else:
            out[key] = type(kind)(value.item())
    return out


def _present(template: dict[str, Any], prefix: str, stored: set[str]) -> dict[str, Any]:
    """The entries of `template` (flattened by DCP as PREFIX.KEY...) that the checkpoint holds."""
    out: dict[str, Any] = {}
    for key, value in template.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            found = _present(value, name, stored)
            if found:
                out[key] = found
        elif name in stored:
            out[key] = value
    return out


def step_folder(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temp folders of crashed saves are ignored).
    Complete means renamed from its temp folder, with its checkpoint.json; whether its files are
    intact is `checkpoint_problem`'s question, asked when one is loaded."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / INFO_NAME).is_file()]
    return sorted(found, key=lambda p: p.name)


# What a damaged file makes dcp.load (which wraps them in CheckpointException, a BaseException) or
# unpickling raise; anything else (a bug) propagates with its traceback.
_LOAD_ERRORS = (CheckpointException, pickle.UnpicklingError, EOFError, OSError, RuntimeError, ValueError, KeyError)


def read_info(folder: Path) -> dict[str, Any]:
    info_path = Path(folder) / INFO_NAME
    if not info_path.is_file():
        raise MissingInputError(
            f"{folder}: not a complete mpo_dist checkpoint (no {INFO_NAME}); a save may have crashed, "
            "or this is not a checkpoint folder"
        )
    return json.loads(info_path.read_text())


def refuse_to_overwrite_a_run(root: Path, resume: str, overwrite: bool) -> None:
    """checkpoint.resume=none where complete checkpoints exist would overwrite that run's checkpoints,
    metrics and config: refused (an InputError naming the options) unless job.overwrite_output_dir."""
    found = complete_checkpoints(root)
    if resume == "none" and found and not overwrite:
        raise InputError(
            f"checkpoint.resume=none: {root} holds the checkpoints of an earlier run ({', '.join(p.name for p in found)}), "
            "which starting fresh there would overwrite, with its metrics.jsonl and config.yaml; resume it with "
            "checkpoint.resume=auto, use another job.output_dir, or set job.overwrite_output_dir=true to delete them "
            "and start fresh")


class Checkpointer:
    def __init__(self, root: str | Path, keep: int, rank: int, dp_rank: int, dp_world_size: int,
                 log: Callable[[str], None] = print, model_config: dict[str, Any] | None = None):
        """`model_config`: the run's model config (a Hugging Face config as a dict), named in the error
        when a checkpoint holds another model."""
        self.root, self.keep = Path(root), keep
        self.rank, self.dp_rank, self.dp_world_size = rank, dp_rank, dp_world_size
        self.log, self.model_config = log, model_config

    def _rank_key(self, name: str, dp_rank: int) -> str:
        return f"{name}/dp_rank_{dp_rank}"

    def save(self, step: int, states: dict[str, Stateful], rank_local: dict[str, Stateful],
             write_extra: Callable[[Path], None] | None = None, info_extra: dict[str, Any] | None = None) -> Path:
        """Save atomically; rank 0 calls `write_extra(folder)` for small side files before completing it,
        and adds rank 0's `info_extra` (plain JSON: e.g. the tracker run ids) to its checkpoint.json,
        which `load` returns."""
        final = step_folder(self.root, step)
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a save that crashed
            tmp.mkdir(parents=True)
        barrier()
        payload: dict[str, Any] = {name: state.state_dict() for name, state in states.items()}
        for name, state in rank_local.items():
            key = self._rank_key(name, self.dp_rank)
            payload[key] = _as_tensors(state.state_dict(), key)  # tensors only: nothing to unpickle on load
        try:
            dcp.save(payload, checkpoint_id=str(tmp), no_dist=not has_process_group())
            # dcp.save fails on every rank together (it gathers the ranks' results); rank 0's completion
            # below fails alone, so the ranks agree on it before anything is pruned.
            error = None
            if self.rank == 0:
                try:
                    info = {"format": CHECKPOINT_FORMAT, "step": step, "dp_world_size": self.dp_world_size,
                            "world_size": world_size(), "rank_local": sorted(rank_local), **(info_extra or {})}
                    self._complete(tmp, final, info, write_extra)
                except Exception as caught:
                    error = caught
            raise_on_every_rank(error, lambda: RuntimeError(f"checkpoint {final}: completing the save failed on rank 0 "
                                                            "(see its error); the previous checkpoints are kept"))
        except (Exception, CheckpointException) as failure:
            self._save_failed(step, tmp, failure)
            raise
        if self.rank == 0:
            self._prune(final)
        barrier()
        return final

    def _save_failed(self, step: int, tmp: Path, failure: BaseException) -> None:
        """After a failed save: rank 0 removes its half-written temp folder (a resume ignores one, but
        it holds disk space); a full disk becomes a DiskFullError saying so, where, and which
        checkpoint is intact. Anything else is left to propagate with its traceback."""
        interrupt = interruption(failure)
        if interrupt is not None:  # a SIGTERM that DCP wrapped: the save is abandoned (every rank left dcp.save)
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise interrupt
        free = free_bytes(self.root)
        full = is_out_of_space(failure) or (free is not None and free < DISK_FULL_BYTES)
        # Every rank failed here together (dcp.save gathers; rank 0's completion is shared by
        # raise_on_every_rank): they agree on the diagnosis before rank 0 frees the space.
        full = not all_ranks_succeeded(not full)
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if full:
            latest = self.latest()
            intact = (f"the newest complete checkpoint, {latest}, is intact (checkpoint.resume=auto resumes from it)"
                      if latest is not None else "there is no earlier checkpoint")
            free_text = f"{free / 2**20:.1f} MiB free" if free is not None else "free space unknown"
            raise DiskFullError(
                f"checkpoint of step {step}: the disk is full under {self.root} ({free_text}; "
                f"{'; '.join(dict.fromkeys(map(one_line, rank_failures(failure) or [failure])))}); "
                f"the half-written {tmp.name} was removed and {intact}; free space there, or set job.output_dir "
                "on a larger disk, and run again") from failure

    def _complete(self, tmp: Path, final: Path, info: dict[str, Any], write_extra: Callable[[Path], None] | None) -> None:
        """Side files and checkpoint.json into `tmp`, then rename it to `final` (rank 0)."""
        if write_extra is not None:
            write_extra(tmp)
        (tmp / INFO_NAME).write_text(json.dumps(info, indent=1))
        replaced = final.with_name(final.name + ".replaced")  # not a step folder: ignored if a crash leaves it
        if final.exists():
            shutil.rmtree(replaced, ignore_errors=True)
            final.rename(replaced)
        tmp.rename(final)
        shutil.rmtree(replaced, ignore_errors=True)

    def _prune(self, newest: Path) -> None:
        """Delete all but the newest `keep` complete checkpoints, and only once `newest` (the one just
        written) is among them: a save that did not complete never costs an older checkpoint. Ones of
        later steps than `newest` (left by a run resumed past a damaged checkpoint) neither count nor
        go: each is replaced when the run saves its step again."""
        found = complete_checkpoints(self.root)
        if newest not in found:
            self.log(f"mpo_dist: WARNING: {newest} is not a complete checkpoint after its save; nothing pruned")
            return
        best = self.best()
        up_to_newest = [p for p in found if p.name <= newest.name]
        for old in up_to_newest[: -self.keep]:
            if best is None or old.name != best["folder"]:  # the best checkpoint stays beside the newest ones
                shutil.rmtree(old, ignore_errors=True)

    def best(self) -> dict[str, Any] | None:
        """The checkpoint kept as best (`checkpoint.keep_best`): {folder, step, metric, value}, or None."""
        path = self.root / BEST_NAME
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except ValueError:
            return None  # a record cut by a crash: the next evaluated save writes a new one

    def consider_best(self, folder: Path, metric: str, value: float, mode: str) -> bool:
        """Record `folder` as the best checkpoint when its `metric` beats the recorded best (`mode`:
        min or max); rank 0 writes, every rank returns the same answer. The record lives beside the
        checkpoints, so a resumed run keeps comparing against it."""
        best = self.best()
        gone = best is not None and not (self.root / best["folder"] / INFO_NAME).is_file()
        better = best is None or gone or best.get("metric") != metric or (
            value < best["value"] if mode == "min" else value > best["value"])
        better = better and value == value  # a NaN is never best
        if better and self.rank == 0:
            record = {"folder": folder.name, "step": int(folder.name.removeprefix("step-")), "metric": metric, "value": value}
            tmp = self.root / (BEST_NAME + ".tmp")
            tmp.write_text(json.dumps(record, indent=1))
            tmp.replace(self.root / BEST_NAME)
            self.log(f"mpo_dist: best checkpoint by {metric} ({mode}) is now {folder} ({value:.6g})")
            self._prune(folder)  # the previous best, no longer protected, goes unless it is among the newest
        return better

    def latest(self) -> Path | None:
        found = complete_checkpoints(self.root)
        return found[-1] if found else None

    def resume(self, resume: str | Path, states: dict[str, Stateful],
               rank_local: dict[str, Stateful]) -> tuple[Path | None, dict[str, Any]]:
        """Load the checkpoint `resume` names (checkpoint.resume: "auto" or a folder); returns the
        folder loaded (None: nothing to resume with "auto") and `load`'s info.

        "auto" tries the complete checkpoints newest first and skips a damaged one with a warning
        naming it, so a save spoilt after its completion (a truncated or zero-byte .distcp, an
        unreadable .metadata) costs the steps since the previous one, not the run. When every one is
        damaged, or a folder named explicitly is, a DamagedCheckpointError (an InputError) names it.
        All ranks decide together (`all_ranks_succeeded`): dcp.load is a collective."""
        if str(resume) != "auto":
            folder = Path(resume)
            if not (folder / INFO_NAME).is_file():
                read_info(folder)  # not a complete checkpoint at all: its own message
            problem = self._try_load(folder, states, rank_local, f"checkpoint.resume={folder}")
            if isinstance(problem, str):
                raise DamagedCheckpointError(f"checkpoint.resume={folder}: this checkpoint is damaged ({problem}); "
                                             "resume from another checkpoint, or set checkpoint.resume=none")
            return folder, problem
        candidates = complete_checkpoints(self.root)[::-1]
        damaged = []
        for folder in candidates:
            outcome = self._try_load(folder, states, rank_local, "checkpoint.resume=auto")
            if not isinstance(outcome, str):
                self._set_aside(damaged)
                return folder, outcome
            damaged.append(folder)
            self.log(f"mpo_dist: WARNING: checkpoint {folder} is damaged ({outcome}); "
                     + ("trying the previous one" if folder != candidates[-1] else "no older checkpoint is left"))
        if damaged:
            raise DamagedCheckpointError(
                f"checkpoint.resume=auto: every checkpoint under {self.root} is damaged "
                f"({', '.join(p.name for p in damaged)}); move them away, or set checkpoint.resume=none "
                "job.overwrite_output_dir=true to delete them and start fresh")
        return None, {}

    def _set_aside(self, damaged: list[Path]) -> None:
        """Rename damaged checkpoints newer than the one resumed from to `NAME.damaged` (kept for a
        look, no longer complete checkpoints): else they would outrank the new saves of the resumed
        run and pruning would delete intact ones before them."""
        if self.rank == 0:
            for folder in damaged:
                target = folder.with_name(folder.name + ".damaged")
                shutil.rmtree(target, ignore_errors=True)
                folder.rename(target)
                self.log(f"mpo_dist: set the damaged checkpoint aside as {target}")
        barrier()

    def _try_load(self, folder: Path, states: dict[str, Stateful], rank_local: dict[str, Stateful],
                  option: str) -> dict[str, Any] | str:
        """`load`'s info, or what is wrong with `folder` when any rank found it damaged (on the ranks
        that did not, a message saying so). An intact checkpoint of another model is no damage: a
        CheckpointMismatchError says what differs (every rank finds the same). Every rank calls it."""
        problem = checkpoint_problem(folder)
        if not all_ranks_succeeded(problem is None):
            return problem or "damaged as seen from another rank"
        refuse_other_format(folder, read_info(folder), option)  # intact but unreadable: no damage, not skipped
        mismatches = shape_mismatches(folder, states)
        if mismatches:
            fix = ("use another job.output_dir for this model, or set checkpoint.resume=none "
                   "job.overwrite_output_dir=true to delete that run's checkpoints and start fresh there"
                   if option == "checkpoint.resume=auto" else "set checkpoint.resume to a checkpoint of this model")
            raise CheckpointMismatchError(
                f"{option}: {folder} holds another model than this run's (it is not damaged): "
                f"{'; '.join(mismatches[:4])}{model_differences(folder, self.model_config)}; {fix}")
        try:
            info = self.load(folder, states, rank_local)
        except _LOAD_ERRORS as error:
            raise_if_interrupted(error)
            problem = short_error(error)
        if not all_ranks_succeeded(problem is None):
            return problem or "loading failed on another rank"
        return info

    def load(self, folder: str | Path, states: dict[str, Stateful], rank_local: dict[str, Stateful]) -> dict[str, Any]:
        """Load everything the checkpoint holds; rank-local state only when the data-parallel size is
        the same. Nothing but DCP's `.metadata` is unpickled (`SafeLoadPlanner`). Returns the
        checkpoint's info, with `rank_local_restored` (all of this rank's rank-local state was
        restored) and `missing`: the names of states the checkpoint does not hold (left as they are;
        e.g. state an older version stored as a pickle, which is never read)."""
        folder = Path(folder)
        info = read_info(folder)
        stored = set(SafeFileSystemReader(str(folder)).read_metadata().state_dict_metadata)
        present = {name: state for name, state in states.items()
                   if any(key == name or key.startswith(name + ".") for key in stored)}
        missing = [name for name in states if name not in present]
        payload: dict[str, Any] = {}
        for name, state in present.items():
            payload[name] = state.state_dict()
            if getattr(state, "parts_may_be_missing", False):  # e.g. a data stream the saving run did not read
                found = _present(payload[name], name, stored)
                missing += [f"{name}.{part}" for part in payload[name] if part not in found]
                payload[name] = found
        same_dp = info["dp_world_size"] == self.dp_world_size
        templates: dict[str, dict[str, Any]] = {}
        if same_dp:
            for name, state in rank_local.items():
                key = self._rank_key(name, self.dp_rank)
                templates[name] = state.state_dict()
                found = _present(_as_tensors(templates[name], key), key, stored)
                if found:
                    payload[key] = found
                else:
                    missing.append(key)
        dcp.load(payload, storage_reader=SafeFileSystemReader(str(folder)), planner=SafeLoadPlanner(),
                 no_dist=not has_process_group())
        for name, state in present.items():
            state.load_state_dict(payload[name])
        for name, state in rank_local.items():
            key = self._rank_key(name, self.dp_rank)
            if key in payload:
                state.load_state_dict(_like(templates[name], payload[key]))
        restored = same_dp and not any(key.startswith(f"{name}/") for name in rank_local for key in missing)
        return {**info, "rank_local_restored": restored, "missing": missing}
