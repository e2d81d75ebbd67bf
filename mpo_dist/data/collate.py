"""Batches for one concatenated forward: chosen rows, then rejected rows (then D_ref rows, by the trainer).

Every sequence is `prompt + response`; `response_mask` marks the response tokens whose log-probs
are summed (prompt and padding are excluded). With right padding, tokens start at column 0; with
left padding they end at the last column. Padding waste is reported per batch as
`num_tokens` (real) against `num_padded_tokens` (the tensor's size).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from mpo_dist.errors import InputError


def pad_sequences(
    prompts: Sequence[np.ndarray],
    responses: Sequence[np.ndarray],
    pad_token_id: int,
    padding_side: str = "right",
    pad_to_multiple_of: int = 1,
) -> dict[str, torch.Tensor]:
    """`prompt_i + response_i` rows padded to a common length, with attention and response masks."""
    if padding_side not in ("right", "left"):
        raise InputError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max(lengths)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = np.full((len(lengths), width), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(lengths), width), dtype=bool)
    response_mask = np.zeros((len(lengths), width), dtype=bool)
    for row, (prompt, response, length) in enumerate(zip(prompts, responses, lengths)):
        start = 0 if padding_side == "right" else width - length
        input_ids[row, start : start + len(prompt)] = prompt
        input_ids[row, start + len(prompt) : start + length] = response
        attention_mask[row, start : start + length] = True
        response_mask[row, start + len(prompt) : start + length] = True
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "response_mask": torch.from_numpy(response_mask),
    }


def _padding_stats(batch: dict[str, torch.Tensor]) -> dict[str, int]:
    return {"num_tokens": int(batch["attention_mask"].sum()), "num_padded_tokens": batch["input_ids"].numel()}


def collate_pairs(samples: Sequence[dict], is_pad: np.ndarray, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int = 1) -> dict:
    """B pairs -> 2B rows (chosen 0..B-1, rejected B..2B-1), labels, reference log-probs, pad flags."""
    prompts = [s["prompt_ids"] for s in samples]
    batch = pad_sequences(
        prompts + prompts,
        [s["chosen_ids"] for s in samples] + [s["rejected_ids"] for s in samples],
        pad_token_id, padding_side, pad_to_multiple_of,
    )
    batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.float32)
    batch["is_pad"] = torch.from_numpy(np.asarray(is_pad, dtype=bool))
    if "ref_chosen_logp" in samples[0]:
        batch["ref_chosen_logps"] = torch.tensor([s["ref_chosen_logp"] for s in samples], dtype=torch.float32)
        batch["ref_rejected_logps"] = torch.tensor([s["ref_rejected_logp"] for s in samples], dtype=torch.float32)
    batch["keys"] = [s["key"] for s in samples]
    batch.update(_padding_stats(batch))
    return batch


def collate_dref(samples: Sequence[dict], is_pad: np.ndarray, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int = 1) -> dict:
    """B reference samples -> B rows with their stored logp_ref."""
    batch = pad_sequences(
        [s["prompt_ids"] for s in samples], [s["response_ids"] for s in samples],
        pad_token_id, padding_side, pad_to_multiple_of,
    )
    batch["ref_logps"] = torch.tensor([s["ref_logp"] for s in samples], dtype=torch.float32)
    batch["is_pad"] = torch.from_numpy(np.asarray(is_pad, dtype=bool))
    batch["keys"] = [s["key"] for s in samples]
    batch.update(_padding_stats(batch))
    return batch


def stack_rows(first: dict, second: dict, pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Rows of two collated batches in one tensor set (pairs, then D_ref), padded to the wider one."""
    width = max(first["input_ids"].shape[1], second["input_ids"].shape[1])

    def widen(tensor: torch.Tensor, value) -> torch.Tensor:
        extra = width - tensor.shape[1]
        padding = (extra, 0) if padding_side == "left" else (0, extra)
        return torch.nn.functional.pad(tensor, padding, value=value)

    return {
        "input_ids": torch.cat([widen(first["input_ids"], pad_token_id), widen(second["input_ids"], pad_token_id)]),
        "attention_mask": torch.cat([widen(first["attention_mask"], False), widen(second["attention_mask"], False)]),
        "response_mask": torch.cat([widen(first["response_mask"], False), widen(second["response_mask"], False)]),
    }
