"""MPO, DPO and IPO against a direct float64 evaluation of the formulas (README, Losses); optima; extreme inputs."""


import pytest
import torch

from mpo_dist.config import LossConfig
from mpo_dist.losses import LOSSES, build_loss, dpo_loss, ipo_loss, mpo_loss

pytestmark = pytest.mark.unit


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
    """Optimise the pair logit z directly (policy log-probs z and 0) and return its trajectory. It ends
    once a step moves z by under 1e-8: converged (there Adam is within 1e-5 of the optimum, the tests
    allow 1e-3), and most of 3000 steps would be spent standing still."""
    z = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    zero, reference = torch.zeros(1, dtype=torch.float64), torch.tensor([z_ref], dtype=torch.float64)
    optimiser = torch.optim.Adam([z], lr=lr)
    trajectory = []
    for _ in range(steps):
        optimiser.zero_grad()
        loss_fn(z, zero, reference, zero).loss.backward()
        optimiser.step()
        trajectory.append(z.item())
        if len(trajectory) > 1 and abs(trajectory[-1] - trajectory[-2]) < 1e-8:
            break
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


# ---- options: length normalisation, pair-logit scale, chosen NLL (each off by default) ----------------

def random_lengths(n=16, seed=0, low=0, high=40):
    """Response token counts as collate gives them (float32), 0 included: the losses clamp to >= 1."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n,), generator=g).to(torch.float32)


def wmean(x, weight):
    return x.mean() if weight is None else (x * weight).sum()


def direct_pair_term(name, z, z_ref, beta, scale=1.0, label=None):
    """Per-pair loss of MPO (with p = sigmoid(s z)), DPO or IPO, in plain arithmetic."""
    label = torch.ones_like(z) if label is None else label
    if name == "mpo":
        p, q = sig(scale * z), sig(scale * z_ref)
        kl = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
        return -(label * p + (1 - label) * (1 - p)) + beta * kl
    h = z - z_ref
    if name == "dpo":
        return -label * torch.log(sig(beta * h)) - (1 - label) * torch.log(sig(-beta * h))
    return (h - (label - 0.5) / beta) ** 2


def test_defaults_are_exactly_the_plain_losses():
    """With every option at its default, giving the token counts changes nothing, bit for bit, and the
    losses are still the plain formulas; the metrics are the same names as without the options."""
    pc, pr, rc, rr = random_logps(seed=7)
    lc, lr = random_lengths(seed=1), random_lengths(seed=2)
    dref, dref_lengths = (-30 * torch.rand(8, dtype=torch.float64)).requires_grad_(), random_lengths(8, seed=3)
    defaults = vars(LossConfig())
    for name, fn in LOSSES.items():
        extra = {"dref_policy_logps": dref, "tau": 0.3} if name == "mpo" else {}
        plain = fn(pc, pr, rc, rr, 0.3, **extra)
        options = {k: v for k, v in defaults.items() if k in fn.__kwdefaults__}  # the option defaults, given explicitly
        assert options and options.keys() <= {"length_normalized_pair", "length_normalized_tau", "pair_logit_scale", "chosen_nll"}
        counts = {"chosen_lengths": lc, "rejected_lengths": lr, **({"dref_lengths": dref_lengths} if name == "mpo" else {})}
        given = fn(pc, pr, rc, rr, 0.3, **extra, **counts, **options)
        assert list(given.metrics) == list(plain.metrics) and "chosen_nll" not in given.metrics
        for metric in plain.metrics:
            assert torch.equal(given.metrics[metric], plain.metrics[metric]), (name, metric)
        inputs = [pc, pr] + ([dref] if name == "mpo" else [])
        for a, b in zip(torch.autograd.grad(given.loss, inputs, retain_graph=True), torch.autograd.grad(plain.loss, inputs)):
            assert torch.equal(a, b), name
        reference = direct_pair_term(name, pc - pr, rc - rr, 0.3).mean() + (0.3 * (-dref).mean() if name == "mpo" else 0)
        assert_same_value_and_grads(given.loss, reference, inputs)


@pytest.mark.parametrize("name", ["mpo", "dpo", "ipo"])
def test_length_normalized_pair_matches_formula(name):
    """z = logp(y_w)/|y_w| - logp(y_l)/|y_l| and z_ref likewise, counts of 0 taken as 1; padded and weighted."""
    pc, pr, rc, rr = random_logps(seed=8)
    lc, lr = random_lengths(seed=4), random_lengths(seed=5)
    lc[0], lr[1] = 0, 0  # an empty response keeps its sum
    weight = torch.rand(16, dtype=torch.float64) * torch.tensor([1.0] * 12 + [0.0] * 4, dtype=torch.float64)
    label = torch.rand(16, dtype=torch.float64)
    out = LOSSES[name](pc, pr, rc, rr, 0.4, length_normalized_pair=True, chosen_lengths=lc, rejected_lengths=lr,
                       weight=weight / weight.sum(), label=label)
    nc, nr = lc.double().clamp(min=1), lr.double().clamp(min=1)
    z, z_ref = pc / nc - pr / nr, rc / nc - rr / nr
    reference = wmean(direct_pair_term(name, z, z_ref, 0.4, label=label), weight / weight.sum())
    assert_same_value_and_grads(out.loss, reference, [pc, pr, rc, rr])
    torch.testing.assert_close(out.metrics["reward_margin"], wmean(z - z_ref, weight / weight.sum()))  # the loss's own z
    torch.testing.assert_close(out.metrics["chosen_logps"], wmean(pc, weight / weight.sum()))  # still the sums
    grad_pc = torch.autograd.grad(out.loss, pc)[0]
    assert torch.all(grad_pc[12:] == 0) and torch.all(grad_pc[:12] != 0)  # weight 0 pads contribute nothing
    # the same loss as the unpadded batch of the 12 real pairs, weighted alike
    kept = LOSSES[name](pc[:12], pr[:12], rc[:12], rr[:12], 0.4, length_normalized_pair=True, chosen_lengths=lc[:12],
                        rejected_lengths=lr[:12], weight=weight[:12] / weight.sum(), label=label[:12])
    torch.testing.assert_close(out.loss, kept.loss)


def test_length_normalized_pair_has_the_analytic_gradient():
    """IPO per pair (h - 1/(2 beta))^2 with h = z - z_ref: d/d logp(y_w) = 2 (h - 1/(2 beta)) / (n |y_w|)."""
    pc, pr, rc, rr = random_logps(seed=9)
    lc, lr = random_lengths(seed=6, low=1), random_lengths(seed=7, low=1)
    out = ipo_loss(pc, pr, rc, rr, 0.5, length_normalized_pair=True, chosen_lengths=lc, rejected_lengths=lr)
    residual = (pc / lc.double() - pr / lr.double()) - (rc / lc.double() - rr / lr.double()) - 1 / (2 * 0.5)
    grad_pc, grad_pr = torch.autograd.grad(out.loss, [pc, pr])
    torch.testing.assert_close(grad_pc, (2 * residual / (16 * lc.double())).detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_pr, (-2 * residual / (16 * lr.double())).detach(), rtol=1e-12, atol=0)


def test_length_normalized_tau_matches_formula():
    """tau * weighted mean(-logp(y)/|y|) over D_ref; dref_nll is that per-token mean, dref_kl stays the sums' KL estimate."""
    pc, pr, rc, rr = random_logps(seed=10)
    dref = (-60 * torch.rand(8, dtype=torch.float64)).requires_grad_()
    dref_ref = -60 * torch.rand(8, dtype=torch.float64)
    lengths = random_lengths(8, seed=8)
    lengths[2] = 0
    dref_weight = torch.tensor([1.0] * 6 + [0.0] * 2, dtype=torch.float64) / 6  # two padding samples
    out = mpo_loss(pc, pr, rc, rr, 0.2, dref, 0.7, dref_ref_logps=dref_ref, dref_weight=dref_weight,
                   dref_lengths=lengths, length_normalized_tau=True)
    per_token_nll = (-dref / lengths.double().clamp(min=1))[:6].mean()
    reference = ref_mpo(pc, pr, rc, rr, 0.2) + 0.7 * per_token_nll
    assert_same_value_and_grads(out.loss, reference, [pc, pr, dref])
    torch.testing.assert_close(out.metrics["dref_nll"], per_token_nll)
    torch.testing.assert_close(out.metrics["dref_kl"], (dref_ref - dref)[:6].mean())  # not normalised
    grad = torch.autograd.grad(out.loss, dref)[0]  # analytic: -tau w_i / |y_i|
    torch.testing.assert_close(grad, -0.7 * dref_weight / lengths.double().clamp(min=1), rtol=1e-12, atol=0)
    # only the tau term changes: the pair term is the plain one
    plain = mpo_loss(pc, pr, rc, rr, 0.2, dref, 0.7, dref_weight=dref_weight)
    torch.testing.assert_close(out.metrics["reward_term"], plain.metrics["reward_term"], rtol=0, atol=0)


