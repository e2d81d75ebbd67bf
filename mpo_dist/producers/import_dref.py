"""Importing D_ref responses sampled by another engine (vLLM, SGLang, TGI, ...): the D_ref shards
and manifest are the contract, so responses from anywhere become standard D_ref once the reference
re-scores their `logp_ref` with the trainer's own computation (`sample.write_dref_shard`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mpo_dist.data.shards import Manifest, ShardCursor, ShardInfo
from mpo_dist.errors import InputError
from mpo_dist.inference_model import finish_forwards
from mpo_dist.producers.sample import as_id_list, write_dref_manifest, write_dref_shard
from mpo_dist.producers.job import check_batch_size, describe_totals, manifest_fingerprint, run_shard_job, stderr_log


@dataclass
class ExternalResponses:
    """Responses sampled elsewhere, per pair key in file order: [(response ids, stop reason), ...]."""

    by_key: dict[str, list[tuple[np.ndarray, str]]]
    per_pair: int  # K: every pair has this many
    sha256: str  # of the file, so a rerun with another file is refused


def read_external_responses(path: str | Path, pairs_dir: str | Path, tokenizer, eos_token_ids: int | list[int] | None,
                            vocab_size: int) -> ExternalResponses:
    """Parse a JSONL file of {"key": pair key, "response": text | "response_ids": [ids], "stop_reason"?}.

    Text is tokenized without special tokens, as prepare_pairs tokenizes responses; a text response
    with "stop_reason": "eos" gets the first stop id appended, as a sampled response keeps the stop
    token it ended at. Ids are taken as they are ("eos" when the last is a stop id, unless the line
    says otherwise). The k-th line of a key is its sample k; every pair of the pairs shards needs the
    same number of responses."""
    path, pairs_dir = Path(path), Path(pairs_dir)
    if not path.is_file():
        raise InputError(f"--responses {path} does not exist")
    stops = as_id_list(eos_token_ids)
    data = path.read_bytes()
    parsed = [_parse_response_line(path, number, line, stops) for number, line in
              enumerate(data.decode("utf-8", errors="strict").splitlines(), 1) if line.strip()]
    texts = [index for index, (_, response, _, _) in enumerate(parsed) if isinstance(response, str)]
    if texts:
        encoded = tokenizer([parsed[i][1] for i in texts], add_special_tokens=False, verbose=False)["input_ids"]
        for index, ids in zip(texts, encoded):
            key, _, reason, number = parsed[index]
            parsed[index] = (key, ids + (stops[:1] if reason == "eos" else []), reason, number)
    by_key: dict[str, list[tuple[np.ndarray, str]]] = {}
    for key, ids, reason, number in parsed:
        if not ids:
            raise InputError(f"--responses {path} line {number}: the response of '{key}' is empty")
        if min(ids) < 0 or max(ids) >= vocab_size:
            raise InputError(f"--responses {path} line {number}: token ids must be in [0, {vocab_size}) "
                             f"(the model's vocabulary), got {min(ids)}..{max(ids)}")
        by_key.setdefault(key, []).append((np.asarray(ids, dtype=np.int32), reason))
    return ExternalResponses(by_key, _check_coverage(path, pairs_dir, by_key), "sha256:" + hashlib.sha256(data).hexdigest()[:32])


def _parse_response_line(path: Path, number: int, line: str, stops: list[int]) -> tuple[str, str | list[int], str, int]:
    import json

    where = f"--responses {path} line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise InputError(f"{where}: not JSON ({error.msg})") from error
    if not isinstance(record, dict) or not isinstance(record.get("key"), str):
        raise InputError(f'{where}: expected an object with a "key" (the pair\'s key)')
    if ("response" in record) == ("response_ids" in record):
        raise InputError(f'{where}: give exactly one of "response" (text) and "response_ids" (token ids)')
    response = record.get("response", record.get("response_ids"))
    if "response" in record and not isinstance(response, str):
        raise InputError(f'{where}: "response" must be text')
    if "response_ids" in record and not (isinstance(response, list) and all(type(i) is int for i in response)):
        raise InputError(f'{where}: "response_ids" must be a list of integer token ids')
    default = "eos" if isinstance(response, list) and response and response[-1] in stops else "length"
    reason = record.get("stop_reason", default)
    if reason not in ("eos", "length"):
        raise InputError(f'{where}: "stop_reason" must be "eos" or "length", got {reason!r}')
    return record["key"], response, reason, number


def _check_coverage(path: Path, pairs_dir: Path, by_key: dict[str, list]) -> int:
    """K, the number of responses of every pair; refuses keys that are not pairs and uneven counts."""
    pairs = Manifest.read(pairs_dir, "pairs")
    keys = [key for shard in pairs.shards
            for key, _, _ in ShardCursor(pairs_dir / shard.name, "pairs", shard.num_samples)]
    unknown = sorted(set(by_key) - set(keys))
    if unknown:
        raise InputError(f"--responses {path}: {len(unknown)} keys are not pairs of --pairs {pairs_dir} "
                         f"(e.g. '{unknown[0]}'); each line's key must be a pair's key")
    counts = {key: len(by_key.get(key, [])) for key in keys}
    per_pair = max(counts.values(), default=0)
    if per_pair == 0:
        raise InputError(f"--responses {path} holds no responses")
    uneven = [key for key, count in counts.items() if count != per_pair]
    if uneven:
        raise InputError(f"--responses {path}: every pair needs the same number of responses K, the most any pair has "
                         f"({per_pair}), but '{uneven[0]}' has {counts[uneven[0]]} ({len(uneven)} pairs differ)")
    return per_pair


def import_dref(
    model,
    pairs_dir: str | Path,
    out_dir: str | Path,
    responses: ExternalResponses,
    *,
    pad_token_id: int,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 16,
    device: torch.device = torch.device("cpu"),
    model_info: dict | None = None,
    source: str = "",
    log: Callable[[str], None] = stderr_log,
) -> Manifest | None:
    """D_ref shards and manifest from responses sampled elsewhere: the same shards sample_dref writes
    (keys KEY-sK, logp_ref re-scored by the reference model with the trainer's code), resumable and
    split over ranks the same way."""
    check_batch_size(batch_size)
    pairs_dir, out_dir = Path(pairs_dir), Path(out_dir)
    pairs = Manifest.read(pairs_dir, "pairs")
    model.eval()

    def make(index: int, shard: ShardInfo) -> int:
        samples = [(f"{key}-s{k}", arrays["prompt_ids"], response, reason)
                   for key, _, arrays in ShardCursor(pairs_dir / shard.name, "pairs", shard.num_samples)
                   for k, (response, reason) in enumerate(responses.by_key[key])]
        write_dref_shard(model, out_dir / shard.name, samples, batch_size, pad_token_id, device)
        return sum(len(response) for _, _, response, _ in samples)

    imported = {"responses": source, "responses_sha256": responses.sha256}
    job = {"pairs": manifest_fingerprint(pairs_dir), "imported": imported, "batch_size": batch_size, **(model_info or {})}
    totals = run_shard_job("import_dref", pairs.shards, out_dir, make, rank=rank, world_size=world_size, log=log,
                           params=job, unit="tokens scored", after_shards=lambda: finish_forwards(model))
    if rank != 0:
        return None
    manifest = write_dref_manifest(model, pairs_dir, out_dir, responses.per_pair, {
        "created_by": "tools/import_dref.py", "sampling": {"num_samples": responses.per_pair}, "imported": imported,
        "batch_size": batch_size}, model_info)
    log(f"import_dref: {manifest.num_samples} samples ({responses.per_pair} per prompt) in {len(manifest.shards)} "
        f"shards written to {out_dir} ({describe_totals(totals, 'tokens scored')})")
    return manifest
