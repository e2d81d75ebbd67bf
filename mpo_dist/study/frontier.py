"""The reward/KL frontier study: its plan (methods, betas, seeds, data variants, sizes), its statistics
over seeds, its tables and its plots.

The question (the MPO paper, arXiv 2312.16430, reports no experiment): does a method turn its KL
regularisation into reward at a bounded KL from the reference, as training goes on? Measured as the
DPO paper did: the expected true reward of a policy against KL(pi_theta || pi_ref), both on the
policy's own samples for held-out prompts, here with every configuration trained on several seeds
and, for the main methods, evaluated at checkpoints along the run (a trajectory). tools/study_frontier.py
runs the plan (data, training, evaluation) and calls `aggregate`, `write_study_results`,
`tables_markdown`, `plot_frontier` and `plot_trajectories` here; this module runs nothing itself.

An evaluation row joins tools/evaluate.py's report (`on_policy/reward` and `on_policy/kl_policy_ref`,
with standard errors clustered by prompt) with the trainer's held-out evaluation at that step
(metrics.jsonl). The reference model, evaluated the same way per seed, is the baseline (KL 0).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpo_dist import metric_names as names
from mpo_dist.data.shards import atomic_write_bytes

# ------------------------------------------------------------------------------------------- plan


DATA_VARIANTS = ("hard", "soft", "varied")  # the pairs a method trains on (`StudyData`)


@dataclass(frozen=True)
class Method:
    """One curve or row group of the study: a loss with its options, on one data variant, at each of
    `betas` (and each of `taus` for a tau sweep), trained once per seed.

    `tau_per_beta` r > 0 gives MPO's D_ref term the weight tau = r * beta, so one beta sets the
    strength of both of MPO's KL terms; `taus` instead sweeps tau at each beta. `data`: "hard"
    (Bradley-Terry draws), "soft" (label = the Bradley-Terry probability) or "varied" (hard labels on
    responses cut to random lengths). `trajectory`: trained `StudySize.steps` and evaluated at every
    `StudySize.eval_steps`; else trained `StudySize.short_steps` and evaluated at its end."""

    name: str  # short id, in run names and file names
    label: str  # legend
    loss: str  # loss.name
    betas: tuple[float, ...]
    tau_per_beta: float = 0.0
    options: tuple[tuple[str, Any], ...] = ()  # further loss.* settings (the MPO options, chosen_nll)
    data: str = "hard"
    taus: tuple[float, ...] = ()
    trajectory: bool = True
    group: str = "frontier"  # the table it is reported in

    def tau(self, beta: float) -> float:
        return float(f"{self.tau_per_beta * beta:.6g}")

    def points(self, betas: tuple[float, ...]) -> list[tuple[float, float]]:
        """(beta, tau) of every configuration at these betas."""
        return [(beta, tau) for beta in betas for tau in (self.taus or (self.tau(beta),))]

    def overrides(self, beta: float, tau: float | None = None) -> list[str]:
        """The trainer's loss settings for this beta and tau (dotted config overrides)."""
        tau = self.tau(beta) if tau is None else tau
        out = [f"loss.name={self.loss}", f"loss.beta={beta:g}", f"loss.tau={tau:g}"]
        out += [f"loss.{key}={_config_value(value)}" for key, value in self.options]
        return out


def _config_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Run:
    """One training run: a method's configuration (`arm`) with one seed."""

    method: Method
    beta: float
    seed: int = 0
    tau: float | None = None  # None: the method's tau for this beta

    @property
    def tau_value(self) -> float:
        return self.method.tau(self.beta) if self.tau is None else self.tau

    @property
    def arm(self) -> str:
        """The configuration without the seed: the seeds of one arm are averaged."""
        name = f"{self.method.name}-b{self.beta:g}"
        return name + (f"-t{self.tau_value:g}" if self.method.taus else "")

    @property
    def name(self) -> str:
        return f"{self.arm}-s{self.seed}"

    @property
    def uses_dref(self) -> bool:
        return self.tau_value > 0

    def overrides(self) -> list[str]:
        return self.method.overrides(self.beta, self.tau_value)


