"""Decoded samples of the three shard sets, read by global id, with the pairs/reference lockstep join.

Record layouts (one packed member per sample, see shards.py):
- pairs  `KEY.pair`: meta {prompt, chosen, rejected, label, where}; arrays prompt_ids, chosen_ids, rejected_ids
- ref    `KEY.ref`:  meta {chosen_logp, rejected_logp, chosen_tokens, rejected_tokens}
- dref   `KEY.dref`: meta {logp_ref, stop_reason, ...}; arrays prompt_ids, response_ids

Every sample read is checked (`pair_problem`, `reference_problem`, `dref_problem`, shared with the
pre-flight check): a missing field or array, a non-finite or positive log-prob, a token id outside
the vocabulary is a ShardError naming shard, key and field, never a raw KeyError or IndexError.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from mpo_dist.data.shards import Manifest, ShardCursor, ShardError, ShardWriter


class ShardSet:
    """A shard folder read by global sample id (manifest order), keeping a few cursors open."""

    def __init__(self, directory: str | os.PathLike, kind: str, max_open: int = 4):
        self.directory = Path(directory)
        self.kind = kind
        self.manifest = Manifest.read(self.directory, expected_kind=kind)
        if not self.manifest.shards:
            raise ShardError(f"{self.directory}: manifest lists no shards")
        for shard in self.manifest.shards:
            if not (self.directory / shard.name).is_file():
                raise ShardError(f"{self.directory / shard.name}: listed in the manifest but missing")
        self.sizes = [shard.num_samples for shard in self.manifest.shards]
        self._starts = np.concatenate([[0], np.cumsum(self.sizes)])
        self._cursors: OrderedDict[int, ShardCursor] = OrderedDict()
        self._max_open = max_open

    def path_of(self, sample_id: int) -> Path:
        return self.directory / self.manifest.shards[self.locate(sample_id)[0]].name

    def __len__(self) -> int:
        return int(self._starts[-1])

    def lengths(self) -> np.ndarray | None:
        if any(shard.lengths is None for shard in self.manifest.shards):
            return None
        return np.concatenate([np.asarray(shard.lengths, dtype=np.int64) for shard in self.manifest.shards])

    def locate(self, sample_id: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self._starts, sample_id, side="right")) - 1
        return shard, int(sample_id - self._starts[shard])

    def read(self, sample_id: int) -> tuple[str, dict[str, Any], dict[str, np.ndarray]]:
        shard, index = self.locate(sample_id)
        cursor = self._cursors.pop(shard, None)
        if cursor is None:
            cursor = ShardCursor(self.directory / self.manifest.shards[shard].name, self.kind, self.sizes[shard])
            if len(self._cursors) >= self._max_open:
                self._cursors.popitem(last=False)[1].close()
        self._cursors[shard] = cursor  # most recently used last
        return cursor.read(index)

    def close(self) -> None:
        for cursor in self._cursors.values():
            cursor.close()
        self._cursors.clear()

    def __getstate__(self):  # DataLoader workers get their own file handles
        state = self.__dict__.copy()
        state["_cursors"] = OrderedDict()
        return state


class PairSource:
    """Pairs, joined sample by sample with their reference log-probs when `reference` is given.

    Token ids are checked against the smaller of `vocab_size` (the model's, when the caller knows
    it) and the vocabulary the pairs manifest records."""

    def __init__(self, pairs_dir: str | os.PathLike, reference_dir: str | os.PathLike | None = None,
                 vocab_size: int | None = None):
        self.shards = ShardSet(pairs_dir, "pairs")
        self.reference = ShardSet(reference_dir, "ref_logps") if reference_dir else None
        self.vocab_size = vocab_limit(self.shards.manifest, vocab_size)
        if self.reference is not None:
            check_reference_matches(self.shards, self.reference)

    def read(self, sample_id: int) -> dict[str, Any]:
        key, meta, arrays = self.shards.read(sample_id)
        refuse(self.shards.path_of(sample_id), key, pair_problem(meta, arrays, self.vocab_size))
        sample = {"key": key, "label": 1.0 if meta.get("label") is None else float(meta["label"]),
                  **arrays}
        if self.reference is not None:
            ref_key, ref_meta, _ = self.reference.read(sample_id)
            if ref_key != key:
                shard, index = self.shards.locate(sample_id)
                name = self.shards.manifest.shards[shard].name
                raise ShardError(
                    f"{self.reference.directory / name}: sample {index} has key '{ref_key}' but "
                    f"{self.shards.directory / name} has '{key}': the reference shards were not scored from these pairs"
                )
            refuse(self.reference.path_of(sample_id), key, reference_problem(ref_meta))  # counts: pre-flight
            sample["ref_chosen_logp"] = float(ref_meta["chosen_logp"])
            sample["ref_rejected_logp"] = float(ref_meta["rejected_logp"])
        return sample


class DrefSource:
    """Prompts with responses pre-sampled from the reference model, and their logp_ref (MPO's tau term)."""

    def __init__(self, dref_dir: str | os.PathLike, vocab_size: int | None = None):
        self.shards = ShardSet(dref_dir, "dref")
        self.vocab_size = vocab_limit(self.shards.manifest, vocab_size)

    def read(self, sample_id: int) -> dict[str, Any]:
        key, meta, arrays = self.shards.read(sample_id)
        refuse(self.shards.path_of(sample_id), key, dref_problem(meta, arrays, self.vocab_size))
        return {"key": key, "ref_logp": float(meta["logp_ref"]), **arrays}


# ---------------------------------------------------------------------------- value checks

PAIR_ARRAYS = ("prompt_ids", "chosen_ids", "rejected_ids")
DREF_ARRAYS = ("prompt_ids", "response_ids")
LOGP_TOLERANCE = 1e-3  # a sum of log-probs is <= 0; rounding may leave a hair above


def vocab_limit(manifest: Manifest, vocab_size: int | None) -> int | None:
    """Token ids must be below this: the smaller of the model's vocabulary (when known) and the one
    the shards' tokenizer recorded (its ids are the only ones it can have written)."""
    recorded = manifest.info.get("tokenizer", {}).get("vocab_size") if isinstance(manifest.info.get("tokenizer"), dict) else None
    known = [int(v) for v in (vocab_size, recorded) if isinstance(v, int) and v > 0]
    return min(known) if known else None


def describe(path: Path, key: str, problem: str) -> str:
    """One problem, as every check reports it: shard, key, field."""
    return f"{path}: sample '{key}': {problem}"


def refuse(path: Path, key: str, problem: str | None) -> None:
    if problem is not None:
        raise ShardError(describe(path, key, problem))


class OutOfVocabulary(str):
    """A problem that is a token id outside the vocabulary: shards made with another tokenizer have one
    in nearly every sample, so the pre-flight counts these in one line instead of listing each."""


def ids_problem(arrays: dict[str, np.ndarray], names: tuple[str, ...], vocab_size: int | None) -> str | None:
    for name in names:
        ids = arrays.get(name)
        if ids is None:
            return f"array '{name}' is missing"
        if ids.dtype.kind not in "iu":
            return f"array '{name}' has dtype {ids.dtype}, expected integer token ids"
        if not len(ids):
            continue
        # One reduction finds negative ids too: seen as unsigned, they are above any vocabulary.
        unsigned = ids.view(ids.dtype.str.replace("i", "u")) if ids.dtype.kind == "i" else ids
        limit = vocab_size if vocab_size is not None else np.iinfo(ids.dtype).max + 1
        if int(unsigned.max()) < limit:
            continue
        if int(ids.min()) < 0:
            return f"array '{name}' holds token id {int(ids[ids < 0][0])}, a negative id"
        return OutOfVocabulary(f"array '{name}' holds token id {int(ids[ids >= vocab_size][0])} outside the "
                               f"vocabulary of {vocab_size} tokens")
    return None


def logp_problem(meta: dict[str, Any], name: str) -> str | None:
    if name not in meta:
        return f"field '{name}' is missing"
    value = meta[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"field '{name}' is {value!r}, not a number"
    if not math.isfinite(value):
        return f"field '{name}' is {value} (not finite)"
    if value > LOGP_TOLERANCE:
        return f"field '{name}' is {value}, but a log-prob is <= 0"
    return None


def pair_problem(meta: dict[str, Any], arrays: dict[str, np.ndarray], vocab_size: int | None) -> str | None:
    """What is wrong with one pairs record, or None."""
    label = meta.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, (int, float)) or not 0 <= label <= 1):
        return f"field 'label' is {label!r}, not a probability in [0, 1]"
    return ids_problem(arrays, PAIR_ARRAYS, vocab_size)


