"""Which attention packed rows run under (model.attention), and the packed paths as a transformers attention.

- dense: SDPA under the 4-D packed mask (logprobs.packed_attention_mask): O(width^2) mask memory per
  row and no flash kernels, but any architecture; the CPU default and the reference.
- varlen: the pieces of varlen.py (torch's flash `varlen_attn` on CUDA, its plain-PyTorch twin
  elsewhere): no mask at all. The data pipeline builds the pieces (`VarlenDescriptors`) on the host
  when it lays a batch out (data.layout.lay_out(varlen=True)) and they move with the batch.
- flex: FlexAttention under a block mask (flex.py), built from the batch's segment and branch ids
  once per micro-batch on the device; compiled on CUDA, forward only elsewhere.

The model runs the packed paths under ONE implementation, `PACKED_IMPLEMENTATION`, set once
(`use_packed_attention`, which also records the path on the model: `packed_attention_of`). The
log-prob path hands each micro-batch's pieces or block mask to every attention layer as the
`PACKED_KWARG` keyword, which transformers' decoders pass through (activation checkpointing and FSDP
included) to the attention function registered here; it runs whichever it is given. Without it
(padded rows, or packed rows laid out without pieces on a model left on the dense path) it is
transformers' SDPA with the mask it is given. Its mask function builds SDPA's mask, except that it
builds none when the decoder gets no mask (the packed paths' forward).
"""

from __future__ import annotations

import torch

from mpo_dist.errors import InputError
from mpo_dist.flex import FlexMask, flex_attention_packed
from mpo_dist.varlen import VARLEN_KERNEL_DTYPES, VarlenDescriptors, varlen_attention

ATTENTION_CHOICES = ("auto", "dense", "varlen", "flex")
PACKED_PATHS = ("varlen", "flex")
ATTENTION_PATHS = ("dense", *PACKED_PATHS)
PACKED_IMPLEMENTATION = "mpo_packed"
PACKED_KWARG = "packed_attention"  # a batch's VarlenDescriptors or FlexMask
_PATH_ATTRIBUTE = "mpo_packed_attention"  # on the model: the packed path use_packed_attention chose


def resolve_attention(choice: str, device: torch.device, model_config, training: bool = True,
                      dtype: torch.dtype = torch.bfloat16, switchable: bool = True) -> str:
    """The path packed rows run ("dense", "varlen" or "flex") for model.attention=`choice`: auto is
    varlen on CUDA in a dtype the flash kernel computes (bf16, fp16) when the model allows it, dense
    otherwise (in float32 varlen would run its plain-PyTorch twin, a loop over the pieces). An
    explicit varlen or flex is refused (InputError) for a model it cannot compute or whose class
    cannot switch attention function (`switchable`: attention_switchable), and flex for training on
    CPU (no backward there)."""
    if choice not in ATTENTION_CHOICES:
        raise InputError(f"model.attention must be one of {', '.join(ATTENTION_CHOICES)}, got {choice!r}")
    refusal = packed_path_refusal(model_config, switchable)
    if choice == "auto":
        kernel = device.type == "cuda" and dtype in VARLEN_KERNEL_DTYPES
        return "varlen" if kernel and refusal is None else "dense"
    if choice == "dense":
        return choice
    if refusal:
        raise refusal_error(choice, refusal)
    if choice == "flex" and training and device.type == "cpu":
        raise InputError("model.attention=flex cannot train on CPU: torch has no FlexAttention backward there "
                         "(forward only); set model.attention=varlen (its CPU twin trains) or model.attention=dense")
    return choice


def layer_windows(model_config) -> dict[str, int | None]:
    """The sliding window of each kind of attention layer a transformers config describes (None: the
    layer sees every earlier key): per `layer_types` entry where the config lists them (Gemma 2/3,
    Qwen2/3: "sliding_attention" layers slide by `sliding_window`, the others do not), else one entry,
    "all", for every layer (Mistral, Phi-3, Mixtral: `sliding_window` or None)."""
    window = getattr(model_config, "sliding_window", None) or None
    layer_types = getattr(model_config, "layer_types", None)
    if layer_types:
        return {kind: window if kind == "sliding_attention" else None for kind in dict.fromkeys(layer_types)}
    return {"all": window}


