"""Per-sequence sums of response-token log-probs from one forward of a causal LM, memory-lean.

The naive way, `log_softmax(model(x).logits)`, holds batch x length x vocab float32 values (8 x 1024
x 50257 x 4 bytes = 1.6 GB, twice over with its gradient). Here the decoder runs once, and the
output projection + log-softmax run over chunks of `chunk_tokens` positions, each under activation
checkpointing: a chunk's logits live only while that chunk is computed, in the forward and again in
the backward, so peak memory for logits is one chunk's, whatever the batch and length.

The contract with the model: the log-prob path calls the decoder and the head itself, not
`model.forward`, so a wrapper that hooks `forward` (FSDP gathers sharded parameters around it)
must hook it too. This module therefore gives the model one method, `model.token_logprobs`
(`add_logprob_method`, done by `model.build_model` and on first use of a plain model), and
everything goes through it; `parallelize.apply_fsdp` registers that method with FSDP like `forward`.

Rows may be right- or left-padded (as the collator makes them): position ids count real tokens
only, so both give the same numbers, also for absolute-position models like GPT-2.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_TOKENS = 1024
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


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """log p(input_ids[:, t] | input_ids[:, :t]) for t >= 1, flattened: [rows * (length - 1)], float32.

    Flat rather than a [rows, length - 1] view: a view returned through FSDP's forward hooks could
    lose its backward hook to an in-place op; the caller reshapes."""
    decoder, head = _decoder_and_head(model)
    transform = _final_logits_transform(model)
    hidden = decoder(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_for(attention_mask), use_cache=False
    ).last_hidden_state
    rows, length = input_ids.shape
    hidden = hidden[:, :-1].reshape(rows * (length - 1), -1)
    targets = input_ids[:, 1:].reshape(-1)
    pieces = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        chunk = slice(start, start + chunk_tokens)
        if torch.is_grad_enabled() and hidden.requires_grad:
            pieces.append(checkpoint(_chunk_token_logps, head, transform, hidden[chunk], targets[chunk], use_reentrant=False))
        else:
            pieces.append(_chunk_token_logps(head, transform, hidden[chunk], targets[chunk]))
    return torch.cat(pieces)


def add_logprob_method(model) -> None:
    """Give `model` the method `model.token_logprobs(input_ids, attention_mask, chunk_tokens)`,
    the single entry of this module's forward; a no-op when it has it already."""
    if not hasattr(model, LOGPROB_METHOD):
        setattr(model, LOGPROB_METHOD, types.MethodType(token_logprobs, model))


def sequence_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> SequenceLogprobs:
    """Sum of log-probs over the tokens marked by `response_mask` (prompt and padding excluded).

    A batch may stack chosen, rejected and D_ref rows: one forward serves them all.
    """
    mask = response_mask[:, 1:]  # the first token has no prediction; a response never starts there
    add_logprob_method(model)
    token_logps = getattr(model, LOGPROB_METHOD)(input_ids, attention_mask, chunk_tokens).view(mask.shape)
    return SequenceLogprobs(
        logps=torch.where(mask, token_logps, 0.0).sum(-1),
        num_tokens=mask.sum(-1),
    )
