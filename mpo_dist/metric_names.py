"""Every metric name a run logs, and the one console formatter that shows them.

The losses return short metric names (`preference_accuracy`, `kl_pair`, ...); `logged_name` maps them
to the names users read (`preference/accuracy`, `loss/kl_pair`, ...). The trainer's own metrics
(throughput, optimizer, memory, progress), the held-out evaluation's (`eval/` + a loss metric's
logged name, and the KL monitor) and tools/evaluate.py's on-policy ones are named here too, so the
trainer, the evaluators, the console, the benchmark and the study read the same constants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

# Loss metric -> logged name; any other loss metric (a loss term) is logged as loss/<name>.
_LOSS_METRIC_NAMES = {
    "loss": "loss/total",
    "reward_accuracy": "reward/accuracy",  # implicit reward z - z_ref > 0 (TRL's reward accuracy)
    "preference_accuracy": "preference/accuracy",  # z > 0: the policy prefers chosen
    "reward_margin": "reward/margin",
    "p": "reward/p",
    "chosen_logps": "logps/chosen",
    "rejected_logps": "logps/rejected",
    "grad_norm": "optim/grad_norm",
}


def logged_name(metric: str) -> str:
    return _LOSS_METRIC_NAMES.get(metric, f"loss/{metric}")


LOSS = logged_name("loss")
REWARD_ACCURACY = logged_name("reward_accuracy")
PREFERENCE_ACCURACY = logged_name("preference_accuracy")
REWARD_MARGIN = logged_name("reward_margin")
REWARD_P = logged_name("p")
DREF_KL = logged_name("dref_kl")
GRAD_NORM = logged_name("grad_norm")

# The trainer's step window (over all ranks, since the previous logged step).
LR = "optim/lr"
SKIPPED_STEPS = "optim/skipped_steps"  # cumulative over the run, resumes included
TOKENS_PER_S = "throughput/tokens_per_s"
TOKENS_PER_S_PER_DEVICE = "throughput/tokens_per_s_per_device"
PAIRS_PER_S = "throughput/pairs_per_s"
SECONDS_PER_STEP = "throughput/seconds_per_step"  # the window's wall time over its steps
PADDING = "throughput/padding"  # the fraction of computed positions that are padding
POSITIONS_PER_PAIR = "throughput/positions_per_pair"
FLOPS_PER_PAIR = "throughput/flops_per_pair"  # flops.CostModel.training_flops per real pair
MFU = "throughput/mfu"
PEAK_GIB = "memory/peak_gib"
PEAK_RESERVED_GIB = "memory/peak_reserved_gib"  # CUDA only: what the caching allocator holds
EPOCH = "progress/epoch"
PAIRS_SEEN = "progress/pairs_seen"
TOKENS_SEEN = "progress/tokens_seen"

# The held-out evaluation (evaluation.py): eval/ + a loss metric's logged name, and these.
EVAL_PREFIX = "eval/"
KL_MONITOR = EVAL_PREFIX + "kl_ref_policy"  # KL(pi_ref || pi_theta) on held-out D_ref samples
EVAL_PAIRS = EVAL_PREFIX + "pairs"
EVAL_DREF_SAMPLES = EVAL_PREFIX + "dref_samples"
EVAL_SECONDS = EVAL_PREFIX + "seconds"

# tools/evaluate.py's on-policy pass (evaluate_model.py).
ON_POLICY = "on_policy/"
KL_POLICY_REF = ON_POLICY + "kl_policy_ref"  # KL(pi_theta || pi_ref) on the policy's own samples
ON_POLICY_REWARD = ON_POLICY + "reward"
ON_POLICY_SAMPLES = ON_POLICY + "samples"
ON_POLICY_PROMPTS = ON_POLICY + "prompts"
ON_POLICY_RESPONSE_TOKENS = ON_POLICY + "response_tokens"
ON_POLICY_EOS_FRACTION = ON_POLICY + "eos_fraction"
ON_POLICY_SECONDS = ON_POLICY + "seconds"


def eval_name(metric: str) -> str:
    """The held-out evaluation's name of a loss metric."""
    return EVAL_PREFIX + logged_name(metric)


def stderr_name(name: str) -> str:
    """The name of a mean's standard error, logged beside it."""
    return name + "_stderr"


# ------------------------------------------------------------------------------------ the console


@dataclass(frozen=True)
class ConsoleField:
    name: str  # the logged name
    label: str
    fmt: str
    with_stderr: bool = False  # shown as "value +- stderr" (stderr_name(name))
    only_nonzero: bool = False  # shown only once something happened


TRAIN_CONSOLE = (
    ConsoleField(LOSS, "loss", "{:.4f}"), ConsoleField(REWARD_ACCURACY, "acc", "{:.3f}"),
    ConsoleField(PREFERENCE_ACCURACY, "pacc", "{:.3f}"), ConsoleField(REWARD_MARGIN, "margin", "{:+.3f}"),
    ConsoleField(REWARD_P, "p", "{:.3f}"), ConsoleField(DREF_KL, "kl(ref|pol)", "{:.3f}"),
    ConsoleField(LR, "lr", "{:.2e}"), ConsoleField(GRAD_NORM, "gnorm", "{:.3f}"),
    ConsoleField(TOKENS_PER_S, "tok/s", "{:,.0f}"), ConsoleField(MFU, "mfu", "{:.1%}"),
    ConsoleField(PEAK_GIB, "mem GiB", "{:.2f}"), ConsoleField(SKIPPED_STEPS, "skipped", "{:.0f}", only_nonzero=True),
)
EVAL_CONSOLE = (
    ConsoleField(eval_name("loss"), "loss", "{:.4f}"), ConsoleField(eval_name("reward_accuracy"), "reward acc", "{:.3f}"),
    ConsoleField(eval_name("preference_accuracy"), "pref acc", "{:.3f}"),
    ConsoleField(eval_name("reward_margin"), "margin", "{:+.3f}"),
    ConsoleField(KL_MONITOR, "kl(ref|pol)", "{:.3f}", with_stderr=True),
)
ON_POLICY_CONSOLE = (
    ConsoleField(KL_POLICY_REF, "on-policy kl(pol|ref)", "{:.3f}", with_stderr=True),
    ConsoleField(ON_POLICY_REWARD, "reward", "{:.3f}", with_stderr=True),
)


def console_line(values: Mapping[str, float], fields: Iterable[ConsoleField], before: Iterable[str] = (),
                 after: Iterable[str] = ()) -> str:
    """`before`, then "label value" for each of `fields` present in `values`, then `after`, joined by " | "."""
    parts = list(before)
    for field in fields:
        value = values.get(field.name)
        if value is None or (field.only_nonzero and not value):
            continue
        text = f"{field.label} {field.fmt.format(value)}"
        if field.with_stderr and stderr_name(field.name) in values:
            text += f" +- {field.fmt.format(values[stderr_name(field.name)])}"
        parts.append(text)
    parts += after
    return " | ".join(parts)
