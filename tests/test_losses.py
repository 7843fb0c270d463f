"""Each training objective against its formula (docs/science.md#training-methods), computed by hand on fixed logits.

The attack is replaced by a fixed x*, and the model is linear in its input, so the natural and
adversarial logits are known exactly and the loss can be written out independently.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from weatcli import losses
from weatcli.config import resolve
from weatcli.losses import LOSSES, method_attack

K, B = 4, 6


def _setup(monkeypatch, method, **sets):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, K))
    x = torch.rand(B, 3, 2, 2)
    x_adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    monkeypatch.setattr(losses, "method_attack", lambda *a, **k: x_adv)
    cfg = resolve(preset="digits-weat", overrides={"train.method": method, "train.beta": sets.pop("beta", 6.0)},
                  sets=[f"train.{k}={v}" for k, v in sets.items()])
    with torch.no_grad():
        nat, adv = model(x).tolist(), model(x_adv).tolist()
    return model, x, y.tolist(), cfg, nat, adv, y


def _softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def _lse(row):
    return math.log(sum(math.exp(v) for v in row))


def _ce(row, k):
    return _lse(row) - row[k]


def _kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def _call(model, x, y, cfg):
    model.train()
    loss, stats = LOSSES[cfg.train.method](model, x, y, cfg, generator=torch.Generator().manual_seed(0), progress=0.9)
    return loss.item(), stats


def test_standard(monkeypatch):
    model, x, ys, cfg, nat, adv, y = _setup(monkeypatch, "standard")
    loss, stats = _call(model, x, y, cfg)
    assert loss == pytest.approx(sum(_ce(r, k) for r, k in zip(nat, ys)) / B, rel=1e-5)
    assert stats["correct"].item() == sum(max(range(K), key=r.__getitem__) == k for r, k in zip(nat, ys))


def test_pgd_at(monkeypatch):
    model, x, ys, cfg, nat, adv, y = _setup(monkeypatch, "pgd-at")
    loss, _ = _call(model, x, y, cfg)
    assert loss == pytest.approx(sum(_ce(r, k) for r, k in zip(adv, ys)) / B, rel=1e-5)


def test_trades(monkeypatch):
    model, x, ys, cfg, nat, adv, y = _setup(monkeypatch, "trades")
    loss, _ = _call(model, x, y, cfg)
    ce = sum(_ce(r, k) for r, k in zip(nat, ys)) / B
    kl = sum(_kl(_softmax(n), _softmax(a)) for n, a in zip(nat, adv)) / B
    assert loss == pytest.approx(ce + 6.0 * kl, rel=1e-5)


def test_mart(monkeypatch):
    model, x, ys, cfg, nat, adv, y = _setup(monkeypatch, "mart")
    loss, _ = _call(model, x, y, cfg)
    total = 0.0
    for n, a, k in zip(nat, adv, ys):
        pa, pn = _softmax(a), _softmax(n)
        wrong = max((j for j in range(K) if j != k), key=pa.__getitem__)  # most likely wrong class under attack
        bce = _ce(a, k) - math.log(1.0001 - pa[wrong] + 1e-12)
        kl = sum(pn[j] * (math.log(pn[j]) - math.log(pa[j] + 1e-12)) for j in range(K))
        total += bce + 6.0 * kl * (1.0000001 - pn[k])
    assert loss == pytest.approx(total / B, rel=1e-5)


@pytest.mark.parametrize("burn_in", [0.5, 0.95])
def test_mail_trades(monkeypatch, burn_in):
    model, x, ys, cfg, nat, adv, y = _setup(monkeypatch, "mail-trades", mail_burn_in=burn_in, mail_bias=-1.5, mail_slope=2.0)
    loss, _ = _call(model, x, y, cfg)  # progress 0.9: past a 0.5 burn-in, inside a 0.95 one
    ws = []
    for a, k in zip(adv, ys):
        pa = _softmax(a)
        pm = max(pa[j] for j in range(K) if j != k) - pa[k]
        ws.append(1 / (1 + math.exp(-2.0 * (pm - 1.5))))
    ws = [w * B / sum(ws) for w in ws] if burn_in < 0.9 else [1.0] * B
    ce = sum(_ce(r, k) for r, k in zip(nat, ys)) / B
    kl = sum(w * _kl(_softmax(n), _softmax(a)) for w, n, a in zip(ws, nat, adv)) / B
    assert loss == pytest.approx(ce + 6.0 * kl, rel=1e-5)


@pytest.mark.parametrize("method", ["weat-adv", "weat-nat"])
def test_weat(monkeypatch, method):
    model, x, ys, cfg, nat, adv, y = _setup(monkeypatch, method)
    loss, stats = _call(model, x, y, cfg)
    ws = [1.0 / math.log1p(math.exp(abs(-_lse(n)))) for n in nat]  # 1 / softplus(|E(x)|), natural logits
    ce_rows = adv if method == "weat-adv" else nat
    ce = sum(w * _ce(r, k) for w, r, k in zip(ws, ce_rows, ys)) / B
    kl = sum(w * _kl(_softmax(n), _softmax(a)) for w, n, a in zip(ws, nat, adv)) / B
    assert loss == pytest.approx(ce + 6.0 * kl, rel=1e-5)
    assert stats["weight"].item() == pytest.approx(sum(ws), rel=1e-5)  # not renormalised


def test_weat_gradient_does_not_flow_through_the_weights(monkeypatch):
    model, x, ys, cfg, nat, adv, y = _setup(monkeypatch, "weat-nat", beta=0.0)
    model.train()
    loss, _ = LOSSES["weat-nat"](model, x, y, cfg)
    loss.backward()
    got = model[1].weight.grad.clone()
    # Same loss with the weights as constants: identical gradient.
    model.zero_grad()
    logits = model(x)
    with torch.no_grad():
        w = 1 / nn.functional.softplus((-torch.logsumexp(logits, 1)).abs())
    (w * nn.functional.cross_entropy(logits, y, reduction="none")).mean().backward()
    torch.testing.assert_close(got, model[1].weight.grad)


def test_losses_leave_model_in_train_mode_and_attack_in_eval_mode():
    cfg = resolve(preset="digits-weat", sets=["attack.steps=2"])
    seen = []
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 10))
    model.register_forward_pre_hook(lambda m, inp: seen.append(m.training))
    x, y = torch.rand(4, 1, 16, 16), torch.tensor([0, 1, 2, 3])
    for method in LOSSES:
        seen.clear()
        model.train()
        LOSSES[method](model, x, y, cfg.model_copy(update={"train": cfg.train.model_copy(update={"method": method})}),
                       generator=torch.Generator().manual_seed(0))
        assert model.training
        if method != "standard":
            assert False in seen and seen[-1] is True  # attack forwards in eval, update forwards in train
    x_adv = method_attack(model, x, y, cfg, generator=torch.Generator().manual_seed(0))
    assert ((x_adv - x).abs() <= cfg.attack.eps + 1e-6).all()


# ----------------------------------------------------------------------------- single-step AT and DER
# docs/science.md#single-step-at, #der. The attack points are checked against the one-step formula
# written out for a linear model (input gradient of CE = W^T (softmax(z) - e_y)), with the start
# drawn from the same seeded generator.

EPS = 0.1


def _linear_problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, K)).double()
    x = torch.rand(B, 3, 2, 2, dtype=torch.float64)
    x[0, 0, 0, 0], x[1, 1, 0, 1], x[2, 2, 1, 1] = 0.0, 1.0, 0.03  # pixels at and near the box edges
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    return model, x, y


def _one_step_by_hand(model, x, y, start_radius, alpha, seed, project):
    """x0 = clip(x + U(-r, r)); x* = clip(x0 + alpha sign(W^T (softmax(W x0 + b) - e_y))), where clip
    is onto the eps ball and [0,1] (project) or onto [0,1] alone."""
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    lo = (x - EPS).clamp(min=0.0) if project else torch.zeros_like(x)
    hi = (x + EPS).clamp(max=1.0) if project else torch.ones_like(x)
    x0 = torch.maximum(torch.minimum(x + (2 * u - 1) * start_radius, hi), lo)
    W, b = model[1].weight.detach(), model[1].bias.detach()
    z = x0.flatten(1) @ W.T + b
    grad = (torch.softmax(z, 1) - nn.functional.one_hot(y, K).to(z.dtype)) @ W
    return torch.maximum(torch.minimum(x0 + alpha * grad.sign().view_as(x), hi), lo)


def _single_step_cfg(method, *sets):
    return resolve(preset="digits-weat", overrides={"train.method": method, "attack.eps": EPS},
                   sets=["attack.steps=10", *sets])


def test_training_attack_settings():
    k = losses.training_attack(_single_step_cfg("fgsm"))
    assert (k["steps"], k["step_size"], k["init"], k["objective"]) == (1, pytest.approx(1.25 * EPS), "uniform", "ce")
    assert k.get("init_radius") is None and k.get("project", True)  # the eps ball: start and projection
    k = losses.training_attack(_single_step_cfg("nfgsm"))
    assert (k["steps"], k["step_size"], k["init_radius"], k["project"]) == (1, pytest.approx(EPS), pytest.approx(2 * EPS), False)
    k = losses.training_attack(_single_step_cfg("n-fgsm", "train.fgsm_alpha=1.5", "train.nfgsm_k=3"))
    assert (k["step_size"], k["init_radius"]) == (pytest.approx(1.5 * EPS), pytest.approx(3 * EPS))
    k = losses.training_attack(_single_step_cfg("pgd-at"))  # multi-step methods: the [attack] section as it is
    assert (k["steps"], k["step_size"]) == (10, pytest.approx(EPS / 4)) and "project" not in k


def test_fgsm_rs_point_is_the_one_step_formula():
    model, x, y = _linear_problem()
    cfg = _single_step_cfg("fgsm-rs")
    got = method_attack(model, x, y, cfg, generator=torch.Generator().manual_seed(3))
    want = _one_step_by_hand(model, x, y, EPS, 1.25 * EPS, 3, project=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert ((got - x).abs() <= EPS + 1e-12).all() and got.min() >= 0 and got.max() <= 1
    assert ((got - x).abs() > EPS / 2).any()  # it moved: the step is not a no-op


def test_n_fgsm_point_is_the_one_step_formula_and_leaves_the_ball():
    model, x, y = _linear_problem()
    cfg = _single_step_cfg("n-fgsm")
    got = method_attack(model, x, y, cfg, generator=torch.Generator().manual_seed(4))
    want = _one_step_by_hand(model, x, y, 2 * EPS, EPS, 4, project=False)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert ((got - x).abs() <= 3 * EPS + 1e-12).all()  # |x* - x| <= k eps + alpha eps
    assert ((got - x).abs() > EPS + 1e-6).any()  # no projection onto the eps ball
    assert got.min() >= 0 and got.max() <= 1


@pytest.mark.parametrize("method", ["fgsm-rs", "n-fgsm"])
def test_single_step_loss_is_ce_on_the_adversarial_point(monkeypatch, method):
    model, x, ys, cfg, nat, adv, y = _setup(monkeypatch, method)
    loss, stats = _call(model, x, y, cfg)
    assert loss == pytest.approx(sum(_ce(r, k) for r, k in zip(adv, ys)) / B, rel=1e-5)
    assert stats["adv_correct"].item() == sum(max(range(K), key=r.__getitem__) == k for r, k in zip(adv, ys))


@pytest.mark.parametrize("method", ["fgsm-rs", "n-fgsm"])
def test_single_step_costs_one_attack_pass_and_one_training_pass(method):
    """One forward-backward for the attack (eval mode, frozen weights), one for the update."""
    model, x, y = _linear_problem()
    seen = []
    model.register_forward_pre_hook(lambda m, inp: seen.append(m.training))
    model.train()
    loss, _ = LOSSES[method](model, x, y, _single_step_cfg(method), generator=torch.Generator().manual_seed(0))
    assert seen == [False, True] and model.training and all(p.requires_grad for p in model.parameters())


def _der_by_hand(nat, adv, ys, gamma):
    out = []
    for n, a, k in zip(nat, adv, ys):
        d_marginal = -_lse(n) + _lse(a)  # E(x) - E(x*), E = -logsumexp
        d_joint = -n[k] + a[k]  # E(x,y) - E(x*,y), E(x,y) = -f_y
        out.append(max(0.0, math.hypot(d_marginal, d_joint) - gamma))
    return out


@pytest.mark.parametrize("method", ["pgd-at", "fgsm-rs", "n-fgsm", "trades", "mart", "mail-trades", "weat-adv", "weat-nat"])
def test_der_adds_the_hinge_on_the_delta_energy_norm(monkeypatch, method):
    model, x, ys, cfg0, nat, adv, y = _setup(monkeypatch, method)
    base, _ = _call(model, x, y, cfg0)
    norms = _der_by_hand(nat, adv, ys, 0.0)
    gamma = sorted(norms)[B // 2]  # half of the examples under the margin: the hinge is exercised
    cfg = cfg0.model_copy(update={"train": cfg0.train.model_copy(update={"der_weight": 0.7, "der_margin": gamma})})
    loss, stats = _call(model, x, y, cfg)
    hinge = _der_by_hand(nat, adv, ys, gamma)
    assert sum(h == 0 for h in hinge) >= B // 2
    assert loss == pytest.approx(base + 0.7 * sum(hinge) / B, rel=1e-5)
    assert stats["der"].item() == pytest.approx(sum(hinge), rel=1e-5)


@pytest.mark.parametrize("grad", ["both", "adversarial"])
def test_der_gradient_flows_through_the_chosen_energies(monkeypatch, grad):
    """d/dW of mean_i DER_i for logits z = W x + b: with n_i = ||(dE_i, dEy_i)|| past the margin,
    dDER/dz_nat = -(dE p(x) + dEy e_y) / n (0 under der_grad "adversarial") and
    dDER/dz_adv = (dE p(x*) + dEy e_y) / n."""
    model, x, ys, cfg0, nat, adv, y = _setup(monkeypatch, "pgd-at")
    x_adv = losses.method_attack(model, x, y, cfg0)
    cfg = cfg0.model_copy(update={"train": cfg0.train.model_copy(update={"der_weight": 1.0, "der_grad": grad})})
    model.train()
    model.zero_grad()
    loss, _ = LOSSES["pgd-at"](model, x, y, cfg)
    loss.backward()
    with_der = model[1].weight.grad.clone()
    model.zero_grad()
    loss, _ = LOSSES["pgd-at"](model, x, y, cfg0)
    loss.backward()
    got = with_der - model[1].weight.grad

    zn, za = torch.tensor(nat, dtype=torch.float64), torch.tensor(adv, dtype=torch.float64)
    onehot = nn.functional.one_hot(y, K).double()
    d_marginal = -torch.logsumexp(zn, 1) + torch.logsumexp(za, 1)
    d_joint = -(zn * onehot).sum(1) + (za * onehot).sum(1)
    n = torch.hypot(d_marginal, d_joint)[:, None]
    g_nat = -(d_marginal[:, None] * torch.softmax(zn, 1) + d_joint[:, None] * onehot) / n / B
    g_adv = (d_marginal[:, None] * torch.softmax(za, 1) + d_joint[:, None] * onehot) / n / B
    want = g_adv.T @ x_adv.flatten(1).double()
    if grad == "both":
        want = want + g_nat.T @ x.flatten(1).double()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    assert (g_nat.T @ x.flatten(1).double()).abs().sum() > 0 and (g_adv.T @ x_adv.flatten(1).double()).abs().sum() > 0


@pytest.mark.parametrize("method", ["pgd-at", "fgsm-rs", "n-fgsm", "trades", "mart", "mail-trades", "weat-adv", "weat-nat"])
def test_energy_anchor_adds_the_mean_squared_energies(monkeypatch, method):
    """der_anchor mu: + mu * (mean_i E(x_i)^2 + mean_i E(x*_i)^2), E = -logsumexp, alone or beside DER."""
    model, x, ys, cfg0, nat, adv, y = _setup(monkeypatch, method)
    base, _ = _call(model, x, y, cfg0)
    term = sum(_lse(r) ** 2 for r in nat) / B + sum(_lse(r) ** 2 for r in adv) / B
    der = sum(_der_by_hand(nat, adv, ys, 0.0)) / B
    for weight in (0.0, 0.7):
        cfg = cfg0.model_copy(update={"train": cfg0.train.model_copy(update={"der_weight": weight, "der_anchor": 0.3})})
        loss, stats = _call(model, x, y, cfg)
        assert loss == pytest.approx(base + weight * der + 0.3 * term, rel=1e-5)
        assert stats["energy_anchor"].item() == pytest.approx(term * B, rel=1e-5)  # a batch sum, like every stat
        assert ("der" in stats) == (weight > 0)


def test_energy_anchor_gradient_flows_through_both_energies(monkeypatch):
    """d/dz of mean_i E(z_i)^2 = -2 E(z_i) softmax(z_i) / B, for the natural and the adversarial logits."""
    model, x, ys, cfg0, nat, adv, y = _setup(monkeypatch, "fgsm-rs")
    x_adv = losses.method_attack(model, x, y, cfg0)
    cfg = cfg0.model_copy(update={"train": cfg0.train.model_copy(update={"der_anchor": 1.0})})
    grads = []
    for c in (cfg, cfg0):
        model.train()
        model.zero_grad()
        LOSSES["fgsm-rs"](model, x, y, c)[0].backward()
        grads.append(model[1].weight.grad.clone())
    got = grads[0] - grads[1]
    zn, za = torch.tensor(nat, dtype=torch.float64), torch.tensor(adv, dtype=torch.float64)
    g_nat = 2 * torch.logsumexp(zn, 1)[:, None] * torch.softmax(zn, 1) / B  # d(E^2)/dz = 2 E dE/dz, dE/dz = -p
    g_adv = 2 * torch.logsumexp(za, 1)[:, None] * torch.softmax(za, 1) / B
    want = g_nat.T @ x.flatten(1).double() + g_adv.T @ x_adv.flatten(1).double()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_der_at_a_zero_gap_has_a_zero_gradient_not_nan():
    logits = torch.randn(B, K, requires_grad=True)
    y = torch.arange(B) % K
    out = losses.der_per_example(logits, logits, y, 0.0)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(B)) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("method", [m for m in LOSSES if m != "standard"])
def test_der_weight_zero_is_the_method_loss_bit_for_bit(method):
    """der_weight 0: the same tensor as the method's loss (no extra forward, no `der` stat), whatever the margin."""
    model, x, y = _linear_problem()
    model.float()
    x = x.float()
    cfg = _single_step_cfg(method, "attack.steps=2")
    calls = []
    model.register_forward_pre_hook(lambda m, inp: calls.append(m.training))
    out = []
    for margin in (0.0, 3.0):
        c = cfg.model_copy(update={"train": cfg.train.model_copy(update={"der_weight": 0.0, "der_margin": margin})})
        calls.clear()
        model.train()
        loss, stats = LOSSES[method](model, x, y, c, generator=torch.Generator().manual_seed(1))
        out.append((loss.detach(), sorted(stats), list(calls)))
    assert torch.equal(out[0][0], out[1][0]) and out[0][1:] == out[1][1:] and "der" not in out[0][1]
    # The loss itself, recomputed without the DER code path: CE on x* (pgd-at and the single-step ones).
    if method in ("pgd-at", "fgsm-rs", "n-fgsm"):
        x_adv = method_attack(model, x, y, cfg, generator=torch.Generator().manual_seed(1))
        model.train()
        assert torch.equal(out[0][0], nn.functional.cross_entropy(model(x_adv).float(), y).detach())
        assert out[0][2].count(True) == 1  # one training forward: no natural pass without DER
