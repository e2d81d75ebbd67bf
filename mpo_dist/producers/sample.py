"""Sampling D_ref from the reference model (the D_ref data contract): MPO's point-wise KL samples.

For every prompt of the pairs shards, K responses are sampled (`generate`):

- Continuous batching. Up to `batch_size` sequences are decoded together with a KV cache (a
  transformers `DynamicCache`), left-padded so that every row's newest token is in the last column.
  A row that ends (at any EOS id, or after max_new_tokens) leaves the batch at once; when a few slots
  are free (`refill_slots`, default an eighth of the batch) the next pending prompts of the shard are
  prefilled together in one batch and joined: their cache and the batch's are left-padded to one
  width (masked columns) and concatenated, and columns that no row attends any more are cut off.
  Long and short responses thus share the batch without idle rows. The price: a joining row is
  padded to the batch's width, its oldest row's length. Refills pay when response lengths vary and
  cost a little when nearly every response runs to max_new_tokens; per-slot preallocated caches with
  ready-made masks, whose every step attends the full capacity, were slower than these joins
  (tools/bench_sampler.py; figures in docs/performance.md). A cache that is not plain key/value tensors
  (sliding windows, recurrent state) is only ever narrowed: then a batch is refilled once all of
  its rows have ended.
- Vectorised sampling with one random stream per sample. Sample k of prompt `key` has its own
  generator, seeded by `sample_seed(seed, key, k)`, that draws all of its max_new_tokens uniforms at
  once; each step picks every row's token at once by inverse CDF (the cumulative sum of the
  temperature-scaled, top-p filtered probabilities against the row's uniform for that step). Greedy
  (temperature 0) is the argmax. The only host sync per step is whether any row ended.

A sample therefore does not depend on the rank, the number of ranks or nodes, or which prompts share
its batch, up to floating-point batch effects: its probabilities in a batch differ from those alone by
a few 1e-6 at most (left padding, other rows), so a token differs only when its uniform falls that
close to a CDF step, which is rare (the rest of that response then differs too, an equally valid
draw). Even those repeat: the schedule, like everything else, depends only on the shard (its prompts
in file order) and the settings, so D_ref is byte-identical whatever the number of processes.

The stored `logp_ref(y|x)` is a re-scoring of prompt + response with `logprobs.py`, the trainer's
own computation, at temperature 1, in batches of `batch_size` samples in file order: with the
default temperature 1 and top-p 1 the responses are draws from pi_ref itself, as MPO's estimator of
KL(pi_ref || pi_theta) assumes. Like the reference's, the manifest records the pairs' fingerprint
and the model, dtype and tokenizer (`job.made_from`). Its shards and manifest are the
contract: D_ref made by another engine can be imported (tools/import_dref.py).
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
from mpo_dist.inference_model import finish_forwards
from mpo_dist.logprobs import position_ids_for, sequence_logprobs
from mpo_dist.errors import InputError
from mpo_dist.producers.job import check_batch_size, describe_totals, made_from, manifest_fingerprint, run_shard_job, stderr_log

SAMPLER_VERSION = 2  # 1: per-row torch.multinomial; 2: inverse CDF of pre-drawn uniforms, refilled batches


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


def _uniforms(seeds: list[int], params: SamplingParams) -> torch.Tensor:
    """[samples, max_new_tokens] float64 uniforms in [0, 1), one call per sample on its own generator.

    Drawn on the CPU whatever the device, so a seed means the same draws on every machine."""
    if params.temperature == 0:  # greedy decoding draws nothing
        return torch.zeros(len(seeds), params.max_new_tokens, dtype=torch.float64)
    return torch.stack([torch.rand(params.max_new_tokens, dtype=torch.float64,
                                   generator=torch.Generator().manual_seed(seed)) for seed in seeds])


def _pick(logits: torch.Tensor, uniforms: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One token per row: the argmax at temperature 0, else the inverse CDF of the row's temperature-
    scaled, top-p filtered distribution at the row's uniform `u`: the first token whose cumulative
    probability exceeds u * total, so token i is drawn with probability p_i / total."""
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / params.temperature, dim=-1)
    order = None
    if params.top_p < 1:
        probs, order = probs.sort(dim=-1, descending=True, stable=True)
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= params.top_p, 0.0)  # the top token always stays
    # float64: rounding in the CDF (~1e-16) is far below any float32 probability, so the draw is exact
    # to float32; a zero-probability token (a flat CDF step) never exceeds u * total first, and the
    # clamp covers u * total rounding up to the total itself (only for u = 1 - 2**-53).
    cdf = probs.double().cumsum(-1)
    index = torch.searchsorted(cdf, uniforms[:, None] * cdf[:, -1:], right=True).clamp_(max=cdf.shape[-1] - 1)
    return (index if order is None else order.gather(-1, index)).squeeze(-1)


