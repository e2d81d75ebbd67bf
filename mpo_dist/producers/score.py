"""The reference model for the reference tools, and scoring pairs with it (the reference log-prob
data contract).

`open_reference` is the one place where the reference tools load the model: on this rank's device,
refused when its tokenizer or vocabulary is not the pairs', with its EOS ids, the pad id the pairs
were made with and the model record that manifests and job files carry.

Scoring writes, for every pairs shard, a shard of the same name with the same keys in the same
order holding `logp_ref` of chosen and rejected (sums over response tokens, computed by
`logprobs.py` exactly as the trainer computes the policy's) and token counts. Each shard is scored
alone, in file order and fixed batches, so the numbers do not depend on how many ranks ran the job.
The manifest records what the shards were made from (`shard_job.made_from`: the pairs' fingerprint,
the model's path, weights hash, dtype and tokenizer hash), which the trainer checks before step 1.
"""

from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

from mpo_dist.attention import packing_for
from mpo_dist.compute_dtype import choose_dtype
from mpo_dist.batch import MicroBatch
from mpo_dist.data.collate import collate_pairs
from mpo_dist.data.layout import lay_out
from mpo_dist.data.samples import write_reference_shard
from mpo_dist.data.shards import Manifest, ShardCursor, ShardInfo
from mpo_dist.distributed import RankInfo, device_for
from mpo_dist.flops import CostModel
from mpo_dist.inference_model import InferenceModel, finish_forwards, load_inference_model
from mpo_dist.objective import policy_logprobs
from mpo_dist.model import read_model_config
from mpo_dist.producers.job import check_batch_size, describe_totals, made_from, manifest_fingerprint, run_shard_job, stderr_log
from mpo_dist.tokenizer import check_tokenizer_matches, tokenizer_beside_model


