"""MPO, DPO and IPO against a direct float64 evaluation of the formulas (README, Losses); optima; extreme inputs."""


import pytest
import torch

from mpo_dist.config import LossConfig
from mpo_dist.losses import LOSSES, build_loss, dpo_loss, ipo_loss, mpo_loss


def random_logps(n=16, seed=0):
    """Sequence log-probs around -30 whose pair logits stay within +-8: where the naive formulas are exact."""
    g = torch.Generator().manual_seed(seed)
    return [(-8 * torch.rand(n, generator=g, dtype=torch.float64) - 26).requires_grad_() for _ in range(4)]


# Independent references: plain sigmoid/log arithmetic, exactly as the formulas are written.
def sig(x):
    return 1 / (1 + torch.exp(-x))


def ref_mpo(pc, pr, rc, rr, beta, dref=None, tau=0.0, label=None):
    p, q = sig(pc - pr), sig(rc - rr)
    kl = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    label = torch.ones_like(p) if label is None else label
    pair = -(label * p + (1 - label) * (1 - p)) + beta * kl
    total = pair.mean()
    return total + tau * (-dref).mean() if dref is not None else total


def ref_dpo(pc, pr, rc, rr, beta, eps=0.0, label=None):
    h = beta * ((pc - pr) - (rc - rr))
    label = torch.ones_like(h) if label is None else label
    q = label * (1 - eps) + (1 - label) * eps
    return (-q * torch.log(sig(h)) - (1 - q) * torch.log(sig(-h))).mean()


def ref_ipo(pc, pr, rc, rr, beta, label=None):
    label = torch.ones_like(pc) if label is None else label
    return (((pc - pr) - (rc - rr) - (label - 0.5) / beta) ** 2).mean()


def assert_same_value_and_grads(ours, reference, inputs):
    grads_ours = torch.autograd.grad(ours, inputs, retain_graph=True)
    grads_ref = torch.autograd.grad(reference, inputs)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads_ours, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("beta", [0.05, 0.5, 2.0])
def test_mpo_matches_formula(beta):
    pc, pr, rc, rr = random_logps()
    dref = (-30 * torch.rand(8, dtype=torch.float64)).requires_grad_()
    label = torch.rand(16, dtype=torch.float64)
    for kwargs, ref_kwargs in [({}, {}), ({"label": label}, {"label": label}),
                               ({"dref_policy_logps": dref, "tau": 0.3}, {"dref": dref, "tau": 0.3})]:
        out = mpo_loss(pc, pr, rc, rr, beta, **kwargs)
        inputs = [pc, pr, rc, rr] + ([dref] if "dref" in ref_kwargs else [])
        assert_same_value_and_grads(out.loss, ref_mpo(pc, pr, rc, rr, beta, **ref_kwargs), inputs)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_dpo_matches_formula(eps):
    pc, pr, rc, rr = random_logps(seed=1)
    assert_same_value_and_grads(dpo_loss(pc, pr, rc, rr, 0.3, label_smoothing=eps).loss, ref_dpo(pc, pr, rc, rr, 0.3, eps), [pc, pr, rc, rr])


def test_ipo_matches_formula():
    pc, pr, rc, rr = random_logps(seed=2)
    assert_same_value_and_grads(ipo_loss(pc, pr, rc, rr, 0.3).loss, ref_ipo(pc, pr, rc, rr, 0.3), [pc, pr, rc, rr])


def test_soft_labels_in_dpo_and_ipo():
    pc, pr, rc, rr = random_logps(seed=6)
    label = torch.rand(16, dtype=torch.float64)
    assert_same_value_and_grads(dpo_loss(pc, pr, rc, rr, 0.3, 0.1, label=label).loss,
                                ref_dpo(pc, pr, rc, rr, 0.3, 0.1, label), [pc, pr, rc, rr])
    assert_same_value_and_grads(ipo_loss(pc, pr, rc, rr, 0.3, label=label).loss,
                                ref_ipo(pc, pr, rc, rr, 0.3, label), [pc, pr, rc, rr])
    ones = torch.ones(16, dtype=torch.float64)  # a label of 1 is the plain loss
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, 0.3, label=ones).loss, dpo_loss(pc, pr, rc, rr, 0.3).loss)
    torch.testing.assert_close(ipo_loss(pc, pr, rc, rr, 0.3, label=ones).loss, ipo_loss(pc, pr, rc, rr, 0.3).loss)


def test_metrics_are_scalars_with_expected_values():
    pc, pr, rc, rr = [t.detach() for t in random_logps(seed=3)]
    dref, dref_ref = -torch.rand(5, dtype=torch.float64) * 10, -torch.rand(5, dtype=torch.float64) * 10
    out = mpo_loss(pc, pr, rc, rr, 0.1, dref, 0.2, dref_ref_logps=dref_ref)
    z, z_ref = pc - pr, rc - rr
    expected = {
        "p": sig(z).mean(), "preference_accuracy": (z > 0).double().mean(),
        "reward_accuracy": (z - z_ref > 0).double().mean(), "reward_margin": (z - z_ref).mean(),
        "chosen_logps": pc.mean(), "rejected_logps": pr.mean(), "dref_nll": (-dref).mean(),
        "dref_kl": (dref_ref - dref).mean(), "reward_term": -sig(z).mean(), "loss": out.loss,
    }
    for name, value in expected.items():
        torch.testing.assert_close(out.metrics[name], value, msg=name)
    assert "kl_pair" in out.metrics
    for fn, term in [(dpo_loss, "dpo_term"), (ipo_loss, "ipo_term")]:
        metrics = fn(pc, pr, rc, rr, 0.1).metrics
        assert metrics[term].dim() == 0 and {"p", "preference_accuracy", "reward_accuracy", "reward_margin", "chosen_logps",
                                                  "rejected_logps", "loss"} <= metrics.keys()
        torch.testing.assert_close(metrics["reward_accuracy"], (z - z_ref > 0).double().mean())
        torch.testing.assert_close(metrics["preference_accuracy"], (z > 0).double().mean())


