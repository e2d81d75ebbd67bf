"""The training options: one dataclass per config section, each option with its default and its
one-line description (`opt(default, help)`, kept in the field's `metadata["help"]`: --options and
docs/configuration.md are generated from it), and each section's `validate()`: the allowed values,
and the checks that span sections in `Config.validate`.
"""

import copy
import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from mpo_dist.errors import InputError


class ConfigError(InputError):
    """A config value is unknown, mistyped or out of range; the message says which and where."""


class InvalidOption(ConfigError):
    """A failed `validate()` check; carries the dotted keys involved, so the loader can say where each
    was set (file, command line, default)."""

    def __init__(self, message: str, *keys: str):
        super().__init__(message)
        self.keys = keys


def _check(ok: bool, key: str, rule: str, value: Any, *also: str) -> None:
    if not ok:
        raise InvalidOption(f"{key} {rule}, got {value!r}", key, *also)


def opt(default: Any, help: str) -> Any:
    """A dataclass field with its one-line description in `metadata["help"]` (read by describe_config)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class JobConfig:
    output_dir: str = opt("outputs/run", "folder for checkpoints, the resolved config and logs")
    seed: int = opt(0, "seed for model init, data shuffling and dropout")
    preempt_signals: str = opt("SIGTERM,SIGUSR1", "signals that, during training, end the run after the step in "
                                                  "progress with a checkpoint of it (comma-separated; SLURM's "
                                                  "--signal=USR1@SECONDS, Kubernetes' and spot reclaims' SIGTERM); "
                                                  "before step 1 they stop the run at once")
    overwrite_output_dir: bool = opt(False, "start fresh in a job.output_dir that holds an earlier run's checkpoints: "
                                            "they, its metrics.jsonl, TensorBoard events and Hugging Face export are "
                                            "deleted once the inputs are checked (needs checkpoint.resume=none); false: "
                                            "such a folder is refused")

    def validate(self) -> None:
        _check(bool(self.output_dir), "job.output_dir", "must be a non-empty path", self.output_dir)
        try:
            from mpo_dist.preemption import parse_signals

            parse_signals([name for name in self.preempt_signals.split(",") if name])
        except ValueError as error:
            _check(False, "job.preempt_signals", str(error), self.preempt_signals)


@dataclass
class ModelConfig:
    path: str = opt("", "local Hugging Face model directory; empty: random init from model.config")
    config: dict = opt({}, "kwargs of a random-init model config, used when model.path is empty (unchecked)")
    dtype: Literal["auto", "float32", "bfloat16"] = opt(
        "auto", "compute dtype of parameters in forward/backward (master weights, gradients reductions and optimizer stay "
                "float32); auto: bfloat16 on a GPU or a CPU that computes it natively, float32 on a CPU that would emulate it")
    attention: Literal["auto", "dense", "varlen", "flex"] = opt(
        "auto", "attention of packed rows (data.packing): dense: SDPA under a [rows, 1, width, width] mask, any "
                "architecture; varlen: no mask, attention by pieces (a prompt with its first response, each further "
                "response over its prompt's keys), torch's flash varlen_attn on CUDA and its plain-PyTorch twin "
                "elsewhere; flex: FlexAttention under a block mask built once per micro-batch, compiled on CUDA "
                "(shapes bucketed to whole 128-position blocks), forward only on CPU, so training there is refused; "
                "varlen and flex are refused for sliding-window or soft-capped attention and attention dropout; "
                "auto: varlen on CUDA in bf16 or fp16 when the model allows it, dense elsewhere. Padded rows run SDPA in every mode")

    def validate(self) -> None:
        # Both set is ambiguous: one of them would be silently ignored.
        if self.path and self.config:
            raise InvalidOption(
                "model.path and model.config are both set; model.config only describes a random-init "
                "model, so set model.config={} to load model.path", "model.path", "model.config")
        if not (self.path or self.config):
            raise InvalidOption("set model.path (a Hugging Face model directory) or model.config "
                                "(a random-init model config)", "model.path", "model.config")


@dataclass
class ParallelConfig:
    dp_replicate: int = opt(1, "replica groups of HSDP (e.g. the number of nodes); 1: plain FSDP")
    dp_shard: int = opt(-1, "ranks each model is sharded over; -1: all ranks / dp_replicate")
    activation_checkpointing: bool = opt(False, "recompute each decoder layer's activations in the backward")
    compile: bool = opt(False, "torch.compile each decoder layer")
    reshard_after_forward: Literal["auto", "always", "never"] = opt(
        "auto", "free each decoder layer's gathered parameters after its forward and gather them again in backward "
                "(always), or keep them until backward: one all-gather per layer less, one unsharded model in "
                "model.dtype more per rank (never); auto: never when that model is under 5% of the device's memory "
                "or parallel.dp_shard is 1 (without parallel.cpu_offload), else always")
    cpu_offload: bool = opt(
        False, "keep each rank's shard of the float32 parameters, their gradients and the optimizer state in host "
               "memory (FSDP2's CPUOffloadPolicy, pinned on CUDA): the device holds only gathered layers and "
               "activations; shards are copied to the device before each all-gather, gradients back after each "
               "reduce-scatter, and AdamW steps on the CPU. One switch, since the optimizer state lives where the "
               "parameters it updates do")

    def validate(self) -> None:
        _check(self.dp_replicate >= 1, "parallel.dp_replicate", "must be >= 1", self.dp_replicate)
        _check(self.dp_shard == -1 or self.dp_shard >= 1, "parallel.dp_shard", "must be >= 1 or -1 (all)", self.dp_shard)


@dataclass
class DataConfig:
    pairs: str = opt("", "folder of pairs shards (required)")
    reference: str = opt("", "folder of reference log-prob shards, one per pairs shard")
    dref: str = opt("", "folder of D_ref shards (responses sampled from the reference)")
    batch_size: int = opt(8, "pairs per micro-batch per rank (fixed batching)")
    batching: Literal["fixed", "tokens"] = opt("fixed", "fixed: batch_size pairs; tokens: fill up to max_tokens")
    max_tokens: int = opt(0, "padded-token budget per micro-batch when data.batching=tokens")
    shuffle: bool = opt(True, "shuffle shard order each epoch and samples within a window")
    shuffle_window: int = opt(1024, "consecutive samples of a rank's slice shuffled together (and read in one pass)")
    tail: Literal["pad", "drop"] = opt("pad", "samples that do not fill a batch on every rank: pad with flagged duplicates (masked from the loss) or drop them")
    num_workers: int = opt(0, "data loader worker processes per rank for each of the pairs and D_ref streams; 0: the "
                              "rank loads its batches itself (a millisecond or two each) and starts no worker (~280 MiB each)")
    packing: Literal["auto", "always", "never"] = opt(
        "auto", "always: compute each pair as one packed sequence [prompt][chosen][rejected] (the prompt once; "
                "rejected does not see chosen), several pairs and D_ref samples per row; never: one padded row "
                "per response; auto: per micro-batch, whichever needs fewer FLOPs by the model's cost estimate "
                "(the same numbers either way)")
    bucket_shapes: bool = opt(True, "round row lengths, packed row counts and the output head's positions up to a few "
                                    "sizes (a quarter octave apart), so a run meets few tensor shapes: bf16 CPU kernels keep "
                                    "memory for every shape, compiled layers recompile per shape")
    pack_tokens: int = opt(0, "longest packed row, in tokens (0: the longest pair or sample of the micro-batch)")
    padding_side: Literal["right", "left"] = opt("right", "side on which padded rows are padded")
    pad_to_multiple_of: int = opt(1, "round padded (or packed) row lengths up to a multiple of this")
    dref_batch_size: int = opt(8, "D_ref samples per micro-batch per rank")
    preflight: bool = opt(True, "before step 1, read every shard once (split over the ranks) and check it: tar members "
                                "against the manifest, checksums, token ids, finite log-probs, keys in lockstep")
    reference_dtype_mismatch: Literal["warn", "error"] = opt(
        "warn", "reference or D_ref log-probs computed in another dtype than model.dtype resolves to here: warn, or refuse")

    def validate(self) -> None:
        _check(bool(self.pairs), "data.pairs", "is required (a folder of pairs shards)", self.pairs)
        _check(self.batch_size >= 1, "data.batch_size", "must be >= 1", self.batch_size)
        _check(self.max_tokens >= 0, "data.max_tokens", "must be >= 0", self.max_tokens)
        if self.batching == "tokens" and self.max_tokens <= 0:
            raise InvalidOption(f"data.max_tokens must be > 0 when data.batching=tokens, got {self.max_tokens}; "
                                "set data.max_tokens or use data.batching=fixed", "data.max_tokens", "data.batching")
        _check(self.shuffle_window >= 1, "data.shuffle_window", "must be >= 1", self.shuffle_window)
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0", self.num_workers)
        _check(self.pad_to_multiple_of >= 1, "data.pad_to_multiple_of", "must be >= 1", self.pad_to_multiple_of)
        _check(self.pack_tokens >= 0, "data.pack_tokens", "must be >= 0", self.pack_tokens)
        _check(self.dref_batch_size >= 1, "data.dref_batch_size", "must be >= 1", self.dref_batch_size)


@dataclass
class LossConfig:
    name: Literal["mpo", "dpo", "ipo"] = opt("mpo", "preference loss")
    beta: float = opt(0.1, "strength of the KL to the reference (all losses)")
    tau: float = opt(0.0, "MPO weight of the D_ref term -tau * logp(y given x); 0 disables it")
    label_smoothing: float = opt(0.0, "probability that a preference label is flipped (DPO)")
    length_normalized_pair: bool = opt(False, "divide every log-prob in the pair logits z and z_ref (policy and reference, "
                                              "chosen and rejected) by its response token count (all losses)")
    length_normalized_tau: bool = opt(False, "MPO D_ref term as tau * mean(-logp(y given x) / response tokens) "
                                             "(the dref_kl metric stays the sum-based KL estimate)")
    pair_logit_scale: float = opt(1.0, "MPO scale s on the pair logits: p = sigmoid(s z), p_ref = sigmoid(s z_ref), optimum "
                                       "z_ref + 1/(s beta); s < 1 keeps p off saturation for log-prob gaps of several nats")
    chosen_nll: float = opt(0.0, "weight of a per-token NLL on chosen responses, mean(-logp(y_w) / response tokens), "
                                 "added to the loss (all losses, as in RPO); 0 disables it")

    def validate(self) -> None:
        _check(self.beta > 0, "loss.beta", "must be > 0", self.beta)
        _check(self.tau >= 0, "loss.tau", "must be >= 0", self.tau)
        _check(0 <= self.label_smoothing < 0.5, "loss.label_smoothing", "must be in [0, 0.5)", self.label_smoothing)
        _check(self.pair_logit_scale > 0, "loss.pair_logit_scale", "must be > 0", self.pair_logit_scale)
        _check(self.chosen_nll >= 0, "loss.chosen_nll", "must be >= 0", self.chosen_nll)
        # A hyper-parameter the chosen loss does not use would be silently ignored.
        mpo_only = f"applies to loss.name=mpo only (loss.name={self.name})"
        _check(self.tau == 0 or self.name == "mpo", "loss.tau", mpo_only, self.tau, "loss.name")
        _check(self.label_smoothing == 0 or self.name == "dpo", "loss.label_smoothing",
               f"applies to loss.name=dpo only (loss.name={self.name})", self.label_smoothing, "loss.name")
        _check(not self.length_normalized_tau or self.name == "mpo", "loss.length_normalized_tau", mpo_only,
               self.length_normalized_tau, "loss.name")
        _check(self.pair_logit_scale == 1 or self.name == "mpo", "loss.pair_logit_scale",
               f"{mpo_only}; DPO and IPO scale the pair logit by loss.beta", self.pair_logit_scale, "loss.name")


@dataclass
class OptimConfig:
    lr: float = opt(1e-6, "AdamW learning rate")
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay")
    betas: list[float] = opt([0.9, 0.95], "AdamW (beta1, beta2)")
    eps: float = opt(1e-8, "AdamW epsilon")
    warmup_steps: int = opt(0, "steps of linear warmup from 0 to optim.lr")
    schedule: Literal["cosine", "linear", "constant"] = opt("cosine", "learning-rate decay after warmup")
    min_lr_ratio: float = opt(0.0, "final learning rate as a fraction of optim.lr (cosine, linear)")

    def validate(self) -> None:
        _check(self.lr > 0, "optim.lr", "must be > 0", self.lr)
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0", self.weight_decay)
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
               "must be two values each in [0, 1)", self.betas)
        _check(self.eps > 0, "optim.eps", "must be > 0", self.eps)
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0", self.warmup_steps)
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]", self.min_lr_ratio)


@dataclass
class TrainingConfig:
    steps: int = opt(100, "optimizer steps to train for")
    global_batch_size: int = opt(0, "pairs per optimizer step over all ranks (fixed batching); sets the "
                                    "accumulation; 0: data.batch_size x ranks x training.grad_accum")
    grad_accum: int = opt(1, "micro-batches per optimizer step, when training.global_batch_size is 0")
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this; 0 disables clipping")
    max_nonfinite_steps: int = opt(10, "stop with an error after this many steps in a row whose loss or gradient "
                                       "norm is NaN or inf (each such step is skipped: no update); 1: at the first")

    def validate(self) -> None:
        _check(self.steps >= 1, "training.steps", "must be >= 1", self.steps)
        _check(self.global_batch_size >= 0, "training.global_batch_size", "must be >= 0", self.global_batch_size)
        _check(self.grad_accum >= 1, "training.grad_accum", "must be >= 1", self.grad_accum)
        _check(self.max_grad_norm >= 0, "training.max_grad_norm", "must be >= 0 (0 disables)", self.max_grad_norm)
        _check(self.max_nonfinite_steps >= 1, "training.max_nonfinite_steps", "must be >= 1", self.max_nonfinite_steps)


@dataclass
class CheckpointConfig:
    interval: int = opt(0, "save every this many steps (0: only at the end)")
    keep: int = opt(2, "complete checkpoints to keep (the oldest are deleted)")
    resume: str = opt("auto", "auto: newest complete checkpoint under job.output_dir/checkpoints, if any; "
                              "none: start fresh; or a checkpoint folder")
    export_hf: bool = opt(False, "after the last step, also write the model as a Hugging Face folder "
                                 "(safetensors) to job.output_dir/hf")
    export_dtype: Literal["float32", "bfloat16"] = opt("bfloat16", "dtype of the exported weights")
    keep_best: str = opt("", "an eval metric (e.g. eval/loss/total): the checkpoint with its best value, among those "
                             "saved at steps where eval ran, is kept beside the newest checkpoint.keep; empty: off")
    best_mode: Literal["min", "max"] = opt("min", "whether the lowest (min) or the highest (max) checkpoint.keep_best is best")

    def validate(self) -> None:
        _check(not self.keep_best or self.keep_best.startswith("eval/"), "checkpoint.keep_best",
               "must name an eval metric (eval/...), e.g. eval/loss/total", self.keep_best)
        _check(self.interval >= 0, "checkpoint.interval", "must be >= 0", self.interval)
        _check(self.keep >= 1, "checkpoint.keep", "must be >= 1", self.keep)
        _check(bool(self.resume), "checkpoint.resume", "must be auto, none or a folder", self.resume)


METRIC_BACKENDS = ("tensorboard", "jsonl", "wandb", "mlflow")  # metrics.backends' names (trackers.py)


@dataclass
class MetricsConfig:
    log_interval: int = opt(10, "steps between logged points (the console line and every metrics.backends tracker)")
    peak_tflops: float = opt(0.0, "peak dense bf16 TFLOP/s of one device, for MFU; 0: known GPUs are "
                                  "looked up, otherwise MFU is not reported")
    backends: list[str] = opt(["tensorboard", "jsonl"], "where rank 0 logs metrics, any of: tensorboard "
                                                        "(job.output_dir/tensorboard), jsonl (job.output_dir/metrics.jsonl, "
                                                        "always written: the tools read it), wandb, mlflow (pip install "
                                                        "'mpo_dist[wandb]' or '[mlflow]'); see docs/tracking.md")
    tensorboard: bool = opt(True, "deprecated (use metrics.backends): false takes tensorboard out of metrics.backends; "
                                  "true changes nothing")
    run_name: str = opt("", "the W&B and MLflow run's name; empty: the name of job.output_dir")
    wandb_project: str = opt("", "W&B project; empty: WANDB_PROJECT, else W&B's default")
    wandb_entity: str = opt("", "W&B entity (user or team); empty: WANDB_ENTITY, else your default entity")
    wandb_mode: Literal["", "online", "offline"] = opt("", "W&B mode; empty: WANDB_MODE, else online (offline: files "
                                                           "under job.output_dir/wandb, or WANDB_DIR, for `wandb sync`)")
    mlflow_tracking_uri: str = opt("", "MLflow tracking server or store (http://HOST:PORT, sqlite:///PATH); empty: "
                                       "MLFLOW_TRACKING_URI, else MLflow's default (mlflow.db in the working folder)")
    mlflow_experiment: str = opt("", "MLflow experiment (created when missing); empty: MLFLOW_EXPERIMENT_NAME, else "
                                     "MLflow's Default experiment")

    def validate(self) -> None:
        _check(self.log_interval >= 1, "metrics.log_interval", "must be >= 1", self.log_interval)
        _check(self.peak_tflops >= 0, "metrics.peak_tflops", "must be >= 0", self.peak_tflops)
        for name in self.backends:
            if name not in METRIC_BACKENDS:
                import difflib

                close = difflib.get_close_matches(name, METRIC_BACKENDS, n=1)
                raise InvalidOption(f"metrics.backends: unknown backend {name!r}"
                                    f"{f' (did you mean {close[0]!r}?)' if close else ''}; the backends are "
                                    f"{', '.join(METRIC_BACKENDS)}", "metrics.backends")
            if self.backends.count(name) > 1:
                raise InvalidOption(f"metrics.backends names {name} twice, got {self.backends!r}", "metrics.backends")


@dataclass
class EvalConfig:
    pairs: str = opt("", "held-out pairs folder evaluated during training (not trained on); empty: no pairs eval")
    reference: str = opt("", "reference log-prob shards of eval.pairs (required with eval.pairs)")
    dref: str = opt("", "held-out D_ref folder (reference samples of eval prompts, never in a loss) for the KL "
                        "monitor eval/kl_ref_policy; empty: no KL monitor")
    interval: int = opt(0, "evaluate every this many steps, and after the last step (0: only after the last step)")
    max_batches: int = opt(0, "batches per rank per eval pass (0: the whole held-out set)")
    batch_size: int = opt(16, "pairs (or D_ref samples) per eval batch per rank")
    require_held_out: bool = opt(True, "refuse eval.pairs that are data.pairs and an eval.dref sampled from the training "
                                       "prompts (set false to evaluate on training data on purpose)")

    def validate(self) -> None:
        _check(self.interval >= 0, "eval.interval", "must be >= 0 (0: only at the end)", self.interval)
        _check(self.max_batches >= 0, "eval.max_batches", "must be >= 0 (0: the whole set)", self.max_batches)
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1", self.batch_size)
        if self.pairs and not self.reference:
            raise InvalidOption("eval.pairs needs eval.reference: its reference log-probs (tools/score_reference.py "
                                "on eval.pairs with the reference model)", "eval.pairs", "eval.reference")
        if self.reference and not self.pairs:
            raise InvalidOption("eval.reference is set but eval.pairs is not: set eval.pairs (the pairs it scores) "
                                "or leave eval.reference empty", "eval.reference", "eval.pairs")
        if self.interval and not (self.pairs or self.dref):
            raise InvalidOption("eval.interval needs something to evaluate: set eval.pairs (with eval.reference) "
                                "and/or eval.dref", "eval.interval", "eval.pairs", "eval.dref")

    @property
    def enabled(self) -> bool:
        return bool(self.pairs or self.dref)


@dataclass
class Config:
    job: JobConfig = field(default_factory=JobConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        # NaN passes no range check and inf passes most (loss.beta=inf turns every weight NaN in a step):
        # every float option must be finite, checked first so the message says so.
        for section in fields(self):
            for f in fields(section.type):
                value = getattr(getattr(self, section.name), f.name)
                if f.type is float or f.type == list[float]:
                    _check(all(math.isfinite(v) for v in (value if isinstance(value, list) else [value])),
                           f"{section.name}.{f.name}", "must be finite (not NaN or inf)", value)
        for f in fields(self):
            getattr(self, f.name).validate()
        # Checks that span sections.
        if self.job.overwrite_output_dir and self.checkpoint.resume != "none":
            raise InvalidOption("job.overwrite_output_dir=true deletes job.output_dir's checkpoints, which checkpoint.resume="
                                f"{self.checkpoint.resume} would resume from (or which may hold the folder it names): set "
                                "checkpoint.resume=none to start fresh", "job.overwrite_output_dir", "checkpoint.resume")
        if self.checkpoint.keep_best and not self.eval.enabled:
            raise InvalidOption(f"checkpoint.keep_best={self.checkpoint.keep_best} needs an eval set: set eval.pairs (with "
                                "eval.reference) or eval.dref", "checkpoint.keep_best", "eval.pairs")
        if self.training.global_batch_size and self.data.batching == "tokens":
            raise InvalidOption("training.global_batch_size counts pairs and needs data.batching=fixed; with token "
                                "budgets set training.global_batch_size=0 and training.grad_accum",
                                "training.global_batch_size", "data.batching")
        if self.loss.name == "mpo" and self.loss.tau > 0 and not self.data.dref:
            raise InvalidOption("loss.tau > 0 needs D_ref samples: set data.dref (made by tools/sample_reference.py) "
                                "or loss.tau=0", "loss.tau", "data.dref")
        if not self.data.reference:
            raise InvalidOption("data.reference is required: the losses compare with reference log-probs "
                                "(made by tools/score_reference.py)", "data.reference")


def grad_accum_for(config: Config, dp_world_size: int) -> int:
    """Micro-batches per step, so that a step holds training.global_batch_size pairs at any world size
    (training.grad_accum when global_batch_size is 0)."""
    if not config.training.global_batch_size:
        return config.training.grad_accum
    per_micro = config.data.batch_size * dp_world_size
    accum, remainder = divmod(config.training.global_batch_size, per_micro)
    if remainder or accum == 0:
        raise ConfigError(
            f"training.global_batch_size={config.training.global_batch_size} is not a multiple of "
            f"data.batch_size ({config.data.batch_size}) x data-parallel ranks ({dp_world_size}) = {per_micro}; "
            "change training.global_batch_size or data.batch_size"
        )
    return accum
