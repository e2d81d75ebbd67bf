"""Scoring pairs with the reference model: reference log-prob shards (SPEC.md data contract 2).

For every pairs shard, a shard of the same name with the same keys in the same order holding
`logp_ref` of chosen and rejected (sums over response tokens, computed by `logprobs.py` exactly as
the trainer computes the policy's) and token counts. Each shard is scored alone, in file order and
fixed batches, so the numbers do not depend on how many ranks ran the job.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mpo_dist.data.collate import collate_pairs
from mpo_dist.data.samples import write_reference_shard
from mpo_dist.data.shards import Manifest, ShardCursor, ShardInfo
from mpo_dist.logprobs import sequence_logprobs
from mpo_dist.shard_job import manifest_fingerprint, run_shard_job, stderr_log
from mpo_dist.tokenizer import tokenizer_beside_model, tokenizer_fingerprint


def weights_fingerprint(model_dir: str | Path) -> str:
    """SHA-256 over the model folder's safetensors files (names and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()[:32]


def load_reference_model(model_dir: str | Path, pairs: Manifest, pairs_dir: Path, dtype: str, device: torch.device):
    """The reference model, refused when its tokenizer is not the one that made the pairs."""
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model {model_dir}: no config.json; expected a Hugging Face model folder")
    tokenizer = tokenizer_beside_model(model_dir)
    if tokenizer is not None:
        model_hash = tokenizer_fingerprint(tokenizer)
        if model_hash != pairs.tokenizer_hash:
            raise ValueError(f"--model {model_dir} has tokenizer {model_hash}, but --pairs {pairs_dir} was tokenized "
                             f"with {pairs.tokenizer_hash}; use the reference model that matches the policy's tokenizer")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).to(device)
    vocab = pairs.info.get("tokenizer", {}).get("vocab_size")
    if vocab is not None and vocab > model.config.vocab_size:
        raise ValueError(f"--pairs {pairs_dir} uses a {vocab}-token vocabulary but --model {model_dir} has "
                         f"{model.config.vocab_size} embeddings")
    return model.eval()


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
    log: Callable[[str], None] = stderr_log,
) -> Manifest | None:
    """Write this rank's reference shards; rank 0 then writes and returns the manifest."""
    pairs_dir, out_dir = Path(pairs_dir), Path(out_dir)
    pairs = Manifest.read(pairs_dir, "pairs")
    model.eval()
    params = {"pairs": manifest_fingerprint(pairs_dir), "batch_size": batch_size, **(model_info or {})}
    totals = run_shard_job(
        "score_reference", pairs.shards, out_dir,
        lambda index, shard: score_shard(model, pairs_dir, shard, out_dir / shard.name, batch_size, device),
        rank=rank, world_size=world_size, barrier=barrier, log=log, params=params)
    if rank != 0:
        return None
    manifest = Manifest("ref_logps", pairs.tokenizer_hash, [ShardInfo(s.name, s.num_samples) for s in pairs.shards],
                        info={"created_by": "tools/score_reference.py", "pairs": str(pairs_dir.resolve()),
                              "pairs_num_samples": pairs.num_samples, **(model_info or {})})
    manifest.write(out_dir)
    rate = totals["work"] / totals["seconds"] if totals["seconds"] else 0.0
    log(f"score_reference: {pairs.num_samples} pairs in {len(pairs.shards)} shards scored into {out_dir} "
        f"(rank 0: {totals['made']} shards made, {totals['skipped']} already done, {rate:,.0f} tokens/s)")
    return manifest
