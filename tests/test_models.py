"""Architecture registry: shapes, RobustBench key layout, parameter counts, wrappers, errors."""

import pytest
import torch
from torch import nn

from weatcli.errors import WeatInputError
from weatcli.models import ARCHS, Normalize, NormalizedModel, arch_names, build, penultimate, unwrap

# (arch, in_channels, image sizes it is meant for)
INTENDED = [
    ("resnet18", 3, (32, 64)),
    ("resnet18-64", 3, (64,)),
    ("preact-resnet18", 3, (32,)),
    ("wrn-28-10", 3, (32,)),
    ("wrn-34-10", 3, (32,)),
    ("small-cnn", 1, (16,)),
    ("small-cnn", 3, (32,)),
    ("mlp", 1, (16,)),
    ("mlp", 3, (16, 32)),
]

# Small nets that are cheap to run forward on CPU in several tests.
CHEAP = ["small-cnn", "resnet18", "preact-resnet18"]


def _meta(arch: str, num_classes: int = 10, **kw) -> nn.Module:
    # Shapes and keys only: no memory, no init cost (wrn-34-10 has ~46M parameters).
    with torch.device("meta"):
        return build(arch, num_classes=num_classes, **kw)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_covers_design_names():
    assert set(arch_names()) == set(ARCHS)
    for name in ["resnet18", "resnet18-64", "preact-resnet18", "wrn-28-10", "wrn-34-10", "small-cnn"]:
        assert name in ARCHS


@pytest.mark.parametrize(("arch", "channels", "sizes"), INTENDED)
def test_forward_shape_on_intended_sizes(arch, channels, sizes):
    torch.manual_seed(0)
    model = build(arch, num_classes=7, in_channels=channels, image_size=max(sizes)).eval()
    with torch.no_grad():
        for s in sizes:
            x = torch.rand(2, channels, s, s)  # (B, C, H, W) in [0,1]
            logits = model(x)
            assert logits.shape == (2, 7)
            assert torch.isfinite(logits).all()


def test_resnet18_keys_match_robustbench():
    keys = set(_meta("resnet18").state_dict())
    for k in [
        "conv1.weight", "bn1.weight", "bn1.running_mean",
        "layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.0.conv2.weight", "layer1.0.bn2.bias",
        "layer2.0.shortcut.0.weight", "layer2.0.shortcut.1.weight", "layer2.0.shortcut.1.running_var",
        "layer4.1.conv2.weight", "linear.weight", "linear.bias",
    ]:
        assert k in keys, k
    assert not any(k.startswith("layer1.0.shortcut") for k in keys)  # identity shortcut has no weights
    assert keys == set(_meta("resnet18-64").state_dict())


def test_preact_resnet18_keys_match_robustbench():
    keys = set(_meta("preact-resnet18").state_dict())
    for k in [
        "conv1.weight", "layer1.0.bn1.weight", "layer1.0.conv1.weight", "layer1.0.bn2.weight",
        "layer1.0.conv2.weight", "layer2.0.shortcut.0.weight", "bn.weight", "bn.running_mean",
        "linear.weight", "linear.bias",
    ]:
        assert k in keys, k
    assert "bn1.weight" not in keys  # no stem BN in PreAct
    assert not any(k.startswith("layer2.0.shortcut.1") for k in keys)  # preact shortcut is conv only


@pytest.mark.parametrize(("arch", "blocks"), [("wrn-28-10", 4), ("wrn-34-10", 5)])
def test_wrn_keys_match_robustbench(arch, blocks):
    keys = set(_meta(arch).state_dict())
    for k in [
        "conv1.weight", "block1.layer.0.bn1.weight", "block1.layer.0.conv1.weight",
        "block1.layer.0.bn2.running_var", "block1.layer.0.conv2.weight",
        "block1.layer.0.convShortcut.weight", "block2.layer.0.convShortcut.weight",
        "block3.layer.0.convShortcut.weight", "bn1.weight", "fc.weight", "fc.bias",
    ]:
        assert k in keys, k
    assert f"block3.layer.{blocks - 1}.conv2.weight" in keys
    assert f"block3.layer.{blocks}.conv2.weight" not in keys
    assert "block1.layer.1.convShortcut.weight" not in keys  # only where width changes
    assert not any("sub_block1" in k for k in keys)