def as_id_list(ids: int | list[int] | None) -> list[int]:
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


def _kv_cache(model) -> dict:
    """A fresh KV cache under the keyword this transformers version uses (`cache`, formerly `past_key_values`)."""
    import inspect

    from transformers import DynamicCache

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: DynamicCache(config=model.config)}


def _cache_tensors(cache) -> list | None:
    """The cache's layers when all hold plain key/value tensors of every position (`DynamicLayer`),
    which rows may be padded, cut and joined in; None for other caches (sliding windows, recurrent
    states), which are only ever narrowed to fewer rows."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or layer.keys is None for layer in layers):
        return None
    return layers


@dataclass
class _Rows:
    """The sequences decoded together, left-padded: every row's newest token is in the last column.

    Between steps every token sampled so far is in the cache except each row's latest, and `logits`
    is the distribution of each row's next token."""

    jobs: list[int]  # which prompt each row samples for (host side)
    kv: dict  # {keyword: cache}, updated in place by every forward
    attention_mask: torch.Tensor  # [rows, width] long, width == the cache's length
    next_position: torch.Tensor  # [rows, 1] the position id of each row's next token
    uniforms: torch.Tensor  # [rows, max_new_tokens] float64: each sample's draws, one per step
    tokens: torch.Tensor  # [rows, max_new_tokens] long: the first `steps` are the response so far
    steps: torch.Tensor  # [rows] long: tokens sampled
    logits: torch.Tensor  # [rows, vocab] float32
    plain: bool = False  # the cache is plain tensors (`_cache_tensors`): rows can be cut, padded and joined
    padded: bool = True  # some column is masked for some row (host side, updated when rows change)

    @property
    def cache(self):
        return next(iter(self.kv.values()))

    def __len__(self) -> int:
        return len(self.jobs)

    def check_padding(self) -> None:
        self.padded = not bool(self.attention_mask.all())  # a host sync, only when rows change


def _prefill(model, jobs: list[int], prompts: list[np.ndarray], seeds: list[int], params: SamplingParams,
             pad_token_id: int, device: torch.device) -> _Rows:
    """Run the prompts of `jobs` through the model in one left-padded batch, with a fresh cache."""
    batch = pad_sequences([prompts[j] for j in jobs], [np.zeros(0, np.int64)] * len(jobs), pad_token_id,
                          padding_side="left")
    input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device).long()
    positions = position_ids_for(attention_mask)
    kv = _kv_cache(model)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                logits_to_keep=1, **kv)
    rows = _Rows(list(jobs), kv, attention_mask, positions[:, -1:] + 1,
                 _uniforms([seeds[j] for j in jobs], params).to(device),
                 torch.zeros(len(jobs), params.max_new_tokens, dtype=torch.long, device=device),
                 torch.zeros(len(jobs), dtype=torch.long, device=device), out.logits[:, -1].float())
    rows.plain = _cache_tensors(rows.cache) is not None
    rows.padded = len({len(prompts[j]) for j in jobs}) > 1
    return rows


def _decode(model, rows: _Rows, latest: torch.Tensor, ready_mask: bool) -> None:
    """Feed each row's latest token: one step of every row, in place.

    With `ready_mask` (sdpa attention) a padded batch of plain caches gets its mask ready-made:
    [rows, 1, 1, width] booleans, exactly what transformers would build for one new query per row
    (it attends every real column), without building it again each step (a visible share of a CPU step).
    Unpadded batches get the 2D mask, for which transformers passes no mask to the attention kernel."""
    rows.attention_mask = torch.cat([rows.attention_mask, torch.ones_like(rows.attention_mask[:, :1])], dim=1)
    mask = rows.attention_mask
    if ready_mask and rows.plain and rows.padded:
        mask = mask.bool()[:, None, None, :]
    out = model(input_ids=latest[:, None], attention_mask=mask, position_ids=rows.next_position, use_cache=True,
                **rows.kv)
    rows.next_position = rows.next_position + 1
    rows.logits = out.logits[:, -1].float()


