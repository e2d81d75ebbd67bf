"""The reward/KL frontier study: the true story reward, Bradley-Terry labels, the pairs made from
reference samples (varied lengths too), the plan (seeds, data variants, trajectory checkpoints), the
statistics over seeds, and the whole pipeline end to end in its tiny mode (launch/study_frontier.sh
--tiny --jobs 2: that it works, not what it finds), with a restart that skips everything finished, a
run cut short that resumes to the same table, the background mode and the folder lock."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest

from support import REPO, SUBPROCESS_ENV, require_shared

from mpo_dist.study.frontier import (
    DATA_VARIANTS, DEFAULT, METHODS, RUN_COLUMNS, SUMMARY_COLUMNS, TINY, TINY_METHODS, Method, Run, StudySize, aggregate,
    mean_and_ci, plan_runs, read_csv_rows, read_json_rows, seed_streams, t_quantile_975, trajectory_changes,
)
from mpo_dist.study.story_reward import (
    NEGATIVE, POSITIVE, SCALE, label_uniform, preference_probability, reward, sample_preference, sentiment_rate,
)
from mpo_dist.study.story_task import NAMES, TEMPLATES, story_prompts, varied_length

# ------------------------------------------------------------------------------- the true reward


@pytest.mark.unit
def test_reward_of_hand_written_texts():
    assert reward("Tom had a ball.", "He was happy.") == pytest.approx(SCALE * 1 / 3)
    assert reward("", "She was sad and scared.") == pytest.approx(SCALE * -2 / 5)
    assert reward("", "Happy, HAPPY friends!") == pytest.approx(SCALE * 3 / 3)  # case and punctuation do not matter
    assert reward("", "He was happy, then sad.") == 0.0  # one of each cancels
    assert reward("", "The cat sat on the mat.") == 0.0
    assert reward("", "") == 0.0 and reward("", " ... 123 !") == 0.0  # no words: 0, not a division by zero
    assert reward("He was so happy and glad.", "The dog ran.") == 0.0  # only the response counts
    assert reward("", "unhappy") == -SCALE and reward("", "happy") == SCALE  # whole words only


@pytest.mark.unit
def test_reward_is_a_rate_not_a_count():
    once = reward("", "Lily smiled at the dog in the park.")
    assert once > 0
    assert reward("", "Lily smiled at the dog in the park. " * 5) == pytest.approx(once)  # longer is not better


@pytest.mark.unit
def test_lexicons_are_disjoint_lowercase_words():
    assert not POSITIVE & NEGATIVE
    assert all(word.isalpha() and word.islower() for word in POSITIVE | NEGATIVE)
    assert sentiment_rate("happy sad") == 0.0


@pytest.mark.unit
def test_reward_is_usable_by_the_evaluation_tool():
    from mpo_dist.evaluate_model import load_reward

    assert load_reward("mpo_dist.study.story_reward:reward")("Once.", "She was happy.") == pytest.approx(SCALE / 3)


# ---------------------------------------------------------------------------- Bradley-Terry labels


@pytest.mark.unit
def test_preference_probability_is_the_logistic_of_the_reward_difference():
    assert preference_probability(1.0, 1.0) == 0.5
    assert preference_probability(2.0, 1.0) == pytest.approx(1 / (1 + math.exp(-1)))
    assert preference_probability(1.0, 2.0) + preference_probability(2.0, 1.0) == pytest.approx(1.0)
    assert preference_probability(1000.0, 0.0) == 1.0 and preference_probability(0.0, 1000.0) == 0.0  # no overflow


@pytest.mark.unit
@pytest.mark.parametrize("difference", [0.0, 0.5, 1.0, -2.0])
def test_sampled_labels_follow_bradley_terry(difference):
    draws = 20000
    wins = sum(sample_preference(0.3 + difference, 0.3, seed=7, key=f"pair-{i}") for i in range(draws))
    p = 1 / (1 + math.exp(-difference))
    stderr = math.sqrt(p * (1 - p) / draws)
    assert abs(wins / draws - p) <= 4 * stderr + 1e-12, (wins / draws, p)


@pytest.mark.unit
def test_sampled_labels_are_deterministic_per_seed_and_key():
    rewards = [(0.2, 0.9), (1.5, -0.5), (0.0, 0.0)] * 50
    labels = lambda seed: [sample_preference(a, b, seed=seed, key=f"k{i}") for i, (a, b) in enumerate(rewards)]
    assert labels(0) == labels(0)
    assert labels(0) != labels(1)
    assert label_uniform(0, "k1") == label_uniform(0, "k1") and 0 <= label_uniform(3, "x") < 1
    # a label depends on its own key only, not on the pairs labelled before it
    assert sample_preference(0.2, 0.9, seed=0, key="k0") == labels(0)[0]


def _sample_sets(root, tokenizer, responses: dict[str, list[str]]):
    """A pairs set (prompts only) and a D_ref-format set of the given responses, as the tools write them."""
    import numpy as np

    from mpo_dist.data.shards import Manifest, ShardInfo, ShardWriter

    pairs, samples = root / "pairs", root / "samples"
    for folder in (pairs, samples):
        folder.mkdir(parents=True)
    encode = lambda text: np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)
    with ShardWriter(pairs / "shard-000000.tar", "pairs") as writer:
        for key, prompt in enumerate(responses):
            writer.write(f"{key:09d}", {"prompt": prompt, "chosen": "a", "rejected": "b", "label": None},
                         {"prompt_ids": encode(prompt), "chosen_ids": encode("a"), "rejected_ids": encode("b")})
    count = sum(len(texts) for texts in responses.values())
    with ShardWriter(samples / "shard-000000.tar", "dref") as writer:
        for key, texts in enumerate(responses.values()):
            for k, text in enumerate(texts):
                writer.write(f"{key:09d}-s{k}", {"logp_ref": -1.0, "stop_reason": "length"},
                             {"prompt_ids": encode("x"), "response_ids": encode(text)})
    Manifest("pairs", "h", [ShardInfo("shard-000000.tar", len(responses))]).write(pairs)
    Manifest("dref", "h", [ShardInfo("shard-000000.tar", count)]).write(samples)
    return pairs, samples


@pytest.mark.unit
def test_label_pairs_takes_samples_two_at_a_time_and_labels_them(tmp_path):
    from mpo_dist.study.story_task import label_pairs
    from mpo_dist.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(require_shared("stories260K"))
    responses = {"Tom had a ball.": ["He was happy.", "He was sad.", "He ran home.", "He ran home."],
                 "Sue saw a cat.": ["She smiled and smiled.", "The cat was scared."]}
    pairs, samples = _sample_sets(tmp_path, tokenizer, responses)
    records, stats = label_pairs(pairs, samples, tokenizer, labels="soft")
    assert stats["identical_pairs_dropped"] == 1 and stats["pairs"] == len(records) == 2
    first, second = records
    assert (first["prompt"], first["chosen"], first["rejected"]) == ("Tom had a ball.", "He was happy.", "He was sad.")
    assert first["label"] == pytest.approx(preference_probability(SCALE / 3, -SCALE / 3))
    assert (second["chosen"], second["rejected"]) == ("She smiled and smiled.", "The cat was scared.")
    assert stats["chosen_has_higher_reward"] == 1.0 and stats["samples"] == 6
    sampled, _ = label_pairs(pairs, samples, tokenizer, labels="sampled", seed=3)
    assert all("label" not in record for record in sampled)  # hard labels: chosen is the winner
    firsts = {"He was happy.": "He was sad.", "She smiled and smiled.": "The cat was scared."}  # sample order
    for record in sampled:
        a = record["chosen"] if record["chosen"] in firsts else record["rejected"]
        a_won = sample_preference(reward("", a), reward("", firsts[a]), seed=3, key=record["key"])
        assert (record["chosen"] == a) == a_won
        assert record["p_chosen"] == pytest.approx(preference_probability(record["reward_chosen"], record["reward_rejected"]))
    assert label_pairs(pairs, samples, tokenizer, labels="sampled", seed=3)[0] == sampled


# ------------------------------------------------------------------------------------ prompts, plan


@pytest.mark.unit
def test_story_prompts_are_distinct_and_cover_the_templates():
    prompts = story_prompts(len(TEMPLATES) * len(NAMES))
    assert len(set(prompts)) == len(prompts) == 400
    assert story_prompts(20) == [t.format(name=NAMES[0]) for t in TEMPLATES]
    assert story_prompts(30) == prompts[:30]
    with pytest.raises(Exception, match="--num-prompts"):
        story_prompts(401)


def _study_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("study_tool", REPO / "tools" / "study_frontier.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def _tiny_methods() -> tuple[Method, ...]:
    return tuple(m for m in METHODS if m.name in TINY_METHODS)


@pytest.mark.unit
def test_plan_has_three_seeds_of_every_configuration_and_long_trajectories():
    runs = plan_runs(DEFAULT)
    assert len({run.name for run in runs}) == len(runs)
    arms = {}
    for run in runs:
        arms.setdefault(run.arm, []).append(run.seed)
    assert all(sorted(seeds) == [0, 1, 2] for seeds in arms.values()) and DEFAULT.seeds >= 3
    assert DEFAULT.steps >= 3 * 160 and DEFAULT.eval_steps[-1] == DEFAULT.steps and len(DEFAULT.eval_steps) >= 5
    assert DEFAULT.short_steps in DEFAULT.eval_steps  # the short runs' step is a point of every trajectory
    assert all(step % DEFAULT.checkpoint_interval() == 0 for step in (*DEFAULT.eval_steps, DEFAULT.short_steps))
    trajectories = {(m.loss, dict(m.options).get("pair_logit_scale", 1.0), m.tau_per_beta > 0)
                    for m in METHODS if m.trajectory and m.data == "hard"}
    assert {("dpo", 1.0, False), ("ipo", 1.0, False), ("mpo", 0.05, False), ("mpo", 0.05, True)} <= trajectories
    assert all(len(m.betas) >= 2 for m in METHODS if m.trajectory and m.data == "hard")  # two strengths each
    soft = {m.loss for m in METHODS if m.data == "soft"}
    assert soft == {"dpo", "ipo", "mpo"}
    (sweep,) = [m for m in METHODS if m.taus]
    assert len(sweep.betas) == 1 and len(sweep.taus) >= 3 and len(plan_runs(DEFAULT, (sweep,))) == 3 * len(sweep.taus)
    assert [run.arm for run in plan_runs(DEFAULT, (sweep,))][::3] == [f"{sweep.name}-b0.3-t{t:g}" for t in sweep.taus]
    options = {key for m in METHODS for key, _ in m.options}
    assert {"length_normalized_pair", "chosen_nll", "length_normalized_tau", "pair_logit_scale"} <= options
    assert all(m.data == "varied" for m in METHODS if dict(m.options).get("length_normalized_pair"))
    assert {m.data for m in METHODS} == set(DATA_VARIANTS)


@pytest.mark.unit
def test_tiny_plan_covers_every_data_variant_trajectory_and_short_runs_and_dref():
    methods = _tiny_methods()
    runs = plan_runs(TINY, methods)
    assert {m.data for m in methods} == set(DATA_VARIANTS) and TINY.seeds == 2
    assert {m.trajectory for m in methods} == {True, False} and any(run.uses_dref for run in runs)
    assert len(runs) == 2 * len(methods)  # one beta each, two seeds


@pytest.mark.unit
def test_run_names_taus_and_overrides():
    method = Method("x", "X", "mpo", (0.1, 1.0), tau_per_beta=0.5, options=(("length_normalized_tau", True),))
    assert method.overrides(0.1) == ["loss.name=mpo", "loss.beta=0.1", "loss.tau=0.05", "loss.length_normalized_tau=true"]
    run = Run(method, 0.1, seed=2)
    assert (run.arm, run.name, run.uses_dref) == ("x-b0.1", "x-b0.1-s2", True)
    assert not Run(METHODS[0], 0.3).uses_dref
    sweep = Method("sw", "S", "mpo", (0.3,), taus=(0.0, 0.1))
    assert [(r.arm, r.tau_value, r.uses_dref) for r in plan_runs(StudySize(seeds=1), (sweep,))] == \
        [("sw-b0.3-t0", 0.0, False), ("sw-b0.3-t0.1", 0.1, True)]
    assert Run(sweep, 0.3, 0, 0.1).overrides()[:3] == ["loss.name=mpo", "loss.beta=0.3", "loss.tau=0.1"]
    assert StudySize(betas_per_method=3).betas(Method("y", "Y", "dpo", (1, 2, 3, 4, 5))) == (1, 3, 5)


@pytest.mark.unit
def test_the_tiny_size_keeps_its_methods_with_other_seeds():
    tool = _study_tool()
    assert tool.selected_methods("", "tiny") == list(TINY_METHODS)  # --tiny --seeds 3 is still the tiny plan
    assert tool.selected_methods("", "default") == [m.name for m in METHODS]
    assert tool.selected_methods("dpo,ipo", "tiny") == ["dpo", "ipo"]


@pytest.mark.unit
def test_seed_streams_differ_within_and_between_seeds():
    streams = [seed_streams(seed) for seed in range(3)]
    values = [value for stream in streams for name, value in stream.items() if name != "training"]
    assert len(set(values)) == len(values)
    assert [stream["training"] for stream in streams] == [0, 1, 2]


@pytest.mark.unit
def test_study_config_loads_with_every_run_setting(tmp_path):
    from mpo_dist.config import load_config

    study = _study_tool().Study(tmp_path, DEFAULT, plan_runs(DEFAULT), tmp_path / "model", nproc=2)
    for run in plan_runs(DEFAULT):
        config = load_config(str(REPO / "configs" / "study_frontier.yaml"), study.run_settings(run)["overrides"])
        assert (config.loss.name, config.loss.beta, config.loss.tau) == (run.method.loss, run.beta, run.tau_value)
        assert config.job.seed == run.seed and config.training.steps == DEFAULT.run_steps(run.method)
        assert config.training.global_batch_size == DEFAULT.batch_size == 2 * config.data.batch_size
        assert config.checkpoint.interval == 40 and config.checkpoint.keep > config.training.steps // 40
        assert bool(config.data.dref) == run.uses_dref and f"/s{run.seed}/{run.method.data}/" in config.data.pairs
        for key, value in run.method.options:
            assert getattr(config.loss, key) == value


# -------------------------------------------------------------------------------- statistics


@pytest.mark.unit
def test_t_intervals_over_seeds():
    assert t_quantile_975(2) == 4.303 and t_quantile_975(30) == 2.042
    assert abs(t_quantile_975(60) - 2.000) < 0.002 and abs(t_quantile_975(1000) - 1.962) < 0.001
    mean, ci, sd = mean_and_ci([1.0, 2.0, 3.0])
    assert (mean, sd) == (2.0, 1.0) and ci == pytest.approx(4.303 / math.sqrt(3))
    assert mean_and_ci([5.0])[0] == 5.0 and math.isnan(mean_and_ci([5.0])[1])
    assert mean_and_ci([1.0, math.nan, 3.0])[:2] == (2.0, pytest.approx(12.706 * math.sqrt(2) / math.sqrt(2)))


def _row(arm, seed, step, reward, kl, **extra):
    method = METHODS[0]
    return {"run": f"{arm}-s{seed}", "arm": arm, "method": method.name, "label": method.label, "group": "frontier",
            "data": "hard", "loss": "dpo", "beta": 0.3, "tau": 0.0, "length_normalized_pair": False,
            "length_normalized_tau": False, "pair_logit_scale": 1.0, "chosen_nll": 0.0, "seed": seed, "step": step,
            "reward": reward, "reward_stderr": 0.1 * (seed + 1), "kl_policy_ref": kl, "kl_policy_ref_stderr": 0.2,
            "prompts": 81, "samples": 648, "heldout_kl_ref_policy": math.nan, "heldout_preference_accuracy": 0.5, **extra}


@pytest.mark.unit
def test_aggregate_over_seeds_and_changes_along_the_runs():
    # three seeds; the mean reward peaks at step 2 and falls by 0.5 at step 3 in every seed; KL keeps growing
    rows = [_row("a", seed, step, reward + seed, kl + seed)
            for seed in range(3) for step, reward, kl in ((2, 1.0, 1.0), (4, 2.0, 2.0), (8, 1.5, 4.0))]
    summary = aggregate(rows)
    assert [(row["arm"], row["step"], row["seeds"]) for row in summary] == [("a", 2, 3), ("a", 4, 3), ("a", 8, 3)]
    last = summary[-1]
    assert last["reward"] == pytest.approx(2.5) and last["reward_sd"] == pytest.approx(1.0)
    assert last["reward_ci"] == pytest.approx(4.303 / math.sqrt(3))
    assert last["reward_stderr"] == pytest.approx(math.sqrt((0.01 + 0.04 + 0.09) / 3))  # root mean square
    assert math.isnan(last["heldout_kl_ref_policy"]) and last["heldout_preference_accuracy"] == 0.5
    assert list(last) == SUMMARY_COLUMNS
    (change,) = trajectory_changes(rows)
    assert (change["peak_step"], change["mid_step"], change["final_step"]) == (4, 4, 8)
    assert change["reward_change"] == pytest.approx(-0.5) and change["reward_change_ci"] == pytest.approx(0.0, abs=1e-12)
    assert change["kl_growth"] == pytest.approx(2.0) and change["seeds"] == 3
    assert trajectory_changes([row for row in rows if row["step"] != 8]) == []  # two steps are not a trajectory
    # a seed missing a step is left out of the changes; a NaN evaluation is not a seed of its step
    partial = [row for row in rows if not (row["seed"] == 2 and row["step"] == 4)]
    assert trajectory_changes(partial)[0]["seeds"] == 2
    with_nan = [dict(row, reward=math.nan) if (row["seed"], row["step"]) == (0, 8) else row for row in rows]
    assert aggregate(with_nan)[-1]["seeds"] == 2 and aggregate(with_nan)[-1]["reward"] == pytest.approx(3.0)


@pytest.mark.unit
def test_varied_lengths_are_seeded_per_sample_and_within_bounds():
    lengths = [varied_length(32, 7, f"{k:09d}-s{j}") for k in range(200) for j in range(2)]
    assert min(lengths) == 8 and max(lengths) == 32 and len(set(lengths)) == 25  # uniform over [32 // 4, 32]
    assert lengths == [varied_length(32, 7, f"{k:09d}-s{j}") for k in range(200) for j in range(2)]
    assert lengths != [varied_length(32, 8, f"{k:09d}-s{j}") for k in range(200) for j in range(2)]
    assert varied_length(1, 0, "x") == 1 and varied_length(3, 0, "y") in (1, 2, 3)


@pytest.mark.unit
def test_label_pairs_with_varied_lengths_cuts_every_sample_to_its_drawn_length(tmp_path):
    from mpo_dist.study.story_task import label_pairs
    from mpo_dist.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(require_shared("stories260K"))
    story = "Tom was happy. He ran to the park and played with his friends all day long until the sun went down."
    responses = {"Tom had a ball.": [story, story + " Then he was sad."], "Sue saw a cat.": [story + " The end.", story]}
    pairs, samples = _sample_sets(tmp_path, tokenizer, responses)
    records, stats = label_pairs(pairs, samples, tokenizer, labels="soft", lengths="varied", seed=5)
    assert stats["lengths"] == "varied"
    texts = [text for record in records for text in (record["chosen"], record["rejected"])]
    full = {len(tokenizer(t, add_special_tokens=False)["input_ids"]) for ts in responses.values() for t in ts}
    cut = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
    assert all(length <= max(full) for length in cut) and len(set(cut)) > 1
    for key, sample_texts in enumerate(responses.values()):  # each kept text is its sample cut to the drawn length
        for k, text in enumerate(sample_texts):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            kept = tokenizer.decode(ids[: varied_length(len(ids), 5, f"{key:09d}-s{k}")], skip_special_tokens=True)
            assert kept in texts
    with pytest.raises(Exception, match="--lengths"):
        label_pairs(pairs, samples, tokenizer, lengths="random")


# ------------------------------------------------------------------------------------ end to end


def _study(out, *args, timeout=900) -> subprocess.CompletedProcess:
    env = {**SUBPROCESS_ENV, "PATH": os.pathsep.join([os.path.dirname(sys.executable), SUBPROCESS_ENV.get("PATH", "")])}
    return subprocess.run(["bash", str(REPO / "launch" / "study_frontier.sh"), str(out), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    require_shared("stories260K")
    out = tmp_path_factory.mktemp("study") / "out"
    start = time.monotonic()
    # Two steps at a time, each run on one process: a core each on CI's two (what is checked here is the
    # pipeline; training on two processes is tests/test_train.py's).
    result = _study(out, "--tiny", "--jobs", "2")
    seconds = time.monotonic() - start
    assert result.returncode == 0, f"study failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return out, result, seconds


def _expected_evaluations() -> set[tuple[str, int]]:
    runs = plan_runs(TINY, _tiny_methods())
    return {(run.name, step) for run in runs for step in TINY.evaluated_steps(run.method)} | \
        {(f"reference-s{seed}", 0) for seed in range(TINY.seeds)}


@pytest.mark.e2e
def test_tiny_study_has_a_finite_row_for_every_evaluation_and_the_seeds_aggregated(tiny_study):
    out, result, _ = tiny_study
    rows = read_csv_rows(out / "runs.csv")
    assert {(row["run"], row["step"]) for row in rows} == _expected_evaluations() and len(rows) == len(_expected_evaluations())
    held_out_prompts = {json.loads(line)["prompt"] for line in (out / "data" / "s0" / "hard" / "pairs.jsonl").open()}
    for row in rows:
        for column in ("reward", "reward_stderr", "kl_policy_ref", "kl_policy_ref_stderr"):
            assert math.isfinite(row[column]), (row["run"], column, row[column])
        assert row["reward_stderr"] > 0
        # on_policy/prompts counts distinct prompts: fewer than the records (2 samples each) of a pairs set
        assert 0 < row["prompts"] < row["samples"] / 2 and row["prompts"] < len(held_out_prompts)
        if row["method"] == "reference":
            assert abs(row["kl_policy_ref"]) < 1e-6  # the reference against itself: 0 exactly
    summary = read_csv_rows(out / "results.csv")
    arms = {(run.arm, step) for run in plan_runs(TINY, _tiny_methods()) for step in TINY.evaluated_steps(run.method)}
    assert {(row["arm"], row["step"]) for row in summary} == arms | {("reference", 0)}
    for row in summary:
        assert row["seeds"] == TINY.seeds and math.isfinite(row["reward_ci"]) and row["reward_ci"] > 0
        mine = [r["reward"] for r in rows if r["arm"] == row["arm"] and r["step"] == row["step"]]
        assert row["reward"] == pytest.approx(sum(mine) / len(mine))
    assert "done" in result.stdout and f"After {TINY.steps} steps" in result.stdout  # the tables, printed at the end


@pytest.mark.e2e
def test_tiny_study_csv_and_json_agree(tiny_study):
    out, _, _ = tiny_study
    for csv_name, key, columns in (("runs.csv", "runs", RUN_COLUMNS), ("results.csv", "rows", SUMMARY_COLUMNS)):
        from_csv, from_json = read_csv_rows(out / csv_name), read_json_rows(out / "results.json", key)
        assert len(from_csv) == len(from_json) > 0
        for a, b in zip(from_csv, from_json):
            assert list(a) == columns == list(b)
            for column in columns:
                x, y = a[column], b[column]
                assert (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)) or x == y, \
                    (a.get("run", a["arm"]), column, x, y)


@pytest.mark.e2e
def test_tiny_study_writes_plots_tables_data_reports_and_its_cpu_time(tiny_study):
    out, _, _ = tiny_study
    for name in ("frontier.png", "trajectories.png"):
        assert (out / name).stat().st_size > 10_000, name
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "results.json").read_text())
    assert set(report["data"]) == {f"s{seed}/{variant}" for seed in range(TINY.seeds) for variant in DATA_VARIANTS}
    assert report["data"]["s0/varied"]["lengths"] == "varied" and report["data"]["s0/soft"]["labels"] == "soft"
    assert all(data["prompts"] == TINY.num_prompts for data in report["data"].values())
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings["cpu"]) == set(timings["wall"]) and all(value > 0 for value in timings["cpu"].values())
    training = [value for key, value in timings["cpu"].items() if key.startswith("train_")]
    assert len(training) == len(plan_runs(TINY, _tiny_methods())) and min(training) > 1  # torchrun's workers count
    tables = (out / "tables.md").read_text()
    assert "CPU-hours in all" in tables and "After 2 steps" in tables and "After 6 steps" in tables
    assert "**Along the trajectory runs**" in tables and "**Over the second half" in tables
    varied = (out / "data" / "s0" / "varied" / "pairs.jsonl").read_text().splitlines()
    fixed = (out / "data" / "s0" / "hard" / "pairs.jsonl").read_text().splitlines()
    length = lambda lines: sorted(len(json.loads(line)["chosen"]) for line in lines)
    assert length(varied) != length(fixed) and sum(length(varied)) < sum(length(fixed))


def _data_steps(variants: int) -> int:
    # prompts and their shards; per seed its samples; per seed and variant labels, prepare, 2 scores, held-out D_ref,
    # and training D_ref for the variants that a run with the tau term trains on (soft, in the tiny plan)
    return 2 + TINY.seeds + TINY.seeds * (variants * 5 + 1)


@pytest.mark.e2e
def test_tiny_study_restart_skips_finished_work_and_gives_the_same_table(tiny_study):
    out, first, seconds = tiny_study
    before = (out / "results.csv").read_text()
    start = time.monotonic()
    again = _study(out, "--tiny")
    rerun_seconds = time.monotonic() - start
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "results.csv").read_text() == before
    ran = [line for line in again.stdout.splitlines() if "done in" in line]
    assert not ran, ran  # every step was skipped
    skipped = [line for line in again.stdout.splitlines() if "done before, skipped" in line]
    runs = len(plan_runs(TINY, _tiny_methods()))
    assert len(skipped) == _data_steps(len(DATA_VARIANTS)) + TINY.seeds + 2 * runs  # data, references' evals, runs, evals
    assert rerun_seconds < seconds / 2, (rerun_seconds, seconds)


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return condition()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.e2e
def test_a_study_stopped_in_the_background_resumes_to_the_same_results(tiny_study):
    """In the background (--background), a run is stopped by `kill PID` as the tool says: the study passes the
    signal on, waits for the run, records the attempt's time and exits. The same command resumes: only that run
    and its evaluation run, from its checkpoint before the last, and the table is unchanged. (In place: the
    runs' settings name their folders, so a copy elsewhere would be trained again.)"""
    import re
    import shutil
    import signal

    out, _, _ = tiny_study
    before = [(r["run"], r["step"], r["reward"], r["kl_policy_ref"]) for r in read_csv_rows(out / "runs.csv")]
    (run,) = [r for r in plan_runs(TINY, _tiny_methods()) if r.method.name == "dpo" and r.seed == 1]
    shutil.rmtree(out / "runs" / run.name / "checkpoints" / f"step-{TINY.steps:08d}")
    shutil.rmtree(out / "evals" / run.name)
    cpu_before = json.loads((out / "timings.json").read_text())["cpu"][f"train_{run.name}"]
    started = _study(out, "--tiny", "--background", timeout=60)
    assert started.returncode == 0 and "study.log" in started.stdout, started.stdout + started.stderr
    pid = int(re.search(r"kill (\d+)", started.stdout).group(1))
    log = out / "study.log"
    assert _wait_for(lambda: f"train_{run.name}: -m" in log.read_text(), 120), log.read_text()[-2000:]
    time.sleep(2)  # the run has started
    os.kill(pid, signal.SIGTERM)
    assert _wait_for(lambda: not _alive(pid), 120), "the study did not stop"
    text = log.read_text()
    assert "signal SIGTERM" in text and "stopped; the same command resumes it" in text, text[-2000:]
    assert json.loads((out / "timings.json").read_text())["cpu"][f"train_{run.name}"] > cpu_before  # the attempt counts
    result = _study(out, "--tiny")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ran = [line.split("] ")[1].split(":")[0] for line in result.stdout.splitlines() if "done in" in line]
    assert ran == [f"train_{run.name}", f"eval_{run.name}"], ran
    log = (out / "logs" / f"train_{run.name}.log").read_text()
    assert "resum" in log.lower(), log[-2000:]
    assert [(r["run"], r["step"], r["reward"], r["kl_policy_ref"]) for r in read_csv_rows(out / "runs.csv")] == before


@pytest.mark.e2e
def test_a_second_study_process_on_a_folder_is_refused(tmp_path):
    import fcntl

    held = tmp_path / "held"
    held.mkdir()
    with open(held / "study.lock", "w") as handle:  # another study process holds this folder
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for background in ([], ["--background"]):
            refused = _study(held, "--tiny", *background, timeout=120)
            assert refused.returncode == 2 and "being run by another study process" in refused.stderr, refused.stderr
            assert "prompts:" not in refused.stdout and "running in the background" not in refused.stdout


@pytest.mark.e2e
def test_a_study_of_another_size_in_the_same_folder_is_refused(tiny_study):
    out, _, _ = tiny_study
    result = _study(out, timeout=120)  # the default size
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "other settings" in result.stderr and "train_" not in result.stdout
