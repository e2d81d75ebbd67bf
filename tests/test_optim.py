"""The learning-rate schedule: linear warmup, then cosine, linear or constant, with a floor."""

from __future__ import annotations

import math

import pytest
import torch

from mpo_dist.config import OptimConfig
from mpo_dist.optim import build_lr_scheduler, lr_multiplier

pytestmark = pytest.mark.unit

WARMUP, TOTAL = 10, 110  # 100 decay steps after the warmup


def optim(schedule: str = "cosine", warmup: int = WARMUP, min_lr_ratio: float = 0.0, lr: float = 1e-3) -> OptimConfig:
    return OptimConfig(lr=lr, warmup_steps=warmup, schedule=schedule, min_lr_ratio=min_lr_ratio)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_is_linear_up_to_the_full_rate(schedule):
    config = optim(schedule)
    assert [lr_multiplier(step, config, TOTAL) for step in range(WARMUP)] == pytest.approx(
        [(step + 1) / WARMUP for step in range(WARMUP)])
    assert lr_multiplier(WARMUP, config, TOTAL) == pytest.approx(1.0)  # the first step after warmup


@pytest.mark.parametrize(("schedule", "quarter", "middle"), [
    ("cosine", 0.5 * (1 + math.cos(math.pi / 4)), 0.5),
    ("linear", 0.75, 0.5),
    ("constant", 1.0, 1.0),
])
def test_decay_shapes_at_start_quarter_middle_and_end(schedule, quarter, middle):
    config = optim(schedule)
    at = lambda fraction: lr_multiplier(WARMUP + int(fraction * (TOTAL - WARMUP)), config, TOTAL)
    end = 1.0 if schedule == "constant" else 0.0
    assert [at(0), at(0.25), at(0.5), at(1)] == pytest.approx([1.0, quarter, middle, end], abs=1e-12)
    assert lr_multiplier(TOTAL + 50, config, TOTAL) == pytest.approx(end, abs=1e-12)  # past the end: stays there


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_min_lr_ratio_is_the_floor(schedule):
    config = optim(schedule, min_lr_ratio=0.1)
    values = [lr_multiplier(step, config, TOTAL) for step in range(WARMUP, TOTAL + 20)]
    assert values[0] == pytest.approx(1.0)
    assert lr_multiplier(WARMUP + 50, config, TOTAL) == pytest.approx(0.1 + 0.9 * 0.5)  # the middle, rescaled
    assert min(values) == pytest.approx(0.1) and values[-1] == pytest.approx(0.1)
    assert all(later <= earlier + 1e-12 for earlier, later in zip(values, values[1:]))  # never rises


def test_no_warmup_starts_at_the_full_rate():
    assert lr_multiplier(0, optim(warmup=0), TOTAL) == pytest.approx(1.0)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lambda_lr_follows_the_multiplier(schedule):
    config = optim(schedule, warmup=3, min_lr_ratio=0.2, lr=2e-3)
    total = 12
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([parameter], lr=config.lr)
    scheduler = build_lr_scheduler(optimizer, config, total)
    for k in range(total + 3):
        expected = config.lr * lr_multiplier(k, config, total)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12), f"after {k} steps"
        assert scheduler.get_last_lr()[0] == pytest.approx(expected, rel=1e-12)
        parameter.grad = torch.ones(2)
        optimizer.step()
        scheduler.step()
