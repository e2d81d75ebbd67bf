"""tools/evaluate.py (mpo_dist/evaluate_model.py): on-policy KL of the reference against itself, agreement
with the trainer's last eval on a training checkpoint, 1 vs 2 processes, a reward that cannot be imported,
standard errors clustered by prompt, and several checkpoints in one process."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import replace
from statistics import fmean, stdev

import pytest
import yaml

from support import REPO, SUBPROCESS_ENV, run_tool, toy_overrides, torchrun_command, train
from mpo_dist.config import LossConfig
from mpo_dist.data.samples import PairSource
from mpo_dist.data.shards import Manifest
from mpo_dist.evaluate_model import evaluation_loss_config, run_loss_config
from mpo_dist.metrics_file import read_metrics

ON_POLICY = ["--on-policy-samples", 2, "--max-new-tokens", 6, "--max-prompts", 12, "--batch-size", 5]


def report(path) -> dict:
    return json.loads(path.read_text())


def checked(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"evaluate failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.mark.e2e
def test_on_policy_kl_of_the_reference_against_itself_is_zero(toy_inputs, tmp_path):
    out = tmp_path / "self.json"
    checked(run_tool("evaluate.py", "--model", toy_inputs["model"], "--reference-model", toy_inputs["model"],
                     "--pairs", toy_inputs["pairs"], *ON_POLICY, "--reward", "operator:contains",  # f(prompt, response): response in prompt
                     "--out", out, cwd=REPO))
    metrics = report(out)["metrics"]
    mean, stderr = metrics["on_policy/kl_policy_ref"], metrics["on_policy/kl_policy_ref_stderr"]
    assert abs(mean) <= 3 * stderr + 1e-6
    assert abs(mean) < 1e-5  # the same model scores each response twice: exactly 0
    assert metrics["on_policy/samples"] == 24 and metrics["on_policy/prompts"] == 12  # the toy prompts are distinct
    assert "on_policy/reward" in metrics and "on_policy/reward_stderr" in metrics
    assert 0 <= metrics["on_policy/reward"] <= 1  # a 0/1 reward
    assert 0 < metrics["on_policy/response_tokens"] <= 6


@pytest.mark.e2e
def test_checkpoint_gives_the_trainers_last_eval(toy_inputs, tmp_path):
    run = tmp_path / "run"
    held_out = {"eval.pairs": toy_inputs["pairs"], "eval.reference": toy_inputs["reference"], "eval.dref": toy_inputs["dref"],
                "eval.require_held_out": "false"}  # the toy set serves as both: on purpose
    train(*toy_overrides(toy_inputs, run, **{"training.steps": 2, "model.dtype": "float32", **held_out}), nproc=2)
    records = read_metrics(run)
    last = [r for r in records if any(k.startswith("eval/") for k in r)][-1]
    (checkpoint,) = sorted((run / "checkpoints").glob("step-*"))[-1:]
    out = tmp_path / "report.json"
    checked(run_tool("evaluate.py", "--model", checkpoint, "--pairs", toy_inputs["pairs"], "--reference",
                     toy_inputs["reference"], "--dref", toy_inputs["dref"], "--per-sample", "--dtype", "float32", "--out", out))
    got = report(out)
    assert got["model"]["checkpoint_step"] == 2 and got["loss"]["name"] == "mpo"  # the run's loss, read beside it
    names = {n for n in last if n.startswith("eval/") and n != "eval/seconds"}
    assert names and names <= set(got["metrics"]), names - set(got["metrics"])
    for name in sorted(names):
        assert got["metrics"][name] == pytest.approx(last[name], abs=1e-4), name
    per_sample = got["per_sample"]
    assert len(per_sample["pairs"]["keys"]) == last["eval/pairs"] == len(set(per_sample["pairs"]["keys"]))
    assert len(per_sample["dref"]["policy_logps"]) == last["eval/dref_samples"]
    kl = [ref - pol for ref, pol in zip(per_sample["dref"]["ref_logps"], per_sample["dref"]["policy_logps"])]
    assert sum(kl) / len(kl) == pytest.approx(got["metrics"]["eval/kl_ref_policy"], abs=1e-9)


@pytest.mark.e2e
def test_one_and_two_processes_give_the_same_report(toy_inputs, tmp_path):
    args = ["--model", toy_inputs["model"], "--reference-model", toy_inputs["model"], "--pairs", toy_inputs["pairs"],
            "--reference", toy_inputs["reference"], "--dref", toy_inputs["dref"], "--per-sample", "--loss", "dpo",
            *ON_POLICY]
    reports = {}
    for nproc in (1, 2):
        out = tmp_path / f"report{nproc}.json"
        command = torchrun_command(nproc, [str(REPO / "tools" / "evaluate.py"), *map(str, args), "--out", str(out)])
        # Two processes with the updating progress line forced on (MPO_DIST_PROGRESS=1), though through a pipe.
        env = {**SUBPROCESS_ENV, "MPO_DIST_PROGRESS": "1", "COLUMNS": "200"} if nproc == 2 else SUBPROCESS_ENV
        result = checked(subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300))
        reports[nproc] = report(out)
    # Rank 0's lines end at its whole share: every rank runs ceil(N / (5 x 2)) batches of each held-out
    # set, and rank 0 samples on-policy batches 0, 2, 4 of 5, 5, 5, 5, 4 samples (12 prompts x 2).
    pairs, dref = (Manifest.read(toy_inputs[what]).num_samples for what in ("pairs", "dref"))
    batches = math.ceil(pairs / 10) + math.ceil(dref / 10)
    drawn = re.split(r"[\r\n]", result.stderr)
    last = {name: [line for line in drawn if line.startswith(f"evaluate ({name}) [")][-1] for name in ("held-out", "on-policy")}
    assert f"100% rank 0 of 2, {batches}/{batches} batches, " in last["held-out"] and " done in " in last["held-out"]
    assert "100% rank 0 of 2, 14/14 samples, " in last["on-policy"] and " done in " in last["on-policy"], last
    one, two = reports[1], reports[2]
    assert two["world_size"] == 2 and one["loss"]["name"] == "dpo"
    assert (one["model"]["shards"], two["model"]["shards"]) == (1, 2)  # each of 2 ranks held half of both models
    names = sorted(n for n in one["metrics"] if not n.endswith("seconds"))
    assert names == sorted(n for n in two["metrics"] if not n.endswith("seconds"))
    assert "eval/kl_ref_policy" in names and "on_policy/kl_policy_ref" in names
    for name in names:
        assert one["metrics"][name] == pytest.approx(two["metrics"][name], rel=1e-5, abs=1e-6), name
    for what in ("pairs", "dref"):
        assert one["per_sample"][what]["keys"] == two["per_sample"][what]["keys"]
        for field, values in one["per_sample"][what].items():
            if field != "keys":
                assert values == pytest.approx(two["per_sample"][what][field], rel=1e-5, abs=1e-5), (what, field)


@pytest.mark.e2e
def test_a_reward_that_cannot_be_imported_is_an_input_error(toy_inputs, tmp_path):
    result = run_tool("evaluate.py", "--model", toy_inputs["model"], "--reference-model", toy_inputs["model"],
                      "--pairs", toy_inputs["pairs"], *ON_POLICY, "--reward", "no_such_module_xyz:score",
                      "--out", tmp_path / "r.json")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--reward" in lines[0] and "no_such_module_xyz" in lines[0], result.stderr
    assert not (tmp_path / "r.json").exists()


@pytest.mark.unit
def test_the_report_loss_keeps_the_run_options_that_the_chosen_loss_takes(tmp_path):
    run = LossConfig(name="mpo", beta=0.2, tau=0.1, length_normalized_pair=True, length_normalized_tau=True,
                     pair_logit_scale=0.5, chosen_nll=0.3)
    (tmp_path / "run" / "checkpoints" / "step-00000002").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump({"loss": vars(run), "job": {"seed": 0}}))
    assert run_loss_config(tmp_path / "run" / "checkpoints" / "step-00000002") == run  # every field, by name
    assert evaluation_loss_config(run) == run
    assert evaluation_loss_config(run, "mpo", 0.4) == replace(run, beta=0.4)
    # another loss: what it takes is kept (length_normalized_pair, chosen_nll), the MPO-only options are reset
    dpo = evaluation_loss_config(run, "dpo", label_smoothing=0.1)
    assert dpo == LossConfig(name="dpo", beta=0.2, label_smoothing=0.1, length_normalized_pair=True, chosen_nll=0.3)
    dpo.validate()
    assert evaluation_loss_config(dpo, "ipo") == LossConfig(name="ipo", beta=0.2, length_normalized_pair=True, chosen_nll=0.3)
    assert evaluation_loss_config(LossConfig(), None, 0.3) == LossConfig(beta=0.3)  # a Hugging Face folder: the defaults


@pytest.mark.e2e
def test_loss_options_reach_training_the_trainers_eval_and_the_tool(toy_inputs, tmp_path):
    """A run with every loss option on (each raises without the token counts, so the run itself shows that
    train_step and the eval pass hand them over); the tool reads the options beside the checkpoint and
    gives the trainer's eval, which is the direct formula over per-sample log-probs and token counts."""
    run = tmp_path / "run"
    options = {"loss.length_normalized_pair": "true", "loss.length_normalized_tau": "true",
               "loss.pair_logit_scale": 0.5, "loss.chosen_nll": 0.3}
    held_out = {"eval.pairs": toy_inputs["pairs"], "eval.reference": toy_inputs["reference"],
                "eval.require_held_out": "false"}
    train(*toy_overrides(toy_inputs, run, **{"training.steps": 2, "model.dtype": "float32", **held_out, **options}))
    records = read_metrics(run)
    assert all("loss/chosen_nll" in r and "loss/dref_nll" in r and "loss/dref_kl" in r for r in records if "loss/total" in r)
    last = [r for r in records if any(k.startswith("eval/") for k in r)][-1]
    (checkpoint,) = sorted((run / "checkpoints").glob("step-*"))[-1:]
    out = tmp_path / "report.json"
    checked(run_tool("evaluate.py", "--model", checkpoint, "--pairs", toy_inputs["pairs"], "--reference",
                     toy_inputs["reference"], "--per-sample", "--dtype", "float32", "--out", out))
    got = report(out)
    assert got["loss"] == {"name": "mpo", "beta": 0.1, "tau": 0.05, "label_smoothing": 0.0, "length_normalized_pair": True,
                           "length_normalized_tau": True, "pair_logit_scale": 0.5, "chosen_nll": 0.3}
    names = {n for n in last if n.startswith("eval/") and n != "eval/seconds"}
    assert "eval/loss/chosen_nll" in names and names <= set(got["metrics"]), names - set(got["metrics"])
    for name in sorted(names):
        assert got["metrics"][name] == pytest.approx(last[name], abs=1e-4), name
    source = PairSource(toy_inputs["pairs"])
    samples = {s["key"]: s for s in (source.read(i) for i in range(len(source.shards)))}
    pairs = got["per_sample"]["pairs"]
    margins, nlls, ps, losses = [], [], [], []
    for key, pc, pr, rc, rr in zip(pairs["keys"], pairs["chosen_logps"], pairs["rejected_logps"], pairs["ref_chosen_logps"],
                                   pairs["ref_rejected_logps"]):
        nc, nr = max(len(samples[key]["chosen_ids"]), 1), max(len(samples[key]["rejected_ids"]), 1)
        z, z_ref = pc / nc - pr / nr, rc / nc - rr / nr
        p, q, label = 1 / (1 + math.exp(-0.5 * z)), 1 / (1 + math.exp(-0.5 * z_ref)), samples[key]["label"]
        kl = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
        margins.append(z - z_ref)
        nlls.append(-pc / nc)
        ps.append(p)
        losses.append(-(label * p + (1 - label) * (1 - p)) + 0.1 * kl + 0.3 * (-pc / nc))
    for name, values in (("eval/reward/margin", margins), ("eval/loss/chosen_nll", nlls), ("eval/reward/p", ps),
                         ("eval/loss/total", losses)):
        assert got["metrics"][name] == pytest.approx(fmean(values), rel=1e-5, abs=1e-6), name