@pytest.mark.parametrize(
    ("arch", "count"),
    [
        ("resnet18", 11_173_962),
        ("resnet18-64", 11_173_962),
        # RobustBench's PreActResNet with bn_before_fc=True (the layout its zoo checkpoints use);
        # without the final `bn` it would be 1,024 fewer.
        ("preact-resnet18", 11_172_170),
        ("wrn-28-10", 36_479_194),
        ("wrn-34-10", 46_160_474),
    ],
)
def test_parameter_counts_cifar10(arch, count):
    assert _n_params(_meta(arch, num_classes=10)) == count


def test_small_cnn_is_small():
    assert _n_params(build("small-cnn", num_classes=10, in_channels=1, image_size=16)) < 150_000


def test_small_cnn_wide_is_small_cnn_at_four_times_the_channels():
    small = build("small-cnn", num_classes=10, in_channels=1, image_size=16)
    wide = build("small-cnn-wide", num_classes=10, in_channels=1, image_size=16)
    assert list(small.state_dict()) == list(wide.state_dict())  # the same layers and keys
    for key, v in small.state_dict().items():
        w = wide.state_dict()[key]
        # every channel count 4x (the input's and the classes' excepted)
        assert [b // a for a, b in zip(v.shape, w.shape)] == [4 if a != b else 1 for a, b in zip(v.shape, w.shape)], key
    assert _n_params(wide) == 1_482_634
    assert wide(torch.rand(2, 1, 16, 16)).shape == (2, 10)


def test_mlp_is_two_hidden_layers_on_the_flattened_16x16_image():
    torch.manual_seed(0)
    mlp = build("mlp", num_classes=10, in_channels=1, image_size=16).eval()
    # 256 -> 1024 -> 1024 -> 10, weights and biases
    assert _n_params(mlp) == (256 * 1024 + 1024) + (1024 * 1024 + 1024) + (1024 * 10 + 10)
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        feats = penultimate(mlp, x)
        assert feats.shape == (3, 1024) and (feats >= 0).all()  # after a ReLU
        torch.testing.assert_close(mlp.linear(feats), mlp(x))
        # A 32x32 image is averaged down to 16x16 first: the same logits as its 2x2-pooled copy.
        big = torch.rand(3, 1, 32, 32)
        torch.testing.assert_close(mlp(big), mlp(torch.nn.functional.avg_pool2d(big, 2)))


def test_mlp_keeps_its_first_layer_and_classifier_in_fp32_under_autocast():
    from weatcli.models import keep_ends_in_fp32

    torch.manual_seed(0)
    mlp = build("mlp", num_classes=10, in_channels=1, image_size=16).eval()
    keep_ends_in_fp32(mlp)
    seen = {}
    mlp.body[0].register_forward_hook(lambda m, i, o: seen.update(first=o.dtype))
    mlp.body[2].register_forward_hook(lambda m, i, o: seen.update(hidden=o.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = mlp(torch.rand(2, 1, 16, 16))
    assert seen == {"first": torch.float32, "hidden": torch.bfloat16}  # only the ends stay fp32
    assert logits.dtype == torch.float32


def test_build_is_deterministic_given_seed():
    torch.manual_seed(3)
    a = build("small-cnn", num_classes=10, in_channels=1, image_size=16)
    torch.manual_seed(3)
    b = build("small-cnn", num_classes=10, in_channels=1, image_size=16)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        assert torch.equal(va, vb), ka


def test_normalized_model_equals_bare_net_on_normalized_input():
    torch.manual_seed(0)
    model = build("small-cnn", num_classes=5, in_channels=1, image_size=16, mean=[0.5], std=[0.25]).eval()
    assert isinstance(model, NormalizedModel)
    bare = unwrap(model)
    assert isinstance(bare, nn.Module) and not isinstance(bare, NormalizedModel)
    assert bare is model.model

    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), bare((x - 0.5) / 0.25))

    keys = list(model.state_dict())
    assert "normalize.mean" in keys and "normalize.std" in keys  # persistent: checkpoints carry them
    assert all(k.startswith(("normalize.", "model.")) for k in keys)
    assert "model.linear.weight" in keys
    assert model.state_dict()["normalize.mean"].shape == (1, 1, 1, 1)


def test_normalize_per_channel_and_broadcast():
    norm = Normalize([0.1, 0.2, 0.3], [0.5, 0.5, 2.0])
    assert norm.mean.shape == (1, 3, 1, 1) and norm.std.shape == (1, 3, 1, 1)
    x = torch.rand(2, 3, 4, 4)
    mean = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.5, 0.5, 2.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(norm(x), (x - mean) / std)
    # One value for all channels is expanded so the buffer is (1, C, 1, 1) for any C.
    model = build("small-cnn", num_classes=3, in_channels=3, mean=[0.5], std=[0.25])
    assert model.normalize.mean.shape == (1, 3, 1, 1)


def test_build_without_mean_std_returns_bare_net():
    model = build("small-cnn", num_classes=3)
    assert not isinstance(model, NormalizedModel)
    assert unwrap(model) is model


def test_unwrap_strips_compile_and_dataparallel():
    model = build("small-cnn", num_classes=3, in_channels=1, image_size=16, mean=[0.5], std=[0.25])
    compiled = torch.compile(model)  # lazy: nothing is compiled until it is called
    assert unwrap(compiled) is model.model
    assert unwrap(nn.DataParallel(compiled)) is model.model


@pytest.mark.parametrize("arch", CHEAP)
@pytest.mark.parametrize("normalized", [False, True])
def test_penultimate_reproduces_logits(arch, normalized):
    torch.manual_seed(0)
    stats = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]} if normalized else {}
    model = build(arch, num_classes=10, **stats).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        feats = penultimate(model, x)
        assert feats.ndim == 2 and feats.shape[0] == 2
        torch.testing.assert_close(unwrap(model).classifier(feats), model(x))


