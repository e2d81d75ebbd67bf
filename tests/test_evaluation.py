"""The held-out evaluation pass (mpo_dist/evaluation.py) in the trainer: sharding (every sample once at
any world size), equal numbers on 1 and 2 processes, no effect on the training trajectory (with
resume), the KL monitor against a direct transformers computation, and config errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from support import NO_EVAL, TRAIN_CONFIG, flat_checkpoint, toy_overrides, train
from mpo_dist.config import ConfigError, load_config
from mpo_dist.data.shards import Manifest
from mpo_dist.metrics_file import read_metrics


def eval_records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if any(k.startswith("eval/") for k in r)]


def eval_overrides(toy: dict, **extra) -> dict:
    # The toy pairs (with their reference) and D_ref serve as held-out sets here.
    # The toy set is also the training set here: evaluating on training data on purpose.
    return {"eval.pairs": toy["pairs"], "eval.reference": toy["reference"], "eval.dref": toy["dref"],
            "eval.require_held_out": "false", **extra}


@pytest.mark.unit
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("max_batches", [0, 5])
def test_eval_streams_read_every_sample_once(toy_inputs, world_size, max_batches):
    """Over all ranks, the real (not padding) samples of one pass are each sample once; every rank has
    the same number of batches; the expected count is what the pass checks against."""
    from mpo_dist.evaluation import Evaluator

    config = load_config(str(TRAIN_CONFIG), [f"{k}={v}" for k, v in eval_overrides(
        toy_inputs, **{"eval.batch_size": 7, "eval.max_batches": max_batches}).items()])
    for kind, folder in (("pairs", toy_inputs["pairs"]), ("dref", toy_inputs["dref"])):
        keys, batch_counts = [], set()
        for rank in range(world_size):
            evaluator = Evaluator(config.eval, config.data, model=None, objective=None, device=torch.device("cpu"),
                                  dp_rank=rank, dp_world_size=world_size, pad_token_id=0,
                                  layout_cost=lambda rows, width, dense_attention: rows * width)  # no forward here
            batches = [getattr(batch, kind) for batch in evaluator._batches(getattr(evaluator, kind), kind)]
            batch_counts.add(len(batches))
            keys += [key for batch in batches for key, real in zip(batch.keys, batch.real.tolist()) if real]
        assert len(batch_counts) == 1
        total = Manifest.read(folder).num_samples
        expected = min(total, max_batches * 7 * world_size) if max_batches else total
        assert len(keys) == len(set(keys)) == expected == evaluator.expected[kind]


@pytest.mark.e2e
def test_eval_equal_on_one_and_two_processes(toy_inputs, tmp_path):
    """The end-of-training eval of the same 2-step run (float32, so that 1 and 2 processes train to
    the same parameters up to summation order) on 1 and 2 processes; eval.batch_size=7 leaves a padded tail."""
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"run{nproc}"
        train(*toy_overrides(toy_inputs, out, **{"training.steps": 2, "model.dtype": "float32",
                                                 **eval_overrides(toy_inputs, **{"eval.batch_size": 7})}), nproc=nproc)
        (last,) = eval_records(out)  # eval.interval=0: only after the last step
        assert last["step"] == 2
        runs[nproc] = last
    pairs, dref = Manifest.read(toy_inputs["pairs"]).num_samples, Manifest.read(toy_inputs["dref"]).num_samples
    for run in runs.values():  # every held-out sample counted once
        assert run["eval/pairs"] == pairs and run["eval/dref_samples"] == dref
        for name in ("eval/loss/total", "eval/reward/margin", "eval/logps/chosen", "eval/logps/rejected",
                     "eval/kl_ref_policy", "eval/kl_ref_policy_stderr"):
            assert name in run, name
        assert any("accuracy" in name for name in run)
        assert run["eval/kl_ref_policy_stderr"] > 0
    names = [name for name in runs[1] if name.startswith("eval/") and name != "eval/seconds"]
    assert sorted(names) == sorted(n for n in runs[2] if n.startswith("eval/") and n != "eval/seconds")
    for name in names:
        assert runs[1][name] == pytest.approx(runs[2][name], rel=1e-4, abs=1e-5), name


@pytest.mark.e2e
def test_eval_does_not_change_training_and_resumes_exactly(toy_inputs, tmp_path):
    """Eval every step (and with a checkpoint and resume in between) ends with parameters and optimizer
    state bitwise equal to the same run without eval."""
    steps = {"training.steps": 4, "checkpoint.interval": 2, "checkpoint.keep": 3}
    train(*toy_overrides(toy_inputs, tmp_path / "off", **steps))
    with_eval = {**steps, **eval_overrides(toy_inputs, **{"eval.interval": 1, "eval.max_batches": 3})}
    train(*toy_overrides(toy_inputs, tmp_path / "on", **with_eval))
    assert [r["step"] for r in eval_records(tmp_path / "on")] == [1, 2, 3, 4]
    (tmp_path / "cut" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "on" / "checkpoints" / "step-00000002", tmp_path / "cut" / "checkpoints" / "step-00000002")
    resumed = train(*toy_overrides(toy_inputs, tmp_path / "cut", **with_eval))
    assert "resumed from" in resumed.stdout
    assert [r["step"] for r in eval_records(tmp_path / "cut")] == [3, 4]
    for name in ("eval/loss/total", "eval/kl_ref_policy"):  # the same model, so the same eval numbers
        assert eval_records(tmp_path / "cut")[-1][name] == eval_records(tmp_path / "on")[-1][name]
    final = {run: flat_checkpoint(tmp_path / run / "checkpoints" / "step-00000004", tmp_path) for run in ("off", "on", "cut")}
    keys = [key for key, value in final["off"].items()
            if isinstance(value, torch.Tensor) and key.startswith(("model_optimizer.", "data."))]
    assert any(key.startswith("model_optimizer.model.") for key in keys) and any(".exp_avg_sq" in key for key in keys)
    for run in ("on", "cut"):
        for key in keys:
            assert torch.equal(final["off"][key], final[run][key]), (run, key)
    for rank in (0, 1):  # the RNG state is restored after every pass
        assert torch.equal(final["off"][f"rng/dp_rank_{rank}.cpu"], final["on"][f"rng/dp_rank_{rank}.cpu"])


@pytest.mark.e2e
def test_kl_monitor_equals_a_direct_transformers_computation(toy_inputs, tmp_path):
    """The last eval runs on the parameters of the final checkpoint (eval after the last step, before the
    save); exported in float32 and scored sample by sample, unpadded, with plain transformers, the same
    held-out D_ref gives the same mean(logp_ref - logp_theta) and standard error (float32 run: the
    difference is summation order only)."""
    from transformers import AutoModelForCausalLM

    from mpo_dist.data.samples import DrefSource

    out = tmp_path / "run"
    train(*toy_overrides(toy_inputs, out, **{"training.steps": 3, "model.dtype": "float32", "checkpoint.export_hf": "true",
                                             "checkpoint.export_dtype": "float32", "eval.dref": toy_inputs["dref"],
                                             "eval.batch_size": 64, "eval.require_held_out": "false"}))
    (last,) = eval_records(out)
    model = AutoModelForCausalLM.from_pretrained(str(out / "hf"), torch_dtype=torch.float32).eval()
    source = DrefSource(toy_inputs["dref"])
    differences = []
    with torch.no_grad():
        for sample_id in range(len(source.shards)):
            sample = source.read(sample_id)
            prompt, response = torch.tensor(sample["prompt_ids"]), torch.tensor(sample["response_ids"])
            ids = torch.cat([prompt, response]).long()[None]
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            targets = ids[0, 1:]
            token_logps = logprobs.gather(-1, targets[:, None])[:, 0][len(prompt) - 1 :]
            differences.append(sample["ref_logp"] - float(token_logps.sum()))
    d = torch.tensor(differences, dtype=torch.float64)
    assert last["eval/dref_samples"] == len(d)
    assert last["eval/kl_ref_policy"] == pytest.approx(float(d.mean()), abs=1e-4)
    assert last["eval/kl_ref_policy_stderr"] == pytest.approx(float(d.std() / math.sqrt(len(d))), rel=1e-3)
    assert "eval/pairs" not in last  # no eval.pairs: the KL monitor alone (it needs no pairs, any loss)


@pytest.mark.unit
@pytest.mark.parametrize("overrides, message", [
    (["eval.pairs=held_out"], "eval.pairs needs eval.reference"),
    (["eval.reference=held_out_ref"], "eval.reference is set but eval.pairs is not"),
    (["eval.interval=10"], "eval.interval needs something to evaluate"),
    (["eval.dref=d", "eval.batch_size=0"], "eval.batch_size must be >= 1"),
    (["eval.dref=d", "eval.max_batches=-1"], "eval.max_batches must be >= 0"),
])
def test_bad_eval_config_is_an_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(str(TRAIN_CONFIG), [*NO_EVAL, *overrides])  # the config's own eval section off first


@pytest.mark.e2e
def test_eval_inputs_of_another_kind_fail_before_training(toy_inputs, tmp_path):
    result = train(*toy_overrides(toy_inputs, tmp_path / "run", **{"training.steps": 1, "eval.dref": toy_inputs["pairs"]}),
                   nproc=1, check=False)
    assert result.returncode != 0
    assert "eval.dref" in result.stdout + result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.e2e
def test_keep_best_keeps_the_checkpoint_with_the_best_eval_metric(toy_inputs, tmp_path):
    """checkpoint.keep_best: besides the newest checkpoint (keep=1), the one whose eval/loss/total was
    lowest among the evaluated saves stays; best.json names it."""
    out = tmp_path / "run"
    train(*toy_overrides(toy_inputs, out, **{"training.steps": 5, "checkpoint.interval": 1, "checkpoint.keep": 1,
                                             "checkpoint.keep_best": "eval/loss/total", "optim.lr": 0.02,
                                             **eval_overrides(toy_inputs, **{"eval.interval": 1, "eval.max_batches": 2})}))
    losses = {record["step"]: record["eval/loss/total"] for record in eval_records(out)}
    best = min(losses, key=losses.get)
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert kept == sorted({f"step-{best:08d}", "step-00000005"})
    assert json.loads((out / "checkpoints" / "best.json").read_text())["step"] == best


@pytest.mark.unit
def test_keep_best_needs_an_eval_set_and_an_eval_metric():
    with pytest.raises(ConfigError, match="checkpoint.keep_best=eval/loss/total needs an eval set"):
        load_config(str(TRAIN_CONFIG), [*NO_EVAL, "checkpoint.keep_best=eval/loss/total"])
    with pytest.raises(ConfigError, match=r"checkpoint.keep_best must name an eval metric \(eval/...\)"):
        load_config(str(TRAIN_CONFIG), ["checkpoint.keep_best=loss/total", "eval.dref=d"])


@pytest.mark.e2e
def test_eval_inputs_that_are_not_held_out_or_from_another_model_are_refused(toy_inputs, tmp_path):
    """Before training: eval pairs that are the training pairs, a D_ref sampled from the training
    prompts, and an eval reference scored by another model than the training reference."""
    import json as json_module

    for extra, message in [
        ({"eval.pairs": toy_inputs["pairs"], "eval.reference": toy_inputs["reference"]}, "is the training set data.pairs"),
        ({"eval.dref": toy_inputs["dref"]}, "was sampled from the training prompts"),
    ]:
        result = train(*toy_overrides(toy_inputs, tmp_path / "run", **{"training.steps": 1, **extra}), check=False)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    # Two copies of the toy reference that say they were scored by two models.
    references = {}
    for name in ("model-a", "model-b"):
        references[name] = tmp_path / f"reference-{name}"
        shutil.copytree(toy_inputs["reference"], references[name])
        manifest = json_module.loads((references[name] / "manifest.json").read_text())
        manifest["info"].setdefault("model", {})["weights_hash"] = f"sha256:{name}"
        (references[name] / "manifest.json").write_text(json_module.dumps(manifest))
    result = train(*toy_overrides(toy_inputs, tmp_path / "run2", **{
        "training.steps": 1, "data.reference": references["model-a"], "eval.pairs": toy_inputs["pairs"],
        "eval.reference": references["model-b"], "eval.require_held_out": "false"}), check=False)
    assert result.returncode == 2 and "was scored by another model (sha256:model-b)" in result.stderr, result.stderr[-2000:]


@pytest.mark.unit
def test_clustered_standard_error():
    """One value per cluster: the usual standard error; a cluster of equal values counts once; otherwise the
    cluster-robust formula, computed here from its definition."""
    import statistics

    from mpo_dist.evaluation import clustered_mean_and_stderr, mean_and_stderr

    values = torch.tensor([1.0, 4.0, 2.0, 7.0, 3.0])
    mean, stderr = clustered_mean_and_stderr(values, torch.arange(5))
    iid = mean_and_stderr(5, float(values.sum()), float((values * values).sum()))
    assert (mean, stderr) == (pytest.approx(iid[0]), pytest.approx(iid[1]))
    repeated = values.repeat_interleave(4)  # each value four times, in one cluster
    assert clustered_mean_and_stderr(repeated, torch.arange(5).repeat_interleave(4))[1] == pytest.approx(
        statistics.stdev(values.tolist()) / math.sqrt(5))
    generator = torch.Generator().manual_seed(0)
    values, clusters = torch.randn(40, generator=generator, dtype=torch.float64), torch.randint(0, 7, (40,), generator=generator)
    mean = values.mean().item()
    sums = [sum(v - mean for v, c in zip(values.tolist(), clusters.tolist()) if c == g) for g in range(7)]
    groups = len(set(clusters.tolist()))
    expected = math.sqrt(groups / (groups - 1) * sum(s * s for s in sums) / 40**2)
    assert clustered_mean_and_stderr(values, clusters) == (pytest.approx(mean), pytest.approx(expected))
    assert math.isnan(clustered_mean_and_stderr(values, torch.zeros(40, dtype=torch.long))[1])  # one cluster
