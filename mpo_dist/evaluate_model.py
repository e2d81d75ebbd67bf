"""Evaluating a given model outside training (tools/evaluate.py): offline metrics on held-out data
and on-policy metrics on the model's own samples, written as one JSON report.

The model is a Hugging Face folder or a training checkpoint folder (one with checkpoint.json): a
checkpoint is converted to a temporary Hugging Face folder in float32 by each node's first process
(the others wait at a barrier), then every process loads it in the requested dtype (auto: `compute_dtype.resolve_dtype`).

Offline: the trainer's own held-out pass (`evaluation.Evaluator`, given the plain model), so the
`eval/...` metrics are the trainer's, computed the same way: held-out pairs with their reference
log-probs (preference metrics of the chosen loss) and a held-out D_ref (the KL monitor
`eval/kl_ref_policy`, an estimate of KL(pi_ref || pi_theta), with its standard error). Every sample
is read once over all ranks; with `per_sample`, every sample's log-probs are gathered into the
report by key (one more sum over ranks: each rank fills the positions of its own samples).

On-policy: K responses per eval prompt sampled from the evaluated model (`sampling.generate`, each
response seeded from (seed, prompt key, k): the samples do not depend on the number of ranks),
scored under the evaluated model and under the reference model; `on_policy/kl_policy_ref` is
mean(logp_theta - logp_ref), an estimate of KL(pi_theta || pi_ref) when sampling at temperature 1
and top-p 1, with its standard error; with a reward function, `on_policy/reward` likewise. Prompts
are cut into fixed batches in manifest order and batch b runs on rank b mod world size, so even the
floating-point batch effects are the same at any world size.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from mpo_dist.checkpoint import read_info
from mpo_dist.compute_dtype import DTYPE_CHOICES, choose_dtype
from mpo_dist.config import DataConfig, EvalConfig, LossConfig
from mpo_dist.convert import convert_checkpoint
from mpo_dist.data.collate import pad_sequences
from mpo_dist.data.shards import Manifest, ShardCursor, ShardError
from mpo_dist.distributed import RankInfo, all_reduce_sum, barrier
from mpo_dist.errors import InputError, MissingInputError
from mpo_dist.evaluation import Evaluator
from mpo_dist.logprobs import sequence_logprobs
from mpo_dist.losses import LOSSES, build_loss, loss_options
from mpo_dist.metrics import model_layout_cost
from mpo_dist.model import read_model_config
from mpo_dist.producers.sample import SamplingParams, generate, sample_seed
from mpo_dist.tokenizer import check_tokenizer_matches, tokenizer_beside_model

ON_POLICY = "on_policy/"
KL_POLICY_REF = ON_POLICY + "kl_policy_ref"
REWARD = ON_POLICY + "reward"


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
    max_prompts: int = 0  # on-policy prompts: the first N of --pairs (0: all)


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


def _load_model(flag: str, folder: str | Path, manifests: list[tuple[str, Manifest]], dtype: str, device: torch.device):
    """A Hugging Face causal LM, refused before its weights are read when its tokenizer or vocabulary
    is not the one of the data it will read."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    config = read_model_config(folder, flag, "a Hugging Face model folder or a training checkpoint folder")
    tokenizer = tokenizer_beside_model(folder)
    for data, manifest in manifests:
        check_tokenizer_matches(manifest, config.vocab_size, tokenizer, data=data, model=f"{flag} {folder}",
                                fix="evaluate on data prepared with this model's tokenizer")
    model = AutoModelForCausalLM.from_pretrained(str(folder), config=config, dtype=getattr(torch, dtype), trust_remote_code=False)
    return model.to(device).eval(), tokenizer


def _conversion_dir(checkpoint: Path, info: RankInfo) -> Path:
    """Where this node's processes find the converted checkpoint: one name per launch and node."""
    if info.world_size == 1:
        return Path(tempfile.mkdtemp(prefix="mpo_dist-evaluate-")) / "model"
    launch = f"{checkpoint.resolve()}|{os.environ.get('TORCHELASTIC_RUN_ID', '')}|{os.getppid()}"
    return Path(tempfile.gettempdir()) / f"mpo_dist-evaluate-{hashlib.sha256(launch.encode()).hexdigest()[:16]}" / "model"


# --------------------------------------------------------------------------------------- offline