def reference_problem(meta: dict[str, Any], pair_arrays: dict[str, np.ndarray] | None = None) -> str | None:
    """What is wrong with one reference record (checked against its pair's token counts when given), or None."""
    for side in ("chosen", "rejected"):
        problem = logp_problem(meta, f"{side}_logp")
        if problem:
            return problem
        count = meta.get(f"{side}_tokens")
        if pair_arrays is not None and count is not None and f"{side}_ids" in pair_arrays \
                and count != len(pair_arrays[f"{side}_ids"]):
            return (f"field '{side}_tokens' is {count}, but the pair's {side} response has "
                    f"{len(pair_arrays[f'{side}_ids'])} tokens: scored from other pairs")
    return None


def dref_problem(meta: dict[str, Any], arrays: dict[str, np.ndarray], vocab_size: int | None) -> str | None:
    """What is wrong with one D_ref record, or None."""
    return logp_problem(meta, "logp_ref") or ids_problem(arrays, DREF_ARRAYS, vocab_size)


def check_reference_matches(pairs: ShardSet, reference: ShardSet) -> None:
    """Refuse reference shards that were not made from these pairs, naming the shard at fault."""
    if reference.manifest.tokenizer_hash != pairs.manifest.tokenizer_hash:
        raise ShardError(
            f"{reference.directory}: tokenizer {reference.manifest.tokenizer_hash} differs from the pairs' "
            f"{pairs.manifest.tokenizer_hash} ({pairs.directory}); rescore with the policy's tokenizer"
        )
    ref_shards = {shard.name: shard for shard in reference.manifest.shards}
    for shard in pairs.manifest.shards:
        match = ref_shards.pop(shard.name, None)
        if match is None:
            raise ShardError(f"{reference.directory / shard.name}: no reference shard for pairs shard {shard.name}")
        if match.num_samples != shard.num_samples:
            raise ShardError(
                f"{reference.directory / shard.name}: {match.num_samples} samples, but pairs shard "
                f"{pairs.directory / shard.name} has {shard.num_samples}"
            )
    if ref_shards:
        raise ShardError(f"{reference.directory}: shards {sorted(ref_shards)} have no pairs shard in {pairs.directory}")
    if [s.name for s in reference.manifest.shards] != [s.name for s in pairs.manifest.shards]:
        raise ShardError(f"{reference.directory}: shards are listed in another order than in {pairs.directory}")


def write_reference_shard(path: str | os.PathLike, keys, chosen_logps, rejected_logps, chosen_tokens, rejected_tokens) -> None:
    """One reference log-prob shard: same keys, same order as its pairs shard."""
    with ShardWriter(path, "ref_logps") as writer:
        for key, lc, lr, nc, nr in zip(keys, chosen_logps, rejected_logps, chosen_tokens, rejected_tokens):
            meta = {"chosen_logp": float(lc), "rejected_logp": float(lr), "chosen_tokens": int(nc), "rejected_tokens": int(nr)}
            writer.write(key, meta, {})

