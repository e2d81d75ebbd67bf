"""Attention over packed rows without a mask: the pieces of `torch.nn.attention.varlen.varlen_attn`.

Packed rows (data/layout.py) hold documents `[prompt][response 1][response 2]...`; a response sees
its prompt and itself, causally. Instead of a dense [rows, 1, width, width] mask (which rules out the
flash kernels and costs O(width^2) memory), the attention is cut into *pieces*, each an ordinary
attention of some queries over some keys, causal and aligned to the bottom-right of the key range
(query i of a piece with q queries and k keys sees keys j <= i + k - q), as flash attention's
`varlen_attn` (window_size=(-1, 0)) computes it:

- a prompt with its first response (the chosen of a pair, or a D_ref sample's only response) is one
  causal sequence: queries = keys = `[prompt][response 1]`;
- each further response (the rejected of a pair) has queries = its own tokens and keys =
  `[its prompt ; its own tokens]`: bottom-right alignment makes its first token see the whole prompt
  and itself, as if the prompt were right before it;
- padded (not packed) rows: each row's real tokens are one causal sequence.

Queries are the real (non-padding) positions in flat `row * width + column` order, which already
lists the pieces one after another, so `cu_seq_q` cuts that order; keys are gathered by one index
(`key_index`, the prompt copied once per further response), so ONE varlen call serves every piece.
Padding positions belong to no piece: their output is zero, and no real position attends to them
(nothing downstream reads a padding position's hidden state: the head reads `predict_from`, real
positions only).

Everything here is computed on the host from the layout's numpy-born tensors, before the batch moves
to the device (`VarlenDescriptors.to`), so the step needs no host sync for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mpo_dist.transfer import to_device

VARLEN_KERNEL_DTYPES = (torch.float16, torch.bfloat16)  # what torch's flash varlen_attn computes
ALIGNMENTS = ("bottom_right", "top_left")  # flash/varlen_attn's causal convention; SDPA's is_causal is top-left


@dataclass
class VarlenDescriptors:
    """Where each attention piece's queries and keys are, in the flat [rows * width] order."""

    query_index: torch.Tensor  # [total_q] int64: flat positions of the queries, piece after piece (real positions)
    key_index: torch.Tensor  # [total_k] int64: flat positions of the keys/values, piece after piece
    cu_seq_q: torch.Tensor  # [pieces + 1] int32: piece p's queries are query_index[cu_seq_q[p]:cu_seq_q[p + 1]]
    cu_seq_k: torch.Tensor  # [pieces + 1] int32: piece p's keys are key_index[cu_seq_k[p]:cu_seq_k[p + 1]]
    max_q: int  # the most queries of a piece
    max_k: int  # the most keys of a piece
    attended_pairs: int  # (query, key) pairs the pieces compute: flops.CostModel's attention term
    rows: int
    width: int
    host_cu_seq_q: tuple[int, ...]  # cu_seq_q and cu_seq_k as host ints: the CPU twin cuts pieces by
    host_cu_seq_k: tuple[int, ...]  # them without reading a device tensor back (no host sync)

    @property
    def num_pieces(self) -> int:
        return self.cu_seq_q.numel() - 1

    def to(self, device: torch.device) -> "VarlenDescriptors":
        """On `device`, in one non-blocking copy (transfer.py); the sizes stay host ints."""
        return to_device(self, device)

    @classmethod
    def of(cls, inputs) -> "VarlenDescriptors":
        """The pieces of a data.layout.ModelInput (packed or padded), from its host tensors."""
        real = inputs.attention_mask.cpu().numpy().astype(bool)
        rows, width = real.shape
        if inputs.segment_ids is None:  # padded rows: a row's real tokens are one causal sequence
            segment = np.broadcast_to(np.arange(rows, dtype=np.int64)[:, None], real.shape)
            branch = np.zeros(real.shape, np.int64)
        else:
            segment = inputs.segment_ids.cpu().numpy().astype(np.int64)
            branch = inputs.branch_ids.cpu().numpy().astype(np.int64)
        return cls._build(real.reshape(-1), segment.reshape(-1), branch.reshape(-1), rows, width)

    @classmethod
    def _build(cls, real: np.ndarray, segment: np.ndarray, branch: np.ndarray, rows: int, width: int):
        positions = np.flatnonzero(real)  # the queries, in flat order
        seg, br = segment[positions], branch[positions]
        row = positions // width
        first = np.ones(len(positions), bool)
        new_document = first.copy()
        new_document[1:] = (row[1:] != row[:-1]) | (seg[1:] != seg[:-1]) | (positions[1:] != positions[:-1] + 1)
        # A new piece at each document, and at each response after the first (branch >= 2).
        new_piece = new_document.copy()
        new_piece[1:] |= (br[1:] != br[:-1]) & (br[1:] >= 2)
        piece_starts = np.flatnonzero(new_piece)
        q_lengths = np.diff(np.append(piece_starts, len(positions)))

        # Each piece's document: its first flat position and its prompt length (branch-0 tokens lead a document).
        document_starts = np.flatnonzero(new_document)
        prompt_lengths = np.add.reduceat((br == 0).astype(np.int64), document_starts) if len(positions) else np.zeros(0, np.int64)
        document_of_piece = np.searchsorted(document_starts, piece_starts, side="right") - 1
        shared_prompt = np.where(br[piece_starts] >= 2, prompt_lengths[document_of_piece], 0)
        prompt_at = positions[document_starts[document_of_piece]]
        k_lengths = q_lengths + shared_prompt

        # key_index: per piece, [its prompt (further responses only) ; its own queries].
        pieces = len(piece_starts)
        key_parts = []
        for p in range(pieces):
            own = positions[piece_starts[p] : piece_starts[p] + q_lengths[p]]
            if shared_prompt[p]:
                key_parts.append(np.arange(prompt_at[p], prompt_at[p] + shared_prompt[p]))
            key_parts.append(own)
        key_index = np.concatenate(key_parts) if key_parts else np.zeros(0, np.int64)

        cu_seq_q, cu_seq_k = (np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32) for lengths in (q_lengths, k_lengths))
        return cls(
            query_index=torch.from_numpy(positions.astype(np.int64)),
            key_index=torch.from_numpy(key_index.astype(np.int64)),
            cu_seq_q=torch.from_numpy(cu_seq_q), cu_seq_k=torch.from_numpy(cu_seq_k),
            host_cu_seq_q=tuple(cu_seq_q.tolist()), host_cu_seq_k=tuple(cu_seq_k.tolist()),
            max_q=int(q_lengths.max(initial=0)), max_k=int(k_lengths.max(initial=0)),
            attended_pairs=count_attended_pairs(q_lengths, k_lengths), rows=rows, width=width,
        )