class _RecordingEvaluator(Evaluator):
    """The trainer's Evaluator, also keeping every real sample's log-probs by key (for --per-sample)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records: dict[str, dict[str, tuple[float, ...]]] = {"pairs": {}, "dref": {}}

    def _logps(self, batch: dict) -> torch.Tensor:
        logps = super()._logps(batch)
        values = logps.double().tolist()
        keys, pads = batch["keys"], batch["is_pad"].tolist()
        if "ref_chosen_logps" in batch:  # a pairs batch: chosen rows, then rejected rows
            size = len(keys)
            refs = zip(batch["ref_chosen_logps"].double().tolist(), batch["ref_rejected_logps"].double().tolist())
            for i, (key, pad, (ref_chosen, ref_rejected)) in enumerate(zip(keys, pads, refs)):
                if not pad:
                    self.records["pairs"][key] = (values[i], values[size + i], ref_chosen, ref_rejected)
        else:  # a D_ref batch
            for key, pad, value, ref in zip(keys, pads, values, batch["ref_logps"].double().tolist()):
                if not pad:
                    self.records["dref"][key] = (value, ref)
        return logps


PER_SAMPLE_FIELDS = {"pairs": ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps"),
                     "dref": ("policy_logps", "ref_logps")}


def _manifest_keys(folder: str | Path, kind: str) -> list[str]:
    manifest = Manifest.read(folder, kind)
    return [key for shard in manifest.shards
            for key, _, _ in ShardCursor(Path(folder) / shard.name, kind, shard.num_samples)]


def _gather_per_sample(records: dict, folders: dict[str, str], device: torch.device) -> dict:
    """Every sample's values in manifest order, whichever rank computed them (one sum over ranks)."""
    layout, parts = [], []
    for what, folder in folders.items():
        keys = _manifest_keys(folder, "pairs" if what == "pairs" else "dref")
        width = len(PER_SAMPLE_FIELDS[what])
        values = torch.zeros(len(keys), width + 1, dtype=torch.float64)  # the last column counts who filled a row
        index = {key: i for i, key in enumerate(keys)}
        for key, row in records[what].items():
            values[index[key], :width] = torch.tensor(row, dtype=torch.float64)
            values[index[key], width] = 1
        layout.append((what, keys, values.shape))
        parts.append(values.flatten())
    if not parts:
        return {}
    total = all_reduce_sum(torch.cat(parts).to(device)).cpu()
    out, start = {}, 0
    for what, keys, shape in layout:
        values = total[start : start + shape.numel()].reshape(shape)
        start += shape.numel()
        if not bool((values[:, -1] == 1).all()):  # an error in the sharding, never in the data
            raise RuntimeError(f"per-sample {what}: some samples were evaluated {values[:, -1].tolist()} times")
        out[what] = {"keys": keys, **{name: values[:, i].tolist() for i, name in enumerate(PER_SAMPLE_FIELDS[what])}}
    return out


def _flag_names(error: ShardError) -> InputError:
    text = str(error).replace("eval.pairs=", "--pairs ").replace("eval.reference=", "--reference ").replace("eval.dref=", "--dref ")
    return InputError(text)


def offline_metrics(request: EvaluationRequest, model, *, device: torch.device, info: RankInfo, pad_token_id: int,
                    vocab_size: int) -> tuple[dict[str, float], dict]:
    """The trainer's eval metrics (`eval/...`) of `model`, and the per-sample log-probs when asked."""
    pairs = request.pairs if request.reference else ""
    config = EvalConfig(pairs=pairs, reference=request.reference if pairs else "", dref=request.dref,
                        batch_size=request.batch_size)
    if not config.enabled:
        return {}, {}
    try:
        evaluator = _RecordingEvaluator(config, DataConfig(pairs=pairs or request.dref), model=model,
                                        loss_fn=build_loss(request.loss), device=device, dp_rank=info.rank,
                                        dp_world_size=info.world_size, pad_token_id=pad_token_id, vocab_size=vocab_size,
                                        layout_cost=model_layout_cost(model))
    except ShardError as error:
        raise _flag_names(error) from error
    metrics = evaluator.evaluate()
    per_sample = {}
    if request.per_sample:
        folders = {what: folder for what, folder in (("pairs", pairs), ("dref", request.dref)) if folder}
        per_sample = _gather_per_sample(evaluator.records, folders, device)
    return metrics, per_sample


# ------------------------------------------------------------------------------------- on-policy


def _mean_stderr(count: float, total: float, squares: float) -> tuple[float, float]:
    mean = total / count
    variance = max(squares / count - mean * mean, 0.0) * count / (count - 1) if count > 1 else math.nan
    return mean, math.sqrt(variance / count)


