"""Attention over packed rows by FlexAttention (model.attention=flex): a block mask instead of a dense one.

`torch.nn.attention.flex_attention` takes the attention pattern as a `mask_mod(b, h, q_idx, kv_idx)`
and compiles it into a *block mask*: which 128 x 128 tiles of the [width, width] scores hold any
allowed pair. Tiles with none are skipped, so a packed row costs about what its documents cost
alone, and no [rows, 1, width, width] mask lives through the forward.

The mask of packed rows (data/layout.py) is logprobs.packed_attention_mask's at every real query:
query q sees key kv when both are in the same document, kv <= q, and kv is the prompt (branch 0) or
q's own response. Padding keys are seen by no query. A padding query (PAD_SEGMENT) therefore sees
nothing: FlexAttention returns zeros there (never NaN, so nothing can leak into a later layer's real
positions), where the dense path lets padding attend to padding; nothing reads a padding position's
hidden state either way (the head reads `predict_from`, real positions only).

The block mask is built once per micro-batch on the batch's device (`build_flex_mask`) and every
layer reuses it. On CUDA the kernel is `torch.compile(flex_attention, dynamic=False)`, which compiles
once per shape, so there the rows and the width are bucketed (`flex_shape`: rows by
data.layout.shape_bucket, the width by shape_bucket and then to whole 128-position blocks) and q/k/v
zero-padded to that shape; the padding's tiles hold no allowed pair, so the kernel skips them and
only the copies cost. Elsewhere flex_attention runs eagerly at the layout's shape (an unfused
implementation, forward only: torch 2.13 has no FlexAttention backward on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from mpo_dist.data.layout import PAD_SEGMENT, round_up, shape_bucket

FLEX_BLOCK = 128  # the block mask's tile (torch's default sparse block size)
_compiled_flex_attention = None  # torch.compile(flex_attention), made on first use on CUDA


@dataclass
class FlexMask:
    """The block mask of one micro-batch's packed rows, and the layout's shape it serves."""

    block_mask: BlockMask  # over flex_shape(rows, width): [flex_rows, 1, flex_width, flex_width]
    rows: int
    width: int

    @property
    def flex_rows(self) -> int:
        return self.block_mask.shape[0]

    @property
    def flex_width(self) -> int:
        return self.block_mask.shape[-1]


def packed_mask_mod(segment_ids: torch.Tensor, branch_ids: torch.Tensor):
    """FlexAttention's mask function of packed rows with these [rows, width] segment and branch ids
    (see the module docstring); q_idx and kv_idx must be in range of the ids' width."""

    def mask_mod(b, h, q_idx, kv_idx):
        segment, branch = segment_ids[b, kv_idx], branch_ids[b, kv_idx]
        same_document = (segment == segment_ids[b, q_idx]) & (segment != PAD_SEGMENT)
        prompt_or_own = (branch == 0) | (branch == branch_ids[b, q_idx])
        return same_document & prompt_or_own & (kv_idx <= q_idx)

    return mask_mod


def flex_shape(rows: int, width: int, bucket: bool) -> tuple[int, int]:
    """The [rows, width] the kernel runs at: the layout's, or (bucket) a few sizes, so a compiled
    kernel serves many micro-batches; the width always whole blocks when bucketed."""
    if not bucket:
        return rows, width
    return shape_bucket(rows), round_up(shape_bucket(width), FLEX_BLOCK)


def build_flex_mask(segment_ids: torch.Tensor, branch_ids: torch.Tensor, bucket: bool | None = None) -> FlexMask:
    """The FlexMask of packed rows (ModelInput.segment_ids / branch_ids, on the device the model runs
    on). `bucket`: run at a bucketed shape (flex_shape); by default on CUDA, where the kernel is compiled."""
    rows, width = segment_ids.shape
    bucket = segment_ids.is_cuda if bucket is None else bucket
    flex_rows, flex_width = flex_shape(rows, width, bucket)
    # The ids cover whole blocks: a kernel may evaluate the mask function over a whole tile past the width.
    id_width = round_up(flex_width, FLEX_BLOCK)
    pad = (0, id_width - width, 0, flex_rows - rows)
    segment = F.pad(segment_ids, pad, value=PAD_SEGMENT)
    branch = F.pad(branch_ids, pad, value=0)
    block_mask = create_block_mask(packed_mask_mod(segment, branch), flex_rows, None, flex_width, flex_width,
                                   device=segment_ids.device, BLOCK_SIZE=FLEX_BLOCK)
    return FlexMask(block_mask=block_mask, rows=rows, width=width)


def _flex_attention_kernel(query: torch.Tensor):
    """Compiled flex_attention on CUDA (once per process), the eager one elsewhere or when already
    inside a compiled region."""
    global _compiled_flex_attention
    if not query.is_cuda or torch.compiler.is_compiling():
        return flex_attention
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention


def flex_attention_packed(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: FlexMask,
                          scale: float | None = None) -> torch.Tensor:
    """Attention of packed rows under `mask`: q [rows, heads, width, dim], k/v [rows, kv_heads, width,
    dim] (kv_heads dividing heads: GQA) -> [rows, width, heads, dim] (transformers' attention output),
    zero at padding; equal to SDPA under logprobs.packed_attention_mask at real positions."""
    rows, width = query.shape[0], query.shape[2]
    if (rows, width) != (mask.rows, mask.width):
        raise ValueError(f"the flex mask was built for {mask.rows} x {mask.width} positions, the attention has {rows} x {width}")
    pad = (0, 0, 0, mask.flex_width - width, 0, 0, 0, mask.flex_rows - rows)
    if any(pad):  # zeros: the padding's keys are masked, its queries see nothing
        query, key, value = (F.pad(states, pad) for states in (query, key, value))
    out = _flex_attention_kernel(query)(query, key, value, block_mask=mask.block_mask, scale=scale,
                                        enable_gqa=key.shape[1] != query.shape[1])
    return out[:rows, :, :width].transpose(1, 2)
