"""Tiny random-init configs of the model families the project is tested on (tests/test_model_families.py,
tests/test_attention_paths.py): 2 layers, hidden 32, each family's own defaults otherwise (tied
embeddings where the family ties them), and what makes each family different kept on: sliding windows
shorter than the test rows (Mistral, Gemma 2, Gemma 3, Qwen2 with use_sliding_window), Gemma 2's
soft-capped attention and logits, mixture-of-experts layers (Qwen3-MoE, Mixtral)."""

from __future__ import annotations

WINDOW = 8  # shorter than the tests' rows, so a mask that ignored it would give other numbers

_ATTENTION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)

# family -> (model_type, config keywords besides vocab_size)
FAMILIES: dict[str, tuple[str, dict]] = {
    "Llama": ("llama", _ATTENTION),
    "Qwen2": ("qwen2", dict(_ATTENTION, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "Qwen3": ("qwen3", dict(_ATTENTION, head_dim=8)),
    "Mistral": ("mistral", dict(_ATTENTION, head_dim=8, sliding_window=WINDOW)),
    "Gemma 2": ("gemma2", dict(_ATTENTION, head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=8,
                               attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "Gemma 3": ("gemma3_text", dict(_ATTENTION, head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=8,
                                    layer_types=["sliding_attention", "full_attention"])),
    "Phi-3": ("phi3", dict(_ATTENTION, pad_token_id=None, bos_token_id=None, eos_token_id=None)),
    "GPT-2": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, n_positions=256)),
    "Qwen3-MoE": ("qwen3_moe", dict(_ATTENTION, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=32, decoder_sparse_step=1)),
    "Mixtral": ("mixtral", dict(_ATTENTION, head_dim=8, num_local_experts=4, num_experts_per_tok=2)),
}


def family_config(family: str, vocab_size: int):
    """The transformers config of `family`'s tiny model."""
    from transformers import AutoConfig

    model_type, keywords = FAMILIES[family]
    return AutoConfig.for_model(model_type, vocab_size=vocab_size, **keywords)


def family_model_config(family: str, vocab_size: int) -> dict:
    """`family`'s tiny model as the trainer's model.config option (model_type and keywords)."""
    model_type, keywords = FAMILIES[family]
    return {"model_type": model_type, "vocab_size": vocab_size, **keywords}
