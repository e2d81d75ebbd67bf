"""How the sequences of one forward are laid out in rows: padded, or packed with a shared prompt.

The unit is a `Document`: a prompt and the responses that continue it (a preference pair is a
prompt with two responses, chosen and rejected; a D_ref sample is a prompt with one). Each response
is an output sequence with its own index; the forward returns log p(response | prompt) per index.

- **padded**: one row per (prompt, response), padded to the longest row (right or left); the
  prompt of a pair is computed twice. The model gets a 2-D padding mask.
- **packed**: one segment per document, `[prompt][response 1][response 2]...`; a response attends
  to its prompt and to itself, not to the other responses, and its positions continue from the
  prompt, so every response sees exactly what it sees alone. Documents are packed into rows
  (first-fit decreasing, up to `pack_tokens` positions, by default the longest document), rows
  padded only to the longest row. The model gets a 4-D mask built from per-position segment and
  branch ids (`logprobs.packed_attention_mask`).

Either way the log-prob of response token t is read from the hidden state of the position that
predicts it (`predict_from`: the previous response token, or the prompt's last token for the
first), so the output head runs on response tokens only, and both layouts give the same numbers.

With `bucket_shapes` (data.bucket_shapes) the width, the packed row count and the number of head
positions are rounded up to a few sizes (`shape_bucket`, at most 25% more): a run then meets few
distinct tensor shapes. This matters on CPU in bf16, where the matmul kernels keep memory for every
shape they meet (tools/bench_bf16_shape_memory.py; figures in docs/performance.md), and for compiled
layers, which recompile per shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import numpy as np
import torch

from mpo_dist.errors import InputError
from mpo_dist.transfer import to_device
from mpo_dist.varlen import VarlenDescriptors

PAD_SEGMENT = -1  # the segment id of padding positions (each attends only to padding before it)


@dataclass
class Document:
    prompt: np.ndarray
    responses: list[tuple[int, np.ndarray]]  # (output sequence index, response token ids)

    @property
    def length(self) -> int:
        return len(self.prompt) + sum(len(response) for _, response in self.responses)


@dataclass
class ModelInput:
    """One forward's rows and where each output sequence's response tokens are."""

    input_ids: torch.Tensor  # [rows, width] int64
    position_ids: torch.Tensor  # [rows, width] int64
    attention_mask: torch.Tensor  # [rows, width] bool: real (non-padding) positions
    segment_ids: torch.Tensor | None  # packed: [rows, width] int32 document per position (PAD_SEGMENT for padding)
    branch_ids: torch.Tensor | None  # packed: [rows, width] int32: 0 for a prompt, k for its k-th response
    predict_from: torch.Tensor  # [targets] int64: flat index (row * width + column) of the predicting position
    targets: torch.Tensor  # [targets] int64: the response token predicted there
    sequence_index: torch.Tensor  # [targets] int64: the output sequence the token belongs to (num_sequences: none,
    #                                a head position added to round the count up, whose value is discarded)
    tokens_per_sequence: torch.Tensor  # [num_sequences] int64: response tokens the head predicts per output sequence
    #                                    (counted on the host, so the step needs no bincount on the device)
    num_sequences: int
    num_tokens: int  # tokens of the sequences as data: prompt + response per output sequence
    num_real_positions: int  # non-padding positions the model computes (prompts shared once when packed)
    varlen: VarlenDescriptors | None = None  # packed rows for model.attention=varlen: their attention pieces

    @property
    def packed(self) -> bool:
        return self.segment_ids is not None

    @property
    def num_positions(self) -> int:
        """Positions the model computes, padding included."""
        return self.input_ids.numel()

    @property
    def dense_attention(self) -> bool:
        """Whether the attention runs under a mask over the full width (packed rows, or padded rows
        with padding); without one, causal kernels skip the upper triangle (flops.CostModel)."""
        return self.packed or self.num_real_positions < self.num_positions

    def to(self, device: torch.device) -> "ModelInput":
        """On `device`, its tensors (the varlen pieces' included) in one non-blocking copy (transfer.py)."""
        return to_device(self, device)


def _targets(starts: list[tuple[int, int, int, int, int]], width: int):
    """Flat predictor index, target column and sequence of every response token that has a predictor.

    `starts` holds, per response: (row, column of its first token, length, column that predicts its
    first token (-1: none), sequence index)."""
    predict_from, target_at, sequence = [], [], []
    for row, start, length, first_predictor, index in starts:
        columns = np.arange(start, start + length)
        predictors = columns - 1
        predictors[0] = first_predictor
        keep = predictors >= 0  # a response at the very start of a row has no prediction for its first token
        predict_from.append(row * width + predictors[keep])
        target_at.append(row * width + columns[keep])
        sequence.append(np.full(int(keep.sum()), index))
    join = (lambda parts: np.concatenate(parts).astype(np.int64)) if starts else (lambda parts: np.zeros(0, np.int64))
    return join(predict_from), join(target_at), join(sequence)


def shape_bucket(size: int) -> int:
    """`size` rounded up to one of a few sizes: exact up to 16, then steps of a quarter octave (17 -> 20,
    100 -> 112, 1000 -> 1024), so at most 25% more, and a run meets few distinct sizes."""
    if size <= 16:
        return max(size, 1)
    step = 1 << (size.bit_length() - 3)  # 1/4 of the power of two below size
    return round_up(size, step)


def _finish(input_ids, position_ids, attention_mask, segment_ids, branch_ids, starts, num_sequences, num_tokens,
            bucket_shapes: bool = False):
    width = input_ids.shape[1]
    predict_from, target_at, sequence = _targets(starts, width)
    if bucket_shapes:  # extra head positions: position 0 predicting its own token, summed into a discarded slot
        extra = shape_bucket(len(predict_from)) - len(predict_from)
        predict_from = np.concatenate([predict_from, np.zeros(extra, np.int64)])
        target_at = np.concatenate([target_at, np.zeros(extra, np.int64)])
        sequence = np.concatenate([sequence, np.full(extra, num_sequences, np.int64)])
    tokens_per_sequence = np.bincount(sequence, minlength=num_sequences + 1)[:num_sequences].astype(np.int64)
    return ModelInput(
        input_ids=torch.from_numpy(input_ids), position_ids=torch.from_numpy(position_ids),
        attention_mask=torch.from_numpy(attention_mask),
        segment_ids=None if segment_ids is None else torch.from_numpy(segment_ids),
        branch_ids=None if branch_ids is None else torch.from_numpy(branch_ids),
        predict_from=torch.from_numpy(predict_from), targets=torch.from_numpy(input_ids.reshape(-1)[target_at]),
        sequence_index=torch.from_numpy(sequence),
        tokens_per_sequence=torch.from_numpy(tokens_per_sequence),
        num_sequences=num_sequences, num_tokens=num_tokens,
        num_real_positions=int(attention_mask.sum()),
    )


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _sequences(documents: Sequence[Document]) -> tuple[int, int]:
    """(number of output sequences, their tokens as data); indices must be 0..n-1, each once."""
    indices = sorted(index for document in documents for index, _ in document.responses)
    if indices != list(range(len(indices))):
        raise ValueError(f"output sequence indices must be 0..{len(indices) - 1}, each once; got {indices}")
    tokens = sum(len(document.prompt) + len(response) for document in documents for _, response in document.responses)
    return len(indices), tokens


def pad_rows(prompts: Sequence[np.ndarray], responses: Sequence[np.ndarray], pad_token_id: int,
             padding_side: str = "right", pad_to_multiple_of: int = 1, min_width: int = 0
             ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """`prompt_i + response_i` rows padded to a common length: token ids, real-token mask, and the
    column where each response starts."""
    if padding_side not in ("right", "left"):
        raise InputError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max(round_up(max(lengths, default=1), pad_to_multiple_of), min_width)
    input_ids = np.full((len(lengths), width), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(lengths), width), dtype=bool)
    response_starts = []
    for row, (prompt, response, length) in enumerate(zip(prompts, responses, lengths)):
        start = 0 if padding_side == "right" else width - length
        input_ids[row, start : start + len(prompt)] = prompt
        input_ids[row, start + len(prompt) : start + length] = response
        attention_mask[row, start : start + length] = True
        response_starts.append(start + len(prompt))
    return input_ids, attention_mask, response_starts


def pad_documents(documents: Sequence[Document], pad_token_id: int, padding_side: str = "right",
                  pad_to_multiple_of: int = 1, bucket_shapes: bool = False) -> ModelInput:
    """One row per output sequence, in sequence order, padded to the longest (see the module docstring);
    with `bucket_shapes` the width and the head's positions are rounded up by `shape_bucket`."""
    num_sequences, num_tokens = _sequences(documents)
    rows: list[tuple[np.ndarray, np.ndarray]] = [None] * num_sequences  # type: ignore[list-item]
    for document in documents:
        for index, response in document.responses:
            rows[index] = (document.prompt, response)
    prompts, responses = [p for p, _ in rows], [r for _, r in rows]
    longest = max((len(p) + len(r) for p, r in rows), default=1)
    min_width = round_up(shape_bucket(longest), pad_to_multiple_of) if bucket_shapes else 0
    input_ids, attention_mask, response_starts = pad_rows(prompts, responses, pad_token_id, padding_side,
                                                          pad_to_multiple_of, min_width)
    starts = [(row, first, len(response), first - 1 if len(prompt) else -1, row)
              for row, (prompt, response, first) in enumerate(zip(prompts, responses, response_starts))]
    position_ids = (attention_mask.cumsum(-1) - 1).clip(min=0).astype(np.int64)  # 0, 1, ... over real tokens
    return _finish(input_ids, position_ids, attention_mask, None, None, starts, num_sequences, num_tokens, bucket_shapes)


def _first_fit_decreasing(lengths: list[int], capacity: int) -> tuple[list[list[int]], list[int]]:
    """Documents (by index) into rows of at most `capacity` positions, longest first, each into the
    first row it fits (a longer document gets a row of its own); ties keep input order."""
    rows: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for row, filled in enumerate(used):
            if filled + lengths[i] <= capacity:
                rows[row].append(i)
                used[row] += lengths[i]
                break
        else:
            rows.append([i])
            used.append(lengths[i])
    return rows, used


def _row_lengths_to_try(lengths: list[int]) -> list[int]:
    """Row lengths worth trying: the longest document, the longest plus one other document (a few
    lengths across the range), and 1.5 to 4 times the longest; none beyond all documents in one row."""
    longest, total = max(lengths), sum(lengths)
    others = sorted(set(lengths))
    picks = others[:: max(1, len(others) // 8)] + others[-1:]
    candidates = {longest, *(longest + other for other in picks), *(int(longest * f) for f in (1.5, 2, 3, 4))}
    return sorted(c for c in candidates if c <= total) or [longest]


def pack_documents(documents: Sequence[Document], pad_token_id: int, pack_tokens: int = 0,
                   pad_to_multiple_of: int = 1, row_cost: Callable[[int, int], float] | None = None,
                   bucket_shapes: bool = False) -> ModelInput:
    """Documents packed into rows of at most `pack_tokens` positions, first-fit decreasing.

    `pack_tokens=0` chooses the row length: the longest document's, or, given `row_cost(rows, width)`
    (the FLOPs of a forward over rows x width positions: the attention part grows with the width),
    the row length that costs least among a few (`_row_lengths_to_try`); e.g. a pair of 320 tokens
    and a D_ref sample of 192 then share a row of 512 instead of taking two rows of 320."""
    num_sequences, num_tokens = _sequences(documents)
    lengths = [document.length for document in documents]
    longest = max(lengths, default=1)
    capacities = [pack_tokens] if pack_tokens else [longest]
    if not pack_tokens and row_cost is not None and lengths:
        capacities = _row_lengths_to_try(lengths)

    placements = [_first_fit_decreasing(lengths, capacity) for capacity in capacities]

    def cost(placement: tuple[list[list[int]], list[int]]) -> float:
        rows, used = placement
        return row_cost(len(rows), round_up(max(used, default=1), pad_to_multiple_of)) if row_cost else 0.0

    rows, used = min(placements, key=cost)  # the first of equal costs: the shortest row length
    width = round_up(max(used, default=1), pad_to_multiple_of)
    count = max(len(rows), 1)
    if bucket_shapes:  # rows of padding only (each padding position attends to itself and earlier padding)
        width, count = round_up(shape_bucket(width), pad_to_multiple_of), shape_bucket(count)
    input_ids = np.full((count, width), pad_token_id, dtype=np.int64)
    position_ids = np.zeros((count, width), dtype=np.int64)
    attention_mask = np.zeros((count, width), dtype=bool)
    segment_ids = np.full((count, width), PAD_SEGMENT, dtype=np.int32)
    branch_ids = np.zeros((count, width), dtype=np.int32)
    starts = []
    for row, members in enumerate(rows):
        column = 0
        for segment, i in enumerate(members):
            document = documents[i]
            prompt_length = len(document.prompt)
            input_ids[row, column : column + prompt_length] = document.prompt
            position_ids[row, column : column + prompt_length] = np.arange(prompt_length)
            segment_ids[row, column : column + document.length] = segment
            last_prompt = column + prompt_length - 1 if prompt_length else -1
            column += prompt_length
            for branch, (index, response) in enumerate(document.responses, start=1):
                span = slice(column, column + len(response))
                input_ids[row, span] = response
                position_ids[row, span] = np.arange(prompt_length, prompt_length + len(response))
                branch_ids[row, span] = branch
                starts.append((row, column, len(response), last_prompt, index))
                column += len(response)
        attention_mask[row, :column] = True
    return _finish(input_ids, position_ids, attention_mask, segment_ids, branch_ids, starts, num_sequences, num_tokens,
                   bucket_shapes)


PACKING_CHOICES = ("auto", "always", "never")


def lay_out(documents: Sequence[Document], *, packing: str, pad_token_id: int,
            cost: Callable[[int, int, bool], float], padding_side: str = "right", pad_to_multiple_of: int = 1,
            pack_tokens: int = 0, bucket_shapes: bool = False, varlen: bool = False) -> ModelInput:
    """The model input for `documents`: packed ("always"), padded ("never"), or ("auto") whichever
    `cost(rows, width, dense_attention, attended_pairs=None)` says is cheaper for these documents
    (flops.CostModel.layout_cost; it also picks the packed row length; `attended_pairs` is given for
    varlen rows only). `dense_attention`: ModelInput.dense_attention. Both layouts
    give the same numbers. With `varlen` (model.attention), packed rows carry their attention pieces
    (ModelInput.varlen), computed here on the host so the step needs no host sync for them."""
    if packing not in PACKING_CHOICES:
        raise InputError(f"data.packing must be one of {', '.join(PACKING_CHOICES)}, got {packing!r}")
    packed = padded = None
    if packing != "never":
        # Under varlen the attention of packed rows does not grow with their width: only the body counts.
        row_cost = ((lambda rows, width: cost(rows, width, True, attended_pairs=0)) if varlen
                    else (lambda rows, width: cost(rows, width, True)))
        packed = pack_documents(documents, pad_token_id, pack_tokens, pad_to_multiple_of, row_cost=row_cost,
                                bucket_shapes=bucket_shapes)
        if varlen:
            packed.varlen = VarlenDescriptors.of(packed)
    if packing != "always":
        padded = pad_documents(documents, pad_token_id, padding_side, pad_to_multiple_of, bucket_shapes)
    if packed is not None and padded is not None:
        def estimate(inputs: ModelInput) -> float:
            rows, width = inputs.input_ids.shape
            if inputs.varlen is not None:
                return cost(rows, width, True, attended_pairs=inputs.varlen.attended_pairs)
            return cost(rows, width, inputs.dense_attention)

        packed, padded = (packed, None) if estimate(packed) < estimate(padded) else (None, padded)
    return packed or padded


def layout_for(data, pad_token_id: int, cost: Callable[[int, int, bool], float], varlen: bool = False
               ) -> Callable[[Sequence[Document]], ModelInput]:
    """`lay_out` with the options of a DataConfig (data.packing, data.pack_tokens, data.padding_side,
    data.pad_to_multiple_of, data.bucket_shapes), the model's `cost` (flops.CostModel.layout_cost) and
    whether packed rows run the varlen attention (attention.resolve_attention gave "varlen")."""
    return partial(lay_out, packing=data.packing, pad_token_id=pad_token_id, padding_side=data.padding_side,
                   pad_to_multiple_of=data.pad_to_multiple_of, pack_tokens=data.pack_tokens, cost=cost,
                   bucket_shapes=data.bucket_shapes, varlen=varlen)
