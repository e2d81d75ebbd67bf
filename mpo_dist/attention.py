"""Which attention packed rows run under (model.attention), and the varlen path as a transformers attention.

- dense: SDPA under the 4-D packed mask (logprobs.packed_attention_mask): O(width^2) mask memory per
  row and no flash kernels, but any architecture; the CPU default and the reference.
- varlen: the pieces of varlen.py (torch's flash `varlen_attn` on CUDA, its plain-PyTorch twin
  elsewhere): no mask at all. The data pipeline builds the pieces (`VarlenDescriptors`) on the host
  when it lays a batch out (data.layout.lay_out(varlen=True)), they move with the batch, and the
  log-prob path hands them to every attention layer as the `varlen_descriptors` keyword, which
  transformers' decoders pass through (activation checkpointing and FSDP included) to the attention
  function registered here.

The model runs under the implementation `VARLEN_IMPLEMENTATION`, set once (`use_varlen_attention`):
with descriptors it runs the pieces; without (padded rows, or a packed batch laid out without them)
it is transformers' SDPA with the mask it is given, so padded rows keep their path. Its mask function
builds SDPA's mask, except that it builds none when the decoder gets no mask (the varlen forward).
"""

from __future__ import annotations

import torch

from mpo_dist.errors import InputError
from mpo_dist.varlen import varlen_attention

ATTENTION_CHOICES = ("auto", "dense", "varlen")
VARLEN_IMPLEMENTATION = "mpo_varlen"
DESCRIPTORS_KWARG = "varlen_descriptors"


def uses_varlen(choice: str, device: torch.device, model_config) -> bool:
    """Whether packed rows run the varlen path: model.attention=varlen (refused, InputError, when the
    model needs what it cannot do), or auto on CUDA when the model allows it; dense otherwise."""
    if choice not in ATTENTION_CHOICES:
        raise InputError(f"model.attention must be one of {', '.join(ATTENTION_CHOICES)}, got {choice!r}")
    if choice == "dense":
        return False
    unsupported = varlen_unsupported(model_config)
    if choice == "varlen" and unsupported:
        raise InputError(f"model.attention=varlen cannot serve this model: {unsupported}; set model.attention=dense")
    return choice == "varlen" or (device.type == "cuda" and not unsupported)


def varlen_unsupported(model_config) -> str | None:
    """What in a transformers config the varlen path cannot compute (None: nothing): sliding windows
    and soft-capped attention scores change the attention the pieces compute."""
    window = getattr(model_config, "sliding_window", None)
    layer_types = getattr(model_config, "layer_types", None) or ()
    if window or "sliding_attention" in layer_types:
        return f"sliding-window attention (sliding_window={window})"
    softcap = getattr(model_config, "attn_logit_softcapping", None)
    if softcap:
        return f"soft-capped attention scores (attn_logit_softcapping={softcap})"
    return None


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention contract (q [rows, heads, width, dim], k/v [rows, kv_heads, width, dim]
    -> [rows, width, heads, dim]): the pieces of kwargs['varlen_descriptors'], else SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    descriptors = kwargs.pop(DESCRIPTORS_KWARG, None)
    if descriptors is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if dropout > 0:
        raise InputError(f"model.attention=varlen does not apply attention dropout (here {dropout}); set "
                         "model.attention=dense or train without attention dropout")
    for name in ("sliding_window", "softcap"):  # refused up front (uses_varlen); a layer may still ask at run time
        if kwargs.get(name) is not None:
            raise InputError(f"model.attention=varlen cannot serve {name}={kwargs[name]} in "
                             f"{type(module).__name__}; set model.attention=dense")
    return varlen_attention(query, key, value, descriptors, scale=scaling), None


def _sdpa_mask_unless_none(*args, attention_mask=None, **kwargs):
    """SDPA's mask function; no mask at all for a decoder given none (the varlen forward's)."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_varlen_attention() -> None:
    """Register the attention and mask functions under VARLEN_IMPLEMENTATION (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(VARLEN_IMPLEMENTATION, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_IMPLEMENTATION, _sdpa_mask_unless_none)


def use_varlen_attention(model: torch.nn.Module) -> None:
    """Run `model` (a transformers causal LM, FSDP-wrapped or not) under VARLEN_IMPLEMENTATION from
    now on; a no-op when it already does. Refused (InputError) for models it cannot serve."""
    config = model.config
    if getattr(config, "_attn_implementation", None) == VARLEN_IMPLEMENTATION:
        return
    unsupported = varlen_unsupported(config)
    if unsupported:
        raise InputError(f"model.attention=varlen cannot serve this model: {unsupported}; set model.attention=dense")
    register_varlen_attention()
    model.set_attn_implementation(VARLEN_IMPLEMENTATION)