def test_penultimate_wrn_on_meta_shape():
    model = _meta("wrn-28-10")
    feats = penultimate(model, torch.empty(2, 3, 32, 32, device="meta"))
    assert feats.shape == (2, 640)
    assert model(torch.empty(2, 3, 32, 32, device="meta")).shape == (2, 10)


def test_unknown_arch_names_it_and_lists_valid():
    with pytest.raises(WeatInputError) as err:
        build("resnet999", num_classes=10)
    msg = str(err.value)
    assert "resnet999" in msg and "model.arch" in msg
    assert "\n" not in msg
    for name in arch_names():
        assert name in msg


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"arch": "resnet18", "image_size": 4}, "model.image_size"),
        ({"arch": "small-cnn", "image_size": 2}, "model.image_size"),
        ({"arch": "resnet18", "num_classes": 0}, "model.num_classes"),
        ({"arch": "resnet18", "in_channels": 0}, "model.in_channels"),
        ({"arch": "small-cnn", "mean": [0.5, 0.5], "std": [0.2, 0.2]}, "model.mean"),
        ({"arch": "small-cnn", "mean": [0.5], "std": [0.0]}, "model.std"),
        ({"arch": "small-cnn", "mean": [0.5]}, "model.mean"),
    ],
)
def test_bad_build_arguments_raise_input_error(kwargs, field):
    kwargs = {"num_classes": 10, **kwargs}
    arch = kwargs.pop("arch")
    with pytest.raises(WeatInputError, match=field.replace(".", r"\.")):
        build(arch, **kwargs)


@pytest.mark.parametrize("arch", CHEAP)
def test_channels_last_matches_contiguous(arch):
    torch.manual_seed(0)
    model = build(arch, num_classes=10, mean=[0.5], std=[0.25]).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_channels_last_backward_works():
    # Attacks differentiate w.r.t. the input; flatten (not view) keeps this legal in channels_last.
    model = build("small-cnn", num_classes=10).to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 32, 32).to(memory_format=torch.channels_last).requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x).sum(), x)
    assert grad.shape == x.shape and torch.isfinite(grad).all()


def test_small_cnn_learns_a_toy_task():
    # Two classes: bright top half vs bright bottom half (16x16, 1 channel), noisy.
    g = torch.Generator().manual_seed(0)
    n = 64
    y = torch.randint(0, 2, (n,), generator=g)
    x = 0.3 * torch.rand(n, 1, 16, 16, generator=g)
    x[y == 0, :, :8] += 0.5
    x[y == 1, :, 8:] += 0.5
    torch.manual_seed(0)
    model = build("small-cnn", num_classes=2, in_channels=1, image_size=16, mean=[0.5], std=[0.25])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc >= 0.95
