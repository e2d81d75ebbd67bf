"""How the model is distributed and compiled: FSDP2 over a 1-D or HSDP mesh, per-layer activation
checkpointing and compile. The only module that knows about sharding.

Order as in torchtitan: activation checkpointing, then compile, then `fully_shard` on every
decoder layer and finally on the root (embeddings, final norm and the output projection, which
stay in one group so tied embeddings remain one parameter). Gradients are summed over the
data-parallel ranks, not averaged: the step weights every pair by 1 / (pairs in the global batch),
so the sum is the global mean whatever the mesh (FSDP, HSDP, or later other parallelism).
(The log-prob head's own chunk-wise recomputation is part of the log-prob path, in logprobs.py.)

`parallel.reshard_after_forward` (`reshard_decoder_layers`): a layer whose gathered parameters are
kept from its forward to its backward is not all-gathered again in backward, at the price of one
unsharded copy of the model (in the compute dtype) per rank at the end of the forward. "auto" pays
it when that copy is small: under KEEP_GATHERED_MEMORY_FRACTION of the device's memory (a 1B model
in bf16 on an 80 GB GPU, not an 8B one), or when there is one shard (the rank holds the whole model
with its float32 gradients and optimizer state anyway, beside which the copy is small). The root
(embeddings, final norm, head) keeps FSDP's own rule: not resharded after forward, since its head is
the first thing backward needs. With `parallel.cpu_offload` one shard is no reason to keep them
(`keeps_gathered_parameters`).

`parallel.cpu_offload` (`offload_policy`): FSDP2's CPUOffloadPolicy on every group. It keeps the
sharded float32 parameters, their gradients and hence AdamW's state (created beside the parameters)
in host memory and runs the optimizer step on the CPU; there is no option for the optimizer state
alone, which would need a host master copy of the parameters and the same two copies per step. On
an accelerator the mesh groups get a gloo backend beside the device's (`mesh_backend`): the gradient
norm of host gradients is a collective on host tensors.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                    register_fsdp_forward_method)

from mpo_dist.config import ParallelConfig
from mpo_dist.errors import InputError
from mpo_dist.logprobs import LOGPROB_METHOD
from mpo_dist.model import DTYPES, decoder_layers


def build_mesh(parallel: ParallelConfig, world_size: int, device_type: str) -> DeviceMesh:
    """1-D ("dp_shard") for FSDP, or 2-D ("dp_replicate", "dp_shard") for HSDP across nodes."""
    shard = world_size // parallel.dp_replicate if parallel.dp_shard == -1 else parallel.dp_shard
    if parallel.dp_replicate * shard != world_size:
        raise InputError(
            f"parallel.dp_replicate ({parallel.dp_replicate}) x parallel.dp_shard ({shard}) must equal the "
            f"number of processes ({world_size}); set parallel.dp_shard=-1 to use all of them"
        )
    names = ("dp_shard",) if parallel.dp_replicate == 1 else ("dp_replicate", "dp_shard")
    shape = (shard,) if parallel.dp_replicate == 1 else (parallel.dp_replicate, shard)
    backend = mesh_backend(parallel, device_type)
    return init_device_mesh(device_type, shape, mesh_dim_names=names,
                            backend_override=None if backend is None else dict.fromkeys(names, backend))


def mesh_backend(parallel: ParallelConfig, device_type: str) -> str | None:
    """The mesh groups' backend: None (the default group's) unless parallel.cpu_offload keeps the
    gradients in host memory on an accelerator; then the device's own backend plus gloo for host
    tensors, since the gradient norm of host-resident DTensor gradients is reduced over the mesh."""
    if not parallel.cpu_offload or device_type == "cpu":
        return None
    return f"{device_type}:{torch.distributed.Backend.default_device_backend_map[device_type]},cpu:gloo"


def offload_policy(parallel: ParallelConfig, device_type: str) -> OffloadPolicy:
    """FSDP2's CPUOffloadPolicy for parallel.cpu_offload (else none). Its host shards are pinned on
    CUDA only: pinning needs CUDA, and with the CPU as the compute device the policy copies nothing."""
    if not parallel.cpu_offload:
        return OffloadPolicy()
    return CPUOffloadPolicy(pin_memory=device_type == "cuda")


def mixed_precision(dtype_name: str) -> MixedPrecisionPolicy:
    """Compute in `dtype_name`; gradients are reduced and kept in float32 with float32 master weights."""
    if dtype_name not in DTYPES:  # e.g. an unresolved model.dtype=auto: which dtype it means depends on the device
        raise ValueError(f"dtype_name must be one of {', '.join(DTYPES)} (compute_dtype.resolve_dtype resolves auto), "
                         f"got {dtype_name!r}")
    return MixedPrecisionPolicy(param_dtype=DTYPES[dtype_name], reduce_dtype=torch.float32)


KEEP_GATHERED_MEMORY_FRACTION = 0.05


def keeps_gathered_parameters(choice: str, unsharded_bytes: int, memory_bytes: int, shard_size: int,
                              offloaded: bool = False) -> bool:
    """Whether decoder layers keep their gathered parameters from forward to backward (the
    `parallel.reshard_after_forward` rule: "never" reshard keeps them, "always" frees them). With
    `offloaded` (parallel.cpu_offload) one shard is no reason to keep them: the device does not hold
    the whole model's state beside them, it holds little but what is gathered."""
    if choice != "auto":
        return choice == "never"
    return (shard_size == 1 and not offloaded) or unsharded_bytes < KEEP_GATHERED_MEMORY_FRACTION * memory_bytes