@torch.no_grad()
def on_policy_metrics(request: EvaluationRequest, model, reference, *, tokenizer, reward: Callable | None,
                      device: torch.device, info: RankInfo, pad_token_id: int, eos_token_ids) -> dict[str, float]:
    """KL(pi_theta || pi_ref) estimated on the model's own samples, and the mean reward when given."""
    start = time.monotonic()
    params = request.on_policy
    pairs = Manifest.read(request.pairs, "pairs")
    jobs = []  # (prompt ids, seed) in manifest order: the first max_prompts prompts, K samples each
    for shard in pairs.shards:
        for key, _, arrays in ShardCursor(Path(request.pairs) / shard.name, "pairs", shard.num_samples):
            if request.max_prompts and len(jobs) >= request.max_prompts * params.num_samples:
                break
            jobs += [(arrays["prompt_ids"], sample_seed(params.seed, key, k)) for k in range(params.num_samples)]
    # count, sum d, sum d**2, sum reward, sum reward**2, response tokens, responses that ended with EOS
    sums = torch.zeros(7, dtype=torch.float64)
    batches = [jobs[i : i + request.batch_size] for i in range(0, len(jobs), request.batch_size)]
    for chunk in batches[info.rank :: info.world_size]:
        prompts = [prompt for prompt, _ in chunk]
        results = generate(model, prompts, [seed for _, seed in chunk], params, eos_token_ids, pad_token_id, device)
        responses = [response for response, _ in results]
        rows = pad_sequences(prompts, responses, pad_token_id)
        tensors = [rows[name].to(device) for name in ("input_ids", "attention_mask", "response_mask")]
        theta = sequence_logprobs(model, *tensors).logps.double().cpu()
        ref = sequence_logprobs(reference, *tensors).logps.double().cpu()
        d = theta - ref
        sums[0] += len(chunk)
        sums[1] += d.sum()
        sums[2] += (d * d).sum()
        if reward is not None:
            for prompt, response in zip(prompts, responses):
                value = float(reward(tokenizer.decode(prompt.tolist(), skip_special_tokens=True),
                                     tokenizer.decode(response.tolist(), skip_special_tokens=True)))
                sums[3] += value
                sums[4] += value * value
        sums[5] += sum(len(response) for response in responses)
        sums[6] += sum(reason == "eos" for _, reason in results)
    count, total, squares, rewards, reward_squares, tokens, eos = all_reduce_sum(sums.to(device)).tolist()
    if round(count) != len(jobs):  # an error in the sharding, never in the data
        raise RuntimeError(f"on-policy pass sampled {count:.0f} responses, expected {len(jobs)}")
    out = {ON_POLICY + "samples": count, ON_POLICY + "prompts": count / params.num_samples}
    out[KL_POLICY_REF], out[KL_POLICY_REF + "_stderr"] = _mean_stderr(count, total, squares)
    if reward is not None:
        out[REWARD], out[REWARD + "_stderr"] = _mean_stderr(count, rewards, reward_squares)
    out[ON_POLICY + "response_tokens"] = tokens / count
    out[ON_POLICY + "eos_fraction"] = eos / count
    out[ON_POLICY + "seconds"] = time.monotonic() - start
    return out


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
        model, tokenizer = _load_model("--model", converted or model_dir, manifests, dtype, device)
    finally:
        if converted is not None:
            barrier()  # every process of this node has read the weights
            if info.local_rank == 0:
                shutil.rmtree(converted.parent, ignore_errors=True)
    if reward is not None and tokenizer is None:
        raise InputError(f"--reward needs the tokenizer beside --model {request.model} to decode text, and it has none")
    vocab_size = model.config.vocab_size

    metrics, per_sample = offline_metrics(request, model, device=device, info=info, pad_token_id=pad_token_id,
                                          vocab_size=vocab_size)
    if request.on_policy is not None:
        reference, _ = _load_model("--reference-model", request.reference_model, manifests[:1], dtype, device)
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        if eos is None:
            eos = model.config.eos_token_id
        metrics.update(on_policy_metrics(request, model, reference, tokenizer=tokenizer, reward=reward, device=device,
                                         info=info, pad_token_id=pad_token_id, eos_token_ids=eos))
    report = {
        "model": {"path": str(model_dir.resolve()), "checkpoint_step": step, "dtype": dtype},
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
    parts = [f"{name} {value:.4f}" for name, value in metrics.items()
             if name.endswith(("loss/total", "accuracy", "kl_ref_policy", "kl_policy_ref", "on_policy/reward"))]
    return " | ".join(parts) or "no metrics"