def _narrow(rows: _Rows, keep: torch.Tensor) -> _Rows:
    """The rows where `keep` is true; leading columns that no remaining row attends are cut off."""
    index = keep.nonzero().squeeze(-1)
    rows.cache.batch_select_indices(index)
    narrowed = _Rows([job for job, kept in zip(rows.jobs, keep.tolist()) if kept], rows.kv,
                     rows.attention_mask[index], rows.next_position[index], rows.uniforms[index],
                     rows.tokens[index], rows.steps[index], rows.logits[index], plain=rows.plain)
    first = int(narrowed.attention_mask.any(0).long().argmax())  # every row attends its own last column
    if rows.plain and first > 0:
        narrowed.attention_mask = narrowed.attention_mask[:, first:]
        for layer in _cache_tensors(narrowed.cache):
            layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
    narrowed.check_padding()
    return narrowed


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _join(rows: _Rows, joining: _Rows) -> _Rows:
    """One batch of both: the narrower is left-padded to the wider's width (masked, zero keys and
    values), which leaves every row's attention unchanged. Needs plain caches."""
    width = max(rows.attention_mask.shape[1], joining.attention_mask.shape[1])
    for layer, other in zip(_cache_tensors(rows.cache), _cache_tensors(joining.cache)):
        layer.keys = torch.cat([_left_pad(layer.keys, width, 2), _left_pad(other.keys, width, 2)])
        layer.values = torch.cat([_left_pad(layer.values, width, 2), _left_pad(other.values, width, 2)])
    joined = _Rows(rows.jobs + joining.jobs, rows.kv,
                   torch.cat([_left_pad(rows.attention_mask, width, 1), _left_pad(joining.attention_mask, width, 1)]),
                   *(torch.cat([getattr(rows, name), getattr(joining, name)])
                     for name in ("next_position", "uniforms", "tokens", "steps", "logits")), plain=True)
    joined.check_padding()
    return joined


def generate(model, prompts: list[np.ndarray], seeds: list[int], params: SamplingParams,
             eos_token_ids: int | list[int] | None, pad_token_id: int, device: torch.device,
             batch_size: int | None = None, refill_slots: int | None = None) -> list[tuple[np.ndarray, str]]:
    """Sample one response per prompt; returns (token ids, stop reason) in the prompts' order.

    At most `batch_size` sequences (default: all) are decoded at once; when `refill_slots` of them
    have finished (default: an eighth of the batch), that many pending prompts join. A response ends
    at any of `eos_token_ids` (chat models often have several, e.g. end of turn) or after
    `params.max_new_tokens` tokens."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if any(len(prompt) == 0 for prompt in prompts):
        raise InputError("an empty prompt cannot be sampled from: every prompt needs at least one token")
    batch_size = max(len(prompts), 1) if batch_size is None else batch_size
    check_batch_size(batch_size)
    refill_slots = max(1, batch_size // 8) if refill_slots is None else refill_slots
    # Inference mode (a few % less overhead per operation than no_grad) makes FSDP's gathered parameters
    # inference tensors, which a later no-grad forward (re-scoring) could not gather into again.
    with torch.no_grad() if getattr(model, "sharded", False) else torch.inference_mode():
        return _generate(model, prompts, seeds, params, eos_token_ids, pad_token_id, device, batch_size, refill_slots)


def _generate(model, prompts, seeds, params, eos_token_ids, pad_token_id, device, batch_size, refill_slots):
    ready_mask = getattr(model.config, "_attn_implementation", None) == "sdpa"
    eos = torch.tensor(as_id_list(eos_token_ids), dtype=torch.long, device=device)
    results: list[tuple[np.ndarray, str]] = [None] * len(prompts)  # type: ignore[list-item]
    pending = list(range(len(prompts)))[::-1]  # popped from the end: file order
    rows = None
    while rows is not None or pending:
        free = batch_size - (0 if rows is None else len(rows))
        if pending and (rows is None or (rows.plain and free >= refill_slots)):
            new = _prefill(model, [pending.pop() for _ in range(min(free, len(pending)))], prompts, seeds, params,
                           pad_token_id, device)
            rows = new if rows is None else _join(rows, new)
        rows = _step(model, rows, params, eos, results, ready_mask)
    return results


def _step(model, rows: _Rows, params: SamplingParams, eos: torch.Tensor, results: list,
          ready_mask: bool) -> _Rows | None:
    """Sample every row's next token; store the responses that end; feed the others' to the model.
    Returns the rows still running (None when none is)."""
    arange = torch.arange(len(rows), device=rows.steps.device)
    latest = _pick(rows.logits, rows.uniforms[arange, rows.steps], params)
    rows.tokens[arange, rows.steps] = latest
    rows.steps += 1
    stopped = torch.isin(latest, eos)
    finished = stopped | (rows.steps >= params.max_new_tokens)
    if bool(finished.any()):  # the one host sync of a step
        _store_finished(rows, finished, stopped, results)
        if bool(finished.all()):
            return None
        keep = ~finished
        rows, latest = _narrow(rows, keep), latest[keep]
    _decode(model, rows, latest, ready_mask)
    return rows


def _store_finished(rows: _Rows, finished: torch.Tensor, stopped: torch.Tensor, results: list) -> None:
    index = finished.nonzero().squeeze(-1)
    tokens, steps, stops = rows.tokens[index].cpu().numpy(), rows.steps[index].tolist(), stopped[index].tolist()
    for row, response, length, stop in zip(index.tolist(), tokens, steps, stops):
        results[rows.jobs[row]] = (response[:length].astype(np.int32), "eos" if stop else "length")


@torch.no_grad()
def write_dref_shard(model, out_path: Path, samples: list[tuple[str, np.ndarray, np.ndarray, str]], batch_size: int,
                     pad_token_id: int, device: torch.device) -> list[int]:
    """Write D_ref samples (key, prompt ids, response ids, stop reason) to `out_path` (atomically) with
    their `logp_ref`, re-scored by the reference model in batches of `batch_size` in the given order.
    Returns each sample's length (prompt + response)."""
    lengths = []
    with ShardWriter(out_path, "dref") as writer:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            rows = pad_sequences([prompt for _, prompt, _, _ in chunk], [response for _, _, response, _ in chunk],
                                 pad_token_id)
            scored = sequence_logprobs(model, rows["input_ids"].to(device), rows["attention_mask"].to(device),
                                       rows["response_mask"].to(device))
            for (key, prompt, response, reason), logp in zip(chunk, scored.logps.double().tolist()):
                writer.write(key, {"logp_ref": logp, "stop_reason": reason},
                             {"prompt_ids": prompt.astype(np.int32), "response_ids": response.astype(np.int32)})
                lengths.append(len(prompt) + len(response))
    return lengths


