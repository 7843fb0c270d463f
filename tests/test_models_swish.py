"""The DM-AT WideResNets (wrn-28-10-swish, wrn-70-16-swish): RobustBench's DMWideResNet layout,
parameter counts, padding, normalisation inside the net, and a Wang2023Better-style import."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import run_cli
from weatcli import checkpoint, zoo
from weatcli.models import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    NORMALIZES_INSIDE,
    DMBlock,
    DMWideResNet,
    NormalizedModel,
    build,
    unwrap,
)

@pytest.fixture(scope="module")
def robustbench_available() -> None:
    """Skip unless robustbench imports; checked when a test needs it, not at collection (its import is slow)."""
    if not zoo.available():
        pytest.skip("robustbench is not importable here (optional extra: pip install 'weat[robustbench]')")


needs_robustbench = pytest.mark.usefixtures("robustbench_available")


def _meta(arch: str, num_classes: int = 10) -> nn.Module:
    with torch.device("meta"):
        return build(arch, num_classes=num_classes)


def _randomised(model: nn.Module, seed: int = 1) -> nn.Module:
    """Random weights and BN statistics, so equal logits mean every tensor landed in its place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)
    return model.eval()


@pytest.mark.parametrize(("arch", "classes", "count"), [
    ("wrn-28-10-swish", 10, 36_479_194),  # RobustBench's Wang2023Better_WRN-28-10 has the same
    ("wrn-28-10-swish", 100, 36_536_884),
    ("wrn-70-16-swish", 10, 266_796_506),  # Wang2023Better_WRN-70-16 / Gowal2020Uncovering_70_16
    ("wrn-70-16-swish", 100, 266_888_756),
])
def test_parameter_counts(arch, classes, count):
    assert sum(p.numel() for p in _meta(arch, classes).parameters()) == count


@pytest.mark.parametrize(("arch", "blocks"), [("wrn-28-10-swish", 4), ("wrn-70-16-swish", 11)])
def test_keys_are_the_public_checkpoints(arch, blocks):
    keys = set(_meta(arch).state_dict())
    for k in ["init_conv.weight",
              "layer.0.block.0.batchnorm_0.weight", "layer.0.block.0.batchnorm_0.running_mean",
              "layer.0.block.0.conv_0.weight", "layer.0.block.0.batchnorm_1.bias", "layer.0.block.0.conv_1.weight",
              "layer.0.block.0.shortcut.weight", "layer.1.block.0.shortcut.weight", "layer.2.block.0.shortcut.weight",
              f"layer.2.block.{blocks - 1}.conv_1.weight", "batchnorm.weight", "batchnorm.running_var",
              "logits.weight", "logits.bias"]:
        assert k in keys, k
    assert f"layer.2.block.{blocks}.conv_0.weight" not in keys
    assert not any(k.startswith("layer.0.block.1.shortcut") for k in keys)  # same width: identity
    assert not any(k in keys for k in ("mean", "std", "normalize.mean"))  # normalisation is not in the state dict


def test_normalisation_is_inside_the_net():
    torch.manual_seed(0)
    net10 = build("wrn-28-10-swish", num_classes=10)
    assert isinstance(net10, DMWideResNet) and "wrn-28-10-swish" in NORMALIZES_INSIDE
    torch.testing.assert_close(net10.mean.flatten(), torch.tensor(CIFAR10_MEAN))
    torch.testing.assert_close(net10.std.flatten(), torch.tensor(CIFAR10_STD))
    net100 = DMWideResNet(16, 2, num_classes=100)  # the same default rule, on a net that is quick to build
    assert net100.mean.flatten().tolist() == pytest.approx(CIFAR100_MEAN)
    assert net100.std.flatten().tolist() == pytest.approx(CIFAR100_STD)
    # Explicit mean/std go into the net (no NormalizedModel wrapper, keys unchanged).
    custom = build("wrn-28-10-swish", num_classes=10, mean=[0.5], std=[0.25])
    assert not isinstance(custom, NormalizedModel)
    assert custom.mean.flatten().tolist() == [0.5] * 3 and custom.std.flatten().tolist() == [0.25] * 3
    assert set(custom.state_dict()) == set(net10.state_dict())


