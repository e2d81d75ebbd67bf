"""Sampling D_ref from the reference model (the D_ref data contract): MPO's point-wise KL samples.

For every prompt of the pairs shards, K responses are sampled with a KV cache in left-padded
batches. Each response has its own random generator, seeded from (seed, sample key, k): a sample
does not depend on the rank, the number of ranks or nodes, or which other prompts share its
batch (batches are formed per shard in file order, so even floating-point batch effects repeat).
The stored `logp_ref(y|x)` is a re-scoring of prompt + response with `logprobs.py`, the trainer's
own computation, at temperature 1: with the default temperature 1 and top-p 1 the responses are
draws from pi_ref itself, as MPO's estimator of KL(pi_ref || pi_theta) assumes. Like the reference's,
the manifest records the pairs' fingerprint and the model, dtype and tokenizer (`shard_job.made_from`).
"""

from __future__ import annotations

import math

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mpo_dist.data.collate import pad_sequences
from mpo_dist.data.shards import Manifest, ShardCursor, ShardInfo, ShardWriter
from mpo_dist.logprobs import position_ids_for, sequence_logprobs
from mpo_dist.errors import InputError
from mpo_dist.shard_job import check_batch_size, describe_totals, made_from, manifest_fingerprint, run_shard_job, stderr_log


