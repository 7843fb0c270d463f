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
