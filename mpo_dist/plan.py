"""Before launch: does a run fit in memory, how much does it communicate, and how long will a step take.

Pure functions of the model's shape (read off the model built on the meta device: no weights), the
machines and the config. Every figure is per process (one GPU, or one CPU rank) and is the sum of
named terms, so a term that proves wrong can be changed alone:

- training keeps, per rank, float32 sharded parameters (FSDP2's sharded parameters are the master
  weights: mixed precision casts them to model.dtype when it gathers them, parallelize.py), float32
  sharded gradients (reduce_dtype) and AdamW's two float32 moments (optim.py): 16 bytes a parameter
  over dp_shard; the activations autograd saves; the log-prob head's logits (logprobs.py); the
  all-gather buffers of the layer in compute and the one prefetched, and the root (embeddings, final
  norm, head: one FSDP unit) gathered from its forward to the end of its backward;
- the peak is the largest of three moments: the start of the backward (activations, head, root),
  the end of the backward (every gradient) and the optimizer step (every moment, and on a GPU the
  foreach AdamW's one moment-sized temporary);
- inference (score, sample, evaluate) keeps the model in model.dtype sharded over --model-shards
  processes, gathers the root and one decoder layer at a time, and holds one no-grad forward (plus
  a KV cache when sampling).

Measured against real peaks by tools/bench_plan_memory.py (figures in docs/planning.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from mpo_dist.errors import InputError
from mpo_dist.flops import CostModel
from mpo_dist.logprobs import DEFAULT_CHUNK_TOKENS, KEEP_LOGITS_BYTES
from mpo_dist.model import DTYPES

GIB, MIB = 2**30, 2**20
ITEMSIZE = {name: dtype.itemsize for name, dtype in DTYPES.items()}
# A GPU rank's memory beyond its tensors: the CUDA context and kernels (~0.5-1 GiB), cuBLAS and NCCL
# workspaces and the caching allocator's fragmentation. A stated allowance, not a measurement.
CUDA_RUNTIME_BYTES = 3 * GIB
# A CPU rank's resident memory before its first tensor: Python, torch, transformers and mpo_dist
# imported and a gloo process group joined (measured: tools/bench_plan_memory.py's "runtime" row).
CPU_RUNTIME_BYTES = 340 * MIB
# Decoder layers whose gathered parameters exist at once in a sharded inference forward (no prefetch).
INFERENCE_LAYERS_IN_FLIGHT = 1
# Llama-3 shapes, for configs whose model.path is a folder this machine does not have.
LLAMA_3 = dict(model_type="llama", vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
               bos_token_id=128000, eos_token_id=128009)
BUILT_IN_SHAPES = {
    "llama-3-1b": dict(LLAMA_3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, tie_word_embeddings=True),
    "llama-3-8b": dict(LLAMA_3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, tie_word_embeddings=False),
    "llama-3-70b": dict(LLAMA_3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, tie_word_embeddings=False),
}


# ---------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class ModelShape:
    """What memory and FLOPs depend on, read off a (meta-device) causal LM."""

    params: int
    layer_params: int  # the largest decoder layer
    root_params: int  # embeddings, final norm and head (once when tied): the root FSDP unit
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    cost: CostModel

    @classmethod
    def of(cls, lm) -> "ModelShape":
        from mpo_dist.model import decoder_layers

        config = lm.config
        layer_sizes = [sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(lm)]
        params = sum(p.numel() for p in lm.parameters())
        heads = config.num_attention_heads
        return cls(params=params, layer_params=max(layer_sizes), root_params=params - sum(layer_sizes),
                   layers=len(layer_sizes), hidden=config.hidden_size, intermediate=config.intermediate_size, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads, vocab=config.vocab_size,
                   cost=CostModel.of(lm))

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    memory_bytes: int  # per process: a GPU's memory, or on CPU the host's share of one rank
    device: str = "cuda"  # "cuda" or "cpu"

    @property
    def processes(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Batch:
    """One micro-batch as the model computes it: padded rows (the most positions any layout computes)."""

    rows: int
    width: int
    head_positions: int  # positions the output head runs on (response tokens)

    @property
    def tokens(self) -> int:
        return self.rows * self.width


@dataclass
class Term:
    name: str
    bytes: float
    note: str = ""


@dataclass
class MemoryPlan:
    stage: str
    terms: list[Term]  # on the device, each counted once
    peak_bytes: float  # the largest moment (the module docstring); <= the sum of the terms
    moments: dict[str, float]  # moment -> bytes
    host_terms: list[Term] = field(default_factory=list)  # per process, in host memory (CPU offload)

    def term(self, name: str) -> float:
        return next(t.bytes for t in self.terms if t.name == name)

    @property
    def largest(self) -> Term:
        return max(self.terms, key=lambda t: t.bytes)

    @property
    def host_bytes(self) -> float:
        return sum(t.bytes for t in self.host_terms)


def planning_model_config(model, model_config_file: str | None = None) -> tuple[dict | None, str]:
    """(kwargs for a random-init model config or None to read model.path, a line saying where the shape
    comes from): model.path's config.json when the folder is here, else --model-config FILE, else
    model.config, else a built-in Llama-3 shape matched by the folder's name (e.g. Llama-3.1-8B-Instruct)."""
    import json

    if model_config_file:
        file = Path(model_config_file)
        file = file / "config.json" if file.is_dir() else file
        if not file.is_file():
            raise InputError(f"--model-config {model_config_file}: no such config.json")
        return json.loads(file.read_text()), f"the shape of {file}"
    if model.path and (Path(model.path) / "config.json").is_file():
        return None, f"model.path {model.path}"
    if model.config:
        return dict(model.config), "model.config"
    name = Path(model.path).name.lower().replace("_", "-")
    size = next((s for s in ("70b", "8b", "1b") if f"-{s}" in name or name.startswith(s)), None)
    if model.path and "llama" in name and size:
        key = f"llama-3-{size}"
        return dict(BUILT_IN_SHAPES[key]), f"the built-in {key} shape (model.path {model.path} is not here)"
    raise InputError(f"model.path {model.path or '(empty)'} is not here and no shape is known for it: pass "
                     "--model-config CONFIG_JSON, or model.config.* overrides")


