"""The trainer end to end under torchrun on CPU (gloo): learning, exact resume, resharding,
two 'nodes', a non-Llama architecture, a real pretrained model, and input errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support import REPO, SUBPROCESS_ENV, TRAIN_CONFIG, flat_checkpoint, free_port, toy_overrides, train
from mpo_dist.metrics_file import METRICS_FILE, read_metrics

pytestmark = pytest.mark.e2e


def logged(run: Path, name: str) -> list[float]:
    """One metric of every logged step, from the run's metrics.jsonl (e.g. 'reward/accuracy')."""
    return [record[name] for record in read_metrics(run)]


def test_two_process_mpo_learns_the_task(toy_inputs, tmp_path):
    result = train(*toy_overrides(toy_inputs, tmp_path / "run", **{"training.steps": 30}))
    accuracy, loss = logged(tmp_path / "run", "preference/accuracy"), logged(tmp_path / "run", "loss/total")
    assert len(accuracy) == 30
    assert accuracy[0] < 0.8 and min(accuracy[-5:]) > 0.95  # the policy comes to prefer chosen on a learnable task
    reward_accuracy = logged(tmp_path / "run", "reward/accuracy")  # implicit reward: z moved above z_ref
    assert reward_accuracy[0] < 0.8 and min(reward_accuracy[-5:]) > 0.9
    epochs = logged(tmp_path / "run", "progress/epoch")  # a fraction: one batch per rank per step
    assert 0 < epochs[0] < 0.1 and epochs == pytest.approx([(step + 1) * epochs[0] for step in range(30)])
    assert sum(loss[-5:]) / 5 < sum(loss[:5]) / 5 - 0.1
    assert (tmp_path / "run" / "checkpoints" / "step-00000030" / "checkpoint.json").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert "TensorBoard logs in" in result.stdout


