"""The on-policy pass of tools/evaluate.py: a model's KL from the reference (and reward) on its own samples.

K responses per eval prompt sampled from the evaluated model (`producers.sample.generate`, each
response seeded from (seed, prompt key, k): the samples do not depend on the number of ranks),
scored under the evaluated model and under the reference model; `on_policy/kl_policy_ref` is
mean(logp_theta - logp_ref), an estimate of KL(pi_theta || pi_ref) when sampling at temperature 1
and top-p 1, with its standard error clustered by prompt (the samples of one prompt are not
independent: K per record, and a pairs set often has several records per prompt); with a reward
function, `on_policy/reward` likewise. `on_policy/prompts` counts distinct prompts (by token ids),
`on_policy/samples` the responses sampled. Prompts are cut into fixed batches in manifest order
and batch b runs on rank b mod world size, so even the floating-point batch effects are the same at
any world size.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from mpo_dist.data.collate import pad_sequences
from mpo_dist.data.shards import Manifest, ShardCursor
from mpo_dist.distributed import RankInfo, all_reduce_sum
from mpo_dist.evaluation import clustered_mean_and_stderr
from mpo_dist.inference_model import finish_forwards
from mpo_dist.logprobs import sequence_logprobs
from mpo_dist.metric_names import (KL_POLICY_REF, ON_POLICY_EOS_FRACTION, ON_POLICY_PROMPTS, ON_POLICY_RESPONSE_TOKENS,
                                   ON_POLICY_REWARD, ON_POLICY_SAMPLES, ON_POLICY_SECONDS, stderr_name)
from mpo_dist.producers.sample import SamplingParams, generate, sample_seed
from mpo_dist.progress import Progress, stderr_log


@torch.no_grad()
def on_policy_metrics(params: SamplingParams, pairs_dir: str, model, reference, *, max_prompts: int, batch_size: int,
                      tokenizer, reward: Callable | None, device: torch.device, info: RankInfo, pad_token_id: int,
                      eos_token_ids, log: Callable[[str], None] = stderr_log) -> dict[str, float]:
    """KL(pi_theta || pi_ref) estimated on `model`'s own samples for the prompts of `pairs_dir` (the
    first `max_prompts`, 0: all), and the mean reward when `reward` is given. Rank 0 shows its
    samples' progress."""
    start = time.monotonic()
    pairs = Manifest.read(pairs_dir, "pairs")
    jobs = []  # (prompt ids, seed, prompt) in manifest order: the first max_prompts records, K samples each
    prompt_index: dict[tuple[int, ...], int] = {}  # distinct prompts (by token ids): a pair set has several records per prompt
    for shard in pairs.shards:
        for key, _, arrays in ShardCursor(Path(pairs_dir) / shard.name, "pairs", shard.num_samples):
            if max_prompts and len(jobs) >= max_prompts * params.num_samples:
                break
            prompt = prompt_index.setdefault(tuple(arrays["prompt_ids"].tolist()), len(prompt_index))
            jobs += [(arrays["prompt_ids"], sample_seed(params.seed, key, k), prompt) for k in range(params.num_samples)]
    # Per sample, in job order (each rank fills its own, summed over ranks): log-ratio, reward, response
    # tokens, ended with EOS, sampled. Kept per sample for the standard errors clustered by prompt.
    values = torch.zeros(len(jobs), 5, dtype=torch.float64)
    starts = range(0, len(jobs), batch_size)
    mine = list(starts)[info.rank :: info.world_size]
    progress = Progress("evaluate (on-policy)", "samples", log,
                        total=sum(len(jobs[start : start + batch_size]) for start in mine), work_unit="tokens sampled",
                        enabled=info.rank == 0, first_after_s=0.0,
                        detail=f"rank 0 of {info.world_size}, " if info.world_size > 1 else "")
    done, sampled_tokens = 0, 0
    for start in mine:
        chunk = jobs[start : start + batch_size]
        prompts = [prompt for prompt, _, _ in chunk]
        results = generate(model, prompts, [seed for _, seed, _ in chunk], params, eos_token_ids, pad_token_id, device)
        responses = [response for response, _ in results]
        rows = pad_sequences(prompts, responses, pad_token_id)
        tensors = [rows[name].to(device) for name in ("input_ids", "attention_mask", "response_mask")]
        theta = sequence_logprobs(model, *tensors).logps.double().cpu()
        ref = sequence_logprobs(reference, *tensors).logps.double().cpu()
        block = values[start : start + len(chunk)]
        block[:, 0] = theta - ref
        if reward is not None:
            block[:, 1] = torch.tensor([float(reward(tokenizer.decode(prompt.tolist(), skip_special_tokens=True),
                                                     tokenizer.decode(response.tolist(), skip_special_tokens=True)))
                                        for prompt, response in zip(prompts, responses)], dtype=torch.float64)
        block[:, 2] = torch.tensor([len(response) for response in responses], dtype=torch.float64)
        block[:, 3] = torch.tensor([reason == "eos" for _, reason in results], dtype=torch.float64)
        block[:, 4] = 1.0
        done += len(chunk)
        sampled_tokens += int(block[:, 2].sum())
        progress.update(done, work=sampled_tokens)
    progress.close()
    finish_forwards(model)  # sharded models: serve the group's forwards until every rank is done
    values = all_reduce_sum(values.to(device)).cpu()
    if not bool((values[:, 4] == 1).all()):  # an error in the sharding, never in the data
        raise RuntimeError(f"on-policy pass sampled {values[:, 4].sum():.0f} responses once each, expected {len(jobs)}")
    count = len(jobs)
    clusters = torch.tensor([prompt for _, _, prompt in jobs], dtype=torch.long)
    # Standard errors clustered by prompt: the samples of one prompt (K per record, several records
    # per prompt) share it, so treating them as independent would understate the error.
    out = {ON_POLICY_SAMPLES: float(count), ON_POLICY_PROMPTS: float(len(prompt_index))}
    out[KL_POLICY_REF], out[stderr_name(KL_POLICY_REF)] = clustered_mean_and_stderr(values[:, 0], clusters)
    if reward is not None:
        out[ON_POLICY_REWARD], out[stderr_name(ON_POLICY_REWARD)] = clustered_mean_and_stderr(values[:, 1], clusters)
    tokens, eos = float(values[:, 2].sum()), float(values[:, 3].sum())
    out[ON_POLICY_RESPONSE_TOKENS] = tokens / count
    out[ON_POLICY_EOS_FRACTION] = eos / count
    out[ON_POLICY_SECONDS] = time.monotonic() - start
    return out
