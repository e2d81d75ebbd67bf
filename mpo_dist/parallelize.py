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
the first thing backward needs.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

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
    if parallel.dp_replicate == 1:
        return init_device_mesh(device_type, (shard,), mesh_dim_names=("dp_shard",))
    return init_device_mesh(device_type, (parallel.dp_replicate, shard), mesh_dim_names=("dp_replicate", "dp_shard"))


def mixed_precision(dtype_name: str) -> MixedPrecisionPolicy:
    """Compute in `dtype_name`; gradients are reduced and kept in float32 with float32 master weights."""
    if dtype_name not in DTYPES:  # e.g. an unresolved model.dtype=auto: which dtype it means depends on the device
        raise ValueError(f"dtype_name must be one of {', '.join(DTYPES)} (compute_dtype.resolve_dtype resolves auto), "
                         f"got {dtype_name!r}")
    return MixedPrecisionPolicy(param_dtype=DTYPES[dtype_name], reduce_dtype=torch.float32)


KEEP_GATHERED_MEMORY_FRACTION = 0.05


def keeps_gathered_parameters(choice: str, unsharded_bytes: int, memory_bytes: int, shard_size: int) -> bool:
    """Whether decoder layers keep their gathered parameters from forward to backward (the
    `parallel.reshard_after_forward` rule: "never" reshard keeps them, "always" frees them)."""
    if choice != "auto":
        return choice == "never"
    return shard_size == 1 or unsharded_bytes < KEEP_GATHERED_MEMORY_FRACTION * memory_bytes


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
                                     mesh["dp_shard"].size())
    return not keep


def apply_fsdp(lm: nn.Module, mesh: DeviceMesh, parallel: ParallelConfig, dtype_name: str) -> nn.Module:
    """Shard `lm` in place (it may still be on the meta device) and return it."""
    policy = mixed_precision(dtype_name)  # first: a bad name changes nothing
    if parallel.activation_checkpointing:
        # transformers' own mechanism keeps parameter names unchanged (no wrapper prefixes).
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = decoder_layers(lm)
    if parallel.compile:
        for layer in layers:
            layer.compile()
    reshard = reshard_decoder_layers(lm, mesh, parallel, dtype_name)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(lm, mesh=mesh, mp_policy=policy)  # the root: FSDP's own rule (module docstring)
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