def optimise_free_logit(loss_fn, z_ref=0.7, steps=3000, lr=0.05):
    """Optimise the pair logit z directly (policy log-probs z and 0) and return its trajectory."""
    z = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.Adam([z], lr=lr)
    trajectory = []
    for _ in range(steps):
        optimiser.zero_grad()
        loss_fn(z, torch.zeros(1, dtype=torch.float64), torch.tensor([z_ref], dtype=torch.float64),
                torch.zeros(1, dtype=torch.float64)).loss.backward()
        optimiser.step()
        trajectory.append(z.item())
    return trajectory


@pytest.mark.parametrize("beta", [0.25, 0.5, 1.0])
def test_stationary_points(beta):
    z_ref = 0.7
    mpo = optimise_free_logit(lambda *a: mpo_loss(*a, beta))
    assert mpo[-1] == pytest.approx(z_ref + 1 / beta, abs=1e-3)
    ipo = optimise_free_logit(lambda *a: ipo_loss(*a, beta))
    assert ipo[-1] == pytest.approx(z_ref + 1 / (2 * beta), abs=1e-3)
    dpo = optimise_free_logit(lambda *a: dpo_loss(*a, beta))
    assert dpo[-1] > dpo[1500] + 1 > z_ref + 1 / beta  # no finite optimum: keeps growing


def test_soft_label_optimum():
    # With label q the reward term is -(q p + (1-q)(1-p)): the optimum moves to z_ref + (2q - 1)/beta.
    beta, q = 0.5, 0.8
    trajectory = optimise_free_logit(lambda *a: mpo_loss(*a, beta, label=torch.tensor([q], dtype=torch.float64)))
    assert trajectory[-1] == pytest.approx(0.7 + (2 * q - 1) / beta, abs=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_inputs_stay_finite(dtype):
    n = 6
    pc = torch.full((n,), -5000.0, dtype=dtype, requires_grad=True)
    pr = torch.tensor([-4000.0, -6000.0, -5000.0, -3000.0, -7000.0, -5000.0], dtype=dtype, requires_grad=True)
    rc = torch.tensor([-5000.0, -5000.0, -6000.0, -4000.0, -2000.0, -5000.0], dtype=dtype)
    rr = torch.tensor([-6000.0, -4000.0, -5000.0, -5000.0, -8000.0, -5000.0], dtype=dtype)
    # pair logits z = -1000, +1000, 0, -2000, +2000, 0 against z_ref = +-1000, +-3000
    dref = torch.full((3,), -5000.0, dtype=dtype, requires_grad=True)
    for out in [mpo_loss(pc, pr, rc, rr, 0.1, dref, 0.5, label=torch.full((n,), 0.9, dtype=dtype)),
                mpo_loss(pc, pr, rc, rr, 0.1), dpo_loss(pc, pr, rc, rr, 0.1, 0.1), ipo_loss(pc, pr, rc, rr, 0.1)]:
        grads = torch.autograd.grad(out.loss, [pc, pr], allow_unused=True)
        assert torch.isfinite(out.loss)
        assert all(torch.isfinite(g).all() for g in grads)
        assert all(torch.isfinite(v) for v in out.metrics.values())


def test_padding_weight_masks_pairs():
    pc, pr, rc, rr = random_logps(seed=4)
    weight = torch.tensor([1.0] * 10 + [0.0] * 6, dtype=torch.float64) / 10
    for fn in LOSSES.values():
        masked = fn(pc, pr, rc, rr, 0.2, weight=weight)
        kept = fn(pc[:10], pr[:10], rc[:10], rr[:10], 0.2)
        torch.testing.assert_close(masked.loss, kept.loss)
        assert torch.all(torch.autograd.grad(masked.loss, pc)[0][10:] == 0)
    all_padding = mpo_loss(pc, pr, rc, rr, 0.2, weight=torch.zeros(16, dtype=torch.float64))
    assert all_padding.loss.item() == 0.0  # an all-padding batch contributes nothing, not NaN


def test_registry_binds_config():
    pc, pr, rc, rr = [t.detach() for t in random_logps(seed=5)]
    dref = -torch.rand(4, dtype=torch.float64)
    mpo = build_loss(LossConfig(name="mpo", beta=0.3, tau=0.2))
    torch.testing.assert_close(mpo(pc, pr, rc, rr, dref_policy_logps=dref).loss, mpo_loss(pc, pr, rc, rr, 0.3, dref, 0.2).loss)
    dpo = build_loss(LossConfig(name="dpo", beta=0.3, label_smoothing=0.1))
    torch.testing.assert_close(dpo(pc, pr, rc, rr).loss, dpo_loss(pc, pr, rc, rr, 0.3, 0.1).loss)
    assert set(LOSSES) == {"mpo", "dpo", "ipo"}
