"""Preference losses as pure functions of per-sequence log-prob sums (formulas in README, "Losses").

Tensors in, tensors out: no `.item()`, no collectives, so they test in one process and the trainer
reduces across ranks once. Each returns a `LossOutput` whose `.loss` is a scalar and whose
`.metrics` are scalar tensors. Everything goes through `logsigmoid`, never `log(sigmoid(.))`, so
log-probs of -5000 and pair logits of +-1000 stay finite in value and gradient.

`weight` (optional, per pair; likewise `dref_weight` per D_ref sample) replaces the plain mean by
`sum(weight * x)`: weights that sum to 1 give a weighted mean, padding samples get weight 0. The
trainer passes `real / (real pairs in the whole global batch)`, so the per-micro-batch, per-rank
losses and metrics add up to the exact mean over the global batch.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass
class LossOutput:
    loss: Tensor
    metrics: dict[str, Tensor]


def _mean(values: Tensor, weight: Tensor | None) -> Tensor:
    if weight is None:
        return values.mean()
    return (values * weight.to(values.dtype)).sum()


def _pair_metrics(policy_chosen: Tensor, policy_rejected: Tensor, z: Tensor, z_ref: Tensor, weight: Tensor | None) -> dict[str, Tensor]:
    """What every DPO-family trainer reports: p, both accuracies, implicit reward margin, log-probs.

    `reward_accuracy` is the implicit-reward accuracy `z - z_ref > 0` (TRL's reward accuracy: the
    policy moved towards chosen relative to the reference; 0 while the policy equals the reference).
    `preference_accuracy` is `z > 0`: the policy itself prefers chosen (MPO's own reward is sigmoid(z))."""
    return {
        "p": _mean(torch.sigmoid(z), weight),
        "reward_accuracy": _mean((z - z_ref > 0).to(z.dtype), weight),
        "preference_accuracy": _mean((z > 0).to(z.dtype), weight),
        "reward_margin": _mean(z - z_ref, weight),
        "chosen_logps": _mean(policy_chosen, weight),
        "rejected_logps": _mean(policy_rejected, weight),
    }


def mpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    dref_policy_logps: Tensor | None = None,
    tau: float = 0.0,
    *,
    label: Tensor | None = None,
    dref_ref_logps: Tensor | None = None,
    weight: Tensor | None = None,
    dref_weight: Tensor | None = None,
) -> LossOutput:
    """MPO: per pair `-E_label[preference] + beta * KL_bern(p || p_ref)`, plus `tau * mean(-logp_theta(y))`
    over D_ref samples y ~ pi_ref. With a deterministic label its optimum is `z = z_ref + 1/beta`.

    `label` is the probability that chosen is preferred (1 when None). `dref_ref_logps`, when given,
    adds the D_ref estimate of KL(pi_ref || pi_theta) = mean(logp_ref - logp_theta) to the metrics as
    `dref_kl`; on the training D_ref it is optimistic (biased downwards, can be negative, see below).
    """
    z = policy_chosen_logps - policy_rejected_logps
    z_ref = ref_chosen_logps - ref_rejected_logps
    log_p, log_1mp = F.logsigmoid(z), F.logsigmoid(-z)
    log_q, log_1mq = F.logsigmoid(z_ref), F.logsigmoid(-z_ref)
    p, one_minus_p = log_p.exp(), log_1mp.exp()  # 1 - p as sigmoid(-z): exact when p is near 1
    kl = p * (log_p - log_q) + one_minus_p * (log_1mp - log_1mq)
    preference = p if label is None else label * p + (1 - label) * one_minus_p
    reward_term = _mean(-preference, weight)
    kl_term = _mean(kl, weight)
    loss = reward_term + beta * kl_term
    metrics = {"reward_term": reward_term, "kl_pair": kl_term}
    if dref_policy_logps is not None:
        dref_nll = _mean(-dref_policy_logps, dref_weight)
        loss = loss + tau * dref_nll
        metrics["dref_nll"] = dref_nll
        if dref_ref_logps is not None:
            # Training-set estimate of KL(pi_ref || pi_theta), and an optimistic one: it is computed on
            # the very D_ref samples the tau term raises the likelihood of, so it is biased downwards and
            # can go negative while the true KL grows. The honest monitor is the same estimate on a
            # held-out D_ref (reference samples for eval prompts, never used in a loss).
            metrics["dref_kl"] = _mean(dref_ref_logps - dref_policy_logps, dref_weight)
    metrics.update(_pair_metrics(policy_chosen_logps, policy_rejected_logps, z, z_ref, weight))
    metrics["loss"] = loss
    return LossOutput(loss, metrics)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    *,
    label: Tensor | None = None,
    weight: Tensor | None = None,
) -> LossOutput:
    """DPO: `-logsigmoid(beta * (z - z_ref))`. Its optimum is unbounded. With label smoothing e
    (conservative DPO) and/or a soft label l, the target probability is `q = l (1 - e) + (1 - l) e`
    and the loss `-q logsigmoid(beta h) - (1 - q) logsigmoid(-beta h)`."""
    z = policy_chosen_logps - policy_rejected_logps
    z_ref = ref_chosen_logps - ref_rejected_logps
    h = beta * (z - z_ref)
    target = 1.0 if label is None else label
    q = target * (1 - label_smoothing) + (1 - target) * label_smoothing
    per_pair = -q * F.logsigmoid(h) - (1 - q) * F.logsigmoid(-h)
    loss = _mean(per_pair, weight)
    metrics = {"dpo_term": loss, **_pair_metrics(policy_chosen_logps, policy_rejected_logps, z, z_ref, weight), "loss": loss}
    return LossOutput(loss, metrics)


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    *,
    label: Tensor | None = None,
    weight: Tensor | None = None,
) -> LossOutput:
    """IPO: `((z - z_ref) - 1/(2 beta))**2`, optimum `z = z_ref + 1/(2 beta)`; with a soft label l
    the target margin is `(l - 1/2) / beta`."""
    z = policy_chosen_logps - policy_rejected_logps
    z_ref = ref_chosen_logps - ref_rejected_logps
    target = 0.5 if label is None else label - 0.5
    loss = _mean((z - z_ref - target / beta) ** 2, weight)
    metrics = {"ipo_term": loss, **_pair_metrics(policy_chosen_logps, policy_rejected_logps, z, z_ref, weight), "loss": loss}
    return LossOutput(loss, metrics)


# loss.name -> function. A new loss is one function above and one line here.
LOSSES: dict[str, Callable[..., LossOutput]] = {"mpo": mpo_loss, "dpo": dpo_loss, "ipo": ipo_loss}


def build_loss(loss_config) -> Callable[..., LossOutput]:
    """The configured loss with its hyper-parameters bound: every field of `loss_config` that the
    function takes as a parameter (beta, tau, label_smoothing, ...) is passed to it."""
    function = LOSSES[loss_config.name]
    parameters = inspect.signature(function).parameters
    bound = {name: value for name, value in vars(loss_config).items() if name in parameters}

    def loss(*args, **kwargs) -> LossOutput:
        return function(*args, **bound, **kwargs)

    loss.__name__ = f"{loss_config.name}_loss"
    return loss