def device_memory_bytes(device_type: str) -> int:
    """Memory of this rank's device; on CPU the host's, shared by the processes of this node."""
    if device_type == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // local_processes


def reshard_decoder_layers(lm: nn.Module, mesh: DeviceMesh, parallel: ParallelConfig, dtype_name: str) -> bool:
    """`reshard_after_forward` for the decoder layers of `lm` (meta device or not)."""
    unsharded = sum(p.numel() for p in lm.parameters()) * DTYPES[dtype_name].itemsize
    keep = keeps_gathered_parameters(parallel.reshard_after_forward, unsharded, device_memory_bytes(mesh.device_type),
                                     mesh["dp_shard"].size(), offloaded=parallel.cpu_offload)
    return not keep


def apply_fsdp(lm: nn.Module, mesh: DeviceMesh, parallel: ParallelConfig, dtype_name: str) -> nn.Module:
    """Shard `lm` in place (it may still be on the meta device) and return it. With
    parallel.cpu_offload every group keeps its shards in host memory: `model.materialize_model`
    must then be told (its `cpu_offload`), since FSDP2 refuses shards that are not on the CPU."""
    policy = mixed_precision(dtype_name)  # first: a bad name changes nothing
    offload = offload_policy(parallel, mesh.device_type)
    if parallel.activation_checkpointing:
        # transformers' own mechanism keeps parameter names unchanged (no wrapper prefixes).
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = decoder_layers(lm)
    if parallel.compile:
        for layer in layers:
            layer.compile()
    reshard = reshard_decoder_layers(lm, mesh, parallel, dtype_name)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, offload_policy=offload, reshard_after_forward=reshard)
    fully_shard(lm, mesh=mesh, mp_policy=policy, offload_policy=offload)  # the root: FSDP's own rule (module docstring)
    for module in lm.modules():
        if isinstance(module, FSDPModule):
            # A plain SUM (no AVG, no PreMulSum, which gloo lacks): the loss already carries 1 / global batch.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    # The log-prob path calls decoder and head itself: FSDP must gather the root's parameters
    # (embeddings, norm, head) around that method as it does around forward.
    if not hasattr(lm, LOGPROB_METHOD):
        raise TypeError(f"{type(lm).__name__} has no {LOGPROB_METHOD}() method; build it with model.build_model")
    register_fsdp_forward_method(lm, LOGPROB_METHOD)
    return lm


# ------------------------------------------------------------------ inference: scoring, sampling, evaluation


def inference_mesh(world_size: int, model_shards: int, local_world_size: int, device_type: str) -> DeviceMesh | None:
    """The mesh of the inference tools: `model_shards` processes share one copy of the model (0: the
    processes of a node, so all-gathers stay within it), the copies are replicated over the rest; None
    when every process holds a whole copy (model_shards 1, or a single process)."""
    shards = local_world_size if model_shards == 0 else model_shards
    if model_shards < 0 or world_size % shards:
        raise InputError(f"--model-shards {model_shards}: must be 0 (the processes of a node), 1 (a whole model per "
                         f"process) or a divisor of the number of processes ({world_size})")
    if shards == 1:
        return None
    if shards == world_size:
        return init_device_mesh(device_type, (shards,), mesh_dim_names=("dp_shard",))
    return init_device_mesh(device_type, (world_size // shards, shards), mesh_dim_names=("dp_replicate", "dp_shard"))


def shard_for_inference(lm: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Shard a model (on the meta device) for no-grad forwards: parameters stay in their own dtype (no
    mixed precision: there is no float32 master), each decoder layer is gathered for its forward only,
    and so is an untied input embedding; the root (final norm, head, tied embeddings) is gathered for
    the whole forward, since the log-prob path calls its head chunk by chunk."""
    lm.requires_grad_(False)
    for layer in decoder_layers(lm):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    embedding, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    if head is None or head.weight is not embedding.weight:
        fully_shard(embedding, mesh=mesh, reshard_after_forward=True)
    fully_shard(lm, mesh=mesh, reshard_after_forward=True)
    register_fsdp_forward_method(lm, LOGPROB_METHOD)
    return lm