@dataclass(frozen=True)
class SamplingParams:
    num_samples: int = 1
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        if self.num_samples < 1:
            raise InputError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature < math.inf:  # NaN fails every comparison
            raise InputError(f"--temperature must be finite and >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"--top-p must be in (0, 1], got {self.top_p}")


def sample_seed(seed: int, key: str, k: int) -> int:
    """A 63-bit seed for the k-th sample of `key`: stable across processes and runs."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}/{k}".encode()).digest()[:8], "little") >> 1


def _pick(logits: torch.Tensor, generators: list[torch.Generator], params: SamplingParams) -> torch.Tensor:
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p  # the top token always stays
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.cat([torch.multinomial(row, 1, generator=generator) for row, generator in zip(probs, generators)])


def _as_list(ids: int | list[int] | None) -> list[int]:
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


def _kv_cache(model) -> dict:
    """A fresh KV cache under the keyword this transformers version uses (`cache`, formerly `past_key_values`)."""
    import inspect

    from transformers import DynamicCache

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: DynamicCache(config=model.config)}


@torch.no_grad()
def generate(model, prompts: list[np.ndarray], seeds: list[int], params: SamplingParams,
             eos_token_ids: int | list[int] | None, pad_token_id: int, device: torch.device) -> list[tuple[np.ndarray, str]]:
    """Sample one response per prompt (left-padded batch, KV cache); returns (token ids, stop reason).
    A response ends at any of `eos_token_ids` (chat models often have several, e.g. end of turn)."""
    eos = torch.tensor(_as_list(eos_token_ids), dtype=torch.long, device=device)
    batch = pad_sequences(prompts, [np.zeros(0, np.int64)] * len(prompts), pad_token_id, padding_side="left")
    input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    positions = position_ids_for(attention_mask)
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    cache = _kv_cache(model)  # updated in place by every forward
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                logits_to_keep=1, **cache)
    next_position = positions[:, -1:] + 1
    responses: list[list[int]] = [[] for _ in prompts]
    reasons = ["length"] * len(prompts)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for _ in range(params.max_new_tokens):
        tokens = _pick(out.logits[:, -1].float(), generators, params)
        stops = torch.isin(tokens, eos)
        for row, (token, stop) in enumerate(zip(tokens.tolist(), stops.tolist())):
            if not finished[row]:
                responses[row].append(token)
                if stop:
                    reasons[row] = "eos"
        finished |= stops
        if bool(finished.all()):
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        out = model(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=next_position,
                    use_cache=True, **cache)
        next_position = next_position + 1
    return [(np.asarray(response, dtype=np.int32), reason) for response, reason in zip(responses, reasons)]


@torch.no_grad()
def sample_shard(model, pairs_dir: Path, shard: ShardInfo, out_path: Path, params: SamplingParams, batch_size: int,
                 eos_token_ids: int | list[int] | None, pad_token_id: int, device: torch.device) -> tuple[int, list[int]]:
    """D_ref samples for one pairs shard into `out_path`; returns (tokens sampled, per-sample lengths)."""
    jobs = [(f"{key}-s{k}", arrays["prompt_ids"], sample_seed(params.seed, key, k))
            for key, _, arrays in ShardCursor(pairs_dir / shard.name, "pairs", shard.num_samples)
            for k in range(params.num_samples)]
    sampled, lengths = 0, []
    with ShardWriter(out_path, "dref") as writer:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            prompts = [prompt for _, prompt, _ in chunk]
            results = generate(model, prompts, [seed for _, _, seed in chunk], params, eos_token_ids, pad_token_id, device)
            responses = [response for response, _ in results]
            rows = pad_sequences(prompts, responses, pad_token_id)
            scored = sequence_logprobs(model, rows["input_ids"].to(device), rows["attention_mask"].to(device),
                                       rows["response_mask"].to(device))
            for (key, prompt, _), (response, reason), logp in zip(chunk, results, scored.logps.double().tolist()):
                writer.write(key, {"logp_ref": logp, "stop_reason": reason},
                             {"prompt_ids": prompt.astype(np.int32), "response_ids": response})
                lengths.append(len(prompt) + len(response))
                sampled += len(response)
    return sampled, lengths


def sample_dref(
    model,
    pairs_dir: str | Path,
    out_dir: str | Path,
    params: SamplingParams,
    *,
    eos_token_ids: int | list[int] | None,
    pad_token_id: int,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 16,
    device: torch.device = torch.device("cpu"),
    model_info: dict | None = None,
    log: Callable[[str], None] = stderr_log,
) -> Manifest | None:
    """Write this rank's D_ref shards (one per pairs shard, same name); rank 0 then writes the manifest.

    Callable in one process without a process group (rank 0 of 1) as well as under torchrun."""
    params.validate()
    check_batch_size(batch_size)
    pairs_dir, out_dir = Path(pairs_dir), Path(out_dir)
    pairs = Manifest.read(pairs_dir, "pairs")
    model.eval()

    def make(index: int, shard: ShardInfo) -> int:
        sampled, _ = sample_shard(model, pairs_dir, shard, out_dir / shard.name, params, batch_size,
                                  eos_token_ids, pad_token_id, device)
        return sampled

    job = {"pairs": manifest_fingerprint(pairs_dir), "sampling": asdict(params), "batch_size": batch_size,
           "eos_token_ids": eos_token_ids, **(model_info or {})}
    totals = run_shard_job("sample_reference", pairs.shards, out_dir, make, rank=rank, world_size=world_size,
                           log=log, params=job, unit="tokens sampled")
    if rank != 0:
        return None
    shards = []
    for shard in pairs.shards:  # lengths for token-budget batching, read back from the finished shards
        count = shard.num_samples * params.num_samples
        lengths = [len(arrays["prompt_ids"]) + len(arrays["response_ids"])
                   for _, _, arrays in ShardCursor(out_dir / shard.name, "dref", count)]
        shards.append(ShardInfo(shard.name, count, lengths))
    manifest = Manifest("dref", pairs.tokenizer_hash, shards, info={
        "created_by": "tools/sample_reference.py", "sampling": asdict(params), "batch_size": batch_size,
        **made_from(pairs_dir, pairs.tokenizer_hash, model, model_info)})
    manifest.write(out_dir)
    log(f"sample_reference: {manifest.num_samples} samples ({params.num_samples} per prompt) in {len(shards)} shards "
        f"written to {out_dir} ({describe_totals(totals, 'tokens sampled')})")
    return manifest