def has_sliding_window(model_config) -> bool:
    return any(window is not None for window in layer_windows(model_config).values())


def mask_unsupported(model_config) -> str | None:
    """What in a transformers config no mask this project builds computes (None: nothing): chunked
    attention and Gemma 3's bidirectional attention, which transformers' own mask functions apply to
    padded rows' 2-D masks and packed rows' masks do not. Sliding windows the packed mask applies
    (logprobs.packed_attention_masks), by position, per kind of layer."""
    layer_types = getattr(model_config, "layer_types", None) or ()
    chunk = getattr(model_config, "attention_chunk_size", None)
    if chunk or "chunked_attention" in layer_types:
        return f"chunked attention (attention_chunk_size={chunk})"
    if getattr(model_config, "use_bidirectional_attention", False):
        return "bidirectional attention (use_bidirectional_attention=True)"
    return None


def packing_for(packing: str, model_config, option: str = "data.packing") -> str:
    """`packing` (auto, always, never: data.packing or a tool's --packing) for this model: padded rows
    ("never") under auto when packed rows' masks cannot serve it (mask_unsupported); refused
    (InputError) when always."""
    unsupported = mask_unsupported(model_config)
    if unsupported is None or packing == "never":
        return packing
    if packing == "always":
        raise InputError(f"{option}=always cannot serve this model: {unsupported}, which packed rows' attention "
                         f"masks do not apply; set {option}=never (or auto, which lays such a model's rows out padded)")
    return "never"


def packed_unsupported(model_config) -> str | None:
    """What in a transformers config the packed paths (varlen, flex) cannot compute (None: nothing):
    what no prepared mask computes (mask_unsupported), sliding windows (their pieces and block masks
    carry none) and soft-capped attention scores (torch's varlen kernel has no soft-cap)."""
    unsupported = mask_unsupported(model_config)
    if unsupported:
        return unsupported
    if has_sliding_window(model_config):
        return f"sliding-window attention (sliding_window={model_config.sliding_window})"
    softcap = getattr(model_config, "attn_logit_softcapping", None)
    if softcap:
        return f"soft-capped attention scores (attn_logit_softcapping={softcap})"
    return None


def packed_path_refusal(model_config, switchable: bool) -> str | None:
    """Why the varlen and flex paths cannot serve a model (None: they can): what they cannot compute
    (packed_unsupported), or a class outside transformers' attention interface (attention_switchable)."""
    unsupported = packed_unsupported(model_config)
    if unsupported is None and not switchable:
        return "its class does not take a registered attention function (transformers' attention interface)"
    return unsupported


def refusal_error(path: str, refusal: str) -> InputError:
    return InputError(f"model.attention={path} cannot serve this model: {refusal}; set model.attention=dense")


def packed_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention contract (q [rows, heads, width, dim], k/v [rows, kv_heads, width, dim]
    -> [rows, width, heads, dim]): the pieces or the block mask of kwargs[PACKED_KWARG], else SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    packed = kwargs.pop(PACKED_KWARG, None)
    if attention_mask is not None and attention_mask.numel() == 0:  # no_mask(): causal, nothing masked
        attention_mask = None
    if packed is None:
        # Never silently dropped: SDPA has no soft-cap (such a model keeps eager attention: model.py), and
        # a sliding window must be in the mask (a model with one keeps transformers' masks: use_packed_attention).
        if kwargs.get("softcap") is not None or (kwargs.get("sliding_window") is not None and attention_mask is None):
            raise ValueError(f"{type(module).__name__}: softcap={kwargs.get('softcap')}, sliding_window="
                             f"{kwargs.get('sliding_window')} reached the SDPA path without a mask that applies them")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if not isinstance(packed, (VarlenDescriptors, FlexMask)):
        raise TypeError(f"{PACKED_KWARG} must be VarlenDescriptors or a FlexMask, got {type(packed).__name__}")
    path = "varlen" if isinstance(packed, VarlenDescriptors) else "flex"
    if dropout > 0:
        raise InputError(f"model.attention={path} does not apply attention dropout (here {dropout}); set "
                         "model.attention=dense or train without attention dropout")
    for name in ("sliding_window", "softcap"):  # refused up front (resolve_attention); a layer may still ask at run time
        if kwargs.get(name) is not None:
            raise InputError(f"model.attention={path} cannot serve {name}={kwargs[name]} in "
                             f"{type(module).__name__}; set model.attention=dense")
    if path == "varlen":
        return _varlen_outside_compile(query, key, value, packed, scaling), None
    return flex_attention_packed(query, key, value, packed, scale=scaling), None