def _pairs_with_repeated_prompts(source, out, prompts: int, copies: int):
    """A pairs set of the first `prompts` distinct prompts of `source`, each in `copies` records (as a
    set of several pairs per prompt is)."""
    from mpo_dist.data.shards import Manifest as ShardManifest, ShardCursor, ShardInfo, ShardWriter

    manifest = ShardManifest.read(source, "pairs")
    chosen, seen = [], set()
    for shard in manifest.shards:
        for key, meta, arrays in ShardCursor(source / shard.name, "pairs", shard.num_samples):
            ids = tuple(arrays["prompt_ids"].tolist())
            if ids not in seen and len(chosen) < prompts:
                seen.add(ids)
                chosen.append((key, meta, arrays))
    out.mkdir()
    with ShardWriter(out / "shard-000000.tar", "pairs") as writer:
        for copy in range(copies):
            for key, meta, arrays in chosen:
                writer.write(f"{key}-r{copy}", meta, arrays)
    ShardManifest("pairs", manifest.tokenizer_hash, [ShardInfo("shard-000000.tar", prompts * copies)],
                  info=manifest.info).write(out)
    return [arrays["prompt_ids"].tolist() for _, _, arrays in chosen]


@pytest.mark.e2e
def test_on_policy_errors_are_clustered_by_prompt(toy_inputs, tmp_path):
    """Four prompts, three records each, two samples per record: 4 prompts and 24 samples. With a reward of
    the prompt alone, the 6 samples of a prompt are one value six times; the clustered standard error is
    then the standard error of the 4 prompts' values (the independent-samples one would be about 2.3x
    smaller)."""
    from mpo_dist.tokenizer import load_tokenizer

    pairs = tmp_path / "pairs"
    prompt_ids = _pairs_with_repeated_prompts(toy_inputs["pairs"], pairs, prompts=4, copies=3)
    (tmp_path / "prompt_reward.py").write_text("def score(prompt, response):\n    return float(len(prompt))\n")
    env = {**SUBPROCESS_ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{SUBPROCESS_ENV['PYTHONPATH']}"}
    command = [sys.executable, str(REPO / "tools" / "evaluate.py"), *map(str, [
        "--model", toy_inputs["model"], "--reference-model", toy_inputs["model"], "--pairs", pairs,
        "--on-policy-samples", 2, "--max-new-tokens", 4, "--batch-size", 5, "--reward", "prompt_reward:score",
        "--dtype", "float32", "--out", tmp_path / "report.json"])]
    checked(subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300))
    metrics = report(tmp_path / "report.json")["metrics"]
    assert metrics["on_policy/prompts"] == 4 and metrics["on_policy/samples"] == 24
    tokenizer = load_tokenizer(toy_inputs["model"])
    values = [float(len(tokenizer.decode(ids, skip_special_tokens=True))) for ids in prompt_ids]
    assert len(set(values)) > 1, values  # the test needs prompts of different lengths
    assert metrics["on_policy/reward"] == pytest.approx(fmean(values))
    assert metrics["on_policy/reward_stderr"] == pytest.approx(stdev(values) / math.sqrt(4))
    independent = stdev(values * 6) / math.sqrt(24)  # what treating the 24 samples as independent gives
    assert metrics["on_policy/reward_stderr"] > 2 * independent


