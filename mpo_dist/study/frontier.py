"""The reward/KL frontier study: its plan (methods x beta, sizes), its results table and its plots.

The question (the MPO paper, arXiv 2312.16430, reports no experiment): does a method turn its KL
regularisation into reward at a bounded KL from the reference? Measured as the DPO paper did: the
expected true reward of a trained policy against KL(pi_theta || pi_ref), both on the policy's own
samples for held-out prompts, one curve per method over a sweep of beta. tools/study_frontier.py
runs the plan (data, training, evaluation) and calls `write_results`, `plot_frontier` and
`plot_kl_steps` here; this module runs nothing itself.

A run's row joins its evaluation report (tools/evaluate.py: `on_policy/reward` and
`on_policy/kl_policy_ref` with standard errors) with the last held-out evaluation of its training
(metrics.jsonl: preference accuracy, margin, and the KL monitor KL(pi_ref || pi_theta) on held-out
reference samples). The reference model, evaluated the same way, is the baseline row (KL 0).
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mpo_dist import metric_names as names

# ------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Method:
    """One curve of the frontier: a loss with its options, trained at each of `betas`.

    `tau_per_beta` r > 0 gives MPO's D_ref term the weight tau = r * beta, so one beta sets the
    strength of both of MPO's KL terms (the pair-wise one and the point-wise one on D_ref)."""

    name: str  # short id, in run names and file names
    label: str  # legend
    loss: str  # loss.name
    betas: tuple[float, ...]
    tau_per_beta: float = 0.0
    options: tuple[tuple[str, Any], ...] = ()  # further loss.* settings (the MPO options)

    def tau(self, beta: float) -> float:
        return float(f"{self.tau_per_beta * beta:.6g}")

    def overrides(self, beta: float) -> list[str]:
        """The trainer's loss settings for this beta (dotted config overrides)."""
        out = [f"loss.name={self.loss}", f"loss.beta={beta:g}", f"loss.tau={self.tau(beta):g}"]
        out += [f"loss.{key}={_config_value(value)}" for key, value in self.options]
        return out


def _config_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Run:
    method: Method
    beta: float

    @property
    def name(self) -> str:
        return f"{self.method.name}-b{self.beta:g}"

    @property
    def uses_dref(self) -> bool:
        return self.method.tau(self.beta) > 0


# The methods and their betas. Chosen by a pilot on the default-size task (150 steps at lr 1e-4 on
# half the pairs; (on-policy KL(pi_theta || pi_ref) in nats, true reward), the reference's ~0.4):
# DPO beta 0.1 (36.7, 1.63), beta 1 (4.5, 1.09); IPO beta 0.1 (1.4, 0.73); MPO tau 0 beta 0.01 (23.3,
# 0.98), 0.1 (8.1, 0.99), 1 (2.8, 0.51); MPO tau = beta / 10 at beta 0.1 (1.7, 0.48), at 0.01 (3.7,
# 0.61); MPO s = 0.05 at beta 0.1 (50.8, 1.54), with per-token tau 0.1 (19.1, 1.20), at beta 1 with
# per-token tau 1 (2.9, 0.58). Each grid spans weak to strong regularisation on its own scale: beta
# enters each loss differently (DPO: the logit scale; IPO: the target margin 1/(2 beta); MPO: the
# optimum z_ref + 1/(s beta)). The pairs' sequence log-prob gaps are ~14 nats (median |z_ref|), where
# MPO's p = sigmoid(z) saturates; pair_logit_scale s = 0.05 brings s z to ~0.7. The responses all
# have 64 tokens here, so length_normalized_pair would be the scale 1/64: the scale knob covers it.
SCALED = (("pair_logit_scale", 0.05),)
KNOBS = (("length_normalized_tau", True), ("pair_logit_scale", 0.05))
METHODS = (
    Method("dpo", "DPO", "dpo", (0.1, 0.3, 1.0, 3.0)),
    Method("ipo", "IPO", "ipo", (0.003, 0.01, 0.03, 0.1)),
    Method("mpo", "MPO, tau = 0", "mpo", (0.01, 0.03, 0.1, 1.0)),
    Method("mpo-tau", "MPO, tau = beta / 10", "mpo", (0.001, 0.003, 0.01, 0.1), tau_per_beta=0.1),
    Method("mpo-scaled", "MPO, s = 0.05, tau = 0", "mpo", (0.1, 0.3, 1.0, 3.0), options=SCALED),
    Method("mpo-knobs", "MPO, s = 0.05, per-token tau = beta", "mpo", (0.1, 0.3, 1.0, 3.0), tau_per_beta=1.0,
           options=KNOBS),
)


