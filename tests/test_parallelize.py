"""parallel.reshard_after_forward: the rule that picks it, and that the decoder layers get it."""

from __future__ import annotations

import pytest
from torch.distributed.fsdp import fully_shard

from mpo_dist.config import ModelConfig, ParallelConfig
from mpo_dist.model import build_model, decoder_layers
from mpo_dist.parallelize import KEEP_GATHERED_MEMORY_FRACTION, apply_fsdp, build_mesh, keeps_gathered_parameters

pytestmark = pytest.mark.unit

GIB = 1024**3
SMALL = int(KEEP_GATHERED_MEMORY_FRACTION * 80 * GIB) - 1  # just under the fraction of an 80 GiB device
LARGE = SMALL + 2


@pytest.mark.parametrize("choice, unsharded, shards, keep", [
    ("auto", SMALL, 8, True),      # small model: keep the gathered parameters, skip the backward all-gather
    ("auto", LARGE, 8, False),     # large model: free them after forward
    ("auto", LARGE, 1, True),      # one shard: the rank holds the whole model anyway
    ("always", SMALL, 8, False),
    ("always", SMALL, 1, False),
    ("never", LARGE, 8, True),
])
def test_keeps_gathered_parameters_follows_the_rule(choice, unsharded, shards, keep):
    assert keeps_gathered_parameters(choice, unsharded, 80 * GIB, shards) is keep


def test_llama_sizes_on_an_80gb_gpu():
    """The documented examples: a 1B Llama in bf16 is kept, an 8B one resharded, on 8 shards."""
    assert keeps_gathered_parameters("auto", int(1.24e9) * 2, 80 * 10**9, 8)
    assert not keeps_gathered_parameters("auto", int(8.03e9) * 2, 80 * 10**9, 8)


@pytest.mark.parametrize("choice, reshard", [("auto", False), ("always", True), ("never", False)])
def test_decoder_layers_get_the_choice_and_the_root_stays_fsdps(one_process_group, choice, reshard):
    policy = build_model(ModelConfig(config={"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
                                             "intermediate_size": 64, "num_hidden_layers": 2,
                                             "num_attention_heads": 4, "num_key_value_heads": 2}))
    parallel = ParallelConfig(reshard_after_forward=choice)
    apply_fsdp(policy, build_mesh(parallel, 1, "cpu"), parallel, "bfloat16")
    # FSDP2 records "reshard after forward" as a post-forward mesh (None: keep the parameters gathered).
    for layer in decoder_layers(policy):
        assert (fully_shard.state(layer)._fsdp_param_group.post_forward_mesh_info is not None) is reshard
    assert fully_shard.state(policy)._auto_reshard_after_forward  # the root: FSDP decides (kept gathered)


def test_cpu_offload_reaches_every_group_and_the_reshard_rule(one_process_group):
    """parallel.cpu_offload: every FSDP group (decoder layers and root) gets CPUOffloadPolicy, pinned only
    on CUDA; one shard no longer keeps the gathered layers (the device does not hold the model's state);
    on an accelerator the mesh groups get gloo for host tensors beside the device's backend."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    from mpo_dist.parallelize import mesh_backend, offload_policy

    policy = build_model(ModelConfig(config={"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
                                             "intermediate_size": 64, "num_hidden_layers": 2,
                                             "num_attention_heads": 4, "num_key_value_heads": 2}))
    parallel = ParallelConfig(cpu_offload=True)
    apply_fsdp(policy, build_mesh(parallel, 1, "cpu"), parallel, "float32")
    groups = [fully_shard.state(module)._fsdp_param_group for module in [*decoder_layers(policy), policy]]
    assert all(group.offload_policy == CPUOffloadPolicy(pin_memory=False) for group in groups)
    assert offload_policy(parallel, "cuda") == CPUOffloadPolicy(pin_memory=True)
    assert type(offload_policy(ParallelConfig(), "cuda")) is not CPUOffloadPolicy
    assert keeps_gathered_parameters("auto", LARGE, 80 * GIB, 1, offloaded=True) is False  # one shard: no keep
    assert keeps_gathered_parameters("auto", SMALL, 80 * GIB, 1, offloaded=True) is True  # a small model still kept
    assert mesh_backend(parallel, "cuda") == "cuda:nccl,cpu:gloo"
    assert mesh_backend(parallel, "cpu") is None and mesh_backend(ParallelConfig(), "cuda") is None
