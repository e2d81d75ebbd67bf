"""Evaluating a given model outside training (tools/evaluate.py): offline metrics on held-out data
and on-policy metrics on the model's own samples, written as one JSON report.

The model is a Hugging Face folder or a training checkpoint folder (one with checkpoint.json): a
checkpoint is converted to a temporary Hugging Face folder in float32 by each node's first process
(the others wait at a barrier), then every process loads it in the requested dtype (auto: `compute_dtype.resolve_dtype`).

The offline pass is evaluate_offline.py (the trainer's held-out pass, `eval/...`), the on-policy
pass evaluate_on_policy.py (`on_policy/...`); this module checks the request, loads the model
(converting a checkpoint) and writes the report.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from mpo_dist.checkpoint import read_info
from mpo_dist.compute_dtype import DTYPE_CHOICES, choose_dtype
from mpo_dist.config import LossConfig
from mpo_dist.convert import convert_checkpoint
from mpo_dist.data.shards import Manifest
from mpo_dist.distributed import RankInfo, barrier
from mpo_dist.errors import InputError, MissingInputError
from mpo_dist.inference_model import Lockstep, load_inference_model
from mpo_dist.evaluate_offline import offline_metrics
from mpo_dist.evaluate_on_policy import on_policy_metrics
from mpo_dist.losses import LOSSES, loss_options
from mpo_dist.metric_names import EVAL_CONSOLE, ON_POLICY_CONSOLE, console_line
from mpo_dist.model import read_model_config
from mpo_dist.producers.sample import SamplingParams
from mpo_dist.tokenizer import check_tokenizer_matches, tokenizer_beside_model


@dataclass
class EvaluationRequest:
    model: str
    dtype: str = "auto"  # auto, float32 or bfloat16 (compute_dtype.resolve_dtype)
    pairs: str = ""
    reference: str = ""
    dref: str = ""
    batch_size: int = 16
    loss: LossConfig = field(default_factory=LossConfig)
    per_sample: bool = False
    on_policy: SamplingParams | None = None  # None: no on-policy evaluation
    reference_model: str = ""
    reward: str = ""  # module:function
    max_prompts: int = 0  # on-policy prompts: those of the first N records of --pairs (0: all)
    model_shards: int = 0  # processes sharing one copy of each model (inference_model; 0: those of a node)


# ------------------------------------------------------------------------------------------ inputs


def is_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / "checkpoint.json").is_file()


def run_loss_config(checkpoint: str | Path) -> LossConfig | None:
    """The loss of the run a checkpoint belongs to (OUTPUT_DIR/config.yaml beside OUTPUT_DIR/checkpoints), if found."""
    path = Path(checkpoint).resolve().parent.parent / "config.yaml"
    if not path.is_file():
        return None
    import yaml

    loss = (yaml.safe_load(path.read_text()) or {}).get("loss") or {}
    known = {name: loss[name] for name in vars(LossConfig()) if name in loss}
    return LossConfig(**known)


def evaluation_loss_config(base: LossConfig, name: str | None = None, beta: float | None = None,
                           label_smoothing: float | None = None) -> LossConfig:
    """The loss a report uses: `base` (the run's, or the defaults) with the given name, beta and label
    smoothing; every other option of `base` is kept where the loss `name` takes it (length
    normalisation, chosen NLL) and reset to its default where it does not (tau and pair_logit_scale
    for DPO or IPO, label smoothing for MPO or IPO)."""
    name = name or base.name
    takes = loss_options(name) if name in LOSSES else vars(base)  # else: validate() says so
    default = LossConfig()
    values = {field: value if field in takes else getattr(default, field) for field, value in vars(base).items()}
    values["name"] = name
    if beta is not None:
        values["beta"] = beta
    if label_smoothing is not None:
        values["label_smoothing"] = label_smoothing
    return LossConfig(**values)


def load_reward(spec: str) -> Callable[[str, str], float]:
    """`module:function` -> the callable; any failure is an input error naming --reward."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise InputError(f"--reward {spec!r}: expected module:function (a callable f(prompt_text, response_text) -> float)")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # ImportError, or any error the module raises while importing
        raise InputError(f"--reward {spec}: cannot import module {module_name!r} ({type(error).__name__}: "
                         f"{str(error).strip().splitlines()[0] if str(error).strip() else ''})") from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise InputError(f"--reward {spec}: module {module_name!r} has no callable {function_name!r}")
    return function


def validate(request: EvaluationRequest) -> None:
    """Everything checkable before a model is loaded."""
    if request.dtype not in DTYPE_CHOICES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {request.dtype!r}")
    if request.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {request.batch_size}")
    if request.max_prompts < 0:
        raise InputError(f"--max-prompts must be >= 0, got {request.max_prompts}")
    if request.loss.name not in LOSSES:
        raise InputError(f"--loss must be one of {', '.join(LOSSES)}, got {request.loss.name!r}")
    if not request.loss.beta > 0:
        raise InputError(f"--beta must be > 0, got {request.loss.beta}")
    if request.reference and not request.pairs:
        raise InputError("--reference needs --pairs (the pairs it scores)")
    offline_pairs = bool(request.pairs and request.reference)
    if request.on_policy is None:
        if request.pairs and not request.reference:
            raise InputError("--pairs needs --reference (its reference log-probs, tools/score_reference.py) for the "
                             "offline metrics, or --on-policy-samples for on-policy evaluation of its prompts")
        if not (offline_pairs or request.dref):
            raise InputError("nothing to evaluate: give --pairs with --reference, and/or --dref, and/or --on-policy-samples")
        for flag, value in (("--reference-model", request.reference_model), ("--reward", request.reward)):
            if value:
                raise InputError(f"{flag} is used by on-policy evaluation only: add --on-policy-samples K")
        return
    try:
        request.on_policy.validate()
    except InputError as error:
        raise InputError(str(error).replace("--num-samples", "--on-policy-samples")) from error
    if not request.pairs:
        raise InputError("--on-policy-samples needs --pairs (whose prompts are sampled)")
    if not request.reference_model:
        raise InputError("--on-policy-samples needs --reference-model (a Hugging Face folder: the reference policy)")


def _load_model(flag: str, folder: str | Path, manifests: list[tuple[str, Manifest]], dtype: str, device: torch.device,
                info: RankInfo, model_shards: int, lockstep: Lockstep | None = None):
    """A Hugging Face causal LM, sharded over `model_shards` processes (`inference_model`), refused
    before its weights are read when its tokenizer or vocabulary is not the one of the data it will read."""
    folder = Path(folder)
    config = read_model_config(folder, flag, "a Hugging Face model folder or a training checkpoint folder")
    tokenizer = tokenizer_beside_model(folder)
    for data, manifest in manifests:
        check_tokenizer_matches(manifest, config.vocab_size, tokenizer, data=data, model=f"{flag} {folder}",
                                fix="evaluate on data prepared with this model's tokenizer")
    model = load_inference_model(folder, config, dtype, device, info, model_shards=model_shards, option=flag,
                                 lockstep=lockstep)
    return model, tokenizer


def _conversion_dir(checkpoint: Path, info: RankInfo) -> Path:
    """Where this node's processes find the converted checkpoint: one name per launch and node."""
    if info.world_size == 1:
        return Path(tempfile.mkdtemp(prefix="mpo_dist-evaluate-")) / "model"
    launch = f"{checkpoint.resolve()}|{os.environ.get('TORCHELASTIC_RUN_ID', '')}|{os.getppid()}"
    return Path(tempfile.gettempdir()) / f"mpo_dist-evaluate-{hashlib.sha256(launch.encode()).hexdigest()[:16]}" / "model"


# ------------------------------------------------------------------------------------------ report


def write_report(path: str | Path, report: dict) -> Path:
    """JSON, written atomically (a temp file beside it, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=1, allow_nan=True) + "\n")
    os.replace(tmp, path)
    return path


def evaluate_model(request: EvaluationRequest, info: RankInfo, device: torch.device, out: str | Path | None,
                   log: Callable[[str], None] = print) -> dict:
    """The whole evaluation (a collective: every rank calls it); rank 0 writes the report to `out`.
    Returns the report (equal on every rank but for per-rank timings)."""
    validate(request)
    dtype = choose_dtype(request.dtype, device, "--dtype", "evaluate", log=log if info.is_main else lambda message: None)
    reward = load_reward(request.reward) if request.reward else None  # before any model is loaded
    manifests = []
    if request.pairs:
        manifests.append((f"--pairs {request.pairs}", Manifest.read(request.pairs, "pairs")))
    if request.dref:
        manifests.append((f"--dref {request.dref}", Manifest.read(request.dref, "dref")))
    pad_token_id = int(manifests[0][1].info.get("tokenizer", {}).get("pad_token_id") or 0) if manifests else 0

    model_dir, converted, step = Path(request.model), None, None
    if not model_dir.is_dir():
        raise MissingInputError(f"--model {model_dir} does not exist")
    if is_checkpoint(model_dir):
        step = read_info(model_dir).get("step")
        converted = _conversion_dir(model_dir, info)
        if info.local_rank == 0:
            if converted.parent.exists() and info.world_size > 1:
                shutil.rmtree(converted.parent)
            convert_checkpoint(model_dir, converted, "float32", log=lambda message: None,
                               names={"checkpoint": "--model", "out": "--model", "dtype": "--dtype"})
        barrier()
    try:
        model, tokenizer = _load_model("--model", converted or model_dir, manifests, dtype, device, info,
                                       request.model_shards)
    finally:
        if converted is not None:
            barrier()  # every process of this node has read the weights
            if info.local_rank == 0:
                shutil.rmtree(converted.parent, ignore_errors=True)
    if reward is not None and tokenizer is None:
        raise InputError(f"--reward needs the tokenizer beside --model {request.model} to decode text, and it has none")
    vocab_size = model.config.vocab_size

    metrics, per_sample = offline_metrics(model, pairs=request.pairs, reference=request.reference, dref=request.dref,
                                          batch_size=request.batch_size, loss=request.loss, per_sample=request.per_sample,
                                          device=device, info=info, pad_token_id=pad_token_id, vocab_size=vocab_size)
    if request.on_policy is not None:
        reference, _ = _load_model("--reference-model", request.reference_model, manifests[:1], dtype, device, info,
                                   request.model_shards, lockstep=model.lockstep)
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        if eos is None:
            eos = model.config.eos_token_id
        metrics.update(on_policy_metrics(request.on_policy, request.pairs, model, reference,
                                         max_prompts=request.max_prompts, batch_size=request.batch_size,
                                         tokenizer=tokenizer, reward=reward, device=device, info=info,
                                         pad_token_id=pad_token_id, eos_token_ids=eos))
    report = {
        "model": {"path": str(model_dir.resolve()), "checkpoint_step": step, "dtype": dtype, "shards": model.shards},
        "data": {"pairs": request.pairs or None, "reference": request.reference or None, "dref": request.dref or None},
        "loss": asdict(request.loss),
        "on_policy": None if request.on_policy is None else {
            **asdict(request.on_policy), "reference_model": str(Path(request.reference_model).resolve()),
            "reward": request.reward or None, "max_prompts": request.max_prompts},
        "world_size": info.world_size,
        "metrics": metrics,
    }
    if request.per_sample:
        report["per_sample"] = per_sample
    if info.is_main and out is not None:
        write_report(out, report)
        log(f"evaluate: {describe(metrics)} -> {out}")
    return report


def describe(metrics: dict[str, float]) -> str:
    return console_line(metrics, EVAL_CONSOLE + ON_POLICY_CONSOLE) or "no metrics"
