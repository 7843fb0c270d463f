"""Training objectives (docs/science.md#training-methods): `(model, x, y, cfg, *, generator, progress) -> (loss, stats)`.

x is a float batch in [0,1], y its labels; the model is in train mode on entry and on return.
Each adversarial method first runs its own training attack (`method_attack`) in eval mode with
frozen weights, computing the natural softmax once per batch (the reference implementations
recompute it at every attack step), unless the caller passes that attack's points as `x_adv`
(the training loop does when AWP must perturb the weights between the attack and the loss).
`stats` holds per-batch sums as 0-d tensors so the training loop can accumulate them without
syncing with the host. Every cross-entropy term goes through `ce` (train.label_smoothing).

Every adversarial method adds the Delta Energy Regulariser when `train.der_weight` > 0
(docs/science.md#der, `der_per_example`), and its energy anchor when `train.der_anchor` > 0
(`energy_anchor`); with both 0 its loss is exactly the method's.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attacks import attack_mode, engine_options_now, pgd
from .config import METHODS, SINGLE_STEP_METHODS, RunConfig
from .energy import energy, joint_energy, kl_per_example, weat_weights

Stats = dict[str, torch.Tensor]
Loss = Callable[..., "tuple[torch.Tensor, Stats]"]

# Training attack of each method: (objective, random start). TRADES-style methods ascend the KL
# from x + 0.001 N(0,1); MART's CE attack starts the same way (Wang et al. 2020); PGD-AT starts
# uniformly in the ball (Madry et al. 2018). `standard` trains on clean images; its entry is the
# attack used to track its energies (dE) per epoch. The single-step methods (docs/science.md#single-step-at)
# take one CE step from a uniform start: FGSM-RS (Wong et al. 2020) in the eps ball, projected back
# to it; N-FGSM (de Jorge et al. 2022) in k * eps, not projected (see `training_attack`).
METHOD_ATTACK = {
    "standard": ("ce", "uniform"),
    "pgd-at": ("ce", "uniform"),
    "trades": ("kl", "normal"),
    "mart": ("ce", "normal"),
    "mail-trades": ("kl", "normal"),
    "weat-adv": ("kl", "normal"),
    "weat-nat": ("kl", "normal"),
    "fgsm-rs": ("ce", "uniform"),
    "n-fgsm": ("ce", "uniform"),
}


def training_attack(cfg: RunConfig) -> dict:
    """The keyword arguments of `attacks.pgd` for the method's training attack (less model, x, y,
    p_nat and generator). Multi-step methods: the [attack] section as it is. fgsm-rs: one step of
    alpha * eps (alpha = train.fgsm_alpha, default 1.25) from U(-eps, eps), projected to the ball.
    n-fgsm: one step of alpha * eps (default alpha 1) from U(-k eps, k eps), k = train.nfgsm_k,
    clipped to [0,1] only."""
    t, a = cfg.train, cfg.attack
    objective, init = METHOD_ATTACK[t.method]
    kwargs = dict(eps=a.eps, step_size=a.step_size, steps=a.steps, norm=a.norm, objective=objective, init=init)
    if t.method in SINGLE_STEP_METHODS:
        kwargs.update(steps=1, step_size=t.single_step_alpha * a.eps)
        if t.method == "n-fgsm":
            kwargs.update(init_radius=t.nfgsm_k * a.eps, project=False)
    return kwargs


def method_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: RunConfig, *, generator=None) -> torch.Tensor:
    """The adversarial points x* a method trains on (eval mode, frozen weights)."""
    kwargs = training_attack(cfg)
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model  # no all-reduce here
    with attack_mode(model):
        p_nat = None
        if kwargs["objective"] == "kl":
            with torch.no_grad():
                p_nat = F.softmax(model(x).float(), dim=1)  # once per batch, not once per step
        return pgd(model, x, y, p_nat=p_nat, generator=generator, **kwargs)


def der_per_example(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, margin: float,
                    grad: Literal["both", "adversarial"] = "both") -> torch.Tensor:
    """DER's per-example term max(0, ||(dE(x), dE(x,y))||_2 - margin), dE(x) = E(x) - E(x*) and
    dE(x,y) = E(x,y) - E(x*,y), in float32. (B, K), (B, K), (B,) -> (B,)

    grad "both": differentiable through both logits; "adversarial": the natural logits are a fixed
    target, so only x*'s energies move toward x's. The norm's gradient at a zero pair is taken as 0
    (not NaN), so x* = x is harmless."""
    if grad == "adversarial":
        logits_nat = logits_nat.detach()
    d_marginal = energy(logits_nat) - energy(logits_adv)
    d_joint = joint_energy(logits_nat, y) - joint_energy(logits_adv, y)
    sq = d_marginal.square() + d_joint.square()
    norm = torch.where(sq > 0, sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt(), sq)
    return F.relu(norm - margin)


def energy_anchor(logits_nat: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """mean_i E(x_i)^2 + mean_i E(x*_i)^2 in float32, differentiable through both: the energy-magnitude
    term of Du & Mordatch (2019), which keeps the energies' scale from running away. (B, K), (B, K) -> ()"""
    return energy(logits_nat).square().mean() + energy(logits_adv).square().mean()


