"""Build a transformers causal LM on the meta device, and materialise it after sharding.

`build_model` makes the module tree without memory (meta device); `parallelize.apply_fsdp` shards
it; `materialize_model` then allocates only this rank's shards, initialises them (random init) and,
for `model.path`, reads this rank's slices straight from the safetensors files with DCP's
Hugging Face reader, so no rank ever holds the full model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mpo_dist.config import ModelConfig
from mpo_dist.distributed import has_process_group
from mpo_dist.errors import InputError, MissingInputError
from mpo_dist.logprobs import add_logprob_method

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def read_model_config(folder: str | Path, option: str, expected: str = "a Hugging Face model folder"):
    """The transformers config of a model folder (`option` names it in errors, e.g. model.path or
    --model); custom code an auto_map names is never run (trust_remote_code=False): refused in one line."""
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise MissingInputError(f"{option} {folder}: no config.json; expected {expected}")
    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as error:  # unreadable, or custom code
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{option} {folder}: cannot read its config.json ({first_line})") from error


def load_model_config(model: ModelConfig):
    from transformers import AutoConfig

    if model.path:
        return read_model_config(model.path, "model.path")
    kwargs = dict(model.config)
    model_type = kwargs.pop("model_type", None)
    if model_type is None:
        raise InputError("model.config needs model_type (e.g. llama, qwen2, gpt2) for a random-init model")
    return AutoConfig.for_model(model_type, **kwargs)


def build_model(model: ModelConfig) -> nn.Module:
    """The causal LM's module tree on the meta device (no parameter memory), in float32, with the
    log-prob method (`logprobs.add_logprob_method`) the trainer calls instead of forward."""
    return build_model_from_config(load_model_config(model), torch.float32)


def build_model_from_config(config, dtype: torch.dtype, device: torch.device | str = "meta") -> nn.Module:
    """`build_model` for a transformers config, with parameters in `dtype` (the inference tools keep
    them in the compute dtype: no float32 master copy); on the meta device (materialized later), or
    random-initialized on `device` from torch's generator."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention_implementation(config))
    lm.config.use_cache = False
    disable_dropout(lm)
    add_logprob_method(lm)
    return lm


def attention_implementation(config) -> str:
    """SDPA where the architecture computes its attention with it, else eager: Gemma 2 (and any model
    whose config soft-caps attention scores, `attn_logit_softcapping`) needs the soft-cap, which SDPA
    cannot apply. Eager runs the same masks (attention.py, logprobs.py), only slower."""
    from transformers import AutoModelForCausalLM

    model_class = AutoModelForCausalLM._model_mapping.get(type(config), None)
    if getattr(config, "attn_logit_softcapping", None) or not getattr(model_class, "_supports_sdpa", True):
        return "eager"
    return "sdpa"


def disable_dropout(lm: nn.Module) -> None:
    """No dropout in the policy (as TRL's DPOTrainer does by default): its log-probs are compared
    with reference log-probs computed without dropout, and at step 0 they must be equal."""
    for module in lm.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


@torch.no_grad()
def materialize_model(lm: nn.Module, model: ModelConfig, device: torch.device, seed: int,
                      cpu_offload: bool = False) -> None:
    """Allocate this rank's (sharded) parameters on `device` and fill them: random init, then
    the weights of `model.path` when given. Buffers (rotary frequencies) are recomputed.

    With `cpu_offload` (parallel.cpu_offload: FSDP2's CPUOffloadPolicy, which refuses shards that are
    not on the CPU) the parameters end in host memory and the buffers on `device`, where the forward
    runs. `model.path`'s slices are read straight into host memory; a random init is drawn on `device`
    and then moved, because DTensor's random ops give each shard its own part of the stream of an
    accelerator's generator only: drawn on the host, every rank would fill its shard with the same
    numbers, and the model would differ from the one the run without offload starts from."""
    host = torch.device("cpu")
    if not cpu_offload or device.type == host.type:
        materialize_weights(lm, model.path or None, device, seed)
        return
    if model.path:
        materialize_weights(lm, model.path, host, seed)
    else:
        materialize_weights(lm, None, device, seed)
        lm.to(host)  # FSDP2 takes the moved shards (and pins them) before its first forward
    for module in lm.modules():
        for name, buffer in module.named_buffers(recurse=False):
            setattr(module, name, buffer.to(device))


