"""tools/bench_train.py's arithmetic: timed windows from metrics.jsonl records, per-pair sums, MFU by
the trainer's formula, the configuration grid and its command lines, the error line of a failed run,
and the concurrent matmul peak."""

from __future__ import annotations

import json
import sys

import pytest

from support import REPO

sys.path.insert(0, str(REPO / "tools"))  # the matmul workers are spawned: their module must be importable by name
import bench_train  # noqa: E402

from mpo_dist import flops  # noqa: E402
from mpo_dist import metric_names as names  # noqa: E402
from mpo_dist.benchmark import MPO_TAU, NO_EVAL, first_error_line, subprocess_env  # noqa: E402
from mpo_dist.errors import InputError  # noqa: E402
from mpo_dist.metrics_file import read_metrics, training_records  # noqa: E402


def record(step, tokens_seen, pairs_seen, seconds_per_step, padding, positions_per_pair, flops_per_pair):
    """A metrics.jsonl record with the fields the bench reads (the trainer writes more)."""
    return {"step": step, names.LOSS: 0.5, names.TOKENS_SEEN: tokens_seen, names.PAIRS_SEEN: pairs_seen,
            names.TOKENS_PER_S: 1.0, names.SECONDS_PER_STEP: seconds_per_step, names.PADDING: padding,
            names.POSITIONS_PER_PAIR: positions_per_pair, names.FLOPS_PER_PAIR: flops_per_pair, names.PEAK_GIB: 0.25}


# Steps 1 (10 s), 2-3 (400 tokens, 8 pairs, 2 s) and 4-5 (200 tokens, 4 pairs, 2 s); an eval-only record between.
RECORDS = [record(1, 100, 2, 10.0, 0.5, 50, 5e5), record(3, 500, 10, 1.0, 0.25, 60, 1e6), {"step": 4, "eval/loss/total": 1.0},
           record(5, 700, 14, 1.0, 0.5, 90, 3e6)]


@pytest.mark.unit
def test_windows_are_differences_of_the_progress_counters_and_warm_up_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in reversed(RECORDS)) + '{"step": 6, "loss/to')  # cut by a crash
    windows = bench_train.windows_of(training_records(read_metrics(tmp_path)))  # by step, eval-only record left out
    assert [(w.first_step, w.last_step, w.tokens, w.pairs) for w in windows] == [(1, 1, 100, 2), (2, 3, 400, 8), (4, 5, 200, 4)]
    assert [w.seconds for w in windows] == pytest.approx([10.0, 2.0, 2.0])  # seconds per step x the window's steps
    assert [(w.first_step, w.last_step) for w in bench_train.timed(windows, 1)] == [(2, 3), (4, 5)]
    assert [(w.first_step, w.last_step) for w in bench_train.timed(windows, 2)] == [(4, 5)]  # 2-3 began in the warm-up
    with pytest.raises(ValueError, match="no timed window"):
        bench_train.summarize(bench_train.timed(windows, 5))


@pytest.mark.unit
def test_summary_sums_the_timed_windows():
    summary = bench_train.summarize(bench_train.timed(bench_train.windows_of(training_records(RECORDS)), 1))
    assert summary["timed_steps"] == [2, 5]
    assert summary["tokens_per_s"] == pytest.approx(600 / 4)  # a ratio of sums, not a mean of the windows' rates
    assert summary["pairs_per_s"] == pytest.approx(12 / 4)
    assert summary["real_tokens_per_pair"] == pytest.approx(50)
    assert summary["positions_per_pair"] == pytest.approx((60 * 8 + 90 * 4) / 12)
    assert summary["padding"] == pytest.approx(1 - (60 * 8 * 0.75 + 90 * 4 * 0.5) / (60 * 8 + 90 * 4))
    assert summary["flops_per_pair"] == pytest.approx((1e6 * 8 + 3e6 * 4) / 12)


