"""Building the policy the way the trainer does: meta device, FSDP2, weights read slice by slice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GPT2Config

from mpo_dist.config import ModelConfig, ParallelConfig
from mpo_dist.model import build_model, materialize_model
from mpo_dist.parallelize import apply_fsdp, build_mesh

pytestmark = pytest.mark.unit


def sharded_policy(path: Path) -> torch.nn.Module:
    config = ModelConfig(path=str(path), dtype="float32")
    policy = build_model(config)
    apply_fsdp(policy, build_mesh(ParallelConfig(), 1, "cpu"), ParallelConfig(), "float32")
    materialize_model(policy, config, torch.device("cpu"), seed=0)
    return policy.train()  # training mode: dropout must still be off


def gpt2_folder(folder: Path, strip_prefix: bool, drop: str | None = None) -> AutoModelForCausalLM:
    """A GPT-2 folder whose file names the base model's tensors without `transformer.` (as the
    original GPT-2 checkpoints do) or with it; dropout is on in its config."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32,
                                                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.3))
    folder.mkdir()
    model.config.save_pretrained(str(folder))
    state = {k.removeprefix("transformer.") if strip_prefix else k: v.contiguous()
             for k, v in model.state_dict().items() if k != "lm_head.weight" and k != drop}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return model.eval()


@pytest.mark.parametrize("strip_prefix", [True, False])
def test_gpt2_weights_load_with_or_without_the_base_prefix(tmp_path, one_process_group, strip_prefix):
    original = gpt2_folder(tmp_path / "gpt2", strip_prefix)
    policy = sharded_policy(tmp_path / "gpt2")
    tokens = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert torch.equal(policy(tokens).logits, original(tokens).logits)


def test_missing_weights_are_named(tmp_path, one_process_group):
    gpt2_folder(tmp_path / "gpt2", True, drop="transformer.h.1.mlp.c_fc.weight")
    with pytest.raises(ValueError, match=r"lack 1 of the model's tensors .*transformer\.h\.1\.mlp\.c_fc\.weight"):
        sharded_policy(tmp_path / "gpt2")


@pytest.mark.parametrize("model_type, extra", [
    ("llama", {}), ("qwen2", {}), ("mistral", {}), ("gpt_neox", {}),
    ("gpt2", {"n_embd": 32, "n_layer": 3, "n_head": 4}),
])
def test_decoder_layers_are_found_and_sharded(one_process_group, model_type, extra):
    """Every decoder layer becomes its own FSDP unit, for the architectures users bring."""
    from torch.distributed.fsdp import FSDPModule

    from mpo_dist.model import decoder_layers

    sizes = {} if extra else {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                              "num_attention_heads": 4, "num_key_value_heads": 2}
    if model_type == "gpt_neox":
        sizes.pop("num_key_value_heads")
    policy = build_model(ModelConfig(config={"model_type": model_type, "vocab_size": 64, **sizes, **extra}))
    apply_fsdp(policy, build_mesh(ParallelConfig(), 1, "cpu"), ParallelConfig(), "bfloat16")
    layers = decoder_layers(policy)
    assert len(layers) == 3 and all(isinstance(layer, FSDPModule) for layer in layers)
    assert isinstance(policy, FSDPModule)
    materialize_model(policy, ModelConfig(config={"model_type": model_type}), torch.device("cpu"), seed=0)
    tokens = torch.randint(0, 64, (2, 8))
    from mpo_dist.logprobs import sequence_logprobs

    mask = torch.ones_like(tokens, dtype=torch.bool)
    out = sequence_logprobs(policy, tokens, mask, mask)
    out.logps.sum().backward()
    assert torch.isfinite(out.logps).all() and all(p.grad is not None for p in policy.parameters())


@pytest.mark.parametrize("family", ["Qwen3-MoE", "Mixtral"])
def test_experts_stored_one_by_one_load_into_the_fused_tensors(tmp_path, monkeypatch, family):
    """transformers 5 fuses a mixture-of-experts layer's experts in memory and its save_pretrained writes
    them one by one: the file layout (hf_layout.py) names exactly the files' tensors, the loader fills
    the fused tensors from them (logits equal), and a transform it cannot invert is refused by name."""
    from safetensors import safe_open

    from mpo_dist.errors import InputError
    from mpo_dist.hf_layout import FileLayout
    from mpo_dist.model import build_model_from_config, materialize_weights
    from model_families import family_config

    config = family_config(family, 64)
    torch.manual_seed(0)
    saved = AutoModelForCausalLM.from_config(config).eval()
    saved.save_pretrained(str(tmp_path))
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        stored = set(handle.keys())
    layout = FileLayout(saved)
    assert {piece.key for name, tensor in saved.state_dict().items()
            for piece in layout.pieces(name, tensor.shape)} == stored
    assert not any(name in stored for name in saved.state_dict() if ".experts." in name)  # all stored otherwise

    model = build_model_from_config(config, torch.float32)
    materialize_weights(model, tmp_path, torch.device("cpu"), seed=1)
    tokens = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, saved(tokens).logits)

    layout.stacks.clear()
    layout.unsupported.append("WeightConverter(experts, Interleave)")
    monkeypatch.setattr("mpo_dist.hf_layout.FileLayout", lambda lm: layout)
    with pytest.raises(InputError, match=r"lack \d+ of the model's tensors .* its conversion mapping has transforms "
                                         r"this loader cannot invert: WeightConverter\(experts, Interleave\)"):
        materialize_weights(build_model_from_config(config, torch.float32), tmp_path, torch.device("cpu"))