@torch.no_grad()
def materialize_weights(lm: nn.Module, path: str | Path | None, device: torch.device, seed: int = 0,
                        option: str = "model.path") -> None:
    """`materialize_model` for a weights folder (`option` names it in errors) or None (random init)."""
    lm.to_empty(device=device)
    torch.manual_seed(seed)
    lm.initialize_weights()  # also recomputes non-persistent buffers that to_empty left empty
    lm.tie_weights()
    if path:
        load_pretrained_weights(lm, path, option)


def load_pretrained_weights(lm: nn.Module, path: str | Path, option: str = "model.path") -> None:
    """Read each rank's slices of the safetensors weights into the (possibly sharded) model. Tensors the
    files store piece by piece (a mixture-of-experts layer's experts: hf_layout.py) are read piece by
    piece into their places in this rank's shard: only the experts this rank holds."""
    import torch.distributed.checkpoint as dcp
    from safetensors import safe_open
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    from mpo_dist.hf_layout import FileLayout

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise MissingInputError(f"{option} {path}: no *.safetensors weights (convert .bin weights to safetensors first)")
    stored: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            stored.update(handle.keys())
    # Some files name the base model's tensors without its prefix (GPT-2: "h.0..." for "transformer.h.0...").
    prefix = lm.base_model_prefix + "."

    def stored_as(key: str) -> str | None:
        return key if key in stored else key.removeprefix(prefix) if key.removeprefix(prefix) in stored else None

    tied = tied_parameter_names(lm)
    layout = FileLayout(lm)
    state, missing = {}, []
    for name, tensor in lm.state_dict().items():
        if name in tied:
            continue
        if stored_as(name) is not None:
            state[stored_as(name)] = tensor
            continue
        pieces = layout.pieces(name, tensor.shape)
        keys = [stored_as(piece.key) for piece in pieces]
        if None in keys:
            missing.append(name)
        elif len(pieces) == 1 and pieces[0].index == ():
            state[keys[0]] = tensor
        else:
            state.update(_pieces_of_local_shard(tensor, pieces, keys))
    if missing:
        unsupported = f"; its conversion mapping has transforms this loader cannot invert: {layout.describe_unsupported()}" \
            if layout.unsupported else ""
        raise InputError(f"{option} {path}: the safetensors files lack {len(missing)} of the model's tensors "
                         f"(e.g. {missing[:3]}); do they belong to the config.json beside them?{unsupported}")
    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=not has_process_group())


def _pieces_of_local_shard(tensor: torch.Tensor, pieces, keys: list[str]) -> dict[str, torch.Tensor]:
    """{file key: the view of this rank's part of `tensor` that the piece fills}, for the pieces (each an
    expert: hf_layout.FilePiece.index starts with it) that lie in this rank's shard of dim 0 (FSDP2's)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local, start = tensor, 0
    if isinstance(tensor, DTensor):
        local = tensor.to_local()
        shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
        if tuple(shape[1:]) != tuple(tensor.shape[1:]):
            raise NotImplementedError(f"a tensor stored piece by piece must be sharded on dim 0 only, got {tensor.placements}")
        start = offset[0]
    views = {}
    for piece, key in zip(pieces, keys):
        expert = piece.index[0]
        if start <= expert < start + local.shape[0]:
            views[key] = local[(expert - start, *piece.index[1:])]
    return views


def tied_parameter_names(lm: nn.Module) -> set[str]:
    """Names that share storage with another parameter (e.g. lm_head.weight tied to the embeddings):
    the file holds one copy, under the first name."""
    seen: dict[int, str] = {}
    tied = set()
    for name, parameter in lm.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            tied.add(name)
        else:
            seen[id(parameter)] = name
    return tied


def decoder_layers(lm: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks, wherever the architecture keeps them (Llama, Qwen2,
    Mistral: model.layers; GPT-2: transformer.h; GPT-NeoX: gpt_neox.layers; ...)."""
    no_split = set(getattr(lm, "_no_split_modules", None) or [])
    layers = [module for module in lm.modules() if type(module).__name__ in no_split]
    if not layers:
        for module in lm.modules():
            if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
                layers = list(module)
                break
    if not layers:
        raise TypeError(f"{type(lm).__name__}: cannot find its decoder layers to shard")
    return layers


def count_parameters(lm: nn.Module, exclude_embeddings: bool = False) -> int:
    """Parameters of `lm`; with `exclude_embeddings`, those whose matmuls cost FLOPs per token: the
    input embedding (a lookup) is left out unless it is tied to the output head, whose matmul runs."""
    total = sum(p.numel() for p in lm.parameters())
    if exclude_embeddings:
        embedding = lm.get_input_embeddings().weight
        head = lm.get_output_embeddings()
        if head is None or head.weight is not embedding:
            total -= embedding.numel()
    return total