def _with_der(loss: torch.Tensor, stats: Stats, logits_nat, logits_adv, y, cfg: RunConfig) -> tuple[torch.Tensor, Stats]:
    """loss + der_weight * mean_i DER_i when train.der_weight > 0 (`der` in stats: the batch sum of
    DER_i), + der_anchor * `energy_anchor` when train.der_anchor > 0 (`energy_anchor` in stats: its
    value times the batch size, so the epoch mean is the term's mean); the loss unchanged, the very
    same tensor, when both are 0."""
    t = cfg.train
    if t.der_weight > 0:
        der = der_per_example(logits_nat, logits_adv, y, t.der_margin, t.der_grad)
        loss, stats = loss + t.der_weight * der.mean(), {**stats, "der": der.detach().sum()}
    if t.der_anchor > 0:
        anchor = energy_anchor(logits_nat, logits_adv)
        loss, stats = loss + t.der_anchor * anchor, {**stats, "energy_anchor": anchor.detach() * len(y)}
    return loss, stats


def _correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(1) == y).sum()


def ce(logits: torch.Tensor, y: torch.Tensor, cfg: RunConfig, *, reduction: str = "mean") -> torch.Tensor:
    """The cross-entropy of every training loss, in fp32, smoothed by train.label_smoothing s:
    (1 - s) * CE(logits, y) + s * mean_k(-log p_k) (torch's label_smoothing; s = 0 is plain CE).
    KL terms and the attacks' objectives never go through here."""
    return F.cross_entropy(logits.float(), y, reduction=reduction, label_smoothing=cfg.train.label_smoothing)


def _attacked(model, x, y, cfg: RunConfig, generator, x_adv):
    """The method's training points: the caller's `x_adv` when given, else its attack now."""
    return method_attack(model, x, y, cfg, generator=generator) if x_adv is None else x_adv


def standard_loss(model, x, y, cfg: RunConfig, *, generator=None, progress: float = 0.0, x_adv=None):
    logits = model(x)
    loss = ce(logits, y, cfg)
    return loss, {"correct": _correct(logits, y)}


def _adversarial_ce(model, x, y, cfg: RunConfig, generator, x_adv=None):
    """CE on the method's own x* (or the given one); natural logits only when DER needs them."""
    x_adv = _attacked(model, x, y, cfg, generator, x_adv)
    logits_adv = model(x_adv)
    loss = ce(logits_adv, y, cfg)
    stats = {"adv_correct": _correct(logits_adv, y)}
    if cfg.train.der_weight == 0 and cfg.train.der_anchor == 0:
        return loss, stats
    logits_nat = model(x)
    return _with_der(loss, {**stats, "correct": _correct(logits_nat, y)}, logits_nat, logits_adv, y, cfg)


