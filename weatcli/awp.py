"""Adversarial weight perturbation (AWP; Wu, Xia & Wang, "Adversarial Weight Perturbation Helps
Robust Generalization", NeurIPS 2020), for pgd-at and the TRADES family.

Each training step, after the training attack has made x*, the weights are pushed uphill on the
adversarial loss, layer by layer relative to each layer's size, the model's gradient is taken at the
perturbed weights, and the perturbation is removed before the optimizer step:

    v_l = gamma * ||w_l|| * g_l / ||g_l||,   g_l = d objective / d w_l  on a proxy copy of the model

The authors' code (github.com/csdongxian/AWP, utils_awp.py `TradesAWP` / `AdvWeightPerturb`, used by
trades_AWP/train_trades_cifar.py and AT_AWP) does this with a proxy model loaded with the model's
state dict, in train mode ("which does not affect the statistics of BN" of the real model), one
plain SGD step (no momentum or weight decay) on the negated objective, then `diff_in_weights`:
for every state-dict entry whose name contains "weight" and that has more than one dimension
(convolution and linear weights; batch-norm weights and all biases are left alone), diff = new - old
rescaled to ||w_l|| / (||diff|| + 1e-20); the model gets w + gamma * diff. One SGD step moves the
proxy by lr * g exactly along g, so v_l above is that diff without the detour through an optimizer
(the learning rate cancels in the rescaling). gamma = 5e-3 in their CIFAR scripts, with AWP switched
on after `--awp-warmup` epochs (10 for TRADES-AWP).

Objectives (the quantity ascended on the proxy, with the proxy's own train-mode batch statistics):
    pgd-at:       CE(f(x*), y)
    TRADES family (trades, mail-trades, weat-adv, weat-nat): CE(f(x), y) + beta * KL(p(x) || p(x*)),
                  batch means, gradients through both p(x) and p(x*), as TradesAWP.calc_awp.

Removal is exact: `add` keeps the original weight tensors and `restore` copies them back (the
reference subtracts gamma * diff again, and (w + v) - v is not w in floating point). So restore
must come before `optimizer.step()`: the gradient was taken at w + v and is applied to w. (The
reference steps at w + v and subtracts v afterwards: the same update except that weight decay sees
w + v there; at gamma = 5e-3 that difference is 5e-3 of the decay term.) `restore` refuses to run
after anything else wrote to the weights (an optimizer step), since copying back would erase it.

Several ranks: the proxy gradients are averaged over ranks before the rescaling, so N ranks compute
the perturbation of the global batch, as one process does (each rank's proxy loss is a mean over its
equal slice), up to float summation order and per-slice batch-norm statistics.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import AWP_METHODS
from .errors import WeatInputError
from .models import strip_wrappers

EPS = 1e-20  # the reference's guard against a zero gradient
DEFAULT_GAMMA = 5e-3
# Training methods (config.AWP_METHODS) -> which proxy objective AWP ascends: pgd-at's CE, or the
# TRADES family's KL.
SUPPORTED_METHODS = AWP_METHODS
TRADES_FAMILY = tuple(m for m in AWP_METHODS if m != "pgd-at")

ProxyLoss = Callable[[nn.Module], torch.Tensor]


def perturbed_names(model: nn.Module) -> list[str]:
    """Names of the parameters AWP perturbs: convolution and linear weights (the reference's
    "'weight' in name and more than one dimension"); batch-norm weights and biases are not."""
    return [n for n, p in strip_wrappers(model).named_parameters() if p.ndim > 1 and "weight" in n]


@dataclass
class WeightPerturbation:
    """The perturbation v of one step: v_l per perturbed parameter name, ||v_l|| = gamma ||w_l||."""

    deltas: dict[str, torch.Tensor]
    gamma: float
    originals: dict[str, torch.Tensor] = field(default_factory=dict)  # add(): the weights to put back
    versions: dict[str, int] = field(default_factory=dict)  # add(): each weight's version counter after it


def make_proxy(model: nn.Module) -> nn.Module:
    """A proxy to pass to every `perturb` call (one allocation for the whole run)."""
    proxy = copy.deepcopy(strip_wrappers(model))
    for p in proxy.parameters():
        p.requires_grad_(True)
    return proxy


def _all_reduce_mean(grads: list[torch.Tensor]) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        for g in grads:
            dist.all_reduce(g)
            g.div_(world)


def perturb(model: nn.Module, proxy_loss_fn: ProxyLoss, gamma: float = DEFAULT_GAMMA, *,
            proxy: nn.Module | None = None) -> WeightPerturbation:
    """The weight perturbation for this step, computed on a proxy; `model` is not changed.

    proxy_loss_fn(net) -> the scalar objective to ascend, evaluated with `net` (the proxy, in train
    mode, holding the model's weights and batch-norm state); see `trades_objective` / `ce_objective`.
    proxy: a module from `make_proxy(model)` to reuse (default: a fresh copy each call).
    """
    if not gamma >= 0:
        raise ValueError(f"awp.perturb: gamma must be >= 0, got {gamma}")
    net = strip_wrappers(model)
    if proxy is None:
        proxy = make_proxy(net)
    else:
        proxy.load_state_dict(net.state_dict())
    proxy.train()
    names = perturbed_names(net)
    proxy_params = dict(proxy.named_parameters())
    targets = [proxy_params[n] for n in names]
    with torch.enable_grad():
        loss = proxy_loss_fn(proxy)
        if loss.ndim != 0:
            raise ValueError(f"awp.perturb: the proxy objective must be a scalar, got shape {tuple(loss.shape)}")
        grads = list(torch.autograd.grad(loss, targets, allow_unused=True))
    grads = [torch.zeros_like(t) if g is None else g.detach().float() for g, t in zip(grads, targets)]
    _all_reduce_mean(grads)
    weights = dict(net.named_parameters())
    deltas = {}
    with torch.no_grad():
        for n, g in zip(names, grads):
            w = weights[n]
            scale = gamma * w.detach().float().norm() / (g.norm() + EPS)  # 0-dim, stays on the device
            deltas[n] = (g * scale).to(w.dtype)
    return WeightPerturbation(deltas=deltas, gamma=gamma)


@torch.no_grad()
def add(model: nn.Module, diff: WeightPerturbation) -> None:
    """w <- w + v for every perturbed weight, keeping the original tensors for `restore`."""
    if diff.originals:
        raise RuntimeError("awp.add: this perturbation is already applied; restore it first")
    params = dict(strip_wrappers(model).named_parameters())
    for n, v in diff.deltas.items():
        p = params[n]
        diff.originals[n] = p.detach().clone()
        p.add_(v)
        diff.versions[n] = p._version


@torch.no_grad()
def restore(model: nn.Module, diff: WeightPerturbation) -> None:
    """Put back exactly the weights `add` saw (bit for bit). Call it after backward and before
    optimizer.step(): the gradients in .grad stay as they are."""
    if not diff.originals:
        raise RuntimeError("awp.restore: this perturbation was not applied (call awp.add first)")
    params = dict(strip_wrappers(model).named_parameters())
    changed = [n for n in diff.originals if params[n]._version != diff.versions[n]]
    if changed:
        raise RuntimeError(f"awp.restore: {changed[0]!r} was written after awp.add (an optimizer step?); "
                           "restore must come before optimizer.step(), or the update would be erased")
    for n, w in diff.originals.items():
        params[n].copy_(w)
    diff.originals.clear()
    diff.versions.clear()


# ----------------------------------------------------------------------------- proxy objectives


def ce_objective(x_adv: torch.Tensor, y: torch.Tensor) -> ProxyLoss:
    """pgd-at (AT-AWP): CE(f(x*), y), batch mean."""

    def objective(net: nn.Module) -> torch.Tensor:
        return F.cross_entropy(net(x_adv), y)

    return objective


def trades_objective(x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, beta: float) -> ProxyLoss:
    """TRADES-AWP: CE(f(x), y) + beta * KL(p(x) || p(x*)), batch means; the gradient flows through
    both distributions (TradesAWP.calc_awp). One forward of x serves both terms: the proxy's
    train-mode batch statistics are those of x either way."""

    def objective(net: nn.Module) -> torch.Tensor:
        logits_nat, logits_adv = net(x), net(x_adv)
        kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1), reduction="batchmean")
        return F.cross_entropy(logits_nat, y) + beta * kl

    return objective


def objective_for(method: str, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, *, beta: float) -> ProxyLoss:
    """The proxy objective AWP ascends for a training method (see the module doc)."""
    if method == "pgd-at":
        return ce_objective(x_adv, y)
    if method in TRADES_FAMILY:
        return trades_objective(x, x_adv, y, beta)
    raise WeatInputError(f"train.method: AWP is implemented for {', '.join(SUPPORTED_METHODS)}, not {method!r}")
