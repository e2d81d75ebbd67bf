"""Preference losses as pure functions of per-sequence log-prob sums (formulas in docs/losses.md).

Tensors in, tensors out: no `.item()`, no collectives, so they test in one process and the trainer
reduces across ranks once. Each returns a `LossOutput` whose `.loss` is a scalar and whose
`.metrics` are scalar tensors. Everything goes through `logsigmoid`, never `log(sigmoid(.))`, so
log-probs of -5000 and pair logits of +-1000 stay finite in value and gradient.

`weight` (optional, per pair; likewise `dref_weight` per D_ref sample) replaces the plain mean by
`sum(weight * x)`: weights that sum to 1 give a weighted mean, padding samples get weight 0. The
trainer passes `real / (real pairs in the whole global batch)`, so the per-micro-batch, per-rank
losses and metrics add up to the exact mean over the global batch.

Options, all off by default (and then the code path is exactly the plain formulas'):
- `length_normalized_pair` (all losses): every log-prob entering the pair logit, policy and
  reference, chosen and rejected, is divided by its response token count (`chosen_lengths=`,
  `rejected_lengths=`): `z = logp(y_w)/|y_w| - logp(y_l)/|y_l|`, and `z_ref` likewise.
- `length_normalized_tau` (MPO): the D_ref term is `tau * mean(-logp_theta(y)/|y|)` (`dref_lengths=`).
- `pair_logit_scale` s (MPO): `p = sigmoid(s z)`, `p_ref = sigmoid(s z_ref)` in the reward and the
  KL_bern term; the optimum for deterministic labels is `z* = z_ref + 1/(s beta)`. Sequence log-prob
  gaps of real pairs are several nats, where p saturates and MPO's gradient p(1-p) vanishes; s < 1
  brings p back into the range where it learns.
- `chosen_nll` c (all losses): adds `c * mean over pairs of -logp_theta(y_w)/|y_w|`, a per-token NLL
  on the chosen responses (as in RPO, Pang et al. 2024), reported as the metric `chosen_nll`.
Token counts are clamped to >= 1 (an empty response keeps its log-prob sum, 0).
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


def _per_token(logps: Tensor, lengths: Tensor | None, option: str) -> Tensor:
    """Sequence log-prob sums divided by their response token counts (clamped to >= 1)."""
    if lengths is None:
        raise ValueError(f"{option} needs the response token counts (the *_lengths arguments of the loss)")
    return logps / lengths.to(logps.dtype).clamp(min=1)


def _pair_logits(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                 normalized: bool, chosen_lengths: Tensor | None,
                 rejected_lengths: Tensor | None) -> tuple[Tensor, Tensor]:
    """`z` and `z_ref`: differences of the log-prob sums, or with `normalized` of the per-token log-probs."""
    if normalized:
        option = "length_normalized_pair"
        policy_chosen, ref_chosen = (_per_token(x, chosen_lengths, option) for x in (policy_chosen, ref_chosen))
        policy_rejected, ref_rejected = (_per_token(x, rejected_lengths, option)
                                         for x in (policy_rejected, ref_rejected))
    return policy_chosen - policy_rejected, ref_chosen - ref_rejected


def _add_chosen_nll(loss: Tensor, metrics: dict[str, Tensor], coefficient: float, policy_chosen: Tensor,
                    chosen_lengths: Tensor | None, weight: Tensor | None) -> Tensor:
    """`loss + coefficient * mean(-logp_theta(y_w)/|y_w|)`, the term in `metrics["chosen_nll"]`; `loss` when 0."""
    if coefficient == 0:
        return loss
    nll = _mean(-_per_token(policy_chosen, chosen_lengths, "chosen_nll"), weight)
    metrics["chosen_nll"] = nll
    return loss + coefficient * nll


def _pair_metrics(policy_chosen: Tensor, policy_rejected: Tensor, z: Tensor, z_ref: Tensor, weight: Tensor | None,
                  scale: float = 1.0) -> dict[str, Tensor]:
    """What every DPO-family trainer reports: p, both accuracies, implicit reward margin, log-probs.

    `reward_accuracy` is the implicit-reward accuracy `z - z_ref > 0` (TRL's reward accuracy: the
    policy moved towards chosen relative to the reference; 0 while the policy equals the reference).
    `preference_accuracy` is `z > 0`: the policy itself prefers chosen (MPO's own reward is sigmoid(z)).
    `z`, `z_ref` and `p = sigmoid(scale z)` are the loss's own (length-normalised when the loss is);
    `chosen_logps` and `rejected_logps` are always the sequence log-prob sums."""
    return {
        "p": _mean(torch.sigmoid(z if scale == 1 else scale * z), weight),
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
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    dref_lengths: Tensor | None = None,
    length_normalized_pair: bool = False,
    length_normalized_tau: bool = False,
    pair_logit_scale: float = 1.0,
    chosen_nll: float = 0.0,
) -> LossOutput:
    """MPO: per pair `-E_label[preference] + beta * KL_bern(p || p_ref)`, plus `tau * mean(-logp_theta(y))`
    over D_ref samples y ~ pi_ref. With a deterministic label its optimum is `z = z_ref + 1/beta`.

    `label` is the probability that chosen is preferred (1 when None). `dref_ref_logps`, when given,
    adds the D_ref estimate of KL(pi_ref || pi_theta) = mean(logp_ref - logp_theta) to the metrics as
    `dref_kl`; on the training D_ref it is optimistic (biased downwards, can be negative, see below).

    Options (module docstring): `pair_logit_scale` s gives `p = sigmoid(s z)`, `p_ref = sigmoid(s z_ref)`
    (optimum `z_ref + 1/(s beta)`); `length_normalized_pair` divides the log-probs in z and z_ref by
    `chosen_lengths` / `rejected_lengths`; `length_normalized_tau` makes the D_ref term
    `tau * mean(-logp_theta(y)/|y|)` with `dref_lengths` (the metric `dref_nll` is then that per-token
    mean, while `dref_kl` stays the sum-based estimate: it estimates a KL between sequence
    distributions); `chosen_nll` adds `chosen_nll * mean(-logp_theta(y_w)/|y_w|)`.
    """
    z, z_ref = _pair_logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                            length_normalized_pair, chosen_lengths, rejected_lengths)
    s_z, s_z_ref = (z, z_ref) if pair_logit_scale == 1 else (pair_logit_scale * z, pair_logit_scale * z_ref)
    log_p, log_1mp = F.logsigmoid(s_z), F.logsigmoid(-s_z)
    log_q, log_1mq = F.logsigmoid(s_z_ref), F.logsigmoid(-s_z_ref)
    p, one_minus_p = log_p.exp(), log_1mp.exp()  # 1 - p as sigmoid(-z): exact when p is near 1
    kl = p * (log_p - log_q) + one_minus_p * (log_1mp - log_1mq)
    preference = p if label is None else label * p + (1 - label) * one_minus_p
    reward_term = _mean(-preference, weight)
    kl_term = _mean(kl, weight)
    loss = reward_term + beta * kl_term
    metrics = {"reward_term": reward_term, "kl_pair": kl_term}
    if dref_policy_logps is not None:
        logps = dref_policy_logps
        if length_normalized_tau:
            logps = _per_token(logps, dref_lengths, "length_normalized_tau")
        dref_nll = _mean(-logps, dref_weight)
        loss = loss + tau * dref_nll
        metrics["dref_nll"] = dref_nll
        if dref_ref_logps is not None:
            # Training-set estimate of KL(pi_ref || pi_theta), and an optimistic one: it is computed on
            # the very D_ref samples the tau term raises the likelihood of, so it is biased downwards and
            # can go negative while the true KL grows. The honest monitor is the same estimate on a
            # held-out D_ref (reference samples for eval prompts, never used in a loss). Always of the
            # sums, also with length_normalized_tau: it estimates the KL of the sequence distributions.
            metrics["dref_kl"] = _mean(dref_ref_logps - dref_policy_logps, dref_weight)
    loss = _add_chosen_nll(loss, metrics, chosen_nll, policy_chosen_logps, chosen_lengths, weight)
    metrics.update(_pair_metrics(policy_chosen_logps, policy_rejected_logps, z, z_ref, weight, pair_logit_scale))
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
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    length_normalized_pair: bool = False,
    chosen_nll: float = 0.0,
) -> LossOutput:
    """DPO: `-logsigmoid(beta * (z - z_ref))`. Its optimum is unbounded. With label smoothing e
    (conservative DPO) and/or a soft label l, the target probability is `q = l (1 - e) + (1 - l) e`
    and the loss `-q logsigmoid(beta h) - (1 - q) logsigmoid(-beta h)`. `length_normalized_pair` and
    `chosen_nll` as in `mpo_loss` (beta is DPO's scale on the pair logit)."""
    z, z_ref = _pair_logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                            length_normalized_pair, chosen_lengths, rejected_lengths)
    h = beta * (z - z_ref)
    target = 1.0 if label is None else label
    q = target * (1 - label_smoothing) + (1 - target) * label_smoothing
    per_pair = -q * F.logsigmoid(h) - (1 - q) * F.logsigmoid(-h)
    dpo_term = _mean(per_pair, weight)
    metrics = {"dpo_term": dpo_term}
    loss = _add_chosen_nll(dpo_term, metrics, chosen_nll, policy_chosen_logps, chosen_lengths, weight)
    metrics.update(_pair_metrics(policy_chosen_logps, policy_rejected_logps, z, z_ref, weight))
    metrics["loss"] = loss
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
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    length_normalized_pair: bool = False,
    chosen_nll: float = 0.0,
) -> LossOutput:
    """IPO: `((z - z_ref) - 1/(2 beta))**2`, optimum `z = z_ref + 1/(2 beta)`; with a soft label l
    the target margin is `(l - 1/2) / beta`. `length_normalized_pair` (the IPO paper's own choice of
    log-probs) and `chosen_nll` as in `mpo_loss`."""
    z, z_ref = _pair_logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                            length_normalized_pair, chosen_lengths, rejected_lengths)
    target = 0.5 if label is None else label - 0.5
    ipo_term = _mean((z - z_ref - target / beta) ** 2, weight)
    metrics = {"ipo_term": ipo_term}
    loss = _add_chosen_nll(ipo_term, metrics, chosen_nll, policy_chosen_logps, chosen_lengths, weight)
    metrics.update(_pair_metrics(policy_chosen_logps, policy_rejected_logps, z, z_ref, weight))
    metrics["loss"] = loss
    return LossOutput(loss, metrics)


# loss.name -> function. A new loss is one function above and one line here.
LOSSES: dict[str, Callable[..., LossOutput]] = {"mpo": mpo_loss, "dpo": dpo_loss, "ipo": ipo_loss}


def loss_options(name: str) -> set[str]:
    """The hyper-parameters the loss `name` takes (its function's keyword parameters)."""
    return set(inspect.signature(LOSSES[name]).parameters)


def build_loss(loss_config) -> Callable[..., LossOutput]:
    """The configured loss with its hyper-parameters bound: every field of `loss_config` that the
    function takes as a parameter (beta, tau, label_smoothing, ...) is passed to it."""
    function = LOSSES[loss_config.name]
    parameters = loss_options(loss_config.name)
    bound = {name: value for name, value in vars(loss_config).items() if name in parameters}

    def loss(*args, **kwargs) -> LossOutput:
        return function(*args, **bound, **kwargs)

    loss.__name__ = f"{loss_config.name}_loss"
    return loss