def sample_shard(model, pairs_dir: Path, shard: ShardInfo, out_path: Path, params: SamplingParams, batch_size: int,
                 eos_token_ids: int | list[int] | None, pad_token_id: int, device: torch.device) -> tuple[int, list[int]]:
    """D_ref samples for one pairs shard into `out_path`; returns (tokens sampled, per-sample lengths)."""
    jobs = [(f"{key}-s{k}", arrays["prompt_ids"], sample_seed(params.seed, key, k))
            for key, _, arrays in ShardCursor(pairs_dir / shard.name, "pairs", shard.num_samples)
            for k in range(params.num_samples)]
    results = generate(model, [prompt for _, prompt, _ in jobs], [seed for _, _, seed in jobs], params, eos_token_ids,
                       pad_token_id, device, batch_size=batch_size)
    samples = [(key, prompt, response, reason) for (key, prompt, _), (response, reason) in zip(jobs, results)]
    lengths = write_dref_shard(model, out_path, samples, batch_size, pad_token_id, device)
    return sum(len(response) for response, _ in results), lengths


def write_dref_manifest(model, pairs_dir: Path, out_dir: Path, per_pair: int, info: dict,
                        model_info: dict | None) -> Manifest:
    """The D_ref manifest over finished shards (one per pairs shard, same name, `per_pair` samples per
    pair): lengths for token-budget batching, read back from the shards, and the provenance."""
    pairs = Manifest.read(pairs_dir, "pairs")
    shards = []
    for shard in pairs.shards:
        count = shard.num_samples * per_pair
        lengths = [len(arrays["prompt_ids"]) + len(arrays["response_ids"])
                   for _, _, arrays in ShardCursor(out_dir / shard.name, "dref", count)]
        shards.append(ShardInfo(shard.name, count, lengths))
    manifest = Manifest("dref", pairs.tokenizer_hash, shards,
                        info={**info, **made_from(pairs_dir, pairs.tokenizer_hash, model, model_info)})
    manifest.write(out_dir)
    return manifest


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

    # The sampler's version is part of the job: a rerun never mixes shards drawn by another algorithm.
    job = {"pairs": manifest_fingerprint(pairs_dir), "sampling": asdict(params), "batch_size": batch_size,
           "eos_token_ids": eos_token_ids, "sampler": SAMPLER_VERSION, **(model_info or {})}
    totals = run_shard_job("sample_reference", pairs.shards, out_dir, make, rank=rank, world_size=world_size,
                           log=log, params=job, unit="tokens sampled", after_shards=lambda: finish_forwards(model))
    if rank != 0:
        return None
    manifest = write_dref_manifest(model, pairs_dir, out_dir, params.num_samples, {
        "created_by": "tools/sample_reference.py", "sampling": asdict(params), "batch_size": batch_size}, model_info)
    log(f"sample_reference: {manifest.num_samples} samples ({params.num_samples} per prompt) in "
        f"{len(manifest.shards)} shards written to {out_dir} ({describe_totals(totals, 'tokens sampled')})")
    return manifest


# ------------------------------------------------------------------ D_ref sampled by another engine