def pgd_at_loss(model, x, y, cfg: RunConfig, *, generator=None, progress: float = 0.0, x_adv=None):
    """Madry et al. 2018: CE on PGD points."""
    return _adversarial_ce(model, x, y, cfg, generator, x_adv)


def fgsm_rs_loss(model, x, y, cfg: RunConfig, *, generator=None, progress: float = 0.0, x_adv=None):
    """Wong et al. 2020 ("fast is better than free"): CE on x* = P(x0 + alpha eps sign(grad CE(x0))),
    x0 = x + U(-eps, eps), P the projection onto the eps ball and [0,1]; alpha 1.25 by default."""
    return _adversarial_ce(model, x, y, cfg, generator, x_adv)


def n_fgsm_loss(model, x, y, cfg: RunConfig, *, generator=None, progress: float = 0.0, x_adv=None):
    """de Jorge et al. 2022 (N-FGSM): CE on x* = clip01(x0 + alpha eps sign(grad CE(x0))),
    x0 = x + U(-k eps, k eps): no projection onto the eps ball; k 2 and alpha 1 by default."""
    return _adversarial_ce(model, x, y, cfg, generator, x_adv)


def _trades_terms(model, x, y, cfg, generator, x_adv=None):
    x_adv = _attacked(model, x, y, cfg, generator, x_adv)
    logits_nat = model(x)
    logits_adv = model(x_adv)
    kl = kl_per_example(logits_adv, F.softmax(logits_nat.float(), dim=1))  # (B,)
    return logits_nat, logits_adv, kl


def trades_loss(model, x, y, cfg: RunConfig, *, generator=None, progress: float = 0.0, x_adv=None):
    """Zhang et al. 2019: CE(f(x), y) + beta * KL(p(.|x) || p(.|x*)), batch mean of the KL."""
    logits_nat, logits_adv, kl = _trades_terms(model, x, y, cfg, generator, x_adv)
    loss = ce(logits_nat, y, cfg) + cfg.train.beta * kl.mean()
    stats = {"correct": _correct(logits_nat, y), "adv_correct": _correct(logits_adv, y)}
    return _with_der(loss, stats, logits_nat, logits_adv, y, cfg)


def mart_loss(model, x, y, cfg: RunConfig, *, generator=None, progress: float = 0.0, x_adv=None):
    """Wang et al. 2020: boosted CE on x* + beta * KL weighted by (1 - p_y(x)). Label smoothing
    smooths the CE part of the boosted CE only (the margin term stays MART's)."""
    x_adv = _attacked(model, x, y, cfg, generator, x_adv)
    logits_nat = model(x)
    logits_adv = model(x_adv)
    p_adv = F.softmax(logits_adv.float(), dim=1)
    p_nat = F.softmax(logits_nat.float(), dim=1)
    # The most likely wrong class under attack: its probability is pushed down (the "boost").
    top2 = p_adv.topk(2, dim=1).indices
    wrong = torch.where(top2[:, 0] == y, top2[:, 1], top2[:, 0])
    boosted_ce = ce(logits_adv, y, cfg, reduction="none") - torch.log(
        1.0001 - p_adv.gather(1, wrong[:, None]).squeeze(1) + 1e-12
    )
    kl = F.kl_div(torch.log(p_adv + 1e-12), p_nat, reduction="none").sum(1)
    p_true = p_nat.gather(1, y[:, None]).squeeze(1)
    loss = boosted_ce.mean() + cfg.train.beta * (kl * (1.0000001 - p_true)).mean()
    stats = {"correct": _correct(logits_nat, y), "adv_correct": _correct(logits_adv, y)}
    return _with_der(loss, stats, logits_nat, logits_adv, y, cfg)