@dataclass(frozen=True)
class StudySize:
    """How big the task and the runs are. On a 2-core CPU (one thread per process, other jobs light),
    `DEFAULT` (24 runs of 160 steps) took 27 minutes: 1 for the data, then per run ~55 s of training
    and ~8 s of evaluation; `TINY` (6 runs of 4 steps: each method once, at the middle of its betas,
    which is enough to check that every method runs end to end) 2.5 minutes, 1.5 with --jobs 2
    --nproc 1 (as CI runs it), almost all of it process start-up.
    Both take longer when other jobs share the cores (up to about twice as long was seen)."""

    num_prompts: int = 400  # distinct story openings
    pairs_per_prompt: int = 4  # pairs of reference samples per prompt
    eval_fraction: float = 0.2  # held-out prompts (by a hash of the prompt text)
    max_new_tokens: int = 64  # length of every sampled response (pairs, D_ref, on-policy)
    steps: int = 160
    eval_interval: int = 20  # the held-out KL monitor against the step
    on_policy_samples: int = 2  # per held-out pair record (pairs_per_prompt records per prompt)
    betas_per_method: int = 0  # 0: all of each method's betas; n: n of them, weakest to strongest (betas())
    lr: float = 1.0e-4

    def betas(self, method: Method) -> tuple[float, ...]:
        """The betas run: all, or `betas_per_method` of them spread from the weakest to the strongest."""
        betas = method.betas
        n = self.betas_per_method
        if not n or n >= len(betas):
            return betas
        if n == 1:
            return betas[len(betas) // 2 : len(betas) // 2 + 1]
        return tuple(betas[round(i * (len(betas) - 1) / (n - 1))] for i in range(n))


DEFAULT = StudySize()
TINY = StudySize(num_prompts=30, pairs_per_prompt=2, eval_fraction=0.3, max_new_tokens=16, steps=4, eval_interval=2,
                 on_policy_samples=2, betas_per_method=1)


def plan_runs(size: StudySize, methods: tuple[Method, ...] = METHODS) -> list[Run]:
    return [Run(method, beta) for method in methods for beta in size.betas(method)]


# ---------------------------------------------------------------------------------------- results

COLUMNS = [
    "run", "method", "label", "loss", "beta", "tau", "length_normalized_pair", "length_normalized_tau",
    "pair_logit_scale", "chosen_nll", "steps", "lr",
    "reward", "reward_stderr", "kl_policy_ref", "kl_policy_ref_stderr",
    "heldout_kl_ref_policy", "heldout_kl_ref_policy_stderr", "heldout_preference_accuracy",
    "heldout_reward_accuracy", "heldout_reward_margin", "train_reward_accuracy", "train_preference_accuracy",
    "response_tokens", "on_policy_samples", "train_seconds", "eval_seconds",
]
_TEXT = {"run", "method", "label", "loss"}
_BOOL = {"length_normalized_pair", "length_normalized_tau"}
_INT = {"steps", "on_policy_samples"}


def kl_curve(records: list[dict]) -> list[tuple[int, float, float]]:
    """(step, held-out KL(pi_ref || pi_theta), its stderr) at every held-out evaluation, from step 0
    (the policy is the reference there: 0 exactly)."""
    points = [(0, 0.0, 0.0)]
    points += [(int(r["step"]), float(r[names.KL_MONITOR]), float(r.get(names.stderr_name(names.KL_MONITOR), math.nan)))
               for r in records if names.KL_MONITOR in r]
    return points


def _last(records: list[dict], name: str) -> float:
    values = [r[name] for r in records if name in r]
    return float(values[-1]) if values else math.nan


def run_row(run: Run, size: StudySize, report: dict, records: list[dict], train_seconds: float,
            eval_seconds: float) -> dict:
    """One row of the results table: the run's settings, its on-policy evaluation and its last held-out eval."""
    metrics = report["metrics"]
    options = dict(run.method.options)
    return {
        "run": run.name, "method": run.method.name, "label": run.method.label, "loss": run.method.loss,
        "beta": float(run.beta), "tau": run.method.tau(run.beta),
        "length_normalized_pair": bool(options.get("length_normalized_pair", False)),
        "length_normalized_tau": bool(options.get("length_normalized_tau", False)),
        "pair_logit_scale": float(options.get("pair_logit_scale", 1.0)),
        "chosen_nll": float(options.get("chosen_nll", 0.0)),
        "steps": size.steps, "lr": size.lr,
        **_on_policy(metrics),
        "heldout_kl_ref_policy": _last(records, names.KL_MONITOR),
        "heldout_kl_ref_policy_stderr": _last(records, names.stderr_name(names.KL_MONITOR)),
        "heldout_preference_accuracy": _last(records, names.eval_name("preference_accuracy")),
        "heldout_reward_accuracy": _last(records, names.eval_name("reward_accuracy")),
        "heldout_reward_margin": _last(records, names.eval_name("reward_margin")),
        "train_reward_accuracy": _last(records, names.REWARD_ACCURACY),
        "train_preference_accuracy": _last(records, names.PREFERENCE_ACCURACY),
        "train_seconds": float(train_seconds), "eval_seconds": float(eval_seconds),
    }


def _on_policy(metrics: dict) -> dict:
    return {
        "reward": float(metrics[names.ON_POLICY_REWARD]),
        "reward_stderr": float(metrics[names.stderr_name(names.ON_POLICY_REWARD)]),
        "kl_policy_ref": float(metrics[names.KL_POLICY_REF]),
        "kl_policy_ref_stderr": float(metrics[names.stderr_name(names.KL_POLICY_REF)]),
        "response_tokens": float(metrics[names.ON_POLICY_RESPONSE_TOKENS]),
        "on_policy_samples": int(metrics[names.ON_POLICY_SAMPLES]),
    }


def reference_row(report: dict, eval_seconds: float) -> dict:
    """The baseline: the reference model evaluated on-policy like every run (its KL is 0 by construction)."""
    row = {name: None for name in COLUMNS}
    row.update(run="reference", method="reference", label="reference (stories260K)", loss=None, beta=None, tau=0.0,
               length_normalized_pair=False, length_normalized_tau=False, pair_logit_scale=1.0, chosen_nll=0.0,
               steps=0, lr=None, **_on_policy(report["metrics"]), train_seconds=0.0, eval_seconds=float(eval_seconds))
    for name in COLUMNS:
        if row[name] is None and name not in _TEXT:
            row[name] = math.nan
    return row


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)  # repr: the exact float comes back
    return str(value)