def weights_fingerprint(model_dir: str | Path) -> str:
    """SHA-256 over the model folder's safetensors files (names and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()[:32]


def load_reference_model(model_dir: str | Path, pairs: Manifest, pairs_dir: Path, dtype: str, device: torch.device,
                         info: RankInfo, model_shards: int) -> InferenceModel:
    """The reference model, sharded over `model_shards` processes (`inference_model`), refused (before
    its weights are read) when its tokenizer is not the one that made the pairs or its vocabulary is
    smaller than theirs."""
    model_dir = Path(model_dir)
    config = read_model_config(model_dir, "--model")
    check_tokenizer_matches(pairs, config.vocab_size, tokenizer_beside_model(model_dir), data=f"--pairs {pairs_dir}",
                            model=f"--model {model_dir}", fix="use the reference model that matches the policy's tokenizer")
    return load_inference_model(model_dir, config, dtype, device, info, model_shards=model_shards, option="--model")


class Reference(NamedTuple):
    model: InferenceModel
    device: torch.device
    eos_token_ids: int | list[int] | None  # every id that ends a sampled response
    pad_token_id: int  # the pad id the pairs were prepared with
    model_info: dict  # {"model": {path, dtype, weights_hash, tokenizer_hash}} for manifests and job files


def open_reference(model_dir: str | Path, pairs_dir: str | Path, dtype: str, info: RankInfo, *, tool: str,
                   model_shards: int = 0) -> Reference:
    """The reference model on this rank's device in `dtype` (auto resolved here, `tool`'s rank 0 saying to
    what: the manifests record the resolved name), sharded over `model_shards` processes, checked against
    the pairs (see `load_reference_model`).

    Only rank 0 hashes the weights (reading every byte again): it alone claims the output folder."""
    pairs = Manifest.read(pairs_dir, "pairs")
    device = device_for(info)
    said: list[str] = []  # what auto became, said once the model is accepted (a refusal is its one line)
    dtype = choose_dtype(dtype, device, "--dtype", tool, log=said.append)
    model = load_reference_model(model_dir, pairs, Path(pairs_dir), dtype, device, info, model_shards)
    said.append(f"{tool}: --model {model_dir}: {model.describe()}")
    for line in said if info.is_main else ():
        stderr_log(line)
    # The generation config lists every stop token (e.g. end of turn as well as end of text).
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    if eos is None:
        eos = model.config.eos_token_id
    pad = pairs.info.get("tokenizer", {}).get("pad_token_id") or 0
    # load_reference_model refused any tokenizer but the pairs': the model's is theirs.
    model_info = {"model": {"path": str(Path(model_dir).resolve()), "dtype": dtype,
                            "weights_hash": weights_fingerprint(model_dir) if info.is_main else None,
                            "tokenizer_hash": pairs.tokenizer_hash}}
    return Reference(model, device, eos, pad, model_info)


@torch.no_grad()
def score_shard(model, pairs_dir: Path, shard: ShardInfo, out_path: Path, batch_size: int, device: torch.device,
                packing: str, cost: Callable[[int, int, bool], float]) -> int:
    """Score one pairs shard into `out_path` (atomically), `batch_size` pairs per forward laid out
    as the trainer lays them out (data/layout.py: `packing` auto, always or never, as data.packing,
    `cost` as flops.CostModel.layout_cost); returns the number of tokens scored."""
    samples = list(ShardCursor(pairs_dir / shard.name, "pairs", shard.num_samples))
    keys, chosen, rejected, chosen_tokens, rejected_tokens = [], [], [], [], []
    tokens = 0
    layout = partial(lay_out, packing=packing, pad_token_id=0, cost=cost)
    for start in range(0, len(samples), batch_size):
        chunk = [{"key": key, "label": 1.0, **arrays} for key, _, arrays in samples[start : start + batch_size]]
        batch = MicroBatch.build(collate_pairs(chunk, np.zeros(len(chunk), bool)), None, layout)
        out = policy_logprobs(model, batch.to(device))
        logps, counts = out.logps.double().cpu(), out.num_tokens.cpu()
        keys += batch.pairs.keys
        chosen += batch.chosen(logps).tolist()
        rejected += batch.rejected(logps).tolist()
        chosen_tokens += batch.chosen(counts).tolist()
        rejected_tokens += batch.rejected(counts).tolist()
        tokens += batch.counts.tokens
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
    packing: str = "auto",
    device: torch.device = torch.device("cpu"),
    model_info: dict | None = None,
    log: Callable[[str], None] = stderr_log,
) -> Manifest | None:
    """Write this rank's reference shards; rank 0 then writes and returns the manifest.

    Callable in one process without a process group (rank 0 of 1) as well as under torchrun."""
    check_batch_size(batch_size)
    packing = packing_for(packing, getattr(model, "config", None), "--packing")  # padded rows for a sliding window
    pairs_dir, out_dir = Path(pairs_dir), Path(out_dir)
    pairs = Manifest.read(pairs_dir, "pairs")
    model.eval()
    params = {"pairs": manifest_fingerprint(pairs_dir), "batch_size": batch_size, "packing": packing, **(model_info or {})}
    cost = CostModel.of(model).layout_cost  # once for the job: each batch may choose padded or packed rows
    totals = run_shard_job(
        "score_reference", pairs.shards, out_dir,
        lambda index, shard: score_shard(model, pairs_dir, shard, out_dir / shard.name, batch_size, device, packing, cost),
        rank=rank, world_size=world_size, log=log, params=params, after_shards=lambda: finish_forwards(model))
    if rank != 0:
        return None
    manifest = Manifest("ref_logps", pairs.tokenizer_hash, [ShardInfo(s.name, s.num_samples) for s in pairs.shards],
                        info={"created_by": "tools/score_reference.py", "pairs_num_samples": pairs.num_samples,
                              **made_from(pairs_dir, pairs.tokenizer_hash, model, model_info)})
    manifest.write(out_dir)
    log(f"score_reference: {pairs.num_samples} pairs in {len(pairs.shards)} shards scored into {out_dir} "
        f"({describe_totals(totals)})")
    return manifest
