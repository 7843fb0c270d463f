"""Weight EMA (model weight averaging) with warm-up, as the DM-AT works train and report it.

Gowal et al. 2020/2021, Rebuffi et al. 2021 and Wang et al. 2023 evaluate an exponential moving
average of the weights, taken after every optimizer step. The public code of Wang et al. 2023
(wzekai99/DM-Improves-AT, gowal21uncovering/utils/watrain.py, `ema_update`) does, with g the number
of optimizer steps taken so far (1 after the first) and w the warm-up steps:

    decay_g = 0                                              for g < w   (the average is the model)
    decay_g = min(tau, (1 + t) / (10 + t)),  t = g - w        for g >= w
    ema <- decay_g * ema + (1 - decay_g) * weights

tau = 0.995 there (train-wa.py's --tau default, with batch 1024) and w = 2.5% of all training steps
(WATrainer.warmup_steps = 0.025 * epochs * steps per epoch). The
(1 + t) / (10 + t) ramp is TensorFlow's `tf.train.ExponentialMovingAverage(num_updates=...)` rule,
which DeepMind's JAX code followed: an average that starts from a few recent models instead of
being dominated for thousands of steps by the random initial weights.

Batch-norm statistics: the reference averages parameters only and then copies the live model's
running_mean / running_var / num_batches_tracked into the averaged model (`update_bn`, at the end
of every epoch). `WeightEMA(bn="copy")` (the default) does the same, after every update, which leaves
the same statistics at every epoch end and makes a mid-epoch state consistent. Neither choice is
exact for the averaged weights (that would need the statistics recomputed on data for them, as
SWA's update_bn does); copying reproduces the published recipe. `bn="average"` averages the running
statistics with the weights' decay instead (timm's ModelEmaV2 convention: every float buffer
averaged); num_batches_tracked and any other buffer (e.g. a Normalize layer's mean/std) are copied.

Exact resume: `state_dict()` holds the averaged tensors and the update count; loading it into a
fresh WeightEMA and feeding it the same models gives bit-identical averages. In a weat
`last.safetensors` the tensors go under `state/ema/` (STATE_PREFIX), which `checkpoint.load` keeps
apart from the model's weights.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

from .models import strip_wrappers

EMA_PREFIX = "state/ema/"
_BN_STATS = ("running_mean", "running_var")


def ema_decay(num_updates: int, decay: float, warmup_steps: int = 0) -> float:
    """The decay used by update number `num_updates` (1 for the first update); see the module doc."""
    if num_updates < warmup_steps:
        return 0.0
    t = num_updates - warmup_steps
    return min(decay, (1.0 + t) / (10.0 + t))


class WeightEMA:
    """An exponential moving average of `model`'s parameters (and batch-norm statistics, per `bn`).

    model: the live model (DDP / torch.compile wrappers are looked through); the average starts as a
    deep copy of it, in eval mode with gradients off: `ema_model`.
    decay: tau, the decay once the ramp (1 + t) / (10 + t) has passed it (0.995 in the DM-AT code).
    warmup_steps: updates before which the average just copies the model.
    """

    def __init__(self, model: nn.Module, decay: float = 0.995, *, warmup_steps: int = 0,
                 bn: Literal["copy", "average"] = "copy"):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"WeightEMA: decay must be in [0, 1), got {decay}")
        if warmup_steps < 0:
            raise ValueError(f"WeightEMA: warmup_steps must be >= 0, got {warmup_steps}")
        if bn not in ("copy", "average"):
            raise ValueError(f"WeightEMA: bn must be 'copy' or 'average', got {bn!r}")
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.bn = bn
        self.num_updates = 0
        self._ema = copy.deepcopy(strip_wrappers(model)).eval()
        for p in self._ema.parameters():
            p.requires_grad_(False)
        self._param_names = [n for n, _ in self._ema.named_parameters()]
        averaged = [n for n, b in self._ema.named_buffers() if bn == "average" and n.endswith(_BN_STATS)
                    and b.is_floating_point()]
        self._avg_buffer_names = averaged
        self._copy_buffer_names = [n for n, _ in self._ema.named_buffers() if n not in set(averaged)]

    @property
    def ema_model(self) -> nn.Module:
        """The averaged model (eval mode, no gradients); same keys as the live model's state_dict."""
        return self._ema

    def _tensors(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        net = strip_wrappers(model)
        params, buffers = dict(net.named_parameters()), dict(net.named_buffers())
        missing = [n for n in self._param_names if n not in params]
        missing += [n for n in self._avg_buffer_names + self._copy_buffer_names if n not in buffers]
        if missing:
            raise ValueError(f"WeightEMA: the model lacks {missing[:3]}: not the model this average was made from")
        return params, buffers

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """One update from the live model, after its optimizer step. Returns the decay used."""
        params, buffers = self._tensors(model)
        self.num_updates += 1
        d = ema_decay(self.num_updates, self.decay, self.warmup_steps)
        ema_params, ema_buffers = dict(self._ema.named_parameters()), dict(self._ema.named_buffers())
        avg_dst = [ema_params[n] for n in self._param_names] + [ema_buffers[n] for n in self._avg_buffer_names]
        avg_src = [params[n].detach() for n in self._param_names] + [buffers[n] for n in self._avg_buffer_names]
        if d == 0.0:  # the warm-up: an exact copy (0 * ema + 1 * w may round differently from w)
            torch._foreach_copy_(avg_dst, avg_src)
        else:  # the reference's arithmetic: ema = d * ema; ema += (1 - d) * w
            torch._foreach_mul_(avg_dst, d)
            torch._foreach_add_(avg_dst, avg_src, alpha=1.0 - d)
        for n in self._copy_buffer_names:
            ema_buffers[n].copy_(buffers[n])
        return d

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged parameters and buffers into `model` (e.g. to evaluate or save it)."""
        strip_wrappers(model).load_state_dict(self._ema.state_dict(), strict=True)

    def state_dict(self, prefix: str = EMA_PREFIX) -> dict[str, torch.Tensor]:
        """Everything an exact resume needs, as tensors: `{prefix}num_updates` and `{prefix}weights/<key>`."""
        out = {f"{prefix}weights/{k}": v.detach().clone() for k, v in self._ema.state_dict().items()}
        out[f"{prefix}num_updates"] = torch.tensor(self.num_updates, dtype=torch.int64)
        return out

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor], prefix: str = EMA_PREFIX) -> None:
        key = f"{prefix}num_updates"
        if key not in tensors:
            raise KeyError(f"WeightEMA.load_state_dict: no {key!r}")
        weights = {k[len(prefix) + len("weights/"):]: v for k, v in tensors.items()
                   if k.startswith(f"{prefix}weights/")}
        self._ema.load_state_dict(weights, strict=True)
        self.num_updates = int(tensors[key])