@pytest.mark.unit
def test_mfu_is_the_trainers_formula_over_the_measured_peak():
    # 2e9 FLOPs per pair x 30 pairs/s = 6e10 FLOP/s against a 2 x 1.5e11 FLOP/s matmul peak (two processes).
    assert bench_train.pairs_mfu(2e9, 30.0, 1, 3e11) == pytest.approx(0.2)
    assert bench_train.pairs_mfu(2e9, 30.0, 1, 3e11) == pytest.approx(flops.mfu(2e9 * 30.0 * 4.0, 4.0, 1, 0.3))
    assert bench_train.pairs_mfu(2e9, 30.0, 2, 3e11) == pytest.approx(0.1)  # two devices of that peak each
    assert bench_train.pairs_mfu(2e9, 30.0, 1, None) is None


@pytest.mark.unit
def test_configurations_cross_every_axis_with_their_overrides():
    configs = bench_train.configurations(["padded", "packed"], ["float32", "bfloat16"], ["2x1", "1x2"], ["dpo", "mpo"])
    assert len(configs) == 16 and len({c.name for c in configs}) == 16
    packed_mpo = next(c for c in configs if c.name == "packed bf16 1x2 mpo")
    assert (packed_mpo.processes, packed_mpo.threads) == (1, 2)
    assert {"model.dtype=bfloat16", "data.packing=always", "loss.name=mpo", f"loss.tau={MPO_TAU}"} <= set(packed_mpo.overrides(0.0))
    assert "loss.tau=0.2" in packed_mpo.overrides(0.2)  # the config's tau when it has one
    padded_dpo = next(c for c in configs if c.name == "padded fp32 2x1 dpo")
    assert {"loss.name=dpo", "loss.tau=0", "data.packing=never"} <= set(padded_dpo.overrides(0.05))
    assert bench_train.configurations(["padded"], ["float32"], ["1x1"], ["config"])[0].name == "padded fp32 1x1"
    for bad in (["padded"], ["float16"], ["2x1"], ["config"]), (["padded"], ["float32"], ["2"], ["config"]):
        with pytest.raises(InputError):
            bench_train.configurations(*bad)



@pytest.mark.unit
def test_a_baseline_twin_follows_each_configuration_and_ratios_pair_the_same_rounds(capfd):
    configs = bench_train.configurations(["padded", "packed"], ["float32"], ["1x2"], ["dpo"], baseline=True)
    assert [c.name for c in configs] == ["padded fp32 1x2 dpo", "padded fp32 1x2 dpo baseline",
                                         "packed fp32 1x2 dpo", "packed fp32 1x2 dpo baseline"]

    def run(round_index, tokens_per_s):
        return {"round": round_index, "summary": {"tokens_per_s": tokens_per_s}}

    padded, padded_base, packed, packed_base = configs
    runs = {padded: [run(1, 110.0), run(2, 90.0), run(3, 100.0)],
            padded_base: [run(1, 100.0), run(2, 100.0), {"round": 3, "error": "killed"}],  # round 3 has no pair
            packed: [run(1, 200.0)], packed_base: [run(1, 250.0)]}
    ratios = bench_train.baseline_ratios(configs, runs)
    assert [(r["name"], r["ratios"]) for r in ratios] == [("padded fp32 1x2 dpo", [1.1, 0.9]), ("packed fp32 1x2 dpo", [0.8])]
    assert ratios[0]["median"] == pytest.approx(1.0)
    assert bench_train.main(["--baseline", str(REPO / "docs"), "--rounds", "1"]) == 2  # an input error, named:
    assert f"--baseline {REPO / 'docs'} is not a checkout of mpo_dist" in capfd.readouterr().err

@pytest.mark.unit
def test_a_run_is_the_trainer_under_the_launcher_with_the_benchs_overrides(tmp_path):
    config = bench_train.BenchConfig("packed", "float32", 2, 3, "dpo")
    command = bench_train.training_command(config, "c.yaml", config.overrides(0.0), tmp_path / "run", steps=7, log_interval=2)
    assert command[:10] == [sys.executable, "-m", "mpo_dist.launcher", "--standalone", "--nproc-per-node", "2",
                            "-m", "mpo_dist.train", "--config", "c.yaml"]
    overrides = command[10:]
    assert overrides[: len(NO_EVAL)] == NO_EVAL  # eval off first: the configuration's overrides may not turn it on
    assert {"training.steps=7", "metrics.log_interval=2", f"job.output_dir={tmp_path / 'run'}", "data.packing=always",
            "checkpoint.resume=none", "metrics.tensorboard=false"} <= set(overrides)
    assert subprocess_env(3)["OMP_NUM_THREADS"] == "3"  # the threads of PxT