# The study's methods (the reasons for each choice are in docs/frontier/README.md). beta enters each loss
# differently (DPO: the logit scale; IPO: the target margin 1/(2 beta); MPO: the optimum z_ref + 1/(s beta)),
# so each method has its own weak and strong beta. The pairs' sequence log-prob gaps are several nats, where
# MPO's p = sigmoid(z) saturates: pair_logit_scale s = 0.05 ("scaled MPO") brings s z below 1. Per-token
# tau (length_normalized_tau) makes tau comparable across response lengths.
SCALED = (("pair_logit_scale", 0.05),)
PER_TOKEN_TAU = (("length_normalized_tau", True), ("pair_logit_scale", 0.05))
METHODS = (
    # reward-against-KL trajectories and the frontier, hard labels
    Method("dpo", "DPO", "dpo", (0.3, 3.0)),
    Method("ipo", "IPO", "ipo", (0.01, 0.1)),
    Method("mpo-scaled", "MPO, s = 0.05, tau = 0", "mpo", (0.3, 3.0), options=SCALED),
    Method("mpo-scaled-tau", "MPO, s = 0.05, per-token tau = beta", "mpo", (0.3, 3.0), tau_per_beta=1.0,
           options=PER_TOKEN_TAU),
    # the same with soft labels, at the weak beta (where hard labels let DPO's optimum run away)
    Method("dpo-soft", "DPO, soft labels", "dpo", (0.3,), data="soft", group="soft"),
    Method("ipo-soft", "IPO, soft labels", "ipo", (0.01,), data="soft", group="soft"),
    Method("mpo-scaled-soft", "MPO, s = 0.05, tau = 0, soft labels", "mpo", (0.3,), options=SCALED, data="soft",
           group="soft"),
    Method("mpo-scaled-tau-soft", "MPO, s = 0.05, per-token tau = beta, soft labels", "mpo", (0.3,), tau_per_beta=1.0,
           options=PER_TOKEN_TAU, data="soft", group="soft"),
    # tau swept at beta 0.3 (tau 0 and 0.3 are the trajectory runs above, at the same step)
    Method("mpo-scaled-tau-sweep", "MPO, s = 0.05, beta 0.3, per-token tau swept", "mpo", (0.3,),
           options=PER_TOKEN_TAU, taus=(0.03, 0.1, 1.0), trajectory=False, group="tau"),
    # MPO as the paper writes it (no scale), chosen-NLL, and length normalisation on varied lengths
    Method("mpo", "MPO, tau = 0 (no scale)", "mpo", (0.1,), trajectory=False, group="knobs"),
    Method("mpo-scaled-nll", "MPO, s = 0.05, chosen NLL 1", "mpo", (0.3,), options=SCALED + (("chosen_nll", 1.0),),
           trajectory=False, group="knobs"),
    Method("mpo-scaled-varied", "MPO, s = 0.05, varied lengths", "mpo", (0.3,), options=SCALED, data="varied",
           trajectory=False, group="knobs"),
    Method("mpo-lnpair-varied", "MPO, length-normalised pair, varied lengths", "mpo", (0.3,),
           options=(("length_normalized_pair", True),), data="varied", trajectory=False, group="knobs"),
)
# The tiny (CI) study: one method per data variant, trajectory and not, with D_ref.
TINY_METHODS = ("dpo", "mpo-scaled-tau-soft", "mpo-lnpair-varied")


@dataclass(frozen=True)
class StudySize:
    """How big the task and the runs are (timings: docs/frontier/README.md)."""

    num_prompts: int = 400  # distinct story openings
    pairs_per_prompt: int = 4  # pairs of reference samples per prompt
    eval_fraction: float = 0.2  # held-out prompts (by a hash of the prompt text)
    max_new_tokens: int = 32  # budget of every sampled response (pairs, D_ref, on-policy)
    steps: int = 480  # trajectory runs
    short_steps: int = 160  # the others (a trajectory run's checkpoint at this step is the same point)
    eval_steps: tuple[int, ...] = (40, 80, 160, 240, 360, 480)  # checkpoints of a trajectory run evaluated on-policy
    monitor_interval: int = 80  # the trainer's held-out KL monitor
    on_policy_samples: int = 2  # per held-out pair record (pairs_per_prompt records per prompt)
    batch_size: int = 16  # pairs per step
    seeds: int = 3
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

    def run_steps(self, method: Method) -> int:
        return self.steps if method.trajectory else self.short_steps

    def evaluated_steps(self, method: Method) -> tuple[int, ...]:
        return self.eval_steps if method.trajectory else (self.short_steps,)

    def checkpoint_interval(self) -> int:
        """Every evaluated step is a multiple of it."""
        return math.gcd(*self.eval_steps, self.short_steps)


