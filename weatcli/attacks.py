"""The shared attack engine: PGD (Linf / L2, untargeted / targeted, CE / KL / CW objectives).

Every attack takes float NCHW images in [0,1] and guarantees |x_adv - x| <= eps and
0 <= x_adv <= 1. Engine rules (DESIGN.md): gradients are taken w.r.t. the input only with the
parameters frozen, clean outputs are computed once by the caller (`p_nat`), Linf projection bounds
are precomputed so a step is one add and one clamp, shapes stay fixed, and nothing in the loop
syncs with the host.

References: Madry et al. 2018 (PGD), Zhang et al. 2019 (TRADES KL attack), Carlini & Wagner 2017
(margin loss, used here as a PGD objective as in the TRADES / MART evaluations).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from .energy import kl_per_example

# An objective maps (logits (B,K), labels or targets (B,), natural probabilities (B,K) or None)
# to a per-example loss (B,) that the attack ascends (or descends when targeted).
Objective = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def ce_objective(logits: torch.Tensor, y: torch.Tensor, p_nat: torch.Tensor | None) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y, reduction="none")


def kl_objective(logits: torch.Tensor, y: torch.Tensor, p_nat: torch.Tensor | None) -> torch.Tensor:
    if p_nat is None:
        raise ValueError("the KL objective needs the natural probabilities p_nat")
    return kl_per_example(logits, p_nat)


def cw_objective(logits: torch.Tensor, y: torch.Tensor, p_nat: torch.Tensor | None) -> torch.Tensor:
    """Margin max_{k != y} f_k - f_y: positive once the example is misclassified."""
    logits = logits.float()
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return others.amax(1) - true


OBJECTIVES: dict[str, Objective] = {"ce": ce_objective, "kl": kl_objective, "cw": cw_objective}

Init = Literal["uniform", "normal", "none"]


@contextmanager
def attack_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and frozen parameters for the duration of an attack; restores both after.

    Freezing the weights means autograd never computes weight gradients while we only want the
    gradient w.r.t. the input.
    """
    was_training = model.training
    frozen = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)


def _random_start(x: torch.Tensor, eps: float, norm: str, init: Init, init_std: float, generator) -> torch.Tensor:
    if init == "none":
        return x.clone()
    if init == "normal":  # TRADES / MART: x + 0.001 * N(0, 1)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + init_std * noise
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + (2 * u - 1) * eps
    # L2: a direction uniform on the sphere, a radius uniform in [0, eps].
    d = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    d = d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    r = torch.rand((x.shape[0], 1, 1, 1), generator=generator, device=x.device, dtype=x.dtype)
    return x + d * r * eps


def _project_l2(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    delta = x_adv - x
    norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    delta = delta * (eps / norms.clamp_min(1e-12)).clamp(max=1.0)
    # Clamping to [0,1] only shrinks each |delta_i| (x itself is in [0,1]), so the ball still holds.
    return (x + delta).clamp_(0.0, 1.0)


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: Literal["linf", "l2"] = "linf",
    objective: str | Objective = "ce",
    targeted: bool = False,
    init: Init = "uniform",
    init_std: float = 0.001,
    p_nat: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Projected gradient ascent on `objective` inside the eps ball around x (Madry et al. 2018).

    x: (B, C, H, W) in [0,1]; y: (B,) labels, or target classes when `targeted` (the objective is
    then descended, e.g. CE to the target). eps and step_size are in [0,1] pixel units (Linf) or in
    L2 norm of the whole image (L2). The caller chooses the model's mode; wrap in `attack_mode` to
    attack in eval mode with frozen weights. Returns x_adv, detached, with
    |x_adv - x|_p <= eps and 0 <= x_adv <= 1.
    """
    fn = OBJECTIVES[objective] if isinstance(objective, str) else objective
    sign = -1.0 if targeted else 1.0
    x = x.detach()
    x_adv = _random_start(x, eps, norm, init, init_std, generator)
    if norm == "linf":
        lo = (x - eps).clamp_(min=0.0)  # precomputed so a step is one add and one clamp
        hi = (x + eps).clamp_(max=1.0)
        x_adv = torch.clamp(x_adv, lo, hi)
    else:
        x_adv = _project_l2(x_adv, x, eps)

    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = fn(model(x_adv), y, p_nat).sum()
        (grad,) = torch.autograd.grad(sign * loss, x_adv)
        with torch.no_grad():
            if norm == "linf":
                x_adv = torch.clamp(x_adv + step_size * grad.sign(), lo, hi)
            else:
                g_norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                x_adv = _project_l2(x_adv + step_size * grad / g_norm, x, eps)
    return x_adv.detach()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Logits of x in fixed-size chunks. (N, C, H, W) -> (N, K)"""
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def pgd_restarts(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    restarts: int = 1,
    targeted: bool = False,
    generator: torch.Generator | None = None,
    **kwargs,
) -> torch.Tensor:
    """PGD with `restarts` random starts, keeping per example the first point that succeeds
    (misclassified, or classified as the target when targeted), else the last restart's point."""
    best = pgd(model, x, y, targeted=targeted, generator=generator, **kwargs)
    for _ in range(restarts - 1):
        with torch.no_grad():
            pred = model(best).argmax(1)
            done = (pred == y) if targeted else (pred != y)
        cand = pgd(model, x, y, targeted=targeted, generator=generator, **kwargs)
        best = torch.where(done.view(-1, 1, 1, 1), best, cand)
    return best