def build_shape(model, model_config_file: str | None = None) -> tuple[ModelShape, str]:
    """The model's shape from the model built on the meta device (`model.build_model`; no weights read)."""
    from mpo_dist.config import ModelConfig
    from mpo_dist.model import build_model

    kwargs, source = planning_model_config(model, model_config_file)
    config = model if kwargs is None else ModelConfig(path="", config=kwargs, dtype=model.dtype)
    return ModelShape.of(build_model(config)), source


def longest_row(pairs_dir: str, default: int = 1024) -> tuple[int, str]:
    """The longest prompt + response of a pairs folder's manifest, or `default` when there is none."""
    from mpo_dist.data.shards import Manifest

    if pairs_dir and (Path(pairs_dir) / "manifest.json").is_file():
        manifest = Manifest.read(pairs_dir, "pairs")
        lengths = [n for shard in manifest.shards for n in (shard.lengths or [])]
        if lengths:
            return max(lengths), f"the longest pair of data.pairs {pairs_dir}"
    return default, "no pairs manifest here; set --max-length"


def training_batch(data, max_length: int, dref_rows: int = 0) -> Batch:
    """data.batch_size pairs (two rows each) plus D_ref rows, padded to `max_length` rounded as the layout rounds it."""
    from mpo_dist.data.layout import shape_bucket

    width = shape_bucket(max_length) if data.bucket_shapes else max_length
    width = math.ceil(width / data.pad_to_multiple_of) * data.pad_to_multiple_of
    rows = 2 * data.batch_size + dref_rows
    return Batch(rows, width, rows * width)


# ---------------------------------------------------------------------------------- memory terms


def layer_activation_bytes_per_token(shape: ModelShape, itemsize: int) -> float:
    """What autograd saves per position in one Llama-like decoder layer (SDPA flash kernels: no
    width x width scores): in the compute dtype 6 hidden-wide tensors (norm outputs, q, attention
    output, residual inputs), k and v, 4 MLP-wide (gate, up, silu, product); the two RMSNorms' float32
    inputs; per-position norm scales and one attention log-sum-exp per head in float32."""
    return itemsize * (6 * shape.hidden + 2 * shape.kv_dim + 4 * shape.intermediate) + 4 * (2 * shape.hidden + 2 + shape.heads)


