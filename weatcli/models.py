"""Architecture registry: CIFAR ResNet-18, PreAct ResNet-18, WideResNets (ReLU, and the SiLU ones of
the DM-AT works) and a small digits net.

Every model's forward takes [0,1] images (B, C, H, W) and returns logits (B, K); normalisation is
a layer inside the model (RobustBench convention) so attacks work in pixel space and eps means
what it says. State-dict keys match RobustBench's model zoo, so its checkpoints load unchanged.

Each bare net has `features(x) -> (B, D)` (the input to its last linear layer) and a `classifier`
property (that layer), with forward(x) = classifier(features(x)); `penultimate` relies on this.
Global pooling is adaptive everywhere, so one net serves 32x32 CIFAR and 64x64 Tiny-ImageNet.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from weatcli.errors import WeatInputError

__all__ = [
    "ARCHS",
    "DMWideResNet",
    "NORMALIZES_INSIDE",
    "Normalize",
    "NormalizedModel",
    "arch_names",
    "build",
    "penultimate",
    "unwrap",
]


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)


def _pool(x: torch.Tensor) -> torch.Tensor:
    # (B, C, H, W) -> (B, C); flatten (not view) so channels_last tensors work.
    return F.adaptive_avg_pool2d(x, 1).flatten(1)


# --- ResNet-18 (kuangliu / RobustBench "Standard" keys) --------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        # An empty Sequential keeps the key layout "shortcut.0 / shortcut.1" of the reference code.
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(_conv1x1(c_in, c_out, stride), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        # PreAct shortcut is a bare conv on the pre-activated input (no BN), as in RobustBench.
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(_conv1x1(c_in, c_out, stride))
        else:
            self.shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stride-1 stem, no max-pool, four stages of widths 64..512.

    `preact=True` gives PreAct ResNet (He et al. 2016b): blocks start with BN-ReLU and a final
    `bn` precedes the pooling; otherwise the stem has `bn1` and blocks end with ReLU.
    """

    def __init__(
        self,
        num_blocks: Sequence[int] = (2, 2, 2, 2),
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        preact: bool = False,
    ):
        super().__init__()
        self.preact = preact
        block = PreActBlock if preact else BasicBlock
        self.conv1 = _conv3x3(in_channels, 64)
        if not preact:
            self.bn1 = nn.BatchNorm2d(64)
        widths, c_in = (64, 128, 256, 512), 64
        for i, (width, n) in enumerate(zip(widths, num_blocks)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(block(c_in, width, stride if j == 0 else 1))
                c_in = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        if preact:
            self.bn = nn.BatchNorm2d(c_in)
        self.linear = nn.Linear(c_in, num_classes)

    @property
    def classifier(self) -> nn.Linear:
        return self.linear

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.preact:
            out = F.relu(self.bn(out))
        return _pool(out)  # (B, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


# --- WideResNet (RobustBench model_zoo.architectures.wide_resnet keys) ----------------------


class WideBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        # The reference code's name; it exists only where the width or resolution changes.
        self.convShortcut = _conv1x1(c_in, c_out, stride) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        # Where shapes change the shortcut sees the pre-activated input, as in RobustBench.
        skip = x if self.convShortcut is None else self.convShortcut(act)
        return out + skip


class NetworkBlock(nn.Module):
    def __init__(self, n: int, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            *(WideBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1) for i in range(n))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-width (Zagoruyko & Komodakis 2016), no dropout, no TRADES `sub_block1`."""

    def __init__(self, depth: int = 28, widen: int = 10, *, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6  # blocks per group: 4 for depth 28, 5 for depth 34
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        # RobustBench's init: conv weights N(0, 2/(k*k*out)) = Kaiming fan_out; zero linear bias.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.fc.bias)

    @property
    def classifier(self) -> nn.Linear:
        return self.fc

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return _pool(F.relu(self.bn1(out)))  # (B, 64 * widen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


# --- DM-AT WideResNet with SiLU (RobustBench model_zoo.architectures.dm_wide_resnet keys) ----
#
# The WideResNets of Gowal et al. 2021 ("Uncovering the limits..."), Rebuffi et al. 2021 ("Fixing
# data augmentation...") and Wang et al. 2023 ("Better diffusion models further improve adversarial
# training"): DeepMind's JAX design ported to PyTorch, as RobustBench's `DMWideResNet` holds it.
# What differs from the WideResNet above, and is matched here (docs/science.md#beyond-the-paper):
#   * SiLU (x * sigmoid(x), "swish") instead of ReLU; Gowal/Rebuffi use a custom autograd swish and
#     Wang 2023 nn.SiLU: the same function and derivative;
#   * TensorFlow "SAME" padding: the first 3x3 conv of a block has padding=0 and its input is padded
#     by hand, (1, 1, 1, 1) at stride 1 and (0, 1, 0, 1) (right and bottom only) at stride 2, so a
#     stride-2 conv samples windows starting at even pixels (PyTorch's padding=1 would start at -1);
#   * normalisation inside the net as non-persistent buffers (they are not in the state dict, so
#     public checkpoints carry none): CIFAR-10 statistics, CIFAR-100's for 100 classes (as in the
#     RobustBench CIFAR-100 entries), or model.mean/model.std when given;
#   * no input padding: DMWideResNet's `padding` argument (zero-padding of the input, for 28x28
#     MNIST in DeepMind's code) is 0 in every RobustBench CIFAR entry;
#   * names: init_conv, layer.<group>.block.<i>.{batchnorm_0, conv_0, batchnorm_1, conv_1, shortcut},
#     batchnorm, logits.
# The pooling is adaptive where the reference uses avg_pool2d(8): the same on 32x32 inputs (an 8x8 map).

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


class DMBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"DMBlock: stride must be 1 or 2, got {stride}")
        self.stride = stride
        self.batchnorm_0 = nn.BatchNorm2d(c_in)
        self.conv_0 = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(c_out)
        self.conv_1 = _conv3x3(c_out, c_out)
        self.shortcut = _conv1x1(c_in, c_out, stride) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.silu(self.batchnorm_0(x))
        # TF "SAME": total padding 2 at stride 1 (split evenly), 1 at stride 2 (all after).
        pad = (1, 1, 1, 1) if self.stride == 1 else (0, 1, 0, 1)
        out = self.conv_1(F.silu(self.batchnorm_1(self.conv_0(F.pad(act, pad)))))
        # Where shapes change the shortcut sees the pre-activated input, as in the reference.
        skip = x if self.shortcut is None else self.shortcut(act)
        return skip + out


class DMBlockGroup(nn.Module):
    def __init__(self, n: int, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.block = nn.Sequential(
            *(DMBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1) for i in range(n))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DMWideResNet(nn.Module):
    """WRN-depth-width with SiLU, TF-style padding and its own input normalisation (see above)."""

    def __init__(self, depth: int = 28, widen: int = 10, *, num_classes: int = 10, in_channels: int = 3,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        if mean is None or std is None:
            mean, std = dm_default_normalization(num_classes, in_channels)
        # (1, C, 1, 1); persistent=False as in the reference: checkpoints carry no normalisation.
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)
        n = (depth - 4) // 6  # blocks per group: 4 for depth 28, 11 for depth 70
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.init_conv = _conv3x3(in_channels, widths[0])
        self.layer = nn.Sequential(
            DMBlockGroup(n, widths[0], widths[1], 1),
            DMBlockGroup(n, widths[1], widths[2], 2),
            DMBlockGroup(n, widths[2], widths[3], 2),
        )
        self.batchnorm = nn.BatchNorm2d(widths[3])
        self.logits = nn.Linear(widths[3], num_classes)
        # No custom initialisation: the reference DMWideResNet keeps PyTorch's defaults.

    @property
    def classifier(self) -> nn.Linear:
        return self.logits

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(self.init_conv((x - self.mean) / self.std))
        return _pool(F.silu(self.batchnorm(out)))  # (B, 64 * widen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(x))

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def dm_default_normalization(num_classes: int, in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation a DM WideResNet applies when model.mean/model.std are not given: CIFAR-100's
    statistics for 100 classes (RobustBench's CIFAR-100 entries), else CIFAR-10's; identity for
    inputs that are not RGB (the CIFAR statistics mean nothing there)."""
    if in_channels != 3:
        return (0.0,) * in_channels, (1.0,) * in_channels
    return (CIFAR100_MEAN, CIFAR100_STD) if num_classes == 100 else (CIFAR10_MEAN, CIFAR10_STD)


# --- small CNN for the 16x16 digits set ------------------------------------------------------


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU stages (32, 64, 128 channels times `width`; two stride-2), ~95k parameters
    at width 1.

    Small enough to adversarially train on a CPU in seconds, yet BN keeps it easy to optimise. At
    width 4 (`small-cnn-wide`, ~1.5M parameters) it has the capacity to memorise a small training
    set adversarially, which robust overfitting needs.
    """

    def __init__(self, *, num_classes: int = 10, in_channels: int = 1, width: int = 1):
        super().__init__()
        chans = (in_channels, 32 * width, 64 * width, 128 * width)
        strides = (1, 2, 2)
        self.body = nn.Sequential(
            *(
                nn.Sequential(
                    _conv3x3(chans[i], chans[i + 1], strides[i]), nn.BatchNorm2d(chans[i + 1]), nn.ReLU()
                )
                for i in range(3)
            )
        )
        self.linear = nn.Linear(chans[-1], num_classes)

    @property
    def classifier(self) -> nn.Linear:
        return self.linear

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return _pool(self.body(x))  # (B, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


class MLP(nn.Module):
    """Two hidden ReLU layers of `width` units on the flattened image, resampled to `side` x `side`
    first (a no-op on digits' 16x16), ~1.3M parameters at width 1024 on one channel.

    No convolution and no pooling: nothing ties the weights to the image's structure, so it can
    fit a small training set by rote, the capacity robust overfitting is said to need. On digits it
    is also the fastest net to train adversarially on a CPU.
    """

    def __init__(self, *, num_classes: int = 10, in_channels: int = 1, width: int = 1024, side: int = 16):
        super().__init__()
        self.side = side
        self.body = nn.Sequential(
            nn.Linear(in_channels * side * side, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()
        )
        self.linear = nn.Linear(width, num_classes)

    @property
    def classifier(self) -> nn.Linear:
        return self.linear

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.side, self.side):
            x = F.adaptive_avg_pool2d(x, self.side)
        return self.body(x.flatten(1))  # (B, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


# --- registry ---------------------------------------------------------------------------------


def _resnet18(*, num_classes: int, in_channels: int = 3) -> nn.Module:
    return ResNet((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels)


def _preact_resnet18(*, num_classes: int, in_channels: int = 3) -> nn.Module:
    return ResNet((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, preact=True)


def _wrn(depth: int) -> Callable[..., nn.Module]:
    def make(*, num_classes: int, in_channels: int = 3) -> nn.Module:
        return WideResNet(depth, 10, num_classes=num_classes, in_channels=in_channels)

    make.__name__ = f"wrn_{depth}_10"
    return make


def _dm_wrn(depth: int, widen: int) -> Callable[..., nn.Module]:
    def make(*, num_classes: int, in_channels: int = 3, mean: Sequence[float] | None = None,
             std: Sequence[float] | None = None) -> nn.Module:
        return DMWideResNet(depth, widen, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)

    make.__name__ = f"wrn_{depth}_{widen}_swish"
    return make


ARCHS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": _resnet18,
    # Same net and keys: adaptive pooling makes it size-agnostic; the name documents intent.
    "resnet18-64": _resnet18,
    "preact-resnet18": _preact_resnet18,
    "wrn-28-10": _wrn(28),
    "wrn-34-10": _wrn(34),
    # DM-AT nets (Gowal 2021, Rebuffi 2021, Wang 2023): normalisation inside, as model.mean/std say.
    "wrn-28-10-swish": _dm_wrn(28, 10),
    "wrn-70-16-swish": _dm_wrn(70, 16),
    "small-cnn": SmallCNN,
    "small-cnn-wide": functools.partial(SmallCNN, width=4),
    "mlp": MLP,
}

# Archs whose net normalises its input itself (RobustBench's DMWideResNet): build() hands
# model.mean/model.std to the net instead of wrapping it in NormalizedModel.
NORMALIZES_INSIDE = frozenset({"wrn-28-10-swish", "wrn-70-16-swish"})

# Smallest square input (pixels) each arch accepts: the stride-8 ResNets/WRNs would pool a
# single pixel below 8, and the stride-4 small net below 4; the MLP resamples any size to 16x16.
_MIN_IMAGE_SIZE: dict[str, int] = {
    "resnet18": 8,
    "resnet18-64": 8,
    "preact-resnet18": 8,
    "wrn-28-10": 8,
    "wrn-34-10": 8,
    "wrn-28-10-swish": 8,
    "wrn-70-16-swish": 8,
    "small-cnn": 4,
    "small-cnn-wide": 4,
    "mlp": 1,  # any size: resampled to 16x16
}


def arch_names() -> list[str]:
    return list(ARCHS)


class Normalize(nn.Module):
    """(x - mean) / std per channel; mean and std are persistent buffers so checkpoints carry them."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        # (1, C, 1, 1) so they broadcast over (B, C, H, W)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class NormalizedModel(nn.Module):
    """[0,1] images -> normalize -> model; keys are "normalize.mean" and "model.<net key>"."""

    def __init__(self, model: nn.Module, normalize: Normalize):
        super().__init__()
        self.normalize = normalize
        self.model = model

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


def _per_channel(field: str, values: Sequence[float], in_channels: int) -> list[float]:
    try:
        vals = [float(v) for v in values]
    except (TypeError, ValueError):
        raise WeatInputError(f"{field}: {values!r} is not a list of numbers") from None
    if len(vals) == 1:
        vals = vals * in_channels  # one value for every channel
    if len(vals) != in_channels:
        raise WeatInputError(f"{field}: got {len(vals)} values; expected 1 or in_channels={in_channels}")
    return vals


def build(
    arch: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """The net for `arch`, taking [0,1] images (B, in_channels, image_size, image_size) to (B, num_classes).

    With mean and std (one value, or one per channel) the net is wrapped in NormalizedModel;
    without them the bare net is returned. The DM WideResNets (NORMALIZES_INSIDE) always normalise
    inside the net itself: with mean/std as given, else `dm_default_normalization`. Weights come from
    torch's global RNG (seed it first).
    """
    key = arch.strip().lower() if isinstance(arch, str) else None
    if key not in ARCHS:
        if isinstance(arch, str) and arch.startswith("robustbench:"):
            raise WeatInputError(f"model.arch: {arch!r} is a RobustBench zoo entry: only checkpoints made by "
                                 f"'weat import --robustbench' use it; expected one of {', '.join(ARCHS)}")
        raise WeatInputError(f"model.arch: unknown {arch!r}; expected one of {', '.join(ARCHS)}")
    for field, value in (("model.num_classes", num_classes), ("model.in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise WeatInputError(f"{field}: {value!r}; expected a positive integer")
    min_size = _MIN_IMAGE_SIZE[key]
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < min_size:
        raise WeatInputError(
            f"model.image_size: {image_size!r} is too small for {key!r}; expected an integer >= {min_size}"
        )
    if (mean is None) != (std is None):
        raise WeatInputError("model.mean/model.std: give both or neither")

    if mean is None:
        return ARCHS[key](num_classes=num_classes, in_channels=in_channels)
    mean_c = _per_channel("model.mean", mean, in_channels)
    std_c = _per_channel("model.std", std, in_channels)
    if any(not s > 0 for s in std_c):  # also rejects NaN
        raise WeatInputError(f"model.std: {std_c}; expected every value > 0")
    if key in NORMALIZES_INSIDE:  # the net's own (non-persistent) normalisation, keys as published
        return ARCHS[key](num_classes=num_classes, in_channels=in_channels, mean=mean_c, std=std_c)
    return NormalizedModel(ARCHS[key](num_classes=num_classes, in_channels=in_channels), Normalize(mean_c, std_c))


def strip_wrappers(model: nn.Module) -> nn.Module:
    # DDP / DataParallel keep the net in .module, torch.compile in ._orig_mod.
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def unwrap(model: nn.Module) -> nn.Module:
    """The bare net inside DDP / DataParallel, torch.compile and NormalizedModel."""
    model = strip_wrappers(model)
    while isinstance(model, NormalizedModel):
        model = strip_wrappers(model.model)
    return model


def penultimate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Features that feed the final linear layer, (B, D), for [0,1] images x (B, C, H, W)."""
    net = strip_wrappers(model)
    if not callable(getattr(net, "features", None)):
        raise TypeError(f"{type(net).__name__} has no features(x) method")
    return net.features(x)


# ----------------------------------------------------------------------------- mixed precision


class _FullPrecisionConv2d(nn.Conv2d):
    """A Conv2d that runs in fp32 even inside an autocast region."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


class _FullPrecisionLinear(nn.Linear):
    """A Linear that runs in fp32 even inside an autocast region."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


_FULL_PRECISION: dict[type, type] = {nn.Conv2d: _FullPrecisionConv2d, nn.Linear: _FullPrecisionLinear}


def keep_ends_in_fp32(model: nn.Module) -> nn.Module:
    """Under bf16/fp16 autocast, run the first convolution (the MLP: its first layer) and the
    classifier in fp32, in place: same parameters, same state_dict keys; together well under 1% of
    a ResNet's FLOPs.

    Why: bf16 has 8 significant bits. The images fed to the stem are rounded to steps of up to
    2^-8 (swallowing TRADES's x + 0.001 N(0,1) start and blurring small perturbations), and logits
    near 5 to steps of 0.03, too coarse for the small KL the training attack ascends. Measured on
    digits (WEAT, 40 epochs, seeds 0-2, best held-out PGD accuracy): fp32 73.9 / 74.2 / 74.7%,
    bf16 71.7 / 73.6 / 72.2%, bf16 with the classifier alone in fp32 72.5 / 72.8 / 72.5%, bf16 with
    both ends in fp32 74.2 / 74.7 / 74.4%.
    """
    net = unwrap(model)
    head = getattr(net, "classifier", None)
    # The stem: the first convolution, or the first linear layer of a net without any (the MLP).
    convs = [m for m in net.modules() if type(m) is nn.Conv2d]
    stem = convs[0] if convs else next((m for m in net.modules() if type(m) is nn.Linear and m is not head), None)
    for layer in (stem, head):
        if type(layer) in _FULL_PRECISION:
            layer.__class__ = _FULL_PRECISION[type(layer)]
    return model