DEFAULT = StudySize()
TINY = StudySize(num_prompts=30, pairs_per_prompt=2, eval_fraction=0.3, max_new_tokens=16, steps=6, short_steps=2,
                 eval_steps=(2, 4, 6), monitor_interval=2, on_policy_samples=2, seeds=2, betas_per_method=1)


def seed_streams(seed: int) -> dict[str, int]:
    """The seeds of study seed `seed`'s independent random streams: the reference samples the pairs are
    made of (the initial data draw), their Bradley-Terry labels (and varied lengths), D_ref for the tau
    term, held-out D_ref for the KL monitor, the on-policy evaluation; the training order is job.seed =
    `seed`. Every stream differs between seeds, so the spread over seeds is the whole run-to-run spread."""
    return {"samples": 100 + seed, "labels": 200 + seed, "dref": 300 + seed, "dref_eval": 400 + seed,
            "on_policy": 500 + seed, "training": seed}


def plan_runs(size: StudySize, methods: tuple[Method, ...] = METHODS) -> list[Run]:
    """Every run: each method's configurations, each with `size.seeds` seeds (seed-major within a
    configuration, so a partial study has whole configurations first)."""
    return [Run(method, beta, seed, tau if method.taus else None)
            for method in methods for beta, tau in method.points(size.betas(method)) for seed in range(size.seeds)]


# ---------------------------------------------------------------------------------------- results

# One row per evaluation: a run at one of its evaluated steps (runs.csv), or the reference (step 0).
RUN_COLUMNS = [
    "run", "arm", "method", "label", "group", "data", "loss", "beta", "tau", "length_normalized_pair",
    "length_normalized_tau", "pair_logit_scale", "chosen_nll", "seed", "step",
    "reward", "reward_stderr", "kl_policy_ref", "kl_policy_ref_stderr", "prompts", "samples",
    "heldout_kl_ref_policy", "heldout_preference_accuracy",
]
# One row per configuration and step, over its seeds (results.csv): the mean, the half-width of the 95%
# confidence interval over seeds (Student t), the standard deviation over seeds, and the root mean square of
# the runs' own standard errors (clustered by prompt): the within-run part of the spread.
MEASURES = ("reward", "kl_policy_ref")
SUMMARY_COLUMNS = [
    "arm", "method", "label", "group", "data", "loss", "beta", "tau", "length_normalized_pair", "length_normalized_tau",
    "pair_logit_scale", "chosen_nll", "step", "seeds",
    *(f"{measure}{suffix}" for measure in MEASURES for suffix in ("", "_ci", "_sd", "_stderr")),
    "heldout_kl_ref_policy", "heldout_preference_accuracy",
]
_TEXT = {"run", "arm", "method", "label", "group", "data", "loss"}
_BOOL = {"length_normalized_pair", "length_normalized_tau"}
_INT = {"seed", "step", "seeds", "prompts", "samples"}
_SETTINGS = ["method", "label", "group", "data", "loss", "beta", "tau", "length_normalized_pair", "length_normalized_tau",
             "pair_logit_scale", "chosen_nll"]

# Student t quantiles t(0.975, df) for df = 1..30; beyond, the normal quantile with a 1/df correction.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom (two-sided 95% intervals)."""
    if df < 1:
        return math.nan
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df)


