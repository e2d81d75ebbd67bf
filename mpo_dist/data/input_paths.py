"""Every file and folder a training run names exists and is what its option wants: checked first, on
every rank, before any input is read or anything is built.

A wrong path is then one line naming the option and what to change, not a FileNotFoundError
traceback from whichever reader opens it first (the held-out eval's folders are opened late, and a
config reused with other data keeps pointing at the quickstart's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mpo_dist.checkpoint import INFO_NAME
from mpo_dist.config import Config
from mpo_dist.data.shards import MANIFEST_NAME
from mpo_dist.errors import MissingInputError

_SHARD_FOLDER = "a shard folder written by mpo_dist tools"


@dataclass(frozen=True)
class _Input:
    option: str
    path: str
    holds: str  # the file that makes the folder what the option wants
    what: str
    fix: str


def check_input_paths(config: Config, *, uses_dref: bool) -> None:
    """Raise MissingInputError when a configured input (model.path, data.pairs, data.reference,
    data.dref when `uses_dref`, an explicit checkpoint.resume, eval.*) does not exist or lacks what
    it must hold: one line, the first such option with its fix, then any others that are missing."""
    missing = [item for item in _inputs(config, uses_dref) if _problem(item)]
    if not missing:
        return
    first, others = missing[0], missing[1:]
    also = f" (also: {'; '.join(_problem(item, say_where=False) for item in others)})" if others else ""
    raise MissingInputError(f"{_problem(first)}; {first.fix}{also}")


def _problem(item: _Input, say_where: bool = True) -> str | None:
    path = Path(item.path)
    where = f" (relative to {Path.cwd()})" if say_where and not path.is_absolute() else ""
    if not path.exists():
        return f"{item.option}={item.path} does not exist{where}"
    if not path.is_dir():
        return f"{item.option}={item.path} is a file, not a folder{where}"
    if not (path / item.holds).is_file():
        return f"{item.option}={item.path} has no {item.holds}: it is not {item.what}"
    return None


def _inputs(config: Config, uses_dref: bool) -> list[_Input]:
    inputs = []
    if config.model.path:
        inputs.append(_Input("model.path", config.model.path, "config.json", "a Hugging Face model folder",
                             "point model.path at a Hugging Face model folder (config.json, safetensors weights, "
                             "tokenizer), or set model.path= and model.config for a random-init model"))
    data = config.data
    inputs.append(_Input("data.pairs", data.pairs, MANIFEST_NAME, _SHARD_FOLDER,
                         "point data.pairs at the --out folder of tools/prepare_pairs.py"))
    inputs.append(_Input("data.reference", data.reference, MANIFEST_NAME, _SHARD_FOLDER,
                         "point data.reference at the --out folder of tools/score_reference.py run on data.pairs"))
    if uses_dref:
        inputs.append(_Input("data.dref", data.dref, MANIFEST_NAME, _SHARD_FOLDER,
                             "point data.dref at the --out folder of tools/sample_reference.py, or set loss.tau=0 "
                             "to train without D_ref"))
    if config.checkpoint.resume not in ("auto", "none"):
        inputs.append(_Input("checkpoint.resume", config.checkpoint.resume, INFO_NAME, "a complete mpo_dist checkpoint",
                             "point checkpoint.resume at a checkpoint folder (job.output_dir/checkpoints/step-NNNNNNNN), "
                             "or set checkpoint.resume=auto (the newest under job.output_dir, if any) or none"))
    evaluated = [name for name in ("pairs", "reference", "dref") if getattr(config.eval, name)]
    for name in evaluated:
        inputs.append(_Input(f"eval.{name}", getattr(config.eval, name), MANIFEST_NAME, _SHARD_FOLDER,
                             _eval_fix(config, evaluated)))
    return inputs


def _eval_fix(config: Config, evaluated: list[str]) -> str:
    """Point the eval folders elsewhere, or the overrides that turn held-out evaluation off entirely
    (those options that would otherwise refuse an empty eval set included)."""
    off = [f"eval.{name}=" for name in evaluated]
    if config.eval.interval:
        off.append("eval.interval=0")
    if config.checkpoint.keep_best:
        off.append("checkpoint.keep_best=")
    options = ", ".join(f"eval.{name}" for name in evaluated)
    return (f"point {options} at held-out shards (tools/prepare_pairs.py --eval-fraction, then score and sample "
            f"them), or train without held-out evaluation: {' '.join(off)}")
