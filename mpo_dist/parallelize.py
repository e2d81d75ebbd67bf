"""The only place that shards, checkpoints activations or compiles: FSDP2 over a 1-D or HSDP mesh.

Order as in torchtitan: activation checkpointing, then compile, then `fully_shard` on every
decoder layer and finally on the root (embeddings, final norm and the output projection, which
stay in one group so tied embeddings remain one parameter).
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from mpo_dist.config import ParallelConfig
from mpo_dist.logprobs import token_logprobs
from mpo_dist.model import DTYPES, decoder_layers


def build_mesh(parallel: ParallelConfig, world_size: int, device_type: str) -> DeviceMesh:
    """1-D ("dp_shard") for FSDP, or 2-D ("dp_replicate", "dp_shard") for HSDP across nodes."""
    shard = world_size // parallel.dp_replicate if parallel.dp_shard == -1 else parallel.dp_shard
    if parallel.dp_replicate * shard != world_size:
        raise ValueError(
            f"parallel.dp_replicate ({parallel.dp_replicate}) x parallel.dp_shard ({shard}) must equal the "
            f"number of processes ({world_size}); set parallel.dp_shard=-1 to use all of them"
        )
    if parallel.dp_replicate == 1:
        return init_device_mesh(device_type, (shard,), mesh_dim_names=("dp_shard",))
    return init_device_mesh(device_type, (parallel.dp_replicate, shard), mesh_dim_names=("dp_replicate", "dp_shard"))


def mixed_precision(dtype_name: str) -> MixedPrecisionPolicy:
    """Compute in `dtype_name`; gradients are reduced and kept in float32 with float32 master weights."""
    return MixedPrecisionPolicy(param_dtype=DTYPES[dtype_name], reduce_dtype=torch.float32)


def apply_fsdp(lm: nn.Module, mesh: DeviceMesh, parallel: ParallelConfig, dtype_name: str) -> nn.Module:
    """Shard `lm` in place (it may still be on the meta device) and return it."""
    if parallel.activation_checkpointing:
        # transformers' own mechanism keeps parameter names unchanged (no wrapper prefixes).
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = decoder_layers(lm)
    if parallel.compile:
        for layer in layers:
            layer.compile()
    policy = mixed_precision(dtype_name)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(lm, mesh=mesh, mp_policy=policy)
    apply_logprob_forward(lm)
    return lm


def apply_logprob_forward(lm: nn.Module) -> None:
    """Make `lm.token_logprobs(...)` a forward method that FSDP wraps like `forward`: the root's
    parameters (embeddings, norm, head) are gathered around it, since the log-prob path calls the
    decoder and the head itself instead of `lm.forward` (to avoid full-vocabulary logits)."""
    lm.token_logprobs = types.MethodType(token_logprobs, lm)
    register_fsdp_forward_method(lm, "token_logprobs")
