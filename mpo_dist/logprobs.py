"""Per-sequence sums of response-token log-probs from one forward of a causal LM, memory-lean.

The naive way, `log_softmax(model(x).logits)`, holds batch x length x vocab float32 values (8 x 1024
x 50257 x 4 bytes = 1.6 GB, twice over with its gradient). Here the decoder runs once, and the
output projection + log-softmax run over chunks of `chunk_tokens` positions, each under activation
checkpointing: a chunk's logits live only while that chunk is computed, in the forward and again in
the backward, so peak memory for logits is one chunk's, whatever the batch and length. When all the
logits of a forward are small (`KEEP_LOGITS_BYTES`: small vocabularies, short batches) they are kept
instead, which saves recomputing the head in the backward.

The contract with the model: the log-prob path calls the decoder and the head itself, not
`model.forward`, so a wrapper that hooks `forward` (FSDP gathers sharded parameters around it)
must hook it too. This module therefore gives the model one method, `model.token_logprobs`
(`add_logprob_method`, done by `model.build_model` and on first use of a plain model), and
everything goes through it; `parallelize.apply_fsdp` registers that method with FSDP like `forward`.

What the forward computes comes as a `data.layout.ModelInput`: rows padded (right or left; position
ids count real tokens only, so both sides give the same numbers, also for absolute-position models
like GPT-2) or packed (several documents per row, a pair's prompt shared by its two responses,
under a 4-D mask, or, with model.attention=varlen, under no mask: the attention pieces the batch
carries, `ModelInput.varlen`, go to every attention layer; with model.attention=flex, a block mask
built once per micro-batch; attention.py). The head runs only on the positions that predict a
response token.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from mpo_dist.attention import (PACKED_IMPLEMENTATION, PACKED_KWARG, layer_windows, mask_unsupported, no_mask,
                                packed_attention_of, use_packed_attention)
from mpo_dist.errors import InputError
from mpo_dist.flex import build_flex_mask

DEFAULT_CHUNK_TOKENS = 1024
# Float32 logits of a whole forward up to this size are kept for the backward (no recomputation of
# the head, a third of its cost); above it each chunk is recomputed, so memory stays one chunk's.
KEEP_LOGITS_BYTES = 128 * 2**20
LOGPROB_METHOD = "token_logprobs"  # the model method that wrappers must treat like forward


@dataclass
class SequenceLogprobs:
    logps: torch.Tensor  # [rows] float32: sum of log p(token) over each row's response tokens
    num_tokens: torch.Tensor  # [rows] int64: response tokens counted in each row


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over each row's real tokens (padding gets 0), for either padding side."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _decoder_and_head(model):
    """The transformer body and the output projection of a Hugging Face causal LM."""
    decoder = getattr(model, model.base_model_prefix, None)
    head = model.get_output_embeddings()
    if decoder is None or head is None:
        raise TypeError(f"{type(model).__name__}: cannot find its decoder ('{model.base_model_prefix}') and output embeddings")
    return decoder, head


def _final_logits_transform(model):
    """Architectures that rescale logits after the projection (Gemma 2/3 soft-capping, Cohere's
    scale, Granite's divisor), as their own forward does."""
    config = model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    divisor = getattr(config, "logits_scaling", None)

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if divisor:
            logits = logits / divisor
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return transform


def _chunk_token_logps(head, transform, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = transform(head(hidden)).float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def packed_attention_mask(segment_ids: torch.Tensor, branch_ids: torch.Tensor, implementation: str, dtype: torch.dtype,
                          position_ids: torch.Tensor | None = None, window: int | None = None):
    """The 4-D mask of packed rows (data/layout.py): query i sees key j when both are in the same
    document, j <= i, and j is the prompt or i's own response (not a sibling response); with a sliding
    `window`, also when i's position is less than `window` past j's (transformers' `q - kv < window`,
    counted in positions: a further response continues its prompt's positions, not the row's columns).

    Boolean (True: attend) for SDPA; additive (0 or the dtype's minimum) for eager attention."""
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    own_branch = (branch_ids[:, None, :] == 0) | (branch_ids[:, :, None] == branch_ids[:, None, :])
    column = torch.arange(segment_ids.shape[1], device=segment_ids.device)
    causal = column[:, None] >= column[None, :]
    allowed = same_segment & own_branch & causal
    if window is not None:
        allowed = allowed & (position_ids[:, :, None] - position_ids[:, None, :] < window)
    allowed = allowed[:, None]
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


def packed_attention_masks(model_config, batch, implementation: str, dtype: torch.dtype):
    """packed_attention_mask for every kind of layer of the model (attention.layer_windows): one mask when
    they all see the same keys (a window no shorter than the row changes nothing), else a mask per layer
    type, the mapping transformers' decoders with `layer_types` (Gemma 2/3, Qwen2/3) take as it is."""
    width = batch.input_ids.shape[1]
    windows = {kind: window if window is not None and window < width else None
               for kind, window in layer_windows(model_config).items()}
    masks = {window: packed_attention_mask(batch.segment_ids, batch.branch_ids, implementation, dtype,
                                           batch.position_ids, window) for window in set(windows.values())}
    if len(masks) == 1:
        return next(iter(masks.values()))
    return {kind: masks[window] for kind, window in windows.items()}


def padded_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The 4-D boolean mask of padded rows ([rows, width] real positions, either padding side): query i
    sees real keys j <= i. A padding query sees itself too, so no row of the mask is empty (SDPA would
    give NaN there, which the next layer would carry into real positions through zero weights)."""
    width = attention_mask.shape[1]
    column = torch.arange(width, device=attention_mask.device)
    causal = column[:, None] >= column[None, :]
    allowed = (causal & attention_mask[:, None, :].bool()) | (column[:, None] == column[None, :])
    return allowed[:, None]


def _attention_inputs(model, batch) -> dict:
    """The decoder's attention arguments (attention.py). On a model under the packed implementation
    (the trainer's, on every path) the masks come prepared, so transformers prepares none and the
    forward reads nothing back to the host: padded rows a 4-D mask (none when they hold no padding),
    packed rows the dense 4-D mask, or no mask and their pieces (batch.varlen: model.attention=varlen)
    or their block mask (built here, once per micro-batch: model.attention=flex). On another model,
    padded rows keep their 2-D mask, which transformers prepares."""
    implementation = getattr(model.config, "_attn_implementation", None) or "sdpa"
    device, rows = batch.input_ids.device, batch.input_ids.shape[0]
    if not batch.packed:
        if implementation != PACKED_IMPLEMENTATION:
            return dict(attention_mask=batch.attention_mask)
        if batch.num_real_positions == batch.num_positions:
            return dict(attention_mask=no_mask(rows, device))  # causal kernels, nothing to mask
        return dict(attention_mask=padded_attention_mask(batch.attention_mask))
    unsupported = mask_unsupported(model.config)
    if unsupported:  # the layouts give such a model padded rows (attention.packing_for); never run it packed
        raise InputError(f"packed rows cannot serve this model: {unsupported}, which their masks do not apply; "
                         "set data.packing=never")
    if batch.varlen is not None:
        if implementation != PACKED_IMPLEMENTATION:
            use_packed_attention(model, "varlen")
        return {"attention_mask": no_mask(rows, device), PACKED_KWARG: batch.varlen}
    if implementation == PACKED_IMPLEMENTATION and packed_attention_of(model) == "flex":
        return {"attention_mask": no_mask(rows, device), PACKED_KWARG: build_flex_mask(batch.segment_ids, batch.branch_ids)}
    if implementation not in ("sdpa", "eager", PACKED_IMPLEMENTATION):  # the latter: SDPA on a given mask
        raise InputError(f"data.packing needs the model's attention to be 'sdpa' or 'eager', not {implementation!r}")
    mask_kind = "eager" if implementation == "eager" else "sdpa"
    return dict(attention_mask=packed_attention_masks(model.config, batch, mask_kind, model.dtype))


def token_logprobs(model, batch, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """log p(batch.targets[k] | what precedes it) for every response token k of `batch` (a
    data.layout.ModelInput on the model's device): [targets] float32.

    The decoder runs over every position; the head and log-softmax only over the positions that
    predict a response token, in checkpointed chunks."""
    decoder, head = _decoder_and_head(model)
    transform = _final_logits_transform(model)
    hidden = decoder(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                     **_attention_inputs(model, batch)).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.predict_from)
    # Recompute each chunk's logits in the backward only when keeping them all would cost memory.
    recompute = hidden.shape[0] * head.weight.shape[0] * 4 > KEEP_LOGITS_BYTES
    pieces = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        chunk = slice(start, start + chunk_tokens)
        if recompute and torch.is_grad_enabled() and hidden.requires_grad:
            pieces.append(checkpoint(_chunk_token_logps, head, transform, hidden[chunk], batch.targets[chunk], use_reentrant=False))
        else:
            pieces.append(_chunk_token_logps(head, transform, hidden[chunk], batch.targets[chunk]))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def add_logprob_method(model) -> None:
    """Give `model` the method `model.token_logprobs(batch, chunk_tokens=DEFAULT_CHUNK_TOKENS)` (this
    module's `token_logprobs`, bound: `batch` a data.layout.ModelInput), the single entry of this
    module's forward; a no-op when it has it already."""
    if not hasattr(model, LOGPROB_METHOD):
        setattr(model, LOGPROB_METHOD, types.MethodType(token_logprobs, model))


def batch_logprobs(model, batch, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> SequenceLogprobs:
    """Per output sequence of `batch` (a data.layout.ModelInput, padded or packed, on the model's
    device): the sum of its response tokens' log-probs and their count."""
    add_logprob_method(model)
    token_logps = getattr(model, LOGPROB_METHOD)(batch, chunk_tokens)
    count = batch.num_sequences  # one slot more: head positions added to round their number up land there
    logps = token_logps.new_zeros(count + 1).index_add(0, batch.sequence_index, token_logps)[:count]
    return SequenceLogprobs(logps=logps, num_tokens=batch.tokens_per_sequence)  # counted by the layout, on the host


def sequence_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> SequenceLogprobs:
    """`batch_logprobs` for rows already padded: the sum of log-probs over the tokens marked by
    `response_mask` (prompt and padding excluded), one value per row."""
    return batch_logprobs(model, padded_rows_input(input_ids, attention_mask, response_mask), chunk_tokens)


def padded_rows_input(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor):
    """A data.layout.ModelInput for padded rows: one output sequence per row; response token t is
    predicted from position t - 1 (the first column predicts nothing)."""
    from mpo_dist.data.layout import ModelInput

    rows, width = input_ids.shape
    predicted = response_mask.clone()
    predicted[:, 0] = False
    flat = predicted.reshape(-1).nonzero().squeeze(-1)
    return ModelInput(
        input_ids=input_ids, position_ids=position_ids_for(attention_mask), attention_mask=attention_mask,
        segment_ids=None, branch_ids=None, predict_from=flat - 1, targets=input_ids.reshape(-1)[flat],
        sequence_index=flat // width, tokens_per_sequence=predicted.long().sum(-1), num_sequences=rows,
        num_tokens=int(attention_mask.sum()), num_real_positions=int(attention_mask.sum()),
    )