def mail_weights(logits_adv: torch.Tensor, y: torch.Tensor, bias: float, slope: float) -> torch.Tensor:
    """MAIL (Liu et al. 2021): sigmoid(slope * (PM + bias)), PM = max_{k!=y} p_k - p_y on x*,
    normalised to mean 1 and detached. Examples near or past the boundary weigh most."""
    with torch.no_grad():
        p = F.softmax(logits_adv.float(), dim=1)
        p_true = p.gather(1, y[:, None]).squeeze(1)
        p_other = p.scatter(1, y[:, None], -1.0).amax(1)
        w = torch.sigmoid(slope * (p_other - p_true + bias))
        rank, world = engine_options_now().shard
        if world > 1:  # one rank's slice of a global batch: normalise by the global mean
            from .distributed import all_reduce_

            total = all_reduce_(torch.stack([w.sum(), torch.tensor(float(len(w)), device=w.device)]))
            return w * (total[1] / total[0])
        return w / w.mean()


def mail_trades_loss(model, x, y, cfg: RunConfig, *, generator=None, progress: float = 0.0, x_adv=None):
    """MAIL-TRADES: CE(f(x), y) + beta * mean_i w_i KL_i with MAIL's probabilistic-margin weights,
    after a burn-in of plain TRADES (w = 1) for the first `mail_burn_in` of training."""
    logits_nat, logits_adv, kl = _trades_terms(model, x, y, cfg, generator, x_adv)
    t = cfg.train
    if progress < t.mail_burn_in:
        w = torch.ones_like(kl)
    else:
        w = mail_weights(logits_adv, y, t.mail_bias, t.mail_slope)
    loss = ce(logits_nat, y, cfg) + t.beta * (w * kl).mean()
    stats = {"correct": _correct(logits_nat, y), "adv_correct": _correct(logits_adv, y), "weight": w.sum()}
    return _with_der(loss, stats, logits_nat, logits_adv, y, cfg)


def _weat_loss(model, x, y, cfg: RunConfig, generator, *, ce_on_adversarial: bool, x_adv=None):
    logits_nat, logits_adv, kl = _trades_terms(model, x, y, cfg, generator, x_adv)
    w = weat_weights(logits_nat)  # 1/softplus(|E(x)|) from natural logits, detached, not renormalised
    ce_logits = logits_adv if ce_on_adversarial else logits_nat
    ce_i = ce(ce_logits, y, cfg, reduction="none")
    loss = (w * ce_i).mean() + cfg.train.beta * (w * kl).mean()
    stats = {"correct": _correct(logits_nat, y), "adv_correct": _correct(logits_adv, y), "weight": w.sum()}
    return _with_der(loss, stats, logits_nat, logits_adv, y, cfg)


def weat_adv_loss(model, x, y, cfg: RunConfig, *, generator=None, progress: float = 0.0, x_adv=None):
    """WEAT-adv (the paper's method): mean_i w_i CE(f(x*_i), y_i) + beta * mean_i w_i KL_i."""
    return _weat_loss(model, x, y, cfg, generator, ce_on_adversarial=True, x_adv=x_adv)


def weat_nat_loss(model, x, y, cfg: RunConfig, *, generator=None, progress: float = 0.0, x_adv=None):
    """WEAT-nat: mean_i w_i CE(f(x_i), y_i) + beta * mean_i w_i KL_i."""
    return _weat_loss(model, x, y, cfg, generator, ce_on_adversarial=False, x_adv=x_adv)


LOSSES: dict[str, Loss] = {
    "standard": standard_loss,
    "pgd-at": pgd_at_loss,
    "trades": trades_loss,
    "mart": mart_loss,
    "mail-trades": mail_trades_loss,
    "weat-adv": weat_adv_loss,
    "weat-nat": weat_nat_loss,
    "fgsm-rs": fgsm_rs_loss,
    "n-fgsm": n_fgsm_loss,
}
assert tuple(LOSSES) == METHODS and tuple(METHOD_ATTACK) == METHODS
