"""Batches of samples as the data streams yield them: pairs, or D_ref samples.

A collated batch keeps each sample's token ids as they are; batch.MicroBatch turns pairs (and
D_ref samples) into the documents of one forward, laid out in rows by data/layout.py, padded or
packed (the layout counts the tokens, batch.BatchCounts). `pad_sequences` pads `prompt + response` rows for the tools
that score or sample rows directly: with right padding tokens start at column 0, with left padding
they end at the last column; `response_mask` marks the response tokens. The response token counts
(`chosen_lengths`, `rejected_lengths`; `response_lengths` of D_ref samples, float32) are there for
the losses' length-normalised options.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from mpo_dist.data.layout import pad_rows


def pad_sequences(
    prompts: Sequence[np.ndarray],
    responses: Sequence[np.ndarray],
    pad_token_id: int,
    padding_side: str = "right",
    pad_to_multiple_of: int = 1,
) -> dict[str, torch.Tensor]:
    """`prompt_i + response_i` rows padded to a common length, with attention and response masks."""
    input_ids, attention_mask, starts = pad_rows(prompts, responses, pad_token_id, padding_side, pad_to_multiple_of)
    response_mask = np.zeros_like(attention_mask)
    for row, (start, response) in enumerate(zip(starts, responses)):
        response_mask[row, start : start + len(response)] = True
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "response_mask": torch.from_numpy(response_mask),
    }


def _lengths(responses: Sequence[np.ndarray]) -> torch.Tensor:
    """Response token counts, float32 (what the losses divide log-prob sums by)."""
    return torch.tensor([len(r) for r in responses], dtype=torch.float32)


def collate_pairs(samples: Sequence[dict], is_pad: np.ndarray) -> dict:
    """B pairs -> their token ids (laid out for the forward by batch.MicroBatch and data/layout.py),
    labels, reference log-probs, response token counts and pad flags."""
    prompts = [s["prompt_ids"] for s in samples]
    batch = {"prompt_ids": prompts, "chosen_ids": [s["chosen_ids"] for s in samples],
             "rejected_ids": [s["rejected_ids"] for s in samples]}
    batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.float32)
    batch["chosen_lengths"], batch["rejected_lengths"] = _lengths(batch["chosen_ids"]), _lengths(batch["rejected_ids"])
    batch["is_pad"] = torch.from_numpy(np.asarray(is_pad, dtype=bool))
    if "ref_chosen_logp" in samples[0]:
        batch["ref_chosen_logps"] = torch.tensor([s["ref_chosen_logp"] for s in samples], dtype=torch.float32)
        batch["ref_rejected_logps"] = torch.tensor([s["ref_rejected_logp"] for s in samples], dtype=torch.float32)
    batch["keys"] = [s["key"] for s in samples]
    return batch


def collate_dref(samples: Sequence[dict], is_pad: np.ndarray) -> dict:
    """B reference samples -> their token ids with their stored logp_ref, response token counts and pad flags."""
    batch = {"prompt_ids": [s["prompt_ids"] for s in samples], "response_ids": [s["response_ids"] for s in samples]}
    batch["ref_logps"] = torch.tensor([s["ref_logp"] for s in samples], dtype=torch.float32)
    batch["response_lengths"] = _lengths(batch["response_ids"])
    batch["is_pad"] = torch.from_numpy(np.asarray(is_pad, dtype=bool))
    batch["keys"] = [s["key"] for s in samples]
    return batch

