"""Metric names in one place, the one console formatter, the one reader of metrics.jsonl, and the
step window's seconds and steps that the trainer logs as throughput/seconds_per_step."""

from __future__ import annotations

import json

import pytest
import torch

from mpo_dist import metric_names as names
from mpo_dist.evaluation import describe
from mpo_dist.metrics import MetricLogger, StepWindow
from mpo_dist.metrics_file import METRICS_FILE, read_metrics, training_records

pytestmark = pytest.mark.unit


def test_loss_metrics_get_their_logged_names_and_the_eval_prefix():
    assert names.logged_name("preference_accuracy") == names.PREFERENCE_ACCURACY == "preference/accuracy"
    assert names.logged_name("kl_pair") == "loss/kl_pair"  # any other loss metric is a loss term
    assert names.eval_name("loss") == "eval/loss/total" and names.KL_MONITOR == "eval/kl_ref_policy"
    assert names.stderr_name(names.KL_POLICY_REF) == "on_policy/kl_policy_ref_stderr"


def test_the_console_line_shows_present_fields_in_order_with_stderr_and_only_nonzero():
    fields = (names.ConsoleField("a", "A", "{:.2f}"), names.ConsoleField("b", "B", "{:.1f}", with_stderr=True),
              names.ConsoleField("c", "C", "{:.0f}", only_nonzero=True), names.ConsoleField("d", "D", "{:.0f}"))
    assert names.console_line({"b": 1.25, "b_stderr": 0.5, "a": 2.0, "c": 0.0}, fields, before=["x"], after=["y"]) \
        == "x | A 2.00 | B 1.2 +- 0.5 | y"
    assert names.console_line({"c": 3.0}, fields) == "C 3"


def test_the_eval_line_names_the_metrics_the_losses_produce():
    values = {names.eval_name("loss"): 0.5, names.eval_name("reward_accuracy"): 0.75,
              names.eval_name("preference_accuracy"): 0.625, names.eval_name("reward_margin"): 0.125,
              names.KL_MONITOR: 0.0123, names.stderr_name(names.KL_MONITOR): 0.002, names.EVAL_SECONDS: 1.25}
    assert describe(values) == ("loss 0.5000 | reward acc 0.750 | pref acc 0.625 | margin +0.125 | "
                                "kl(ref|pol) 0.012 +- 0.002 | 1.2s")


def test_metrics_file_records_skip_a_cut_line_and_training_records_hold_throughput(tmp_path):
    (tmp_path / METRICS_FILE).write_text(json.dumps({"step": 2, names.TOKENS_PER_S: 5.0}) + "\n"
                                         + json.dumps({"step": 2, names.KL_MONITOR: 0.1}) + "\n"
                                         + json.dumps({"step": 1, names.TOKENS_PER_S: 4.0}) + "\n" + '{"step": 3, "lo')
    records = read_metrics(tmp_path)  # a run's folder or the file itself
    assert records == read_metrics(tmp_path / METRICS_FILE) and [r["step"] for r in records] == [2, 2, 1]
    assert [(r["step"], r[names.TOKENS_PER_S]) for r in training_records(records)] == [(1, 4.0), (2, 5.0)]
    assert read_metrics(tmp_path / "nothing") == []


def test_a_resumed_logger_keeps_the_records_up_to_its_step(tmp_path):
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps({"step": s, "loss/total": s / 10}) + "\n" for s in (1, 2, 3))
                                         + '{"step": 4, "lo')
    logger = MetricLogger(tmp_path, enabled=True, tensorboard=False, total_steps=5, start_step=2, log=lambda line: None)
    logger.write(3, {"loss/total": 0.5})
    logger.close()
    assert read_metrics(tmp_path) == [{"step": 1, "loss/total": 0.1}, {"step": 2, "loss/total": 0.2},
                                      {"step": 3, "loss/total": 0.5}]


def test_the_step_window_counts_every_step_and_means_over_the_finite_ones(one_process_group):
    window = StepWindow()
    window.add_step({"loss": torch.tensor(1.0)}, {"grad_norm": torch.tensor(2.0)}, {"tokens": 10.0})
    window.add_step({"loss": torch.tensor(float("nan"))}, {"grad_norm": torch.tensor(float("nan"))}, {"tokens": 5.0},
                    skipped=True)
    window.add_step({"loss": torch.tensor(3.0)}, {"grad_norm": torch.tensor(4.0)}, {"tokens": 20.0})
    out = window.reduce(torch.device("cpu"))
    assert out["steps"] == 3 and out["tokens"] == 35.0 and out["seconds"] > 0  # skipped steps take time too
    assert out[names.LOSS] == 2.0 and out[names.GRAD_NORM] == 3.0
