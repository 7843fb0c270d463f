"""The energy lens (PAPER.md section 2): distributions of E(x), E(x,y) and their deltas for clean
images and adversarial points, per model, and the TRADES decomposition of the KL in energies.

Engine functions only: they compute and return; cli.py renders and plots.py draws.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .attacks import attack_mode, pgd
from .errors import WeatInputError
from .runtime import EventFn

# `weat energy` attack names: every `weat attack` name, plus "<name>-targeted" for the attacks
# that take a target (random wrong class per example, seeded).
DEFAULT_ATTACKS = ("pgd", "pgd-targeted")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass
class EnergyLens:
    """Per-example energies of one model: `clean` and one entry per attack, tensors (n,) on CPU."""

    model: str
    eps: float
    norm: str
    n: int
    y: torch.Tensor
    clean: dict[str, torch.Tensor]  # energy, joint
    attacks: dict[str, dict[str, torch.Tensor]]  # energy, joint, delta_energy, delta_joint
    clean_accuracy: float
    robust_accuracy: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)

    def series(self) -> dict[str, dict[str, np.ndarray]]:
        """{"clean": {...}, attack: {...}} as numpy, the input of plots.energy_histograms."""
        keys = ("energy", "joint")
        out = {"clean": {k: self.clean[k].numpy() for k in keys}}
        out.update({a: {k: d[k].numpy() for k in keys} for a, d in self.attacks.items()})
        return out


def _split_name(name: str) -> tuple[str, bool]:
    base, targeted = (name[: -len("-targeted")], True) if name.endswith("-targeted") else (name, False)
    return base, targeted


def check_lens_attacks(names: Sequence[str]) -> list[str]:
    from .evaluate import TARGETED_ATTACKS, check_attack_names

    out = []
    for name in names or DEFAULT_ATTACKS:
        base, targeted = _split_name(name)
        check_attack_names([base])
        if targeted and base not in TARGETED_ATTACKS:
            raise WeatInputError(f"--attack: {name!r}; only {', '.join(TARGETED_ATTACKS)} take a -targeted suffix")
        if name not in out:
            out.append(name)
    return out


def energy_lens(
    *,
    checkpoint: Path | str,
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    n: int | None = None,
    eps: float | None = None,
    steps: int = 20,
    batch_size: int = 500,
    dataset: str | None = None,
    data_dir: str | None = None,
    device: str = "auto",
    seed: int = 0,
    on_event: EventFn | None = None,
) -> EnergyLens:
    """Energies of the first n test images (default min(1000, split size)) and of their
    adversarial points under each attack.

    Untargeted and targeted attacks run through `weat attack`'s engine (evaluate.evaluate_checkpoint),
    the targeted ones towards a random wrong class per example.
    """
    from .attack_checkpoint import evaluate_checkpoint, resolve_config
    from .checkpoint import stored_config

    names = check_lens_attacks(attacks)
    stored = stored_config(checkpoint)
    groups: dict[bool, list[str]] = {False: [], True: []}
    for name in names:
        base, targeted = _split_name(name)
        groups[targeted].append(base)

    results = {}
    for targeted, bases in groups.items():
        if not bases:
            continue
        cfg = resolve_config(stored=stored, overrides={
            "evaluate.attacks": bases, "attack.eps": eps, "evaluate.steps": steps, "evaluate.targeted": targeted,
            "evaluate.target_class": "random", "evaluate.n": n, "evaluate.batch_size": batch_size, "data.dataset": dataset,
            "data.data_dir": data_dir, "evaluate.device": device, "evaluate.seed": seed})
        ev = evaluate_checkpoint(checkpoint, cfg, on_event=on_event, default_n=1000)
        for base, r in ev.attacks.items():
            results[f"{base}-targeted" if targeted else base] = (ev, r)

    ev = next(iter(results.values()))[0]
    clean = {"energy": ev.energy_natural.float(), "joint": ev.joint_natural.float()}
    per_attack = {}
    for name in names:
        _, r = results[name]
        e_adv, j_adv = r.energy_adversarial.float(), r.joint_adversarial.float()
        per_attack[name] = {"energy": e_adv, "joint": j_adv, "delta_energy": clean["energy"] - e_adv,
                            "delta_joint": clean["joint"] - j_adv}
    return EnergyLens(model=str(checkpoint), eps=ev.eps, norm=ev.norm, n=ev.n, y=ev.y, clean=clean, attacks=per_attack,
                      clean_accuracy=ev.clean_accuracy,
                      robust_accuracy={name: results[name][1].robust_accuracy for name in names}, info=dict(ev.info))


def describe(values: torch.Tensor) -> dict[str, float]:
    """mean, std and quantiles of a 1-d sample."""
    v = values.double()
    q = torch.quantile(v, torch.tensor(QUANTILES, dtype=torch.float64)).tolist() if len(v) else [float("nan")] * 5
    return {"mean": float(v.mean()), "std": float(v.std(unbiased=False)),
            **{f"q{int(p * 100):02d}": float(x) for p, x in zip(QUANTILES, q)}, "n": int(len(v))}


def lens_stats(lens: EnergyLens, *, per_class: bool = False) -> dict[str, Any]:
    """The `weat energy stats --json` object."""

    def block(mask: torch.Tensor | None) -> dict[str, Any]:
        pick = (lambda t: t) if mask is None else (lambda t: t[mask])
        out = {"clean": {"energy": describe(pick(lens.clean["energy"])), "joint": describe(pick(lens.clean["joint"]))}}
        for name, d in lens.attacks.items():
            out[name] = {k: describe(pick(v)) for k, v in d.items()}
        return out

    result: dict[str, Any] = {
        "model": lens.model, "eps": lens.eps, "norm": lens.norm, "n": lens.n,
        "clean_accuracy": lens.clean_accuracy, "robust_accuracy": lens.robust_accuracy, "energies": block(None),
    }
    if per_class:
        result["per_class"] = {str(c): block(lens.y == c) for c in sorted(set(lens.y.tolist()))}
    return result


@torch.no_grad()
def trades_decomposition(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float,
                         steps: int = 10, batch_size: int = 500, generator: torch.Generator | None = None) -> dict[str, Any]:
    """PAPER.md 2.3 on real adversarial points x* (TRADES' KL attack from x + 0.001 N(0,1)):

        KL(p(.|x) || p(.|x*)) = E_{k~p(.|x)}[E(x*,k) - E(x,k)] + (E(x) - E(x*))

    Returns the mean of each term, of the directly computed KL, and the largest per-example gap
    between the KL and the sum of the terms (float64; it must be ~1e-12).
    """
    parts = {"kl": [], "joint_term": [], "marginal_term": []}
    with attack_mode(model):
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            logits = model(xb).double()
            p = F.softmax(logits, dim=1)
            with torch.enable_grad():
                x_adv = pgd(model, xb, yb, eps=eps, step_size=step_size, steps=steps, objective="kl", init="normal",
                            p_nat=p.float(), generator=generator)
            logits_adv = model(x_adv).double()
            # The KL as TRADES computes it (kl_div against the natural softmax), in float64.
            parts["kl"].append(F.kl_div(F.log_softmax(logits_adv, 1), p, reduction="none").sum(1))
            # E(x,k) = -f_k(x): E(x*,k) - E(x,k) = f_k(x) - f_k(x*)
            parts["joint_term"].append((p * (logits - logits_adv)).sum(1))
            parts["marginal_term"].append(-torch.logsumexp(logits, 1) + torch.logsumexp(logits_adv, 1))
    t = {k: torch.cat(v) for k, v in parts.items()}
    gap = (t["kl"] - (t["joint_term"] + t["marginal_term"])).abs()
    return {
        "n": len(x), "eps": eps, "steps": steps,
        "kl_mean": float(t["kl"].mean()),
        "joint_term_mean": float(t["joint_term"].mean()),
        "marginal_term_mean": float(t["marginal_term"].mean()),
        "max_abs_gap": float(gap.max()),
        "marginal_share": float(t["marginal_term"].mean() / t["kl"].mean()) if float(t["kl"].mean()) else float("nan"),
    }