def activation_bytes(shape: ModelShape, batch: Batch, itemsize: int, checkpointing: bool) -> float:
    """Activations saved for the backward over the decoder: every layer's, or with activation
    checkpointing each layer's input plus one layer recomputed in the backward; and outside the
    layers the embeddings' output, the final norm and the head's input rows."""
    per_layer = layer_activation_bytes_per_token(shape, itemsize) * batch.tokens
    layers = (shape.layers * itemsize * shape.hidden * batch.tokens + per_layer) if checkpointing else shape.layers * per_layer
    outside = batch.tokens * (2 * itemsize * shape.hidden + 4 * (shape.hidden + 1)) + batch.head_positions * itemsize * shape.hidden
    return layers + outside


def head_bytes(shape: ModelShape, head_positions: int, itemsize: int, training: bool) -> float:
    """The log-prob head's float32 logits (logprobs.py): all of them kept for the backward when they fit
    in KEEP_LOGITS_BYTES, else one chunk of DEFAULT_CHUNK_TOKENS at a time; at its peak (the backward
    of the log-softmax) a chunk holds its logits, their exponentials and their gradient, plus the
    head's output in the compute dtype."""
    logits = head_positions * shape.vocab * 4
    live = head_positions if (training and logits <= KEEP_LOGITS_BYTES) else min(head_positions, DEFAULT_CHUNK_TOKENS)
    copies = 3 if training else 2  # no-grad: the logits and the log-sum-exp's exponentials
    return live * shape.vocab * (4 * copies + (itemsize if itemsize != 4 else 0))


def gather_bytes(shape: ModelShape, itemsize: int, shards: int, keep_gathered: bool, layers_in_flight: int = 2) -> float:
    """Gathered (unsharded) parameters in the compute dtype: the root through forward and backward,
    plus `layers_in_flight` decoder layers (the one computing and the one prefetched), or every layer
    when they stay gathered from forward to backward. One float32 shard needs no gather: FSDP uses
    the sharded parameters themselves."""
    if shards == 1 and itemsize == 4:
        return 0.0
    layers = (shape.params - shape.root_params) if keep_gathered else layers_in_flight * shape.layer_params
    return itemsize * (shape.root_params + layers)


def gradient_buffer_bytes(shape: ModelShape, itemsize: int) -> float:
    """The end of the backward: the root's unsharded gradients in the compute dtype and the float32
    copy FSDP reduce-scatters them from (made at any shard count, one included)."""
    return (itemsize + 4) * shape.root_params


def keeps_gathered(parallel, unsharded_bytes: float, memory_bytes: float, shards: int) -> bool:
    from mpo_dist.parallelize import keeps_gathered_parameters

    return keeps_gathered_parameters(parallel.reshard_after_forward, int(unsharded_bytes), int(memory_bytes), shards,
                                     offloaded=bool(getattr(parallel, "cpu_offload", False)))


def runtime_term(device: str) -> Term:
    if device == "cpu":
        return Term("runtime", CPU_RUNTIME_BYTES, "Python, torch, transformers imported, process group (measured)")
    return Term("runtime", CUDA_RUNTIME_BYTES, "CUDA context, library workspaces, allocator slack (allowance)")


