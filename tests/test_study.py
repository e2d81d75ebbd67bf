"""The reward/KL frontier study: the true story reward, Bradley-Terry labels, the pairs made from
reference samples, and the whole pipeline end to end in its tiny mode (launch/study_frontier.sh
--tiny --jobs 2 --nproc 1: that it works, not what it finds), with a restart that skips everything
finished."""

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
    COLUMNS, DEFAULT, METHODS, TINY, Method, Run, StudySize, kl_curve, plan_runs, read_results_csv, read_results_json,
)
from mpo_dist.study.story_reward import (
    NEGATIVE, POSITIVE, SCALE, label_uniform, preference_probability, reward, sample_preference, sentiment_rate,
)
from mpo_dist.study.story_task import NAMES, TEMPLATES, story_prompts

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


@pytest.mark.unit
def test_plan_covers_every_method_and_tau_follows_beta():
    runs = plan_runs(DEFAULT)
    assert {run.method.name for run in runs} == {m.name for m in METHODS}
    assert len({run.name for run in runs}) == len(runs)
    assert [run.method for run in plan_runs(TINY)] == list(METHODS)  # the CI size: every method, one beta each
    for method in METHODS:
        assert TINY.betas(method)[0] in method.betas
        assert StudySize(betas_per_method=2).betas(method) == (min(method.betas), max(method.betas))
    mpo = [(m.tau_per_beta > 0, bool(m.options)) for m in METHODS if m.loss == "mpo"]
    assert set(mpo) == {(False, False), (True, False), (False, True), (True, True)}  # tau off/on, options off/on
    method = Method("x", "X", "mpo", (0.1, 1.0), tau_per_beta=0.5, options=(("length_normalized_tau", True),))
    assert method.overrides(0.1) == ["loss.name=mpo", "loss.beta=0.1", "loss.tau=0.05", "loss.length_normalized_tau=true"]
    assert Run(method, 0.1).uses_dref and not Run(METHODS[0], 0.1).uses_dref
    assert StudySize(betas_per_method=3).betas(Method("y", "Y", "dpo", (1, 2, 3, 4, 5))) == (1, 3, 5)


@pytest.mark.unit
def test_kl_curve_starts_at_zero_and_reads_the_monitor():
    records = [{"step": 10, "loss": 1.0}, {"step": 20, "eval/kl_ref_policy": 1.5, "eval/kl_ref_policy_stderr": 0.1}]
    assert kl_curve(records) == [(0, 0.0, 0.0), (20, 1.5, 0.1)]


@pytest.mark.unit
def test_study_config_loads_with_every_knob_the_study_sets():
    from mpo_dist.config import load_config

    for run in plan_runs(DEFAULT):
        config = load_config(str(REPO / "configs" / "study_frontier.yaml"), run.method.overrides(run.beta))
        assert config.loss.name == run.method.loss and config.loss.beta == run.beta


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
    # Two steps at a time and each run on one process: a core each on CI's two (what is checked here is the
    # pipeline; training on two processes is tests/test_train.py's).
    result = _study(out, "--tiny", "--jobs", "2", "--nproc", "1")
    seconds = time.monotonic() - start
    assert result.returncode == 0, f"study failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return out, result, seconds


@pytest.mark.e2e
def test_tiny_study_has_a_finite_row_for_every_run_and_the_reference(tiny_study):
    out, result, _ = tiny_study
    rows = read_results_json(out / "results.json")
    by_run = {row["run"]: row for row in rows}
    expected = {run.name for run in plan_runs(TINY)}
    assert set(by_run) == expected | {"reference"}
    for name in expected:
        row = by_run[name]
        for column in ("reward", "reward_stderr", "kl_policy_ref", "kl_policy_ref_stderr", "heldout_kl_ref_policy",
                       "heldout_preference_accuracy"):
            assert math.isfinite(row[column]), (name, column, row[column])
        assert row["reward_stderr"] > 0 and row["kl_policy_ref_stderr"] >= 0 and row["steps"] == TINY.steps
    reference = by_run["reference"]
    assert math.isfinite(reference["reward"]) and reference["reward_stderr"] > 0
    assert abs(reference["kl_policy_ref"]) < 1e-6  # the reference against itself: 0 exactly
    assert rows[0]["run"] == "reference"
    assert "reference" in result.stdout and "done" in result.stdout


@pytest.mark.e2e
def test_tiny_study_csv_and_json_agree(tiny_study):
    out, _, _ = tiny_study
    from_csv, from_json = read_results_csv(out / "results.csv"), read_results_json(out / "results.json")
    assert len(from_csv) == len(from_json)
    for a, b in zip(from_csv, from_json):
        assert list(a) == COLUMNS == list(b)
        for column in COLUMNS:
            x, y = a[column], b[column]
            assert (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)) or x == y, \
                (a["run"], column, x, y)


@pytest.mark.e2e
def test_tiny_study_writes_plots_data_report_and_kl_curves(tiny_study):
    out, _, _ = tiny_study
    for name in ("frontier.png", "kl_steps.png"):
        assert (out / name).stat().st_size > 10_000, name
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "results.json").read_text())
    assert report["data"]["pairs"] > 0 and report["data"]["prompts"] == TINY.num_prompts
    for run in plan_runs(TINY):
        steps = [point[0] for point in report["kl_curves"][run.name]]
        assert steps[0] == 0 and steps[-1] == TINY.steps


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
    assert len(skipped) == 9 + 1 + 2 * len(plan_runs(TINY))  # data steps, the reference's eval, each run and its eval
    assert rerun_seconds < seconds / 2, (rerun_seconds, seconds)


@pytest.mark.e2e
def test_a_study_of_another_size_in_the_same_folder_is_refused(tiny_study):
    out, _, _ = tiny_study
    result = _study(out, timeout=120)  # the default size
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "other settings" in result.stderr and "train_" not in result.stdout
