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


# ----------------------------------------------------------------------------- one summary schema

# The quantities of an energy summary, named as energy_stats names them. Every output that
# summarises energies uses these names: `weat attack --json` (per attack), `weat energy stats --json`
# (per set of points), metrics.jsonl (the mean of each, per epoch) and the plots' JSON.
ENERGY_QUANTITIES = ("energy_natural", "energy_adversarial", "delta_energy", "joint_natural", "joint_adversarial",
                     "delta_joint")
NATURAL_QUANTITIES = ("energy_natural", "joint_natural")  # what clean points alone have
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def describe(values: torch.Tensor) -> dict[str, float]:
    """{mean, std (population), q05, q25, q50, q75, q95, n} of a 1-d sample, in float64."""
    v = values.detach().double().reshape(-1).cpu()
    if not len(v):
        return {"mean": float("nan"), "std": float("nan"), **{f"q{int(p * 100):02d}": float("nan") for p in QUANTILES},
                "n": 0}
    q = torch.quantile(v, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    return {"mean": float(v.mean()), "std": float(v.std(correction=0)),
            **{f"q{int(p * 100):02d}": float(x) for p, x in zip(QUANTILES, q)}, "n": int(len(v))}


def summarize(per_example: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """The energy summary of a set of points: {quantity: describe(values)} for each quantity of
    ENERGY_QUANTITIES present in `per_example` (e.g. the output of energy_stats), in schema order."""
    return {k: describe(per_example[k]) for k in ENERGY_QUANTITIES if k in per_example}
