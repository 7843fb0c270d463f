"""A classifier as an energy-based model: pure tensor maths on logits (docs/science.md#energies).

    E(x)   = -logsumexp_k f(x)_k      marginal energy (low = in distribution for the model)
    E(x,y) = -f(x)_y                  joint energy
    CE     = E(x,y) - E(x)
    dE(x)  = E(x) - E(x*),  dE(x,y) = E(x,y) - E(x*,y)   (x* the adversarial point)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def energy(logits: torch.Tensor) -> torch.Tensor:
    """Marginal energy E(x) = -logsumexp_k f(x)_k. (B, K) -> (B,)"""
    return -torch.logsumexp(logits.float(), dim=1)


def joint_energy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Joint energy E(x, y) = -f(x)_y. (B, K), (B,) -> (B,)"""
    return -logits.float().gather(1, y[:, None]).squeeze(1)


def weat_weights(logits: torch.Tensor) -> torch.Tensor:
    """WEAT sample weights w = 1 / softplus(|E(x)|) from natural logits: detached, not renormalised.

    Range (0, 1/softplus(0)] = (0, 1.443]: samples whose energy is near 0 (high energy, poorly fit)
    weigh most. (B, K) -> (B,)
    """
    with torch.no_grad():
        return 1.0 / F.softplus(energy(logits).abs())


def kl_per_example(logits_adv: torch.Tensor, p_nat: torch.Tensor) -> torch.Tensor:
    """KL(p_nat || softmax(logits_adv)) summed over classes, as TRADES writes it. -> (B,)"""
    return F.kl_div(F.log_softmax(logits_adv.float(), dim=1), p_nat.float(), reduction="none").sum(1)


@torch.no_grad()
def energy_stats(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example natural/adversarial marginal and joint energies and their deltas (all (B,))."""
    e_nat, e_adv = energy(logits_nat), energy(logits_adv)
    j_nat, j_adv = joint_energy(logits_nat, y), joint_energy(logits_adv, y)
    return {
        "energy_natural": e_nat,
        "energy_adversarial": e_adv,
        "delta_energy": e_nat - e_adv,
        "joint_natural": j_nat,
        "joint_adversarial": j_adv,
        "delta_joint": j_nat - j_adv,
    }