@pytest.mark.unit
def test_a_failed_run_is_told_by_its_first_error_line():
    log = ("pre-flight: ok\n[rank0]: Traceback (most recent call last):\n[rank0]:   File x\n"
           "[rank0]: TypeError: f() got an unexpected keyword argument 'a'\n[rank1]: TypeError: again\n"
           "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\ntraceback : To enable traceback see: ...\n")
    assert first_error_line(log) == "[rank0]: TypeError: f() got an unexpected keyword argument 'a'"
    assert first_error_line("x\nmpo_dist: error (rank 0): unknown key data.packing\n") \
        == "mpo_dist: error (rank 0): unknown key data.packing"


@pytest.mark.dist
def test_matmul_peak_sums_processes_that_run_at_once():
    rates, device = bench_train.matmul_peak(2, 1, ["float32"], size=128, seconds=0.2)
    assert set(rates) == {"float32"} and rates["float32"] > 0 and device == "cpu"


@pytest.mark.unit
def test_recompute_and_compile_axes_set_the_parallel_options():
    configs = bench_train.configurations(["packed"], ["bfloat16"], ["1x1"], ["config"],
                                         bench_train.on_off("--recompute", "off,on"), bench_train.on_off("--compile", "off,on"))
    assert [c.name for c in configs] == ["packed bf16 1x1", "packed bf16 1x1 recompute", "packed bf16 1x1 compile",
                                         "packed bf16 1x1 recompute compile"]
    both = configs[-1].overrides(0.0)
    assert {"parallel.activation_checkpointing=true", "parallel.compile=true"} <= set(both)
    # Off is said explicitly: a config that turns them on does not leak into an "off" configuration.
    assert {"parallel.activation_checkpointing=false", "parallel.compile=false"} <= set(configs[0].overrides(0.0))
    with pytest.raises(InputError, match="--compile: 'yes' is not off or on"):
        bench_train.on_off("--compile", "off,yes")


@pytest.mark.unit
def test_gpu_runs_report_mfu_against_the_card_and_gpu_memory():
    config = bench_train.BenchConfig("packed", "bfloat16", 2, 1, "config")
    summary = {"tokens_per_s": 1000.0, "pairs_per_s": 4.0, "real_tokens_per_pair": 250.0, "positions_per_pair": 300.0,
               "padding": 0.1, "flops_per_pair": 1e14, "trainer_peak_gib": 12.5,
               "trainer_peak_reserved_gib": 14.0, "timed_steps": [6, 30]}
    runs = [{"round": 1, "summary": summary, "processes": [{"role": "rank 0", "peak_bytes": 2**30}]}]
    gpu = bench_train.config_result(config, runs, {"bfloat16": 2e15}, card_peak_flops=1e15, device_type="cuda")
    assert gpu["mfu_card_median"] == pytest.approx(1e14 * 4.0 / (1e15 * 2))  # two processes: two GPUs
    assert gpu["mfu_median"] == pytest.approx(1e14 * 4.0 / 2e15)  # against the matmul measured on both
    assert gpu["device_peak_bytes"] == 12.5 * 2**30 and gpu["device_reserved_bytes"] == 14.0 * 2**30
    cpu = bench_train.config_result(config, runs, {"bfloat16": 2e15})
    assert cpu["mfu_card_median"] is None and cpu["device_peak_bytes"] is None and cpu["device_reserved_bytes"] is None
    assert "MFU card" in bench_train.format_table([gpu]) and "GPU MiB" in bench_train.format_table([gpu])
    assert "MFU card" not in bench_train.format_table([cpu]) and "GPU" not in bench_train.format_table([cpu])
    assert "GPU rsv MiB" in bench_train.format_table([gpu])