@pytest.mark.e2e
def test_several_checkpoints_in_one_process_give_the_reports_of_separate_runs(toy_inputs, tmp_path):
    """Two checkpoints of one run (and the run's own loss, read beside each) evaluated in one process: each
    report equals that of the checkpoint evaluated alone, and the two differ (nothing leaks between them)."""
    run = tmp_path / "run"
    train(*toy_overrides(toy_inputs, run, **{"training.steps": 2, "checkpoint.interval": 1, "checkpoint.keep": 2,
                                             "loss.name": "dpo", "loss.tau": 0, "data.dref": "", "optim.lr": 1e-2}), nproc=1)
    checkpoints = sorted((run / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints] == ["step-00000001", "step-00000002"]
    args = ["--reference-model", toy_inputs["model"], "--pairs", toy_inputs["pairs"], "--reference",
            toy_inputs["reference"], *ON_POLICY, "--dtype", "float32"]
    together = [tmp_path / f"together{k}.json" for k in range(2)]
    checked(run_tool("evaluate.py", *args, *[a for c, out in zip(checkpoints, together) for a in ("--model", c, "--out", out)]))
    for checkpoint, out in zip(checkpoints, together):
        alone = tmp_path / f"alone-{checkpoint.name}.json"
        checked(run_tool("evaluate.py", *args, "--model", checkpoint, "--out", alone))
        one, other = report(alone), report(out)
        assert other["model"]["checkpoint_step"] == one["model"]["checkpoint_step"] and other["loss"] == one["loss"]
        assert one["loss"]["name"] == "dpo"
        assert {k: v for k, v in other["metrics"].items() if not k.endswith("seconds")} == \
            {k: v for k, v in one["metrics"].items() if not k.endswith("seconds")}, checkpoint.name
    first, second = (report(out)["metrics"] for out in together)
    assert first["on_policy/kl_policy_ref"] != second["on_policy/kl_policy_ref"]
    assert first["eval/loss/total"] != second["eval/loss/total"]


@pytest.mark.unit
def test_each_model_needs_its_own_report(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_tool", REPO / "tools" / "evaluate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for argv, message in ((["--model", "a", "--model", "b", "--out", "r.json"], "one --out per --model: 2 --model, 1 --out"),
                          (["--model", "a", "--model", "b", "--out", "r.json", "--out", "r.json"], "the same --out")):
        with pytest.raises(SystemExit) as exit_info:
            tool.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