@pytest.mark.parametrize("scale", [0.05, 0.3, 2.0])
def test_pair_logit_scale_matches_formula_and_analytic_gradient(scale):
    """p = sigmoid(s z), p_ref = sigmoid(s z_ref) in both terms; per pair dL/dz = s p(1-p) (-(2l-1) + beta s (z - z_ref))."""
    pc, pr, rc, rr = random_logps(seed=11)
    label = torch.rand(16, dtype=torch.float64)
    beta = 0.3
    out = mpo_loss(pc, pr, rc, rr, beta, label=label, pair_logit_scale=scale)
    z, z_ref = pc - pr, rc - rr
    assert_same_value_and_grads(out.loss, direct_pair_term("mpo", z, z_ref, beta, scale, label).mean(), [pc, pr, rc, rr])
    p = sig(scale * z).detach()
    dz = scale * p * (1 - p) * (-(2 * label - 1) + beta * scale * (z - z_ref).detach()) / 16
    grad_pc, grad_pr = torch.autograd.grad(out.loss, [pc, pr])
    torch.testing.assert_close(grad_pc, dz, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(grad_pr, -dz, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(out.metrics["p"], p.mean())  # the loss's own p
    assert out.metrics["reward_accuracy"] == ((z - z_ref) > 0).double().mean()  # unchanged by s > 0


@pytest.mark.parametrize("scale, beta", [(0.1, 0.5), (0.5, 0.25), (2.0, 1.0)])
def test_pair_logit_scale_moves_the_optimum_to_z_ref_plus_one_over_s_beta(scale, beta):
    z_ref = 0.7
    z_star = z_ref + 1 / (scale * beta)
    zero = torch.zeros(1, dtype=torch.float64)

    def grad_at(z):
        z = torch.tensor([z], dtype=torch.float64, requires_grad=True)
        out = mpo_loss(z, zero, torch.tensor([z_ref], dtype=torch.float64), zero, beta, pair_logit_scale=scale)
        return torch.autograd.grad(out.loss, z)[0].item()

    assert abs(grad_at(z_star)) < 1e-15
    assert grad_at(z_star - 0.5) < 0 < grad_at(z_star + 0.5)  # a minimum: the loss falls towards z*
    if scale >= 0.5:  # far optima (z* = 20.7 for s = 0.1) take Adam longer than this test should
        trajectory = optimise_free_logit(lambda *a: mpo_loss(*a, beta, pair_logit_scale=scale), z_ref=z_ref)
        assert trajectory[-1] == pytest.approx(z_star, abs=1e-3)


def test_pair_logit_scale_below_one_unsaturates_the_gradient():
    """Real pairs have sequence log-prob gaps of several nats: at z = z_ref = 12, p = sigmoid(12) saturates
    and MPO's gradient p(1-p) all but vanishes; s = 0.1 gives it back."""
    def gradient(scale):
        z = torch.tensor([12.0], dtype=torch.float64, requires_grad=True)
        zero = torch.zeros(1, dtype=torch.float64)
        out = mpo_loss(z, zero, torch.tensor([12.0], dtype=torch.float64), zero, 0.1, pair_logit_scale=scale)
        return -torch.autograd.grad(out.loss, z)[0].item()

    saturated = sig(torch.tensor(12.0, dtype=torch.float64))
    assert gradient(1.0) == pytest.approx((saturated * (1 - saturated)).item(), rel=1e-6)  # dL/dz = -p(1-p) at z = z_ref
    assert gradient(1.0) < 1e-5 and gradient(0.1) > 1e-2


@pytest.mark.parametrize("name", ["mpo", "dpo", "ipo"])
def test_chosen_nll_matches_formula(name):
    """loss + c * weighted mean(-logp(y_w)/|y_w|); the term reported as chosen_nll; its gradient -c w_i/|y_w,i|."""
    pc, pr, rc, rr = random_logps(seed=12)
    lc = random_lengths(seed=9)
    lc[3] = 0
    weight = torch.tensor([1.0] * 13 + [0.0] * 3, dtype=torch.float64) / 13
    c = 0.35
    out = LOSSES[name](pc, pr, rc, rr, 0.2, chosen_nll=c, chosen_lengths=lc, weight=weight)
    nll = wmean(-pc / lc.double().clamp(min=1), weight)
    reference = wmean(direct_pair_term(name, pc - pr, rc - rr, 0.2), weight) + c * nll
    assert_same_value_and_grads(out.loss, reference, [pc, pr, rc, rr])
    torch.testing.assert_close(out.metrics["chosen_nll"], nll)
    torch.testing.assert_close(out.metrics["loss"], out.loss)
    plain = LOSSES[name](pc, pr, rc, rr, 0.2, weight=weight)
    grad_with, grad_without = torch.autograd.grad(out.loss, pc)[0], torch.autograd.grad(plain.loss, pc)[0]
    torch.testing.assert_close(grad_with - grad_without, -c * weight / lc.double().clamp(min=1), rtol=1e-9, atol=1e-15)
    term = {"mpo": "reward_term", "dpo": "dpo_term", "ipo": "ipo_term"}[name]
    torch.testing.assert_close(out.metrics[term], plain.metrics[term], rtol=0, atol=0)  # the pair term alone
    assert "chosen_nll" not in plain.metrics


def test_all_options_together_match_formula():
    """MPO with both normalisations, a scale and the chosen NLL, padded and weighted, against the direct formula."""
    pc, pr, rc, rr = random_logps(seed=13)
    lc, lr = random_lengths(seed=10), random_lengths(seed=11)
    dref, dl = (-50 * torch.rand(6, dtype=torch.float64)).requires_grad_(), random_lengths(6, seed=12)
    weight = torch.tensor([1.0] * 14 + [0.0] * 2, dtype=torch.float64) / 14
    dref_weight = torch.tensor([1.0] * 5 + [0.0], dtype=torch.float64) / 5
    out = mpo_loss(pc, pr, rc, rr, 0.25, dref, 0.4, weight=weight, dref_weight=dref_weight, chosen_lengths=lc,
                   rejected_lengths=lr, dref_lengths=dl, length_normalized_pair=True, length_normalized_tau=True,
                   pair_logit_scale=0.2, chosen_nll=0.6)
    nc, nr, nd = (x.double().clamp(min=1) for x in (lc, lr, dl))
    reference = (wmean(direct_pair_term("mpo", pc / nc - pr / nr, rc / nc - rr / nr, 0.25, 0.2), weight)
                 + 0.4 * wmean(-dref / nd, dref_weight) + 0.6 * wmean(-pc / nc, weight))
    assert_same_value_and_grads(out.loss, reference, [pc, pr, rc, rr, dref])


def test_options_without_token_counts_are_an_error():
    pc, pr, rc, rr = [t.detach() for t in random_logps(seed=14)]
    with pytest.raises(ValueError, match="length_normalized_pair needs the response token counts"):
        dpo_loss(pc, pr, rc, rr, 0.1, length_normalized_pair=True)
    with pytest.raises(ValueError, match="chosen_nll needs the response token counts"):
        ipo_loss(pc, pr, rc, rr, 0.1, chosen_nll=0.1)
    with pytest.raises(ValueError, match="length_normalized_tau needs the response token counts"):
        mpo_loss(pc, pr, rc, rr, 0.1, -torch.rand(3, dtype=torch.float64), 0.1, length_normalized_tau=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_options_on_extreme_inputs_stay_finite(dtype):
    pc = torch.full((4,), -5000.0, dtype=dtype, requires_grad=True)
    pr = torch.tensor([-4000.0, -6000.0, -3000.0, -7000.0], dtype=dtype, requires_grad=True)
    rc, rr = torch.full((4,), -5000.0, dtype=dtype), torch.tensor([-6000.0, -4000.0, -5000.0, -5000.0], dtype=dtype)
    lengths = torch.tensor([0.0, 1.0, 3.0, 2000.0])
    dref = torch.full((2,), -5000.0, dtype=dtype, requires_grad=True)
    for out in [mpo_loss(pc, pr, rc, rr, 0.1, dref, 0.5, pair_logit_scale=3.0, chosen_nll=1.0, length_normalized_tau=True,
                         length_normalized_pair=True, chosen_lengths=lengths, rejected_lengths=lengths.flip(0),
                         dref_lengths=lengths[:2]),
                mpo_loss(pc, pr, rc, rr, 0.1, pair_logit_scale=0.01),
                dpo_loss(pc, pr, rc, rr, 0.1, chosen_nll=2.0, length_normalized_pair=True, chosen_lengths=lengths,
                         rejected_lengths=lengths)]:
        grads = torch.autograd.grad(out.loss, [pc, pr])
        assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads)
        assert all(torch.isfinite(v) for v in out.metrics.values())


def test_registry_binds_the_options_by_name():
    pc, pr, rc, rr = [t.detach() for t in random_logps(seed=15)]
    lc, lr, dl = random_lengths(seed=13), random_lengths(seed=14), random_lengths(4, seed=15)
    dref = -10 * torch.rand(4, dtype=torch.float64)
    counts = {"chosen_lengths": lc, "rejected_lengths": lr}
    options = {"length_normalized_pair": True, "length_normalized_tau": True, "pair_logit_scale": 0.3, "chosen_nll": 0.2}
    mpo = build_loss(LossConfig(name="mpo", beta=0.3, tau=0.2, **options))
    torch.testing.assert_close(mpo(pc, pr, rc, rr, dref_policy_logps=dref, dref_lengths=dl, **counts).loss,
                               mpo_loss(pc, pr, rc, rr, 0.3, dref, 0.2, dref_lengths=dl, **counts, **options).loss, rtol=0, atol=0)
    # DPO and IPO take the options that apply to them; the MPO-only ones (at their defaults) are not passed
    for name, fn in (("dpo", dpo_loss), ("ipo", ipo_loss)):
        bound = build_loss(LossConfig(name=name, beta=0.3, length_normalized_pair=True, chosen_nll=0.2))
        direct = fn(pc, pr, rc, rr, 0.3, length_normalized_pair=True, chosen_nll=0.2, **counts)
        torch.testing.assert_close(bound(pc, pr, rc, rr, **counts).loss, direct.loss, rtol=0, atol=0)
        assert direct.loss != fn(pc, pr, rc, rr, 0.3).loss
