"""Scoring pairs with the reference model: reference log-prob shards (SPEC.md data contract 2).

For every pairs shard, a shard of the same name with the same keys in the same order holding
`logp_ref` of chosen and rejected (sums over response tokens, computed by `logprobs.py` exactly as
the trainer computes the policy's) and token counts. Rank `r` of `W` scores the shards with
`i % W == r`; shards are written atomically and a rerun skips finished ones. Rank 0 writes the
manifest after a barrier. Results do not depend on W: each shard is scored alone, in file order.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mpo_dist.data.collate import collate_pairs
from mpo_dist.data.samples import write_reference_shard
from mpo_dist.data.shards import Manifest, ShardCursor, ShardInfo
from mpo_dist.logprobs import sequence_logprobs


def weights_fingerprint(model_dir: str | Path) -> str:
    """SHA-256 over the model folder's safetensors files (names and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()[:32]


@torch.no_grad()
def score_shard(model, pairs_dir: Path, shard: ShardInfo, out_path: Path, batch_size: int, device: torch.device) -> int:
    """Score one pairs shard into `out_path` (atomically); returns the number of tokens scored."""
    samples = list(ShardCursor(pairs_dir / shard.name, "pairs", shard.num_samples))
    keys, chosen, rejected, chosen_tokens, rejected_tokens = [], [], [], [], []
    tokens = 0
    for start in range(0, len(samples), batch_size):
        batch = [{"key": key, "label": 1.0, **arrays} for key, _, arrays in samples[start : start + batch_size]]
        rows = collate_pairs(batch, np.zeros(len(batch), bool), pad_token_id=0)
        out = sequence_logprobs(model, rows["input_ids"].to(device), rows["attention_mask"].to(device),
                                rows["response_mask"].to(device))
        size = len(batch)
        logps, counts = out.logps.double().cpu().tolist(), out.num_tokens.cpu().tolist()
        keys += rows["keys"]
        chosen += logps[:size]
        rejected += logps[size:]
        chosen_tokens += counts[:size]
        rejected_tokens += counts[size:]
        tokens += rows["num_tokens"]
    write_reference_shard(out_path, keys, chosen, rejected, chosen_tokens, rejected_tokens)
    return tokens


def score_pairs(
    model,
    pairs_dir: str | Path,
    out_dir: str | Path,
    *,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 8,
    device: torch.device = torch.device("cpu"),
    model_info: dict | None = None,
    barrier: Callable[[], None] = lambda: None,
    log: Callable[[str], None] = lambda message: print(message, file=sys.stderr, flush=True),
) -> Manifest | None:
    """Write this rank's reference shards; rank 0 then writes and returns the manifest."""
    pairs_dir, out_dir = Path(pairs_dir), Path(out_dir)
    pairs = Manifest.read(pairs_dir, "pairs")
    out_dir.mkdir(parents=True, exist_ok=True)
    mine = [shard for index, shard in enumerate(pairs.shards) if index % world_size == rank]
    todo = [shard for shard in mine if not (out_dir / shard.name).exists()]
    model.eval()
    start, tokens = time.monotonic(), 0
    for done, shard in enumerate(todo, 1):
        tokens += score_shard(model, pairs_dir, shard, out_dir / shard.name, batch_size, device)
        if rank == 0:
            elapsed = time.monotonic() - start
            eta = elapsed / done * (len(todo) - done)
            log(f"score_reference: rank 0 shard {done}/{len(todo)} ({len(mine) - len(todo)} already done), "
                f"{tokens / elapsed:,.0f} tokens/s, ETA {eta:.0f}s")
    barrier()
    if rank != 0:
        return None
    manifest = Manifest("ref_logps", pairs.tokenizer_hash, [ShardInfo(s.name, s.num_samples) for s in pairs.shards],
                        info={"created_by": "tools/score_reference.py", "pairs": str(pairs_dir.resolve()),
                              "pairs_num_samples": pairs.num_samples, **(model_info or {})})
    manifest.write(out_dir)
    return manifest