def count_attended_pairs(q_lengths: np.ndarray, k_lengths: np.ndarray) -> int:
    """(query, key) pairs of causal pieces aligned bottom-right: query i of a piece sees k - q + i + 1
    keys, so a piece holds q * k - q * (q - 1) / 2 (q (q + 1) / 2 when q = k)."""
    q, k = q_lengths.astype(np.int64), k_lengths.astype(np.int64)
    return int((q * k - q * (q - 1) // 2).sum())


def to_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, descriptors: VarlenDescriptors):
    """transformers' [rows, heads, width, head_dim] q/k/v -> varlen_attn's [total, heads, head_dim],
    queries at descriptors.query_index, keys and values at descriptors.key_index."""
    def flat(states: torch.Tensor) -> torch.Tensor:
        rows, heads, width, dim = states.shape
        return states.transpose(1, 2).reshape(rows * width, heads, dim)

    return (flat(query).index_select(0, descriptors.query_index), flat(key).index_select(0, descriptors.key_index),
            flat(value).index_select(0, descriptors.key_index))


def from_varlen(output: torch.Tensor, descriptors: VarlenDescriptors) -> torch.Tensor:
    """varlen_attn's [total_q, heads, head_dim] -> [rows, width, heads, head_dim] (transformers'
    sdpa_attention_forward layout), zero at padding positions."""
    flat = output.new_zeros(descriptors.rows * descriptors.width, *output.shape[1:])
    flat = flat.index_copy(0, descriptors.query_index, output)
    return flat.view(descriptors.rows, descriptors.width, *output.shape[1:])


def causal_piece_mask(q_length: int, k_length: int, alignment: str = "bottom_right", device=None) -> torch.Tensor:
    """[q_length, k_length] bool, True where query i sees key j: j <= i + (k_length - q_length)
    bottom-right (varlen_attn's causal), j <= i top-left (SDPA's is_causal)."""
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
    shift = k_length - q_length if alignment == "bottom_right" else 0
    i = torch.arange(q_length, device=device)[:, None]
    j = torch.arange(k_length, device=device)[None, :]
    return j <= i + shift


def varlen_attn_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_q: torch.Tensor | tuple,
                          cu_seq_k: torch.Tensor | tuple, scale: float | None = None, enable_gqa: bool = False,
                          alignment: str = "bottom_right") -> torch.Tensor:
    """The contract of varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
    window_size=(-1, 0), scale=scale, enable_gqa=enable_gqa) in plain PyTorch: [total_q, heads,
    head_dim] out, one causal SDPA per piece. `alignment="top_left"` exists so tests can show they
    tell the two conventions apart; the kernel's is bottom-right."""
    outputs = []
    # Host values: this is the CPU twin. Given as host ints (VarlenDescriptors.host_cu_seq_q/k), they
    # need no read-back from the device.
    bounds_q, bounds_k = (list(b) if isinstance(b, (tuple, list)) else b.tolist() for b in (cu_seq_q, cu_seq_k))
    for p in range(len(bounds_q) - 1):
        q = query[bounds_q[p] : bounds_q[p + 1]].transpose(0, 1)[None]  # [1, heads, q, dim]
        k = key[bounds_k[p] : bounds_k[p + 1]].transpose(0, 1)[None]
        v = value[bounds_k[p] : bounds_k[p + 1]].transpose(0, 1)[None]
        mask = causal_piece_mask(q.shape[2], k.shape[2], alignment, query.device)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                               enable_gqa=enable_gqa)
        outputs.append(out[0].transpose(0, 1))
    return torch.cat(outputs) if outputs else query.new_zeros(0, *query.shape[1:-1], value.shape[-1])