def test_forward_normalises_then_runs_the_net():
    torch.manual_seed(0)
    net = _randomised(DMWideResNet(16, 2, num_classes=10))
    plain = _randomised(DMWideResNet(16, 2, num_classes=10, mean=[0.0] * 3, std=[1.0] * 3))
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(net(x), plain((x - mean) / std), rtol=0, atol=1e-6)
        assert net(x).shape == (4, 10) and net.features(x).shape == (4, 128)


def test_stride_two_pads_right_and_bottom_only():
    """TF 'SAME' at stride 2: windows start at even pixels (0, 2, ...), unlike padding=1 (-1, 1, ...)."""
    torch.manual_seed(0)
    block = _randomised(DMBlock(4, 8, 2))
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        act = F.silu(block.batchnorm_0(x))
        conv0 = F.conv2d(F.pad(act, (0, 1, 0, 1)), block.conv_0.weight, stride=2)
        want = block.shortcut(act) + block.conv_1(F.silu(block.batchnorm_1(conv0)))
        torch.testing.assert_close(block(x), want, rtol=0, atol=0)
        symmetric = F.conv2d(act, block.conv_0.weight, stride=2, padding=1)
        assert symmetric.shape == conv0.shape and not torch.allclose(symmetric, conv0)


def _rb_dm():
    return importlib.import_module("robustbench.model_zoo.architectures.dm_wide_resnet")


@needs_robustbench
@pytest.mark.parametrize(("depth", "width", "classes", "activation"), [
    (28, 10, 10, "silu"),  # Wang2023Better_WRN-28-10
    (16, 2, 100, "swish"),  # Gowal/Rebuffi's custom swish, CIFAR-100 statistics
])
def test_same_logits_as_robustbench_dmwideresnet(depth, width, classes, activation):
    rb = _rb_dm()
    mean, std = (rb.CIFAR100_MEAN, rb.CIFAR100_STD) if classes == 100 else (rb.CIFAR10_MEAN, rb.CIFAR10_STD)
    act = nn.SiLU if activation == "silu" else rb.Swish
    torch.manual_seed(0)
    ref = _randomised(rb.DMWideResNet(num_classes=classes, depth=depth, width=width, activation_fn=act,
                                      mean=mean, std=std))
    ours = DMWideResNet(depth, width, num_classes=classes).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # no renaming
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


@needs_robustbench
def test_70_16_keys_and_shapes_match_robustbench():
    rb = _rb_dm()
    with torch.device("meta"):
        ref = rb.DMWideResNet(num_classes=10, depth=70, width=16, activation_fn=nn.SiLU)
    ours = _meta("wrn-70-16-swish")
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in ref.state_dict().items()}


def test_import_takes_the_public_layout_without_renaming(tmp_path, capsys):
    """A Wang2023Better_WRN-28-10-style file (plain torch.save of the DMWideResNet state dict)."""
    torch.manual_seed(0)
    net = _randomised(build("wrn-28-10-swish", num_classes=10))
    src = tmp_path / "Wang2023Better_WRN-28-10.pt"
    torch.save(net.state_dict(), src)
    code, out, err = run_cli(["import", str(src), "--arch", "wrn-28-10-swish", "--dataset", "cifar10", "--json"], capsys)
    assert code == 0, err
    import json

    summary = json.loads(out)
    assert summary["renamed"] == {} and summary["stripped_prefix"] is None and summary["filled"] == []
    assert summary["parameters"] == 36_479_194
    assert summary["mean"] == pytest.approx(CIFAR10_MEAN) and summary["std"] == pytest.approx(CIFAR10_STD)
    ck = checkpoint.load(summary["checkpoint"])
    assert isinstance(unwrap(ck.model), DMWideResNet) and ck.config.model.arch == "wrn-28-10-swish"
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(ck.model(x), net(x), rtol=0, atol=1e-6)