def training_memory(shape: ModelShape, cluster: Cluster, parallel, dtype: str, batch: Batch, shards: int,
                    grad_accum: int = 1) -> MemoryPlan:
    """Per-rank memory of a training step (module docstring); `parallel` gives activation_checkpointing,
    reshard_after_forward and cpu_offload."""
    itemsize = ITEMSIZE[dtype]
    sharded = shape.params / shards
    offload = bool(getattr(parallel, "cpu_offload", False)) and cluster.device != "cpu"
    state = [Term("parameters", 4 * sharded, "float32 sharded (the master weights)"),
             Term("gradients", 4 * sharded, "float32 sharded"),
             Term("optimizer", 8 * sharded, "AdamW's two float32 moments")]
    keep = keeps_gathered(parallel, shape.params * itemsize, cluster.memory_bytes, shards)
    checkpointing = parallel.activation_checkpointing
    activations = activation_bytes(shape, batch, itemsize, checkpointing)
    terms = [] if offload else list(state)
    terms += [Term("activations", activations, ("with" if checkpointing else "without") + " activation checkpointing"),
              Term("log-prob head", head_bytes(shape, batch.head_positions, itemsize, training=True)),
              Term("all-gather buffers", gather_bytes(shape, itemsize, shards, keep),
                   "every layer kept gathered" if keep else "root + 2 layers"),
              Term("gradient buffers", gradient_buffer_bytes(shape, itemsize), "the root's, to reduce-scatter"),
              runtime_term(cluster.device)]
    if offload:  # one layer's float32 shard on its way to the device and one gradient shard on its way back
        terms.append(Term("offload staging", 2 * 4 * shape.layer_params / shards, "a layer's shard in and its gradient out"))
    size = {t.name: t.bytes for t in terms}
    fixed = size["runtime"] + (0 if offload else size["parameters"] + size["optimizer"]) + size.get("offload staging", 0)
    grads = 0 if offload else size["gradients"]
    carried = grads if grad_accum > 1 else 0  # earlier micro-batches' gradients are there from the start
    gathered_layers, gathered_root = size["all-gather buffers"], (0 if shards == 1 and itemsize == 4 else itemsize * shape.root_params)
    # The head's backward comes first: its logits' gradients and its weight's unsharded gradient.
    head_gradient = itemsize * shape.cost.head_params
    # AdamW runs foreach on a GPU (one moment-sized temporary); on CPU one tensor at a time (the largest:
    # an embedding's shard).
    step_temp = 0 if offload else (4 * shape.vocab * shape.hidden / shards if cluster.device == "cpu" else 4 * sharded)
    moments = {"start of backward": fixed + carried + activations + size["log-prob head"] + gathered_layers + head_gradient,
               "end of backward": fixed + grads + gathered_root + size["gradient buffers"],
               "optimizer step": fixed + grads + step_temp}
    host = [Term(t.name, t.bytes) for t in state] if offload else []
    return MemoryPlan("train", terms, max(moments.values()), moments, host)


def forward_working_bytes(shape: ModelShape, tokens: int, itemsize: int) -> float:
    """A no-grad forward's largest transient, inside one layer: the residual stream and its norm, q, k,
    v and the attention output, and the MLP's gate, up and their product."""
    return tokens * itemsize * (4 * shape.hidden + 2 * shape.kv_dim + 3 * shape.intermediate) + tokens * 4 * shape.hidden


def kv_cache_bytes(shape: ModelShape, rows: int, length: int, itemsize: int) -> float:
    return rows * length * shape.layers * 2 * shape.kv_dim * itemsize


def inference_memory(shape: ModelShape, cluster: Cluster, dtype: str, stage: str, shards: int, batch: Batch,
                     max_new_tokens: int = 0) -> MemoryPlan:
    """Per-process memory of sharded scoring, sampling or evaluation: the model in `dtype` over `shards`
    processes (two models, policy and reference, for evaluate), no gradients or optimizer."""
    itemsize = ITEMSIZE[dtype]
    models = 2 if stage == "evaluate" else 1
    terms = [Term("parameters", models * itemsize * shape.params / shards, f"{models} model(s) in {dtype}, sharded"),
             Term("all-gather buffers", 0.0 if shards == 1 else
                  gather_bytes(shape, itemsize, shards, False, INFERENCE_LAYERS_IN_FLIGHT), "root + one layer"),
             Term("forward", forward_working_bytes(shape, batch.tokens, itemsize) + batch.tokens * itemsize * shape.hidden,
                  "one no-grad forward"),
             Term("log-prob head", head_bytes(shape, batch.head_positions, itemsize, training=False)),
             runtime_term(cluster.device)]
    if stage == "sample":
        terms.append(Term("KV cache", kv_cache_bytes(shape, batch.rows, batch.width + max_new_tokens, itemsize),
                          f"{batch.rows} rows x ({batch.width} + {max_new_tokens}) positions"))
    total = sum(t.bytes for t in terms)
    moments = {"forward": total}
    if cluster.device == "cpu":
        # safetensors are read through a memory map: the pages of this rank's slices stay mapped (counted in
        # its resident memory, though the kernel may reclaim them) until the file is read; on a GPU node they
        # are host memory, not the device's.
        # Models are read one after the other: the pages of one model's file are mapped at a time.
        mapped = Term("weights file pages", terms[0].bytes / models, "this rank's slices of one model's files, mapped "
                                                                     "while they are read")
        terms.append(mapped)
        moments["reading the weights"] = terms[0].bytes + mapped.bytes + runtime_term(cluster.device).bytes
    return MemoryPlan(stage, terms, max(moments.values()), moments)