def mean_and_ci(values: list[float]) -> tuple[float, float, float]:
    """(mean, half-width of its 95% t interval, standard deviation) of independent values (the seeds);
    the interval and deviation are NaN for one value."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return math.nan, math.nan, math.nan
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    sd = statistics.stdev(values)
    return mean, t_quantile_975(len(values) - 1) * sd / math.sqrt(len(values)), sd


def _at_step(records: list[dict], name: str, step: int) -> float:
    values = [r[name] for r in records if name in r and int(r["step"]) == step]
    return float(values[-1]) if values else math.nan


def _settings(method: Method | None, beta: float, tau: float) -> dict:
    options = dict(method.options) if method else {}
    return {
        "method": method.name if method else "reference", "label": method.label if method else "reference (stories260K)",
        "group": method.group if method else "reference", "data": method.data if method else "hard",
        "loss": method.loss if method else None, "beta": float(beta), "tau": float(tau),
        "length_normalized_pair": bool(options.get("length_normalized_pair", False)),
        "length_normalized_tau": bool(options.get("length_normalized_tau", False)),
        "pair_logit_scale": float(options.get("pair_logit_scale", 1.0)),
        "chosen_nll": float(options.get("chosen_nll", 0.0)),
    }


def _on_policy(metrics: dict) -> dict:
    return {
        "reward": float(metrics[names.ON_POLICY_REWARD]),
        "reward_stderr": float(metrics[names.stderr_name(names.ON_POLICY_REWARD)]),
        "kl_policy_ref": float(metrics[names.KL_POLICY_REF]),
        "kl_policy_ref_stderr": float(metrics[names.stderr_name(names.KL_POLICY_REF)]),
        "prompts": int(metrics[names.ON_POLICY_PROMPTS]), "samples": int(metrics[names.ON_POLICY_SAMPLES]),
    }


def run_step_row(run: Run, step: int, report: dict, records: list[dict]) -> dict:
    """A run at one evaluated step: its on-policy evaluation (tools/evaluate.py's report) and the trainer's
    held-out evaluation at that step (metrics.jsonl; NaN where the monitor did not run at that step)."""
    return {
        "run": run.name, "arm": run.arm, **_settings(run.method, run.beta, run.tau_value), "seed": run.seed, "step": step,
        **_on_policy(report["metrics"]),
        "heldout_kl_ref_policy": _at_step(records, names.KL_MONITOR, step),
        "heldout_preference_accuracy": _at_step(records, names.eval_name("preference_accuracy"), step),
    }


def reference_step_row(report: dict, seed: int) -> dict:
    """The baseline: the reference model evaluated on-policy like every run (its KL is 0 by construction)."""
    return {"run": f"reference-s{seed}", "arm": "reference", **_settings(None, math.nan, 0.0), "seed": seed, "step": 0,
            **_on_policy(report["metrics"]), "heldout_kl_ref_policy": math.nan, "heldout_preference_accuracy": math.nan}


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per configuration and step over its seeds (SUMMARY_COLUMNS), in the order of `rows`."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["arm"], row["step"]), []).append(row)
    summary = []
    for (arm, step), mine in groups.items():
        out = {"arm": arm, **{name: mine[0][name] for name in _SETTINGS}, "step": step,
               "seeds": sum(math.isfinite(r["reward"]) and math.isfinite(r["kl_policy_ref"]) for r in mine)}
        for measure in MEASURES:
            out[measure], out[f"{measure}_ci"], out[f"{measure}_sd"] = mean_and_ci([r[measure] for r in mine])
            errors = [r[f"{measure}_stderr"] for r in mine if math.isfinite(r[f"{measure}_stderr"])]
            out[f"{measure}_stderr"] = math.sqrt(statistics.fmean(e * e for e in errors)) if errors else math.nan
        for name in ("heldout_kl_ref_policy", "heldout_preference_accuracy"):
            out[name] = mean_and_ci([r[name] for r in mine])[0]
        summary.append(out)
    return summary


def trajectory_changes(rows: list[dict]) -> list[dict]:
    """For every configuration evaluated at three steps or more, its changes over the second half of its
    runs: per seed, the value at the end minus the value at `mid_step` (the evaluated step nearest half
    the run, fixed in advance, so the comparison is not chosen on the same noise it is tested with), then
    the mean over seeds with its 95% interval:
    - `reward_change`: below 0 with its interval, the true reward fell (over-optimisation);
    - `kl_growth`: above 0 with its interval, KL was still growing.
    `peak_step`, the step of the highest mean reward, only describes the curve.
    """
    by_arm: dict[str, list[dict]] = {}
    for row in rows:
        by_arm.setdefault(row["arm"], []).append(row)
    out = []
    for arm, mine in by_arm.items():
        finite = [row for row in mine if math.isfinite(row["reward"]) and math.isfinite(row["kl_policy_ref"])]
        steps = sorted({row["step"] for row in finite})
        if len(steps) < 3:
            continue
        at = {(row["seed"], row["step"]): row for row in finite}
        complete = [seed for seed in sorted({row["seed"] for row in finite}) if all((seed, step) in at for step in steps)]
        if not complete:
            continue
        mean_reward = {step: statistics.fmean(at[seed, step]["reward"] for seed in complete) for step in steps}
        final = steps[-1]
        mid = min(steps, key=lambda step: abs(step - final / 2))
        change = mean_and_ci([at[seed, final]["reward"] - at[seed, mid]["reward"] for seed in complete])
        growth = mean_and_ci([at[seed, final]["kl_policy_ref"] - at[seed, mid]["kl_policy_ref"] for seed in complete])
        out.append({"arm": arm, **{name: mine[0][name] for name in _SETTINGS}, "seeds": len(complete),
                    "final_step": final, "mid_step": mid, "peak_step": max(steps, key=lambda step: mean_reward[step]),
                    "reward_change": change[0], "reward_change_ci": change[1], "kl_growth": growth[0],
                    "kl_growth_ci": growth[1]})
    return out


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


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> Path:
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_cell(row[name]) for name in columns])
    atomic_write_bytes(path, text.getvalue().encode())
    return path


def _json_safe(rows: list[dict]) -> list[dict]:
    return [{name: None if isinstance(value, float) and math.isnan(value) else value for name, value in row.items()}
            for row in rows]


def write_study_results(out_dir: str | Path, rows: list[dict], summary: list[dict], extra: dict) -> list[Path]:
    """runs.csv (every evaluation), results.csv (per configuration and step, over seeds) and results.json
    ({"run_columns", "runs", "columns", "rows", "trajectory_changes", **extra}; missing values are null),
    each written atomically. Empty CSV cells are missing values."""
    out_dir = Path(out_dir)
    paths = [_write_csv(out_dir / "runs.csv", RUN_COLUMNS, rows), _write_csv(out_dir / "results.csv", SUMMARY_COLUMNS, summary)]
    json_path = out_dir / "results.json"
    atomic_write_bytes(json_path, (json.dumps({
        "run_columns": RUN_COLUMNS, "runs": _json_safe(rows), "columns": SUMMARY_COLUMNS, "rows": _json_safe(summary),
        "trajectory_changes": _json_safe(trajectory_changes(rows)), **extra}, indent=1) + "\n").encode())
    return [*paths, json_path]


def read_csv_rows(path: str | Path) -> list[dict]:
    """runs.csv or results.csv back as typed rows (missing numbers are NaN)."""
    with open(path, newline="") as handle:
        return [{name: _parse_cell(name, text) for name, text in row.items()} for row in csv.DictReader(handle)]


def read_json_rows(path: str | Path, key: str = "rows") -> list[dict]:
    """results.json's `rows` (or `runs`) with missing numbers as NaN, as `read_csv_rows` gives them."""
    rows = json.loads(Path(path).read_text())[key]
    return [{name: (math.nan if value is None and name not in _TEXT else value) for name, value in row.items()}
            for row in rows]


# ----------------------------------------------------------------------------------------- tables


def _pm(mean: float, ci: float, digits: int = 2) -> str:
    if not math.isfinite(mean):
        return "—"
    return f"{mean:.{digits}f}" + (f" ± {ci:.{digits}f}" if math.isfinite(ci) else "")


def _trajectory_arms(summary: list[dict]) -> list[str]:
    """The configurations evaluated at more than two steps, in order: those with a trajectory."""
    steps: dict[str, int] = {}
    for row in summary:
        steps[row["arm"]] = steps.get(row["arm"], 0) + 1
    return [arm for arm, count in steps.items() if count > 2]


def _setting_text(row: dict) -> str:
    return "—" if row["method"] == "reference" else f"{row['beta']:g}"


def _summary_table(rows: list[dict]) -> list[str]:
    lines = ["| configuration | data | beta | tau | seeds | true reward | KL(π_θ ‖ π_ref) | within-run s.e. (reward, KL) "
             "| held-out KL(π_ref ‖ π_θ) |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['label']} | {row['data']} | {_setting_text(row)} | {row['tau']:g} | {row['seeds']} "
                     f"| {_pm(row['reward'], row['reward_ci'])} | {_pm(row['kl_policy_ref'], row['kl_policy_ref_ci'])} "
                     f"| {row['reward_stderr']:.2f}, {row['kl_policy_ref_stderr']:.2f} "
                     f"| {_pm(row['heldout_kl_ref_policy'], math.nan)} |")
    return lines


def tables_markdown(rows: list[dict], summary: list[dict], size: StudySize, timings: dict) -> str:
    """The study's tables in Markdown (tables.md): every configuration at the end of the long runs and
    at `size.short_steps`, the trajectories step by step, their changes, and the cost. Mean ± the
    half-width of the 95% interval over seeds."""
    reference = [row for row in summary if row["method"] == "reference"]
    out = ["Mean ± half-width of the 95% confidence interval over seeds (Student t); the within-run standard errors "
           "(clustered by prompt) are the root mean square over seeds.", ""]
    final = [row for row in summary if row["step"] == size.steps and row["method"] != "reference"]
    if final:
        out += [f"**After {size.steps} steps** (the trajectory runs)", "", *_summary_table(reference + final), ""]
    short = [row for row in summary if row["step"] == size.short_steps and row["method"] != "reference"]
    if short:
        out += [f"**After {size.short_steps} steps** (every configuration; a trajectory run's checkpoint at this step "
                "is trained exactly as the shorter runs)", "", *_summary_table(reference + short), ""]
    arms = _trajectory_arms(summary)
    if arms:
        steps = sorted({row["step"] for row in summary if row["arm"] in arms})
        out += ["**Along the trajectory runs**: true reward / KL(π_θ ‖ π_ref) at each evaluated step (means over seeds)",
                "", "| configuration | data | beta | " + " | ".join(f"step {step}" for step in steps) + " |",
                "|---|---|---|" + "---|" * len(steps)]
        at = {(row["arm"], row["step"]): row for row in summary}
        for arm in arms:
            first = next(row for row in summary if row["arm"] == arm)
            cells = [f"{at[arm, step]['reward']:.2f} / {at[arm, step]['kl_policy_ref']:.1f}" if (arm, step) in at else "—"
                     for step in steps]
            out.append(f"| {first['label']} | {first['data']} | {first['beta']:g} | " + " | ".join(cells) + " |")
        out.append("")
    changes = trajectory_changes(rows)
    if changes:
        out += ["**Over the second half of the trajectory runs** (per seed, the value at the end minus at mid-run; mean "
                "± 95% interval over seeds): the true reward (below 0 with its interval: it fell) and the KL (above 0: "
                "still growing). The peak step is that of the highest mean reward.", "",
                "| configuration | data | beta | steps | reward, end − mid-run | KL, end − mid-run | peak step |",
                "|---|---|---|---|---|---|---|"]
        for row in changes:
            out.append(f"| {row['label']} | {row['data']} | {row['beta']:g} | {row['mid_step']} → {row['final_step']} "
                       f"| {_pm(row['reward_change'], row['reward_change_ci'])} "
                       f"| {_pm(row['kl_growth'], row['kl_growth_ci'])} | {row['peak_step']} |")
        out.append("")
    out += [cost_line(timings), ""]
    return "\n".join(out)


def cost_line(timings: dict) -> str:
    """What the study's steps took, wall-clock and CPU (timings.json), by kind of step."""
    kinds = {"training": "train_", "evaluation": "eval_"}
    cpu_seconds = timings.get("cpu", {})

    def total(prefix: str | None) -> float:  # None: the data steps, every one that is neither kind
        if prefix is None:
            return sum(v for k, v in cpu_seconds.items() if not any(k.startswith(p) for p in kinds.values()))
        return sum(v for k, v in cpu_seconds.items() if k.startswith(prefix))

    parts = [f"{name} {total(prefix) / 3600:.2f} CPU-hours" for name, prefix in [("data", None), *kinds.items()]]
    cpu = sum(cpu_seconds.values())
    return (f"**Cost**: {cpu / 3600:.2f} CPU-hours in all ({', '.join(parts)}); the steps' wall-clock seconds add up to "
            f"{sum(timings.get('wall', {}).values()) / 3600:.2f} hours (steps run side by side with --jobs overlap).")


# ------------------------------------------------------------------------------------------ plots


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("the study's plots need matplotlib: pip install -e '.[study]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _reference_marker(ax, summary: list[dict]) -> None:
    for ref in (row for row in summary if row["method"] == "reference"):
        ax.errorbar([0.0], [ref["reward"]], yerr=[ref["reward_ci"]], fmt="*", color="black", markersize=14,
                    label=ref["label"], zorder=5)
        ax.axhline(ref["reward"], color="black", linestyle=":", linewidth=0.8)


def _finish_axes(ax, kls: list[float], symlog_above: float, title: str) -> None:
    """KL on x (symlog past `symlog_above` nats), the true reward on y, the title, grid and legend."""
    if max([kl for kl in kls if math.isfinite(kl)] or [1.0]) > symlog_above:
        ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("KL(π_θ ‖ π_ref) per response, nats (on-policy, held-out prompts)")
    ax.set_ylabel("true reward (mean over on-policy samples)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def plot_frontier(summary: list[dict], path: str | Path, size: StudySize) -> Path:
    """True reward against KL(pi_theta || pi_ref), both with 95% intervals over seeds, one curve per method
    through its betas: after `size.steps` (left) and after `size.short_steps` steps (right, every configuration)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.2), squeeze=False)
    for ax, step in zip(axes.flat, (size.steps, size.short_steps)):
        _reference_marker(ax, summary)
        mine = [row for row in summary if row["step"] == step and row["method"] != "reference"]
        for method in dict.fromkeys(row["method"] for row in mine):
            points = sorted((row for row in mine if row["method"] == method), key=lambda row: (-row["beta"], row["tau"]))
            soft = points[0]["data"] == "soft"
            ax.errorbar([row["kl_policy_ref"] for row in points], [row["reward"] for row in points],
                        xerr=[row["kl_policy_ref_ci"] for row in points], yerr=[row["reward_ci"] for row in points],
                        fmt="s--" if soft else "o-", mfc="none" if soft else None, capsize=3, label=points[0]["label"])
            for row in points:
                text = f"β={row['beta']:g}" + (f" τ={row['tau']:g}" if row["group"] == "tau" else "")
                ax.annotate(text, (row["kl_policy_ref"], row["reward"]), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
        _finish_axes(ax, [row["kl_policy_ref"] for row in mine], 30, f"after {step} steps (95% intervals over seeds)")
    fig.suptitle("Reward/KL frontier: stories260K story task", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_trajectories(summary: list[dict], path: str | Path, size: StudySize) -> Path:
    """True reward against KL(pi_theta || pi_ref) along each trajectory run (means over seeds, 95% intervals),
    from the reference at step 0: one panel per label kind, one line per configuration."""
    plt = _pyplot()
    arms = _trajectory_arms(summary)
    kinds = list(dict.fromkeys(next(row["data"] for row in summary if row["arm"] == arm) for arm in arms)) or ["hard"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(7.5 * len(kinds), 6.2), squeeze=False)
    reference = [row for row in summary if row["method"] == "reference"]
    for ax, kind in zip(axes.flat, kinds):
        _reference_marker(ax, summary)
        for arm in arms:
            points = sorted((row for row in summary if row["arm"] == arm), key=lambda row: row["step"])
            if points[0]["data"] != kind:
                continue
            start = [(0.0, reference[0]["reward"])] if reference else []
            xs = [x for x, _ in start] + [row["kl_policy_ref"] for row in points]
            ys = [y for _, y in start] + [row["reward"] for row in points]
            line, = ax.plot(xs, ys, "-", linewidth=1.2, label=f"{points[0]['label']}, β={points[0]['beta']:g}")
            ax.errorbar([row["kl_policy_ref"] for row in points], [row["reward"] for row in points],
                        xerr=[row["kl_policy_ref_ci"] for row in points], yerr=[row["reward_ci"] for row in points],
                        fmt="o", markersize=3, capsize=2, color=line.get_color())
            last = points[-1]
            ax.annotate(f"{last['step']}", (last["kl_policy_ref"], last["reward"]), textcoords="offset points",
                        xytext=(4, -8), fontsize=7, color=line.get_color())
        # symlog above 10 nats: the strong runs' steps stay apart near 0
        _finish_axes(ax, [row["kl_policy_ref"] for row in summary if row["arm"] in arms and row["data"] == kind], 10,
                     f"{kind} labels: along training, steps {', '.join(map(str, size.eval_steps))}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
