"""The energy lens (docs/science.md#findings): distributions of E(x), E(x,y) and their deltas for
clean images and adversarial points, per model, and the TRADES decomposition of the KL in energies.

Engine functions only: each takes a checkpoint and a resolved RunConfig (its [data], [attack] and
[lens] sections), computes and returns; cli.py renders and plots.py draws. Energies are named and
summarised as energy.py's one schema says (ENERGY_QUANTITIES, describe, summarize).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .attacks import attack_mode, pgd
from .config import LENS_DEFAULT_N, RunConfig
from .energy import summarize
from .errors import WeatInputError
from .runtime import EventFn, Stream, eval_device, generator_for, ignore_event

CONFIG_SECTIONS = ("data", "attack", "lens")  # what the lens reads: the "config" of every energy output


def used_config(cfg: RunConfig) -> dict[str, Any]:
    """The sections of `cfg` the lens runs with, JSON-ready: the "config" echoed by every `weat energy --json`."""
    data = cfg.to_dict()
    return {k: data[k] for k in CONFIG_SECTIONS}


@dataclass
class EnergyLens:
    """Per-example energies of one model, tensors (n,) on CPU named as energy.ENERGY_QUANTITIES:
    `clean` holds energy_natural and joint_natural, each entry of `attacks` all six quantities."""

    model: str
    eps: float
    norm: str
    n: int
    y: torch.Tensor
    clean: dict[str, torch.Tensor]
    attacks: dict[str, dict[str, torch.Tensor]]
    clean_accuracy: float
    robust_accuracy: dict[str, float]
    config: dict[str, Any] = field(default_factory=dict)  # used_config(cfg)
    info: dict[str, Any] = field(default_factory=dict)

    def series(self) -> dict[str, dict[str, np.ndarray]]:
        """The energies each set of points puts into plots.energy_histograms, as numpy: clean ->
        energy_natural, joint_natural; an attack -> energy_adversarial, joint_adversarial."""
        out = {"clean": {k: v.numpy() for k, v in self.clean.items()}}
        out.update({a: {k: d[k].numpy() for k in ("energy_adversarial", "joint_adversarial")}
                    for a, d in self.attacks.items()})
        return out


def _split_name(name: str) -> tuple[str, bool]:
    """"pgd-targeted" -> ("pgd", True); names were checked by LensConfig."""
    return (name[: -len("-targeted")], True) if name.endswith("-targeted") else (name, False)


def _evaluate(path: Path | str, cfg: RunConfig, bases: list[str], *, targeted: bool, on_event: EventFn | None) -> Any:
    """`weat attack`'s engine on the lens's images: the untargeted attacks, or the targeted ones
    towards a random wrong class per image (seeded)."""
    from .attack_checkpoint import evaluate_checkpoint
    from .config import EvaluateConfig

    lens = cfg.lens
    evaluate = EvaluateConfig(attacks=bases, steps=lens.steps, targeted=targeted, target_class="random", n=lens.n,
                              batch_size=lens.batch_size, seed=lens.seed, device=lens.device)
    return evaluate_checkpoint(path, cfg.model_copy(update={"evaluate": evaluate}), on_event=on_event,
                               default_n=LENS_DEFAULT_N)


def energy_lens(path: Path | str, cfg: RunConfig, on_event: EventFn | None = None) -> EnergyLens:
    """Energies of the first lens.n test images (default min(1000, split size)) and of their
    adversarial points under each of lens.attacks, at the [attack] threat."""
    groups: dict[bool, list[str]] = {False: [], True: []}
    for name in cfg.lens.attacks:
        base, targeted = _split_name(name)
        groups[targeted].append(base)
    results = {}
    for targeted, bases in groups.items():
        if bases:
            ev = _evaluate(path, cfg, bases, targeted=targeted, on_event=on_event)
            results.update({f"{base}-targeted" if targeted else base: (ev, r) for base, r in ev.attacks.items()})

    ev = next(iter(results.values()))[0]
    e_nat, j_nat = ev.energy_natural.float(), ev.joint_natural.float()
    per_attack = {}
    for name in cfg.lens.attacks:
        r = results[name][1]
        e_adv, j_adv = r.energy_adversarial.float(), r.joint_adversarial.float()
        per_attack[name] = {"energy_natural": e_nat, "energy_adversarial": e_adv, "delta_energy": e_nat - e_adv,
                            "joint_natural": j_nat, "joint_adversarial": j_adv, "delta_joint": j_nat - j_adv}
    return EnergyLens(model=str(path), eps=ev.eps, norm=ev.norm, n=ev.n, y=ev.y,
                      clean={"energy_natural": e_nat, "joint_natural": j_nat}, attacks=per_attack,
                      clean_accuracy=ev.clean_accuracy,
                      robust_accuracy={name: results[name][1].robust_accuracy for name in cfg.lens.attacks},
                      config=used_config(cfg), info=dict(ev.info))


def lens_stats(lens: EnergyLens, *, per_class: bool = False) -> dict[str, Any]:
    """The `weat energy stats --json` object: accuracies, and per set of points (clean, each attack)
    the energy summary {quantity: energy.describe(...)} (also per true class with `per_class`)."""

    def block(mask: torch.Tensor | None) -> dict[str, Any]:
        pick = (lambda t: t) if mask is None else (lambda t: t[mask])
        out = {"clean": summarize({k: pick(v) for k, v in lens.clean.items()})}
        out.update({name: summarize({k: pick(v) for k, v in d.items()}) for name, d in lens.attacks.items()})
        return out

    result: dict[str, Any] = {
        "model": lens.model, "eps": lens.eps, "norm": lens.norm, "n": lens.n,
        "clean_accuracy": lens.clean_accuracy, "robust_accuracy": lens.robust_accuracy, "energies": block(None),
    }
    if per_class:
        result["per_class"] = {str(c): block(lens.y == c) for c in sorted(set(lens.y.tolist()))}
    result["config"] = lens.config
    return result


def trades_checkpoint(path: Path | str, cfg: RunConfig, on_event: EventFn | None = None) -> dict[str, Any]:
    """`weat energy trades`: trades_decomposition on the checkpoint's first lens.n test images (default
    min(1000, split size)) at the [attack] eps and step size, lens.trades_steps KL-attack steps, the
    attack's start drawn from the seeded Stream.TRADES_LENS. Returns its dict plus "model" and "config"."""
    from . import checkpoint as ckpt_mod
    from . import data as data_mod

    emit = on_event or ignore_event
    dev = eval_device(cfg.lens.device)
    loaded = ckpt_mod.load(path, device=dev)
    ds = data_mod.load(cfg.data.dataset, cfg.data.data_dir, device=dev)
    n = min(LENS_DEFAULT_N, len(ds.test_x)) if cfg.lens.n is None else cfg.lens.n
    if n > len(ds.test_x):
        raise WeatInputError(f"--n: {n}; expected 1..{len(ds.test_x)} (the test split's size)")
    emit("start", {"model": str(path), "dataset": cfg.data.dataset, "split": "test", "n": n, "device": str(dev),
                   "eps": cfg.attack.eps, "norm": "linf", "attacks": ["trades-kl"]})
    result = trades_decomposition(loaded.model, data_mod.to_float(ds.test_x[:n]), ds.test_y[:n], eps=cfg.attack.eps,
                                  step_size=cfg.attack.step_size, steps=cfg.lens.trades_steps,
                                  batch_size=cfg.lens.batch_size, generator=generator_for(dev, cfg.lens.seed, Stream.TRADES_LENS))
    return {**result, "model": str(path), "config": used_config(cfg)}


@torch.no_grad()
def trades_decomposition(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float,
                         steps: int = 10, batch_size: int = 500, generator: torch.Generator | None = None) -> dict[str, Any]:
    """docs/science.md#trades-decomposition on real adversarial points x* (TRADES' KL attack from x + 0.001 N(0,1)):

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
