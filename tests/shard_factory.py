"""Synthetic shard sets for tests: pairs, reference log-probs and D_ref with known contents."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np

from mpo_dist.data.samples import write_reference_shard
from mpo_dist.data.shards import Manifest, ShardCursor, ShardInfo, ShardWriter, shard_name

TOKENIZER_HASH = "sha256:test"
VOCAB_SIZE = 100  # recorded in the pairs manifest as prepare_pairs does


def pair_key(shard: int, index: int) -> str:
    return f"s{shard:03d}-{index:04d}"


def make_pairs(directory: Path, shard_sizes: list[int], seed: int = 0, tokenizer_hash: str = TOKENIZER_HASH,
               vocab_size: int = VOCAB_SIZE) -> list[str]:
    """Pairs of token ids in 3..99 whose prompt text is their key; lengths vary so token budgets matter.
    Returns all keys."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    shards, keys = [], []
    for shard, size in enumerate(shard_sizes):
        lengths = []
        with ShardWriter(directory / shard_name(shard), "pairs") as writer:
            for index in range(size):
                prompt = rng.integers(3, 100, size=rng.integers(1, 12))
                chosen = rng.integers(3, 100, size=rng.integers(1, 20))
                rejected = rng.integers(3, 100, size=rng.integers(1, 20))
                key = pair_key(shard, index)
                writer.write(key, {"prompt": key, "chosen": "c", "rejected": "r", "label": None},
                             {"prompt_ids": prompt.astype(np.int32), "chosen_ids": chosen.astype(np.int32),
                              "rejected_ids": rejected.astype(np.int32)})
                lengths.append(len(prompt) + max(len(chosen), len(rejected)))
                keys.append(key)
        shards.append(ShardInfo(shard_name(shard), size, lengths))
    Manifest("pairs", tokenizer_hash, shards, info={"tokenizer": {"vocab_size": vocab_size}}).write(directory)
    return keys


def ref_logps_of(key: str) -> tuple[float, float]:
    """Deterministic fake reference log-probs, so a join can be checked sample by sample."""
    value = sum(ord(c) for c in key)
    return -float(value), -float(value) - 0.5


def make_reference(directory: Path, pairs_dir: Path, tokenizer_hash: str = TOKENIZER_HASH) -> None:
    """Reference shards for every pairs shard, same keys in the same order."""
    from mpo_dist.data.shards import ShardCursor

    directory.mkdir(parents=True, exist_ok=True)
    pairs = Manifest.read(pairs_dir, "pairs")
    for shard in pairs.shards:
        samples = list(ShardCursor(pairs_dir / shard.name, "pairs", shard.num_samples))
        keys = [key for key, _, _ in samples]
        logps = [ref_logps_of(key) for key in keys]
        write_reference_shard(directory / shard.name, keys, [c for c, _ in logps], [r for _, r in logps],
                              [len(a["chosen_ids"]) for _, _, a in samples], [len(a["rejected_ids"]) for _, _, a in samples])
    Manifest("ref_logps", tokenizer_hash, [ShardInfo(s.name, s.num_samples) for s in pairs.shards]).write(directory)


def make_dref(directory: Path, shard_sizes: list[int], tokenizer_hash: str = TOKENIZER_HASH) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    shards, keys = [], []
    for shard, size in enumerate(shard_sizes):
        lengths = []
        with ShardWriter(directory / shard_name(shard), "dref") as writer:
            for index in range(size):
                prompt, response = rng.integers(3, 100, size=4), rng.integers(3, 100, size=rng.integers(1, 9))
                key = f"d{shard:03d}-{index:04d}"
                writer.write(key, {"logp_ref": -float(index), "stop_reason": "eos"},
                             {"prompt_ids": prompt.astype(np.int32), "response_ids": response.astype(np.int32)})
                lengths.append(len(prompt) + len(response))
                keys.append(key)
        shards.append(ShardInfo(shard_name(shard), size, lengths))
    Manifest("dref", tokenizer_hash, shards).write(directory)
    return keys


def dref_from_pairs(pairs_dir: Path, reference_dir: Path, out_dir: Path, limit: int) -> None:
    """D_ref shards whose 'samples' are the first `limit` chosen responses, with their reference
    log-probs: stands in for tools/sample_reference.py where only the data contract matters."""
    from mpo_dist.data.samples import PairSource

    source = PairSource(pairs_dir, reference_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lengths = []
    with ShardWriter(out_dir / shard_name(0), "dref") as writer:
        for sample_id in range(min(limit, len(source.shards))):
            sample = source.read(sample_id)
            writer.write(sample["key"], {"logp_ref": sample["ref_chosen_logp"], "stop_reason": "eos"},
                         {"prompt_ids": sample["prompt_ids"], "response_ids": sample["chosen_ids"]})
            lengths.append(len(sample["prompt_ids"]) + len(sample["chosen_ids"]))
    Manifest("dref", source.shards.manifest.tokenizer_hash, [ShardInfo(shard_name(0), len(lengths), lengths)]).write(out_dir)


def make_sampled_dref(directory: Path, pairs_dir: Path, per_pair: int = 2) -> list[str]:
    """D_ref shards as tools/sample_reference.py lays them out: one per pairs shard (same name), keys
    `KEY-sK`, the pairs fingerprint and sampling parameters in the manifest. Returns all keys."""
    from mpo_dist.data.shards import ShardCursor
    from mpo_dist.producers.job import manifest_fingerprint

    directory.mkdir(parents=True, exist_ok=True)
    pairs = Manifest.read(pairs_dir, "pairs")
    shards, keys = [], []
    for shard in pairs.shards:
        lengths = []
        with ShardWriter(directory / shard.name, "dref") as writer:
            for key, _, arrays in ShardCursor(pairs_dir / shard.name, "pairs", shard.num_samples):
                for k in range(per_pair):
                    writer.write(f"{key}-s{k}", {"logp_ref": -1.0 - k, "stop_reason": "eos"},
                                 {"prompt_ids": arrays["prompt_ids"], "response_ids": arrays["chosen_ids"]})
                    lengths.append(len(arrays["prompt_ids"]) + len(arrays["chosen_ids"]))
                    keys.append(f"{key}-s{k}")
        shards.append(ShardInfo(shard.name, shard.num_samples * per_pair, lengths))
    info = {"sampling": {"num_samples": per_pair}, "pairs": str(pairs_dir), "pairs_fingerprint": manifest_fingerprint(pairs_dir),
            "model": {"dtype": "float32"}}
    Manifest("dref", pairs.tokenizer_hash, shards, info=info).write(directory)
    return keys


def rewrite(path: Path, kind: str, change) -> None:
    """Rewrite a shard with valid checksums, `change(index, key, meta, arrays)` -> (key, meta, arrays) or None."""
    with tarfile.open(path) as tar:
        count = len(tar.getmembers())
    samples = list(ShardCursor(path, kind, count))
    with ShardWriter(path, kind) as writer:
        for index, (key, meta, arrays) in enumerate(samples):
            result = change(index, key, dict(meta), {name: np.array(a) for name, a in arrays.items()})
            if result is not None:
                writer.write(*result)