def varlen_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               descriptors: VarlenDescriptors, scale: float | None = None,
                               alignment: str = "bottom_right") -> torch.Tensor:
    """Attention of packed rows by pieces, on any device in plain PyTorch: q [rows, heads, width, dim],
    k/v [rows, kv_heads, width, dim] (kv_heads dividing heads: GQA) -> [rows, width, heads, dim],
    value's dtype, zero at padding; equal to SDPA under logprobs.packed_attention_mask at real positions."""
    q, k, v = to_varlen(query, key, value, descriptors)
    out = varlen_attn_reference(q, k, v, descriptors.host_cu_seq_q, descriptors.host_cu_seq_k, scale,
                                enable_gqa=key.shape[1] != query.shape[1], alignment=alignment)
    return from_varlen(out, descriptors)


def varlen_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, descriptors: VarlenDescriptors,
                     scale: float | None = None) -> torch.Tensor:
    """`varlen_attention_reference`'s contract with torch's flash varlen kernel on CUDA (fp16/bf16),
    the reference elsewhere. `descriptors` must be on the query's device."""
    if not query.is_cuda or query.dtype not in VARLEN_KERNEL_DTYPES:
        return varlen_attention_reference(query, key, value, descriptors, scale)
    from torch.nn.attention.varlen import varlen_attn

    q, k, v = to_varlen(query, key, value, descriptors)
    out = varlen_attn(q, k, v, descriptors.cu_seq_q, descriptors.cu_seq_k, descriptors.max_q, descriptors.max_k,
                      scale=scale, window_size=(-1, 0), enable_gqa=key.shape[1] != query.shape[1])
    return from_varlen(out, descriptors)