def _parse_cell(name: str, text: str) -> Any:
    if name in _TEXT:
        return text or None
    if name in _BOOL:
        return text == "true"
    if text == "":
        return math.nan
    return int(text) if name in _INT else float(text)


def write_results(out_dir: str | Path, rows: list[dict], extra: dict) -> tuple[Path, Path]:
    """results.csv (one row per run, the reference first; empty cells are missing values) and
    results.json ({"columns", "rows", **extra}; missing values are null), both written atomically."""
    out_dir = Path(out_dir)
    csv_path, json_path = out_dir / "results.csv", out_dir / "results.json"
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([_csv_cell(row[name]) for name in COLUMNS])
    os.replace(tmp, csv_path)
    as_json = [{name: None if isinstance(row[name], float) and math.isnan(row[name]) else row[name] for name in COLUMNS}
               for row in rows]
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps({"columns": COLUMNS, "rows": as_json, **extra}, indent=1) + "\n")
    os.replace(tmp, json_path)
    return csv_path, json_path


def read_results_csv(path: str | Path) -> list[dict]:
    """results.csv back as typed rows (missing numbers are NaN)."""
    with open(path, newline="") as handle:
        return [{name: _parse_cell(name, row[name]) for name in COLUMNS} for row in csv.DictReader(handle)]


