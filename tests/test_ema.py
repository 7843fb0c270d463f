"""Weight EMA: the DM-AT warm-up rule, convergence to a constant model, batch-norm statistics, exact resume."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from conftest import tiny_config
from weatcli import checkpoint
from weatcli.ema import EMA_PREFIX, WeightEMA, ema_decay
from weatcli.models import build


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build("small-cnn", num_classes=10, in_channels=1, image_size=16, mean=[0.5], std=[0.25])


def _trajectory(steps: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """State dicts of a small net after each of `steps` SGD steps in train mode (BN statistics move too)."""
    net = _net(seed).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    states = []
    for _ in range(steps):
        x, y = torch.rand(16, 1, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        states.append({k: v.clone() for k, v in net.state_dict().items()})
    return states


def _model_at(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    net = _net(99)
    net.load_state_dict(state)
    return net


def test_warm_up_rule():
    # min(tau, (1 + t) / (10 + t)) with t = updates - warmup; a plain copy (decay 0) before the warm-up ends.
    assert [ema_decay(g, 0.995, 5) for g in range(5)] == [0.0] * 5
    assert ema_decay(5, 0.995, 5) == pytest.approx(0.1)
    assert ema_decay(6, 0.995, 5) == pytest.approx(2 / 11)
    assert ema_decay(1, 0.995) == pytest.approx(2 / 11)
    assert ema_decay(100, 0.995) == pytest.approx(101 / 110)
    assert ema_decay(1990, 0.995) == pytest.approx(0.995)  # (1 + t) / (10 + t) >= 0.995 from t = 1790
    assert ema_decay(1789, 0.995) < 0.995 and ema_decay(1791, 0.995) == 0.995
    for g in range(1, 3000, 37):
        assert ema_decay(g, 0.999, 10) == (0.0 if g < 10 else min(0.999, (1 + g - 10) / (10 + g - 10)))


def test_one_update_is_the_reference_arithmetic():
    a, b = _net(1), _net(2)
    ema = WeightEMA(a, decay=0.9)
    d = ema.update(b)
    assert d == pytest.approx(2 / 11) and ema.num_updates == 1
    for (name, pa), pb, pe in zip(a.named_parameters(), b.parameters(), ema.ema_model.parameters()):
        torch.testing.assert_close(pe, d * pa + (1 - d) * pb, rtol=0, atol=1e-7, msg=name)
        assert not pe.requires_grad


def test_during_warm_up_the_average_is_the_model_exactly():
    a, b = _net(1), _net(2)
    ema = WeightEMA(a, warmup_steps=4)
    for _ in range(3):  # updates 1, 2, 3 < 4 copy; update 4 starts the ramp (t = 0: decay 0.1), as in watrain.py
        assert ema.update(b) == 0.0
    for k, v in b.state_dict().items():
        assert torch.equal(ema.ema_model.state_dict()[k], v), k
    assert ema.update(a) == pytest.approx(0.1)


def test_many_updates_with_a_constant_model_equal_it():
    a, b = _net(1), _net(2)
    ema = WeightEMA(a, decay=0.9)
    for _ in range(500):
        ema.update(b)
    # The initial weights' share is prod(decays) < 0.9^400 < 1e-18 by now: what is left is float rounding.
    for (name, pe), pb in zip(ema.ema_model.named_parameters(), b.parameters()):
        torch.testing.assert_close(pe, pb, rtol=2e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("bn", ["copy", "average"])
def test_batch_norm_statistics(bn):
    states = _trajectory(2)
    first, second = _model_at(states[0]), _model_at(states[1])
    ema = WeightEMA(first, decay=0.5, bn=bn)
    d = ema.update(second)
    e, m, f = ema.ema_model.state_dict(), second.state_dict(), first.state_dict()
    stats = [k for k in e if k.endswith(("running_mean", "running_var"))]
    assert stats
    for k in stats:
        want = m[k] if bn == "copy" else d * f[k] + (1 - d) * m[k]
        torch.testing.assert_close(e[k], want, rtol=0, atol=1e-7, msg=k)
    for k in e:
        if k.endswith("num_batches_tracked") or k.startswith("normalize."):
            assert torch.equal(e[k], m[k]), k  # copied in both modes


def test_resume_is_bit_identical_through_a_safetensors_file():
    states = _trajectory(10)
    start = _net(0)
    full = WeightEMA(start, decay=0.8, warmup_steps=2)
    for s in states:
        full.update(_model_at(s))

    part = WeightEMA(start, decay=0.8, warmup_steps=2)
    for s in states[:6]:
        part.update(_model_at(s))
    saved = st_save(part.state_dict())  # as it would sit in last.safetensors
    resumed = WeightEMA(_net(5), decay=0.8, warmup_steps=2)  # a new process, another starting model
    resumed.load_state_dict(st_load(saved))
    for s in states[6:]:
        resumed.update(_model_at(s))
    assert resumed.num_updates == full.num_updates == 10
    for k, v in full.ema_model.state_dict().items():
        assert torch.equal(resumed.ema_model.state_dict()[k], v), k


def test_copy_to_and_checkpoint_layout(tmp_path):
    a, b = _net(1), _net(2)
    ema = WeightEMA(a)
    ema.update(b)
    assert set(ema.ema_model.state_dict()) == set(a.state_dict())
    target = _net(3)
    ema.copy_to(target)
    for k, v in ema.ema_model.state_dict().items():
        assert torch.equal(target.state_dict()[k], v)
    # The EMA state rides along in a weat checkpoint under state/ema/ and does not disturb loading.
    cfg = tiny_config(**{"model.mean": [0.5], "model.std": [0.25]})
    meta = checkpoint.model_metadata(cfg, num_classes=10, in_channels=1, image_size=16, epoch=1)
    sd = checkpoint.state_dict_of(ema.ema_model)
    state = ema.state_dict()
    assert all(k.startswith(EMA_PREFIX) for k in state)
    checkpoint.save(tmp_path / "last.safetensors", {**sd, **state}, meta)
    ck = checkpoint.load(tmp_path / "last.safetensors")
    assert set(ck.extra) == set(state) and int(ck.extra[f"{EMA_PREFIX}num_updates"]) == 1
    x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ck.model(x), ema.ema_model(x), rtol=0, atol=0)


def test_a_different_model_is_refused():
    ema = WeightEMA(_net(1))
    with pytest.raises(ValueError, match="lacks"):
        ema.update(build("resnet18", num_classes=10))
