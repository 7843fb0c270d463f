"""AWP: layer-wise relative perturbation of conv/linear weights, computed on a proxy as the authors'
code does, and removed bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from weatcli import awp
from weatcli.errors import WeatInputError
from weatcli.models import build


def _net(seed: int = 0, arch: str = "small-cnn") -> torch.nn.Module:
    torch.manual_seed(seed)
    channels = 1 if arch == "small-cnn" else 3
    size = 16 if arch == "small-cnn" else 32
    return build(arch, num_classes=10, in_channels=channels, image_size=size, mean=[0.5], std=[0.25]).train()


def _batch(seed: int = 1, channels: int = 1, size: int = 16):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(12, channels, size, size, generator=g)
    x_adv = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return x, x_adv, torch.randint(0, 10, (12,), generator=g)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_only_conv_and_linear_weights_are_perturbed_relative_to_their_norm():
    model = _net()
    x, x_adv, y = _batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    diff = awp.perturb(model, awp.trades_objective(x, x_adv, y, beta=6.0), gamma=5e-3)
    # The model itself (weights and BN statistics) is untouched: the work happened on the proxy.
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    names = set(diff.deltas)
    assert names == {"model.body.0.0.weight", "model.body.1.0.weight", "model.body.2.0.weight", "model.linear.weight"}
    params = dict(model.named_parameters())
    for n, v in diff.deltas.items():
        assert v.shape == params[n].shape
        torch.testing.assert_close(v.norm(), 5e-3 * params[n].norm(), rtol=1e-5, atol=0)
    awp.add(model, diff)
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n in names), n  # BN weights/biases and the linear bias stay


def test_same_perturbation_as_the_reference_proxy_sgd_step():
    """The authors' recipe, written out: load a proxy, one plain SGD step on -objective, diff = new - old,
    rescaled per weight to ||w|| / (||diff|| + 1e-20), times gamma."""
    model = _net(3)
    x, x_adv, y = _batch(4)
    # lr only sets how far the proxy moves (it cancels in the rescaling); a large one keeps new - old
    # clear of float cancellation against w (at lr = 0.1 the reference's diff is off by a few 1e-6 of
    # its largest entry, too much for an elementwise rtol on the small entries).
    beta, gamma, lr = 6.0, 5e-3, 100.0
    proxy = copy.deepcopy(model).train()
    opt = torch.optim.SGD(proxy.parameters(), lr=lr)
    nat = proxy(x)
    loss = -(F.cross_entropy(nat, y) + beta * F.kl_div(F.log_softmax(proxy(x_adv), dim=1), F.softmax(nat, dim=1),
                                                         reduction="batchmean"))
    opt.zero_grad()
    loss.backward()
    opt.step()
    old, new = model.state_dict(), proxy.state_dict()
    want = {}
    for k in old:
        if old[k].ndim > 1 and "weight" in k:
            d = new[k] - old[k]
            want[k] = gamma * old[k].norm() / (d.norm() + 1e-20) * d
    got = awp.perturb(model, awp.trades_objective(x, x_adv, y, beta), gamma).deltas
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-9, msg=k)


def test_the_objective_goes_up_under_the_perturbation():
    model = _net(5)
    x, x_adv, y = _batch(6)
    objective = awp.ce_objective(x_adv, y)
    probe = copy.deepcopy(model).train()
    with torch.no_grad():
        before = float(objective(copy.deepcopy(probe)))
    diff = awp.perturb(model, objective, gamma=1e-2)
    awp.add(probe, diff)
    with torch.no_grad():
        after = float(objective(probe))
    assert after > before


def test_restore_is_bit_identical_after_a_training_backward():
    model = _net(7)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x, x_adv, y = _batch(8)
    proxy = awp.make_proxy(model)
    original = _params(model)
    diff = awp.perturb(model, awp.trades_objective(x, x_adv, y, 6.0), gamma=5e-3, proxy=proxy)
    awp.add(model, diff)
    # Subtracting would not give the weights back: (w + v) - v != w somewhere in float32.
    params = dict(model.named_parameters())
    assert any(not torch.equal((params[n] - diff.deltas[n]).detach(), original[n]) for n in diff.deltas)
    opt.zero_grad()
    F.cross_entropy(model(x_adv), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    awp.restore(model, diff)
    for n, p in model.named_parameters():
        assert torch.equal(p, original[n]), n
        assert torch.equal(p.grad, grads[n]), n  # the gradient at w + v survives the restore
    opt.step()
    with pytest.raises(RuntimeError, match="not applied"):
        awp.restore(model, diff)


def test_restore_after_an_optimizer_step_is_refused():
    model = _net(9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, x_adv, y = _batch(10)
    diff = awp.perturb(model, awp.ce_objective(x_adv, y))
    awp.add(model, diff)
    F.cross_entropy(model(x_adv), y).backward()
    opt.step()
    with pytest.raises(RuntimeError, match="before optimizer.step"):
        awp.restore(model, diff)


def test_a_reused_proxy_gives_the_same_perturbation():
    model = _net(11)
    x, x_adv, y = _batch(12)
    objective = awp.trades_objective(x, x_adv, y, 6.0)
    proxy = awp.make_proxy(_net(99))  # stale weights: perturb loads the model's state first
    fresh = awp.perturb(model, objective)
    reused = awp.perturb(model, objective, proxy=proxy)
    for n in fresh.deltas:
        assert torch.equal(fresh.deltas[n], reused.deltas[n]), n


def test_gamma_zero_changes_nothing_and_methods_map_to_objectives():
    model = _net(13)
    x, x_adv, y = _batch(14)
    before = _params(model)
    diff = awp.perturb(model, awp.ce_objective(x_adv, y), gamma=0.0)
    awp.add(model, diff)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    awp.restore(model, diff)
    net = _net(15).eval()
    with torch.no_grad():
        assert float(awp.objective_for("pgd-at", x, x_adv, y, beta=6.0)(net)) == pytest.approx(
            float(F.cross_entropy(net(x_adv), y)))
        for method in awp.TRADES_FAMILY:
            assert float(awp.objective_for(method, x, x_adv, y, beta=6.0)(net)) == pytest.approx(
                float(awp.trades_objective(x, x_adv, y, 6.0)(net)))
    for method in ("standard", "mart"):
        with pytest.raises(WeatInputError, match="AWP"):
            awp.objective_for(method, x, x_adv, y, beta=6.0)


def test_swish_wrn_weights_are_found():
    names = awp.perturbed_names(build("wrn-28-10-swish", num_classes=10))
    assert "init_conv.weight" in names and "logits.weight" in names and "layer.0.block.0.shortcut.weight" in names
    assert not any("batchnorm" in n or n.endswith("bias") for n in names)
    assert len(names) == 1 + 3 * 4 * 2 + 3 + 1  # stem, two convs per block, three shortcuts, head
