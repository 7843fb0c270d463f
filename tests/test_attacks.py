from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from weatcli.attacks import attack_mode, cw_objective, pgd, pgd_restarts


def _model(seed=0, in_ch=1, k=10) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(in_ch, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, k))


def _batch(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("linf", 0.3), ("l2", 0.5), ("l2", 3.0)])
@pytest.mark.parametrize("objective", ["ce", "cw", "kl"])
@pytest.mark.parametrize("init", ["uniform", "normal", "none"])
def test_eps_ball_and_pixel_range_respected(norm, eps, objective, init):
    model, (x, y) = _model(), _batch()
    with attack_mode(model):
        p_nat = F.softmax(model(x), 1)
        x_adv = pgd(model, x, y, eps=eps, step_size=eps / 2, steps=5, norm=norm, objective=objective, init=init,
                    p_nat=p_nat, generator=torch.Generator().manual_seed(0))
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-6).all()
    if init != "none" or objective != "kl":  # KL at x itself has zero gradient: nothing moves from there
        assert (size > 0).any()


def test_loss_rises_under_attack_and_accuracy_falls():
    model, (x, y) = _model(), _batch(64)
    model.eval()
    y = model(x).argmax(1).detach()  # start from points the model gets right
    with attack_mode(model):
        x_adv = pgd(model, x, y, eps=0.1, step_size=0.02, steps=10, generator=torch.Generator().manual_seed(0))
        clean_loss = F.cross_entropy(model(x), y, reduction="none")
        adv_loss = F.cross_entropy(model(x_adv), y, reduction="none")
        adv_acc = (model(x_adv).argmax(1) == y).float().mean()
    assert (adv_loss >= clean_loss - 1e-6).all() and adv_loss.mean() > clean_loss.mean() + 0.1
    assert adv_acc < 1.0


def test_targeted_pgd_moves_predictions_to_the_target():
    model, (x, _) = _model(), _batch(64)
    target = torch.full((64,), 3)
    with attack_mode(model):
        before = (model(x).argmax(1) == 3).float().mean()
        x_adv = pgd(model, x, target, eps=0.5, step_size=0.05, steps=30, targeted=True, init="none")
        after = (model(x_adv).argmax(1) == 3).float().mean()
    assert after > 0.9 and after > before


def test_eps_zero_changes_nothing():
    model, (x, y) = _model(), _batch()
    with attack_mode(model):
        x_adv = pgd(model, x, y, eps=0.0, step_size=0.01, steps=3)
    torch.testing.assert_close(x_adv, x)


def test_attack_mode_freezes_weights_and_restores_state():
    model, (x, y) = _model(), _batch()
    model.train()
    running = model[1].running_mean.clone()
    with attack_mode(model):
        assert not model.training and all(not p.requires_grad for p in model.parameters())
        pgd(model, x, y, eps=0.1, step_size=0.05, steps=2, generator=torch.Generator().manual_seed(0))
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())  # no weight gradients were computed
    torch.testing.assert_close(model[1].running_mean, running)  # eval mode: BN statistics untouched


def test_same_generator_seed_same_points():
    model, (x, y) = _model(), _batch()
    with attack_mode(model):
        a = pgd(model, x, y, eps=0.1, step_size=0.05, steps=2, generator=torch.Generator().manual_seed(5))
        b = pgd(model, x, y, eps=0.1, step_size=0.05, steps=2, generator=torch.Generator().manual_seed(5))
        c = pgd(model, x, y, eps=0.1, step_size=0.05, steps=2, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cw_margin_and_restarts_never_hurt():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0]])
    torch.testing.assert_close(cw_objective(logits, torch.tensor([0, 1]), None), torch.tensor([-2.0, 3.0]))
    model, (x, y) = _model(), _batch(64)
    with attack_mode(model):
        one = pgd_restarts(model, x, y, restarts=1, eps=0.05, step_size=0.01, steps=3, generator=torch.Generator().manual_seed(0))
        four = pgd_restarts(model, x, y, restarts=4, eps=0.05, step_size=0.01, steps=3, generator=torch.Generator().manual_seed(0))
        acc1 = (model(one).argmax(1) == y).sum()
        acc4 = (model(four).argmax(1) == y).sum()
    assert acc4 <= acc1
    assert ((four - x).abs() <= 0.05 + 1e-6).all()