def read_results_json(path: str | Path) -> list[dict]:
    """results.json's rows with missing numbers as NaN (as `read_results_csv` gives them)."""
    rows = json.loads(Path(path).read_text())["rows"]
    return [{name: (math.nan if value is None and name not in _TEXT else value) for name, value in row.items()}
            for row in rows]


# ------------------------------------------------------------------------------------------ plots


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("the study's plots need matplotlib: pip install -e '.[study]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_frontier(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Reward against KL(pi_theta || pi_ref) on held-out prompts, with standard errors: one curve per
    method through its betas (each point labelled), the reference at KL 0."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 6))
    reference = [row for row in rows if row["method"] == "reference"]
    for ref in reference:
        ax.errorbar([0.0], [ref["reward"]], yerr=[ref["reward_stderr"]], fmt="*", color="black", markersize=14,
                    label=ref["label"], zorder=5)
        ax.axhline(ref["reward"], color="black", linestyle=":", linewidth=0.8)
    methods = [m for m in dict.fromkeys(row["method"] for row in rows) if m != "reference"]
    for method in methods:
        mine = sorted((row for row in rows if row["method"] == method), key=lambda row: -row["beta"])
        ax.errorbar([row["kl_policy_ref"] for row in mine], [row["reward"] for row in mine],
                    xerr=[row["kl_policy_ref_stderr"] for row in mine], yerr=[row["reward_stderr"] for row in mine],
                    fmt="o-", capsize=3, label=mine[0]["label"])
        for row in mine:
            ax.annotate(f"β={row['beta']:g}", (row["kl_policy_ref"], row["reward"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    largest = max([row["kl_policy_ref"] for row in rows if math.isfinite(row["kl_policy_ref"])] or [1.0])
    if largest > 30:
        ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("KL(π_θ ‖ π_ref) per response, nats (on-policy, held-out prompts)")
    ax.set_ylabel("true reward (mean over on-policy samples)")
    ax.set_title(title or "Reward/KL frontier")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_kl_steps(curves: dict[str, list[tuple[int, float, float]]], rows: list[dict], path: str | Path) -> Path:
    """The held-out KL monitor KL(pi_ref || pi_theta) against the step, one panel per method, one
    line per beta."""
    plt = _pyplot()
    by_run = {row["run"]: row for row in rows}
    methods = [m for m in dict.fromkeys(row["method"] for row in rows) if m != "reference"]
    columns = min(3, max(len(methods), 1))
    lines = max(math.ceil(len(methods) / columns), 1)
    fig, axes = plt.subplots(lines, columns, figsize=(4.6 * columns, 3.6 * lines), squeeze=False)
    for ax, method in zip(axes.flat, methods):
        for run, curve in curves.items():
            row = by_run.get(run)
            if row is None or row["method"] != method:
                continue
            steps, kl, stderr = zip(*curve)
            ax.errorbar(steps, kl, yerr=stderr, fmt=".-", capsize=2, label=f"β={row['beta']:g}")
        ax.set_title(next(row["label"] for row in rows if row["method"] == method), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("held-out KL(π_ref ‖ π_θ), nats")
    for ax in list(axes.flat)[len(methods):]:
        ax.set_visible(False)
    fig.suptitle("KL monitor (held-out reference samples) against the step", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def describe_plan(size: StudySize, runs: list[Run]) -> dict:
    """The plan as recorded in results.json: the sizes and every run's loss settings."""
    return {"size": asdict(size), "runs": {run.name: run.method.overrides(run.beta) for run in runs}}