def test_resume_equals_uninterrupted_and_reshards(toy_inputs, tmp_path):
    import shutil

    steps = {"training.steps": 6, "checkpoint.interval": 3, "checkpoint.keep": 3, "optim.warmup_steps": 2}
    train(*toy_overrides(toy_inputs, tmp_path / "full", **steps))
    # "Stopped at step 3": a run folder holding only the step-3 checkpoint, resumed with resume=auto.
    (tmp_path / "cut" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-00000003", tmp_path / "cut" / "checkpoints" / "step-00000003")
    # The full run loads in the ranks (data.num_workers=0, the default); the resumed one with a worker per stream.
    resumed = train(*toy_overrides(toy_inputs, tmp_path / "cut", **steps, **{"data.num_workers": 1}))
    assert "resumed from" in resumed.stdout and [r["step"] for r in read_metrics(tmp_path / "cut")] == [4, 5, 6]
    full = flat_checkpoint(tmp_path / "full" / "checkpoints" / "step-00000006", tmp_path)
    cut = flat_checkpoint(tmp_path / "cut" / "checkpoints" / "step-00000006", tmp_path)
    # Every saved tensor, the ranks' RNG states included (restored after the data iterators draw from it).
    assert sorted(full) == sorted(cut)
    tensors = [key for key, value in full.items() if isinstance(value, torch.Tensor)]
    assert any(key.startswith("model_optimizer.model.") for key in tensors)
    assert any(".exp_avg_sq" in key for key in tensors) and {"rng/dp_rank_0.cpu", "rng/dp_rank_1.cpu"} <= set(tensors)
    for key in tensors:  # model parameters, optimizer state, loader positions and RNG, bitwise
        assert torch.equal(full[key], cut[key]), key
    positions = [key for key in full if key.startswith("data.")]  # one key: both streams' positions
    assert "data.pairs.samples" in positions and "data.dref.samples" in positions
    for key in positions:  # the same data was seen: identical (global) loader positions
        assert torch.equal(full[key], cut[key]), key
    for rank in (0, 1):  # the RNG is per rank, as tensors (nothing pickled)
        assert full[f"rng/dp_rank_{rank}.cpu"].dtype == torch.uint8
    assert full["train_state.step"] == cut["train_state.step"] == 6
    assert full["train_state.pairs_seen"] == cut["train_state.pairs_seen"]

    # The same checkpoint at another world size: model and optimizer reshard, and the data position
    # (global) follows: the same global batch of 32 pairs per step, resumed at the next pair.
    (tmp_path / "one" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-00000003", tmp_path / "one" / "checkpoints" / "step-00000003")
    single = train(*toy_overrides(toy_inputs, tmp_path / "one", **steps), nproc=1)
    assert "written by 2 data-parallel ranks, now 1" in single.stdout
    assert "96 samples (3 global batches of 32) of epoch 0 done; resumes exactly" in single.stdout
    assert "data restarts" not in single.stdout
    assert [r["step"] for r in read_metrics(tmp_path / "one")] == [4, 5, 6]
    assert read_metrics(tmp_path / "one")[-1]["progress/pairs_seen"] == read_metrics(tmp_path / "full")[-1]["progress/pairs_seen"]
    one = flat_checkpoint(tmp_path / "one" / "checkpoints" / "step-00000006", tmp_path)
    for key in positions:
        if not key.endswith(("dp_world_size", ".batches")):  # per-rank batches differ: 1 rank takes 2 per step
            assert torch.equal(full[key], one[key]), key


def test_cpu_offload_resumes_bitwise_and_trains_like_no_offload(toy_inputs, tmp_path):
    """parallel.cpu_offload=true (FSDP2's CPUOffloadPolicy): resumed at step 2 it ends bitwise where the
    uninterrupted offload run ends, and both equal the run without offload bitwise, since here the
    compute device is the CPU too: the policy's copies are no-ops and the same kernels run (on a GPU
    the optimizer then steps on the CPU instead, which rounds differently)."""
    import shutil

    from transformers import AutoModelForCausalLM

    steps = {"training.steps": 4, "checkpoint.interval": 2, "checkpoint.keep": 2, "optim.warmup_steps": 1}
    offload = {**steps, "parallel.cpu_offload": "true"}
    train(*toy_overrides(toy_inputs, tmp_path / "full", **offload))
    (tmp_path / "cut" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-00000002", tmp_path / "cut" / "checkpoints" / "step-00000002")
    resumed = train(*toy_overrides(toy_inputs, tmp_path / "cut", **offload))
    assert "resumed from" in resumed.stdout and [r["step"] for r in read_metrics(tmp_path / "cut")] == [3, 4]
    assert "cpu_offload: true" in (tmp_path / "cut" / "config.yaml").read_text()
    train(*toy_overrides(toy_inputs, tmp_path / "plain", **steps))
    runs = {name: flat_checkpoint(tmp_path / name / "checkpoints" / "step-00000004", tmp_path)
            for name in ("full", "cut", "plain")}
    tensors = [key for key, value in runs["full"].items() if isinstance(value, torch.Tensor)]
    assert any(key.startswith("model_optimizer.model.") for key in tensors)
    assert any(".exp_avg_sq" in key for key in tensors) and {"rng/dp_rank_0.cpu", "rng/dp_rank_1.cpu"} <= set(tensors)
    for name in ("cut", "plain"):
        assert sorted(runs[name]) == sorted(runs["full"]), name
        for key in tensors:  # parameters, optimizer state, data positions and RNG
            assert torch.equal(runs[name][key], runs["full"][key]), (name, key)
    assert runs["full"]["train_state.step"] == runs["cut"]["train_state.step"] == 4
    assert logged(tmp_path / "cut", "loss/total") == logged(tmp_path / "full", "loss/total")[2:]
    assert logged(tmp_path / "plain", "loss/total") == logged(tmp_path / "full", "loss/total")
    assert logged(tmp_path / "plain", "optim/grad_norm") == logged(tmp_path / "full", "optim/grad_norm")
    start = AutoModelForCausalLM.from_pretrained(str(toy_inputs["model"])).state_dict()
    trained = {key.removeprefix("model_optimizer.model."): value for key, value in runs["full"].items()
               if key.startswith("model_optimizer.model.")}
    assert any(not torch.equal(start[name], value) for name, value in trained.items() if name in start)  # it trained


def test_crash_during_save_keeps_last_good_checkpoint(toy_inputs, tmp_path):
    run = tmp_path / "run"
    train(*toy_overrides(toy_inputs, run, **{"training.steps": 2, "checkpoint.interval": 1}))
    # A save that died half-way leaves only a temp folder: it is ignored and the newest complete one used.
    broken = run / "checkpoints" / "step-00000003.tmp"
    broken.mkdir()
    (broken / "__0_0.distcp").write_bytes(b"partial")
    result = train(*toy_overrides(toy_inputs, run, **{"training.steps": 3, "checkpoint.interval": 1}))
    assert "resumed from" in result.stdout and "step-00000002" in result.stdout
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]  # each step logged once across the restart


def test_two_nodes_with_c10d_rendezvous(toy_inputs, tmp_path):
    rendezvous = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                  "--rdzv-endpoint", f"localhost:{free_port()}", "--rdzv-id", "two-nodes-test"]
    args = toy_overrides(toy_inputs, tmp_path / "run", **{"training.steps": 4})
    command = [sys.executable, "-m", "torch.distributed.run", *rendezvous, "-m", "mpo_dist.train", "--config",
               str(TRAIN_CONFIG), *args]
    nodes = [subprocess.Popen(command, env=SUBPROCESS_ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    log = "".join(out for out, _ in outputs)
    assert "on 2 x cpu" in log and read_metrics(tmp_path / "run")[-1]["step"] == 4


def test_gpt2_architecture_trains(toy_inputs, tmp_path):
    gpt2 = "{model_type: gpt2, n_embd: 64, n_layer: 2, n_head: 4, n_positions: 64, vocab_size: 16}"
    result = train(*toy_overrides(toy_inputs, tmp_path / "run", **{"training.steps": 20, "model.path": "", "model.config": gpt2}))
    assert "GPT2LMHeadModel" in result.stdout
    loss = logged(tmp_path / "run", "loss/total")
    assert sum(loss[-5:]) / 5 < sum(loss[:5]) / 5 - 0.1


def test_stories260k_on_hh_rlhf_writes_every_metric(tmp_path, stories_inputs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from shard_factory import dref_from_pairs

    dref_from_pairs(stories_inputs["pairs"], stories_inputs["reference"], tmp_path / "dref", limit=40)
    model_dir, pairs, reference = stories_inputs["model"], stories_inputs["pairs"], stories_inputs["reference"]
    run = tmp_path / "run"
    train(*[f"{k}={v}" for k, v in {
        "job.output_dir": run, "model.path": model_dir, "data.pairs": pairs,
        "data.reference": reference, "data.dref": tmp_path / "dref", "loss.tau": 0.05,
        "data.batch_size": 4, "data.dref_batch_size": 4, "training.global_batch_size": 16, "training.steps": 3,
        "optim.lr": 1e-4, "metrics.log_interval": 1, "metrics.peak_tflops": 1.0, "model.dtype": "float32"}.items()])
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"loss/total", "loss/reward_term", "loss/kl_pair", "loss/dref_nll", "loss/dref_kl", "reward/accuracy",
                "preference/accuracy", "reward/margin", "reward/p", "logps/chosen", "logps/rejected", "optim/lr", "optim/grad_norm",
                "throughput/tokens_per_s", "throughput/mfu", "memory/peak_gib"}
    assert expected <= tags, expected - tags
    assert [event.step for event in events.Scalars("loss/total")] == [1, 2, 3]
    assert events.Scalars("progress/pairs_seen")[-1].value == 40  # global: 40 real pairs, padded to 3 global batches of 16
    # Step 1 starts at the reference: in float32 the policy's log-probs equal the scored ones.
    assert abs(events.Scalars("reward/margin")[0].value) < 1e-3
    assert abs(events.Scalars("loss/dref_kl")[0].value) < 1e-3


@pytest.mark.parametrize("case, override, message", [
    ("missing shards", {"data.pairs": "/nonexistent/pairs"}, "data.pairs=/nonexistent/pairs"),
    ("batch does not divide", {"training.global_batch_size": 30}, "training.global_batch_size=30 is not a multiple"),
    ("beta <= 0", {"loss.beta": 0}, "loss.beta must be > 0"),
])
def test_bad_inputs_fail_before_training_on_every_rank(toy_inputs, tmp_path, case, override, message):
    result = train(*toy_overrides(toy_inputs, tmp_path / "run", **override), check=False)
    assert result.returncode == 2, result.stderr[-3000:]  # the workers' input-error code, passed through by the launcher
    errors = [line for line in result.stderr.splitlines() if line.startswith("mpo_dist: error")]
    assert sorted(line.split(":")[1] for line in errors) == [" error (rank 0)", " error (rank 1)"], result.stderr[-3000:]
    assert all(message in line for line in errors)  # one line per rank, naming the option
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    assert not (tmp_path / "run" / METRICS_FILE).exists()


def test_tokenizer_mismatch_is_refused(toy_inputs, tmp_path, shared_data):
    result = train(*toy_overrides(toy_inputs, tmp_path / "run", **{"model.path": shared_data("stories260K")}), check=False)
    assert result.returncode != 0
    assert "was tokenized with tokenizer" in result.stderr and "re-run tools/prepare_pairs.py" in result.stderr


def test_hsdp_mesh_and_activation_checkpointing_train_the_same(toy_inputs, tmp_path):
    """HSDP (2 replicas x 1 shard), recomputed activations and layers resharded after forward (the
    tiny model keeps them gathered by default) are other ways to run the same computation: the
    logged losses and margins equal plain FSDP's, to float32 rounding (HSDP all-reduces the
    gradients where FSDP reduce-scatters them, scaling them in another order: at step 3 the loss is
    2e-7 apart and the margin, a difference of log-prob sums of tens of nats, 3e-7)."""
    runs = {}
    for name, extra in {"fsdp": {}, "hsdp": {"parallel.dp_replicate": 2},
                        "recompute": {"parallel.activation_checkpointing": "true"},
                        "reshard": {"parallel.reshard_after_forward": "always"}}.items():
        train(*toy_overrides(toy_inputs, tmp_path / name, **{"training.steps": 3, **extra}))
        runs[name] = (logged(tmp_path / name, "loss/total"), logged(tmp_path / name, "reward/margin"))
    assert len(runs["fsdp"][0]) == 3
    for name in ("hsdp", "recompute", "reshard"):
        for values, expected in zip(runs[name], runs["fsdp"]):
            assert values == pytest.approx(expected, rel=1e-5, abs=1e-5), name


@pytest.mark.parametrize("loss", ["dpo", "ipo"])
def test_dpo_and_ipo_train_on_the_same_shards(toy_inputs, tmp_path, loss):
    extra = {"loss.name": loss, "loss.tau": 0, "data.dref": "", "training.steps": 12}
    if loss == "dpo":
        extra["loss.label_smoothing"] = 0.1
    train(*toy_overrides(toy_inputs, tmp_path / "run", **extra))
    accuracy = logged(tmp_path / "run", "preference/accuracy")  # the policy comes to prefer chosen
    assert len(accuracy) == 12 and max(accuracy[-3:]) > accuracy[0] + 0.2
    reward_accuracy = logged(tmp_path / "run", "reward/accuracy")  # and its implicit reward z - z_ref rises
    assert len(reward_accuracy) == 12 and max(reward_accuracy[-3:]) > reward_accuracy[0] + 0.2


def test_reference_scored_on_other_pairs_is_refused_before_step_1(toy_inputs, tmp_path):
    """Pairs re-prepared with other length limits (same tokenizer, keys and counts) against the
    reference scored on the old ones: refused by its recorded pairs fingerprint, not trained on."""
    from support import QUIET
    from mpo_dist.producers.prepare import PrepareOptions, prepare_pairs

    prepare_pairs(toy_inputs["root"] / "toy" / "pairs.jsonl", toy_inputs["model"], tmp_path / "pairs",
                  PrepareOptions(samples_per_shard=300, max_length=48, max_prompt_length=24), log=QUIET)
    result = train(*toy_overrides(toy_inputs, tmp_path / "run", **{"data.pairs": tmp_path / "pairs", "loss.tau": 0,
                                                                    "data.dref": ""}), check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("mpo_dist: error")]
    assert len(errors) == 2 and all(f"data.reference {toy_inputs['reference']} was made from other pairs" in line
                                    for line in errors), result.stderr[-3000:]
    assert not (tmp_path / "run" / METRICS_FILE).exists()


def test_a_nan_in_a_reference_shard_is_refused_before_step_1(toy_inputs, tmp_path):
    """The trainer's pre-flight check reads every shard before the model is built: one NaN reference
    log-prob stops the run with a line naming shard, key and field, on every rank."""
    import math
    import shutil

    from shard_factory import rewrite

    reference = tmp_path / "reference"
    shutil.copytree(toy_inputs["reference"], reference)
    poisoned = {}

    def poison(index, key, meta, arrays):
        if index == 3:
            meta["rejected_logp"] = math.nan
            poisoned["key"] = key
        return key, meta, arrays

    rewrite(reference / "shard-000001.tar", "ref_logps", poison)
    result = train(*toy_overrides(toy_inputs, tmp_path / "run", **{"data.reference": reference}), check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    expected = f"shard-000001.tar: sample '{poisoned['key']}': field 'rejected_logp' is nan (not finite)"
    assert expected in result.stderr and "failed on another rank" in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "run" / METRICS_FILE).exists()


def test_packed_training_ends_with_the_parameters_of_padded_training(toy_inputs, tmp_path):
    """data.packing changes how the forward is laid out, not what it computes: in float32, 4 MPO
    steps (with D_ref) end with the same parameters to float rounding, and log the same losses."""
    finals = {}
    for packing in ("never", "always"):
        train(*toy_overrides(toy_inputs, tmp_path / packing, **{"training.steps": 4, "model.dtype": "float32",
                                                                 "data.packing": packing}))
        state = flat_checkpoint(tmp_path / packing / "checkpoints" / "step-00000004", tmp_path)
        finals[packing] = {k: v for k, v in state.items() if k.startswith("model_optimizer.model.")}
    assert finals["always"].keys() == finals["never"].keys() and len(finals["always"]) > 5
    for key, padded in finals["never"].items():
        torch.testing.assert_close(finals["always"][key], padded, rtol=1e-4, atol=2e-5, msg=key)
    assert logged(tmp_path / "always", "loss/total") == pytest.approx(logged(tmp_path / "never", "loss/total"), abs=1e-5)
    packed, padded = read_metrics(tmp_path / "always")[-1], read_metrics(tmp_path / "never")[-1]
    assert packed["throughput/positions_per_pair"] < padded["throughput/positions_per_pair"]  # prompts computed once
    assert packed["throughput/tokens_per_s"] > 0 and packed["throughput/padding"] < padded["throughput/padding"]
