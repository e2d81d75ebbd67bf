"""A preference task with a known reward, on a real pretrained model: story openings for stories260K.

Prompts are story openings (`TEMPLATES` x `NAMES`: 400 distinct ones). Preference pairs are two
samples of the reference model for the same prompt, labelled by the Bradley-Terry model on the true
reward of `mpo_dist.study.story_reward`. The samples are drawn by the project's own sampler
(tools/sample_reference.py) from a bootstrap pairs set whose records carry only the prompts, so the
chain is made of the ordinary tools (tools/study_frontier.py runs it):

1. `write_prompt_records` (tools/make_story_prompts.py): one JSONL record per prompt with
   placeholder responses;
2. tools/prepare_pairs.py (no split) and tools/sample_reference.py --num-samples 2P: 2P reference
   samples per prompt, each with its own seeded random stream;
3. `label_pairs` (tools/label_story_pairs.py): the samples of each prompt, decoded to text, taken two
   at a time into P pairs and labelled, written as pairs JSONL for tools/prepare_pairs.py (which
   splits train / held-out by a hash of the prompt text).

Labels: "sampled" (default) draws each pair's winner once with probability sigmoid(r_a - r_b)
(`story_reward.sample_preference`, seeded by the pair's key): hard labels with Bradley-Terry noise,
the setting of the DPO paper's controlled experiments, in which DPO's optimum is unbounded. "soft"
keeps the higher-reward response as chosen with `label` = sigmoid(r_chosen - r_rejected), which the
losses accept as the probability that chosen is preferred.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Callable

from mpo_dist.data.shards import Manifest, ShardCursor
from mpo_dist.errors import InputError
from mpo_dist.study.story_reward import label_uniform, preference_probability, reward, sample_preference

TEMPLATES = [
    "Once upon a time, there was a little girl named {name}.",
    "Once upon a time, there was a little boy named {name}.",
    "One day, {name} went to the park.",
    "{name} had a big red ball.",
    "{name} wanted to fly.",
    "{name} found a box in the garden.",
    "{name} saw a cat in the tree.",
    "It was a sunny day. {name} went outside to play.",
    "{name} had a new toy.",
    "{name} lived in a small house.",
    "{name} went to the store with mom.",
    "{name} did not want to sleep.",
    "{name} lost a toy.",
    "{name} was sad.",
    "{name} and the dog ran to the hill.",
    "{name} liked to draw pictures.",
    "One night, {name} heard a loud noise.",
    "{name} wanted to help mom in the kitchen.",
    "{name} went to the beach with dad.",
    "{name} saw a big bug.",
]
NAMES = ["Lily", "Tom", "Sue", "Ben", "Mia", "Max", "Tim", "Anna", "Sam", "Lucy",
         "Jack", "Sara", "Bob", "Amy", "Jake", "Kate", "Leo", "Emma", "Ellie", "Jill"]
LABEL_MODES = ("sampled", "soft")
LENGTH_MODES = ("fixed", "varied")


def story_prompts(count: int) -> list[str]:
    """The first `count` distinct openings: prompt k is template k mod 20 with name k // 20 (so any
    prefix covers the templates evenly). At most len(TEMPLATES) x len(NAMES) = 400."""
    limit = len(TEMPLATES) * len(NAMES)
    if not 1 <= count <= limit:
        raise InputError(f"--num-prompts must be in [1, {limit}], got {count}")
    return [TEMPLATES[k % len(TEMPLATES)].format(name=NAMES[k // len(TEMPLATES)]) for k in range(count)]


def write_prompt_records(path: str | Path, prompts: list[str]) -> Path:
    """One pairs JSONL record per prompt with placeholder responses: the prompts for the sampler
    (tools/prepare_pairs.py needs a chosen and a rejected; nothing else reads them)."""
    records = [{"prompt": prompt, "chosen": " placeholder", "rejected": " unused"} for prompt in prompts]
    return write_jsonl(path, records)


def _read_set(folder: str | Path, kind: str):
    manifest = Manifest.read(folder, kind)
    for shard in manifest.shards:
        yield from ShardCursor(Path(folder) / shard.name, kind, shard.num_samples)


def varied_length(full: int, seed: int, sample_key: str) -> int:
    """The tokens a sample keeps under --lengths varied: uniform in [max(1, full // 4), full], drawn from
    (seed, sample key) alone (so the same under any order of the samples)."""
    shortest = max(1, full // 4)
    return shortest + min(int(label_uniform(seed, f"length/{sample_key}") * (full - shortest + 1)), full - shortest)


def label_pairs(pairs_dir: str | Path, samples_dir: str | Path, tokenizer, *, seed: int = 0, labels: str = "sampled",
                lengths: str = "fixed", reward_fn: Callable[[str, str], float] = reward) -> tuple[list[dict], dict]:
    """Labelled pairs from reference samples: for each prompt of the bootstrap `pairs_dir`, its samples
    in `samples_dir` (D_ref shards made by tools/sample_reference.py, keys `KEY-sK`) decoded as the
    evaluation tool decodes them (special tokens skipped), taken in order two at a time.

    Returns (records for tools/prepare_pairs.py, statistics of the reward spread). Each record has
    `prompt`, `chosen`, `rejected` (and `label` with soft labels), plus what it was made from:
    `key`, `reward_chosen`, `reward_rejected`, `p_chosen` (the Bradley-Terry probability that chosen
    wins), which the prepare tool ignores.

    `lengths="varied"` first cuts every sample to its first `varied_length` tokens (seeded by `seed`
    and the sample's key), so that chosen and rejected differ in length (the samples all run to the
    token budget otherwise): the setting in which `loss.length_normalized_pair` is not a constant scale."""
    if labels not in LABEL_MODES:
        raise InputError(f"--labels must be one of {', '.join(LABEL_MODES)}, got {labels!r}")
    if lengths not in LENGTH_MODES:
        raise InputError(f"--lengths must be one of {', '.join(LENGTH_MODES)}, got {lengths!r}")
    prompts = {key: meta["prompt"] for key, meta, _ in _read_set(pairs_dir, "pairs")}
    responses: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for sample_key, _, arrays in _read_set(samples_dir, "dref"):
        key, _, k = sample_key.rpartition("-s")
        if key not in prompts or not k.isdigit():
            raise InputError(f"{samples_dir}: sample {sample_key} is not a sample of a prompt of {pairs_dir}")
        ids = arrays["response_ids"].tolist()
        if lengths == "varied":
            ids = ids[: varied_length(len(ids), seed, sample_key)]
        responses[key].append((int(k), tokenizer.decode(ids, skip_special_tokens=True)))
    records, differences, identical = [], [], 0
    rewards_by_prompt: dict[str, list[float]] = defaultdict(list)
    for key, prompt in prompts.items():
        texts = [text for _, text in sorted(responses.get(key, []))]
        if len(texts) < 2:
            raise InputError(f"{samples_dir}: prompt {key} has {len(texts)} samples; sample at least 2 per prompt")
        scores = [float(reward_fn(prompt, text)) for text in texts]
        rewards_by_prompt[prompt] += scores
        for j in range(len(texts) // 2):
            (a, r_a), (b, r_b) = (texts[2 * j], scores[2 * j]), (texts[2 * j + 1], scores[2 * j + 1])
            if a.strip() == b.strip():
                identical += 1
                continue
            differences.append(r_a - r_b)
            pair_key = f"{key}-p{j}"
            if labels == "sampled":
                a_wins = sample_preference(r_a, r_b, seed=seed, key=pair_key)
            else:
                a_wins = r_a >= r_b
            (chosen, r_c), (rejected, r_r) = ((a, r_a), (b, r_b)) if a_wins else ((b, r_b), (a, r_a))
            record = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
            if labels == "soft":
                record["label"] = preference_probability(r_c, r_r)
            record.update(key=pair_key, reward_chosen=r_c, reward_rejected=r_r, p_chosen=preference_probability(r_c, r_r))
            records.append(record)
    stats = spread_statistics(records, differences, rewards_by_prompt, identical, labels, seed)
    stats["lengths"] = lengths
    return records, stats


def spread_statistics(records: list[dict], differences: list[float], rewards_by_prompt: dict[str, list[float]],
                      identical: int, labels: str, seed: int) -> dict:
    """How much signal the pairs carry: the within-prompt spread of the reward and the label noise."""
    within = [statistics.pvariance(values) for values in rewards_by_prompt.values() if len(values) > 1]
    all_rewards = [value for values in rewards_by_prompt.values() for value in values]
    decided = [r for r in records if r["reward_chosen"] != r["reward_rejected"]]
    return {
        "labels": labels,
        "label_seed": seed,
        "prompts": len(rewards_by_prompt),
        "samples": len(all_rewards),
        "pairs": len(records),
        "identical_pairs_dropped": identical,
        "reward_mean": statistics.fmean(all_rewards),
        "reward_std": statistics.pstdev(all_rewards),
        "within_prompt_std": math.sqrt(statistics.fmean(within)) if within else math.nan,
        "mean_abs_pair_difference": statistics.fmean(abs(d) for d in differences) if differences else math.nan,
        "tied_pairs": sum(d == 0 for d in differences) / len(differences) if differences else math.nan,
        "mean_p_chosen": statistics.fmean(r["p_chosen"] for r in records) if records else math.nan,
        "chosen_has_higher_reward": (sum(r["reward_chosen"] > r["reward_rejected"] for r in decided) / len(decided)
                                     if decided else math.nan),
    }


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    """One JSON object per line, written atomically (a temp file beside it, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path
