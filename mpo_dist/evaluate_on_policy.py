"""The on-policy pass of tools/evaluate.py: a model's KL from the reference (and reward) on its own samples.

K responses per eval prompt sampled from the evaluated model (`producers.sample.generate`, each
response seeded from (seed, prompt key, k): the samples do not depend on the number of ranks),
scored under the evaluated model and under the reference model; `on_policy/kl_policy_ref` is
mean(logp_theta - logp_ref), an estimate of KL(pi_theta || pi_ref) when sampling at temperature 1
and top-p 1, with its standard error; with a reward function, `on_policy/reward` likewise. Prompts
are cut into fixed batches in manifest order and batch b runs on rank b mod world size, so even the
floating-point batch effects are the same at any world size.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from mpo_dist.data.collate import pad_sequences
from mpo_dist.data.shards import Manifest, ShardCursor
from mpo_dist.distributed import RankInfo, all_reduce_sum
from mpo_dist.evaluation import mean_and_stderr
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
    jobs = []  # (prompt ids, seed) in manifest order: the first max_prompts prompts, K samples each
    for shard in pairs.shards:
        for key, _, arrays in ShardCursor(Path(pairs_dir) / shard.name, "pairs", shard.num_samples):
            if max_prompts and len(jobs) >= max_prompts * params.num_samples:
                break
            jobs += [(arrays["prompt_ids"], sample_seed(params.seed, key, k)) for k in range(params.num_samples)]
    # count, sum d, sum d**2, sum reward, sum reward**2, response tokens, responses that ended with EOS
    sums = torch.zeros(7, dtype=torch.float64)
    batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    mine = batches[info.rank :: info.world_size]
    progress = Progress("evaluate (on-policy)", "samples", log, total=sum(map(len, mine)), work_unit="tokens sampled",
                        enabled=info.rank == 0, first_after_s=0.0,
                        detail=f"rank 0 of {info.world_size}, " if info.world_size > 1 else "")
    for chunk in mine:
        prompts = [prompt for prompt, _ in chunk]
        results = generate(model, prompts, [seed for _, seed in chunk], params, eos_token_ids, pad_token_id, device)
        responses = [response for response, _ in results]
        rows = pad_sequences(prompts, responses, pad_token_id)
        tensors = [rows[name].to(device) for name in ("input_ids", "attention_mask", "response_mask")]
        theta = sequence_logprobs(model, *tensors).logps.double().cpu()
        ref = sequence_logprobs(reference, *tensors).logps.double().cpu()
        d = theta - ref
        sums[0] += len(chunk)
        sums[1] += d.sum()
        sums[2] += (d * d).sum()
        if reward is not None:
            for prompt, response in zip(prompts, responses):
                value = float(reward(tokenizer.decode(prompt.tolist(), skip_special_tokens=True),
                                     tokenizer.decode(response.tolist(), skip_special_tokens=True)))
                sums[3] += value
                sums[4] += value * value
        sums[5] += sum(len(response) for response in responses)
        sums[6] += sum(reason == "eos" for _, reason in results)
        progress.update(sums[0].item(), work=sums[5].item())
    progress.close()
    finish_forwards(model)  # sharded models: serve the group's forwards until every rank is done
    count, total, squares, rewards, reward_squares, tokens, eos = all_reduce_sum(sums.to(device)).tolist()
    if round(count) != len(jobs):  # an error in the sharding, never in the data
        raise RuntimeError(f"on-policy pass sampled {count:.0f} responses, expected {len(jobs)}")
    out = {ON_POLICY_SAMPLES: count, ON_POLICY_PROMPTS: count / params.num_samples}
    out[KL_POLICY_REF], out[stderr_name(KL_POLICY_REF)] = mean_and_stderr(count, total, squares)
    if reward is not None:
        out[ON_POLICY_REWARD], out[stderr_name(ON_POLICY_REWARD)] = mean_and_stderr(count, rewards, reward_squares)
    out[ON_POLICY_RESPONSE_TOKENS] = tokens / count
    out[ON_POLICY_EOS_FRACTION] = eos / count
    out[ON_POLICY_SECONDS] = time.monotonic() - start
    return out
