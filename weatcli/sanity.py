"""Sanity checks before an expensive evaluation, in the spirit of AutoAttack's (docs/science.md#evaluation-protocol).

A robust accuracy means something only if gradient attacks can work on the model: it must be in
eval mode, deterministic, return logits (not probabilities: those flatten the loss and make every
energy 0 or meaningless) and have a non-zero input gradient. Each check returns warnings, never
errors: `weat attack` prints them and goes on. Every warning ends with where to read more.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

CHECK_N = 32  # images the checks look at (they are heuristics; a few dozen suffice)
SEE = "see docs/science.md#evaluation-protocol"


def sanity_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None = None) -> list[str]:
    """Warnings about `model` on a few images x (B, C, H, W) in [0, 1] with labels y (B,).

    `logits`: the model's output on x if already computed (saves a forward pass).
    """
    out = _training_modules(model)
    with torch.no_grad():
        a = model(x).float() if logits is None else logits.float()
        b = model(x).float()
    if not torch.isfinite(a).all():
        return out + [f"model returns non-finite logits; accuracies and energies are meaningless ({SEE})"]
    out += _nondeterminism(a, b) + _not_logits(a)
    return out + _gradient_warnings(model, x, y)


def _training_modules(model: nn.Module) -> list[str]:
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if not training:
        return []
    return [f"model has {len(training)} module(s) in training mode (e.g. {training[0]}): batch-norm statistics and "
            f"dropout change under attack ({SEE})"]


def _nondeterminism(a: torch.Tensor, b: torch.Tensor) -> list[str]:
    """Two forward passes of the same images, (B, K) each."""
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    if diff <= 1e-4 * max(1.0, float(a.abs().max())):
        return []
    return [f"two forward passes of the same images differ (max |difference| {diff:.3g}): a randomized model? "
            f"gradient attacks and the reported accuracies are then unreliable ({SEE})"]


def _not_logits(a: torch.Tensor) -> list[str]:
    """Probabilities (rows in [0, 1] summing to 1) or log-probabilities (logsumexp 0) instead of logits."""
    in_unit = float(a.min()) >= -1e-5 and float(a.max()) <= 1 + 1e-5
    if in_unit and float((a.sum(1) - 1).abs().max()) < 1e-4:
        return ["model outputs look like probabilities (every row in [0,1], summing to 1): attacks and energies "
                f"need logits; remove the final softmax ({SEE})"]
    if float(torch.logsumexp(a, 1).abs().max()) < 1e-4:
        return ["model outputs look like log-probabilities (logsumexp 0 in every row): E(x) is then 0 for every "
                f"image; return the logits instead ({SEE})"]
    return []


def _gradient_warnings(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[str]:
    """The input gradient of the summed cross-entropy: missing, non-finite or zero."""
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(xg).float(), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xg, allow_unused=True)
    if grad is None:
        return ["the model's output does not depend on its input through autograd (detached?): gradient attacks "
                f"cannot run ({SEE})"]
    out = []
    per_image = grad.flatten(1).abs().sum(1)
    if not torch.isfinite(per_image).all():
        out.append(f"the input gradient has non-finite values: gradient attacks are unreliable ({SEE})")
    zero = int((per_image == 0).sum())
    if zero == len(per_image):
        out.append("the input gradient is zero for every image (masked or obfuscated gradients?): gradient attacks "
                   f"cannot move; robust accuracy would be overestimated ({SEE})")
    elif zero:
        out.append(f"{zero} of {len(per_image)} images have an exactly zero input gradient of the cross-entropy "
                   f"(saturated softmax?): PGD cannot move them; check with cw or autoattack ({SEE})")
    return out