# ---------------------------------------------------------------------------------- time and traffic


@dataclass(frozen=True)
class Traffic:
    """Bytes each rank sends (ring collectives: about what it receives too) per optimizer step."""

    intra_node: float
    inter_node: float


def training_traffic(shape: ModelShape, cluster: Cluster, dtype: str, replicate: int, shards: int, resharded: bool,
                     grad_accum: int) -> Traffic:
    """FSDP all-gathers of the parameters in forward (and again in backward when resharded), the
    reduce-scatter of float32 gradients, every micro-batch; HSDP's all-reduce over dp_replicate.
    A shard group within a node talks over the node's links, one larger than a node across nodes."""
    itemsize = ITEMSIZE[dtype]
    ring = (shards - 1) / shards
    gathers = shape.params + (shape.params - shape.root_params if resharded else 0)
    shard_bytes = grad_accum * ring * (itemsize * gathers + 4 * shape.params)
    replica_bytes = grad_accum * 2 * (replicate - 1) / replicate * 4 * shape.params / shards
    within = shards <= cluster.gpus_per_node
    return Traffic(intra_node=shard_bytes if within else 0.0,
                   inter_node=(0.0 if within else shard_bytes) + (replica_bytes if cluster.nodes > 1 else 0.0))


def training_flops(shape: ModelShape, batch: Batch) -> float:
    """One micro-batch's forward and backward (flops.CostModel): padded rows under a padding mask."""
    return shape.cost.layout_cost(batch.rows, batch.width, dense_attention=True) + 6.0 * shape.cost.head_params * batch.head_positions


def step_seconds(flops_per_rank: float, peak_tflops: float, mfu: float) -> float:
    return flops_per_rank / (peak_tflops * 1e12 * mfu)


# ---------------------------------------------------------------------------------- verdict


@dataclass
class Verdict:
    fits: bool
    largest: Term
    advice: list[str]


def verdict(plan: MemoryPlan, memory_bytes: float, replan=None) -> Verdict:
    """Fits or not; when not, each change that `replan(change) -> MemoryPlan | None` can try, with its
    new peak. Changes: "checkpointing", "batch_size", "offload", "shards" (see `training_changes`)."""
    fits = plan.peak_bytes <= memory_bytes
    advice = []
    if not fits and replan is not None:
        for description, plan_after in replan():
            state = "fits" if plan_after.peak_bytes <= memory_bytes else "still does not fit"
            host = f", host {plan_after.host_bytes / GIB:,.1f} GiB per process" if plan_after.host_terms else ""
            advice.append(f"{description}: peak {plan_after.peak_bytes / GIB:,.1f} GiB{host} ({state})")
    return Verdict(fits, plan.largest, advice)


def training_changes(shape, cluster, parallel, dtype, batch: Batch, shards: int, grad_accum: int,
                     one_pair: Batch | None = None):
    """What to change when training does not fit, each with its plan (for `verdict`); `one_pair`: the
    micro-batch at data.batch_size=1 (None when it is 1 already)."""
    def plan(cluster=cluster, parallel=parallel, batch=batch, shards=shards):
        return training_memory(shape, cluster, parallel, dtype, batch, shards, grad_accum)

    changes = []
    if not parallel.activation_checkpointing:
        changes.append(("parallel.activation_checkpointing=true", plan(parallel=replace(parallel, activation_checkpointing=True))))
    if one_pair is not None:
        changes.append(("data.batch_size=1", plan(batch=one_pair)))
    if not getattr(parallel, "cpu_offload", False) and cluster.device != "cpu":
        changes.append(("parallel.cpu_offload=true (parameters, gradients, optimizer state in host memory)",
                        plan(parallel=replace(parallel, cpu_offload=True))))
    more = shards * 2
    while more <= 4096:
        bigger = replace(cluster, nodes=math.ceil(more / cluster.gpus_per_node))
        if plan(cluster=bigger, shards=more).peak_bytes <= cluster.memory_bytes or more == 4096:
            changes.append((f"shard over {more} GPUs ({bigger.nodes} nodes of {cluster.gpus_per_node}, parallel.dp_shard={more})",
                            plan(cluster=bigger, shards=more)))
            break
        more *= 2
    return changes