@torch.compiler.disable
def _varlen_outside_compile(query, key, value, descriptors: VarlenDescriptors, scale: float | None) -> torch.Tensor:
    """varlen_attention, run eagerly inside compiled layers (parallel.compile): the pieces' sizes are
    host ints that change with every micro-batch, and a compiled graph would specialise on each and
    recompile; the flash kernel is one fused call either way."""
    return varlen_attention(query, key, value, descriptors, scale=scale)


def no_mask(rows: int, device: torch.device) -> torch.Tensor:
    """The mask of a forward that needs none (the packed paths; padded rows without padding): a 4-D
    tensor of no elements. transformers hands a 4-D mask to the attention as it is, so it prepares
    none: given None with position ids, it would look for packed sequences in them, and given a 2-D
    mask it would check it for padding, each a host sync. packed_attention_forward reads it as None
    (SDPA's causal kernels); any other implementation fails on its shape, never silently."""
    return torch.empty(rows, 1, 0, 0, dtype=torch.bool, device=device)


def register_packed_attention() -> None:
    """Register the attention and mask functions under PACKED_IMPLEMENTATION (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(PACKED_IMPLEMENTATION, packed_attention_forward)
    # SDPA's own mask function, for callers that pass 2-D masks (the log-prob path passes 4-D ones,
    # which transformers hands through without calling it).
    AttentionMaskInterface.register(PACKED_IMPLEMENTATION, sdpa_mask)


def attention_switchable(model: torch.nn.Module) -> bool:
    """Whether `model`'s class takes a registered attention function (transformers' attention
    interface); older architectures (GPT-Neo, Bloom, Falcon) keep their own attention code."""
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    return bool(can_set()) if can_set is not None else False


def use_packed_attention(model: torch.nn.Module, path: str) -> None:
    """Run `model` (a transformers causal LM, FSDP-wrapped or not) under PACKED_IMPLEMENTATION from
    now on, its packed rows by `path` ("dense", "varlen" or "flex"; packed_attention_of). On the dense
    path an SDPA model switches too, so that the log-prob path hands it prepared masks (no host sync:
    no_mask), unless it needs padded rows' masks only transformers builds (mask_unsupported, a sliding
    window) or cannot switch; a model on another implementation (eager: soft-capped attention) keeps it. Refused (InputError) for
    models the varlen and flex paths cannot serve."""
    if path not in ATTENTION_PATHS:
        raise ValueError(f"path must be one of {ATTENTION_PATHS}, got {path!r}")
    config = model.config
    current = getattr(config, "_attn_implementation", None)
    if path == "dense" and (current not in (None, "sdpa", PACKED_IMPLEMENTATION) or mask_unsupported(config)
                            or has_sliding_window(config) or not attention_switchable(model)):
        return
    if current != PACKED_IMPLEMENTATION:
        refusal = packed_path_refusal(config, attention_switchable(model)) if path != "dense" else None
        if refusal:
            raise refusal_error(path, refusal)
        register_packed_attention()
        model.set_attn_implementation(PACKED_IMPLEMENTATION)
        if getattr(config, "_attn_implementation", None) != PACKED_IMPLEMENTATION:  # transformers only warns
            raise InputError(f"model.attention={path}: {type(model).__name__} did not take the attention function "
                             f"{PACKED_IMPLEMENTATION!r}; set model.attention=dense")
    setattr(model, _PATH_ATTRIBUTE, path)


def packed_attention_of(model: torch.nn.Module) -> str:
    """The path `model`'s packed rows run: what use_packed_attention set, else "dense"."""
    return getattr(model, _PATH_ATTRIBUTE, "dense")
