"""Robust accuracy under attack, with the energies of the adversarial points (docs/science.md#evaluation-protocol).

`evaluate_model` attacks one set of images with any mix of our PGD (CE objective), CW (PGD on
the margin loss) and AutoAttack or its parts (the official package, see attacks.autoattack), and
returns per attack the robust accuracy, the seconds it took and the energy statistics of the
natural and adversarial points; plus the worst case over all attacks per example. It is what
`weat attack` runs after `evaluate_checkpoint` has rebuilt the model, loaded the data and checked
the input. Only cli.py prints: progress and warnings come out through `on_event(kind, payload)`.

Protocol and conventions:
- fp32, the model in eval mode with frozen weights (attacks.attack_mode), fixed batches of
  `batch_size` images; clean logits are computed once.
- An example is robust under an attack when the model classifies it correctly both clean and at
  the attack's point x*. Worst case: robust under every attack.
- PGD / CW: x* is the final iterate for every example (restarts keep the first successful one), so
  E(x*) describes the attack's whole output. AutoAttack: the package's convention, x* is the
  adversarial point where a part succeeded and x itself elsewhere (dE = 0 there). Its parts run in
  order on the examples still robust, batches formed as the package forms them.
- Randomness: PGD starts come from a generator seeded by (seed, attack, first example of the batch),
  random targets from (seed, "targets"), so a result does not depend on which other attacks run and
  a resumed evaluation replays the same batches. AutoAttack gets `seed` (and seeds torch's global
  generators itself; they are restored afterwards).
- `state_path`: a resumable evaluation. Progress is saved (safetensors, atomically) at most every
  STATE_EVERY seconds, after each attack stage and when interrupted; a rerun with the same inputs
  continues after the last saved batch. pyautoattack 0.2.0's own state file cannot be resumed
  (the attack set is compared as a list against a set, and a restored run returns no adversarial
  points for the examples fooled before the restore), so weat keeps its own, for every attack.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import attacks as attacks_mod
from .errors import WeatInputError, WeatRunError
from .fileio import atomic_write_bytes, check_writable
from .runtime import EventFn, Stream, eval_device, generator_for, ignore_event, name_part, tensor_digest

# Attack name -> the stages it runs, in order. "pgd"/"cw" are our engine's PGD; the rest are
# parts of AutoAttack ("autoattack" = its standard version).
ATTACKS: dict[str, tuple[str, ...]] = {
    "pgd": ("pgd",),
    "cw": ("cw",),
    "autoattack": attacks_mod.AUTOATTACK_STANDARD,
    **{part: (part,) for part in attacks_mod.AUTOATTACK_PARTS},
}
_OBJECTIVE = {"pgd": "ce", "cw": "cw"}  # engine stages and their PGD objective
TARGETED_ATTACKS = tuple(_OBJECTIVE)  # --targeted applies to these; AutoAttack picks its own targets
NORMS = ("linf", "l2")
DEFAULT_N = 10_000  # the field's protocol: the first 10,000 test images
STATE_FORMAT = "weat-attack-state/1"
ADV_FORMAT = "weat-adv/1"
CHECK_N = 32  # images the sanity checks look at (they are heuristics; a few dozen suffice)
STATE_EVERY = 60.0  # seconds between state saves (it also saves after every stage and on interrupt)

ENERGY_KEYS = ("natural_mean", "natural_std", "adversarial_mean", "adversarial_std", "delta_mean",
               "joint_natural_mean", "joint_adversarial_mean", "joint_delta_mean")


# ----------------------------------------------------------------------------- results


@dataclass
class AttackResult:
    """One attack on n images. Per-example tensors are on the CPU, (n,) unless noted."""

    name: str
    robust_accuracy: float
    seconds: float
    energy: dict[str, float]  # ENERGY_KEYS
    settings: dict[str, Any]
    robust: torch.Tensor  # bool: correct on x and on x*
    energy_adversarial: torch.Tensor  # E(x*)
    joint_adversarial: torch.Tensor  # E(x*, y), y the true label
    stages: dict[str, float] = field(default_factory=dict)  # robust accuracy after each AutoAttack part
    targets: torch.Tensor | None = None  # targeted pgd / cw: the target class of each example
    target_success_rate: float | None = None  # share of examples (target != label) classified as the target
    x_adv: torch.Tensor | None = None  # (n, C, H, W) float32 when kept

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"robust_accuracy": self.robust_accuracy, "seconds": round(self.seconds, 3),
                               "energy": dict(self.energy)}
        if self.target_success_rate is not None:
            out["target_success_rate"] = self.target_success_rate
        return out


@dataclass
class Evaluation:
    model: str
    eps: float
    norm: str
    n: int
    clean_accuracy: float
    attacks: dict[str, AttackResult]
    worst_case_accuracy: float
    y: torch.Tensor  # (n,) int64 labels
    correct: torch.Tensor  # (n,) bool: clean prediction right
    energy_natural: torch.Tensor  # (n,) E(x)
    joint_natural: torch.Tensor  # (n,) E(x, y)
    warnings: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # dataset, split, device, seed, ... for display
    x: torch.Tensor | None = None  # (n, C, H, W) float32 when adversarial points are kept

    def summary(self) -> dict[str, Any]:
        """The `weat attack --json` object: snake_case keys, accuracies in [0, 1]."""
        return {
            "model": self.model,
            "eps": self.eps,
            "norm": self.norm,
            "n": self.n,
            "clean_accuracy": self.clean_accuracy,
            "attacks": {name: r.summary() for name, r in self.attacks.items()},
            "worst_case_accuracy": self.worst_case_accuracy,
        }


def energy_summary(e_nat: torch.Tensor, e_adv: torch.Tensor, j_nat: torch.Tensor, j_adv: torch.Tensor) -> dict[str, float]:
    """Means and (population) standard deviations of E(x), E(x*), dE(x) = E(x) - E(x*), and the
    joint versions with the true label. All inputs (n,)."""
    e_nat, e_adv, j_nat, j_adv = (t.double() for t in (e_nat, e_adv, j_nat, j_adv))

    def mean(t: torch.Tensor) -> float:
        return float(t.mean()) if t.numel() else float("nan")

    def std(t: torch.Tensor) -> float:
        return float(t.std(correction=0)) if t.numel() else float("nan")

    return {
        "natural_mean": mean(e_nat), "natural_std": std(e_nat),
        "adversarial_mean": mean(e_adv), "adversarial_std": std(e_adv),
        "delta_mean": mean(e_nat - e_adv),
        "joint_natural_mean": mean(j_nat), "joint_adversarial_mean": mean(j_adv),
        "joint_delta_mean": mean(j_nat - j_adv),
    }


# ----------------------------------------------------------------------------- checks


def sanity_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None = None) -> list[str]:
    """Checks in the spirit of AutoAttack's before an expensive evaluation; warnings, never errors.

    The model should be in eval mode, give the same outputs for the same input twice, return
    logits (not probabilities: those flatten the loss and make every energy 0 or meaningless) and
    have a non-zero gradient w.r.t. the input (else gradient attacks cannot move). x: (B, C, H, W),
    a few dozen images suffice; `logits`: the model's output on x if already computed.
    """
    out: list[str] = []
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        out.append(f"model has {len(training)} module(s) in training mode (e.g. {training[0]}): "
                   "batch-norm statistics and dropout change under attack")
    with torch.no_grad():
        a = model(x).float() if logits is None else logits.float()
        b = model(x).float()
    if not torch.isfinite(a).all():
        out.append("model returns non-finite logits; accuracies and energies are meaningless")
        return out
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    if diff > 1e-4 * max(1.0, float(a.abs().max())):
        out.append(f"two forward passes of the same images differ (max |difference| {diff:.3g}): a randomized "
                   "model? gradient attacks and the reported accuracies are then unreliable")
    in_unit = float(a.min()) >= -1e-5 and float(a.max()) <= 1 + 1e-5
    if in_unit and float((a.sum(1) - 1).abs().max()) < 1e-4:
        out.append("model outputs look like probabilities (every row in [0,1], summing to 1): attacks and energies "
                   "need logits; remove the final softmax")
    elif float(torch.logsumexp(a, 1).abs().max()) < 1e-4:
        out.append("model outputs look like log-probabilities (logsumexp 0 in every row): E(x) is then 0 for every "
                   "image; return the logits instead")
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(xg).float(), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xg, allow_unused=True)
    if grad is None:
        out.append("the model's output does not depend on its input through autograd (detached?): gradient attacks "
                   "cannot run")
        return out
    per_image = grad.flatten(1).abs().sum(1)
    if not torch.isfinite(per_image).all():
        out.append("the input gradient has non-finite values: gradient attacks are unreliable")
    zero = int((per_image == 0).sum())
    if zero == len(per_image):
        out.append("the input gradient is zero for every image (masked or obfuscated gradients?): gradient attacks "
                   "cannot move; robust accuracy would be overestimated")
    elif zero:
        out.append(f"{zero} of {len(per_image)} images have an exactly zero input gradient of the cross-entropy "
                   "(saturated softmax?): PGD cannot move them; check with cw or autoattack")
    return out


# ----------------------------------------------------------------------------- state


class _State:
    """The resumable progress of an evaluation: per attack the stage and the next example index,
    its seconds so far, and its per-example tensors; saved as safetensors."""

    def __init__(self, path: Path | None, fingerprint: dict[str, Any]):
        self.path = path
        self.fingerprint = fingerprint
        self.progress: dict[str, dict[str, Any]] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        self.last_save = time.monotonic()

    @staticmethod
    def read(path: Path, metadata_only: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """An existing state file's tensors and metadata; anything else is bad input naming --state."""
        from . import checkpoint

        tensors, meta = checkpoint.read(path, flag="--state", metadata_only=metadata_only,
                                        what="a weat attack state file; pass a new file name to start over")
        if meta.get("format") != STATE_FORMAT:
            raise WeatInputError(f"--state: {path} is not a weat attack state file (format {meta.get('format')!r}, "
                                 f"expected {STATE_FORMAT!r}); pass a new file name to start over")
        return tensors, meta

    def load(self) -> bool:
        if self.path is None or not self.path.exists():
            return False
        tensors, meta = self.read(self.path)
        saved = json.loads(meta.get("fingerprint", "{}"))
        changed = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
        if changed:
            raise WeatInputError(f"--state: {self.path} belongs to another evaluation ({', '.join(changed)} differ); "
                                 "expected the options it was saved with: rerun with them or pass a new file name")
        self.progress = json.loads(meta["progress"])
        self.tensors = tensors
        return True

    def save(self, force: bool = False) -> None:
        from safetensors.torch import save as st_save

        if self.path is None or not (force or time.monotonic() - self.last_save >= STATE_EVERY):
            return
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        meta = {"format": STATE_FORMAT, "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
                "progress": json.dumps(self.progress, sort_keys=True)}
        atomic_write_bytes(self.path, st_save(tensors, metadata=meta))
        self.last_save = time.monotonic()


# ----------------------------------------------------------------------------- validation


def check_attack_names(names: Sequence[str]) -> list[str]:
    """Lower-cased, de-duplicated (order kept) attack names; unknown ones are bad input."""
    out: list[str] = []
    for raw in names:
        name = str(raw).strip().lower()
        if name not in ATTACKS:
            raise WeatInputError(f"--attack: unknown {raw!r}; expected one of {', '.join(ATTACKS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise WeatInputError("--attack: no attack given; expected one or more of " + ", ".join(ATTACKS))
    return out


def parse_target(value: int | str | None) -> int | str:
    """--target-class: an int C, `random` or `least-likely` (None: random)."""
    if value is None:
        return "random"
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip().lower().replace("_", "-")
    if text in attacks_mod.TARGET_MODES:
        return text
    try:
        return int(text)
    except ValueError:
        raise WeatInputError(f"--target-class: expected a class index, 'random' or 'least-likely', got {value!r}") from None


def _check_settings(*, eps: float, norm: str, steps: int, step_size: float, restarts: int, batch_size: int,
                    target: int | str, targeted: bool, num_classes: int, attack_names: Sequence[str]) -> None:
    if norm not in NORMS:
        raise WeatInputError(f"--norm: unknown {norm!r}; expected linf or l2")
    if not math.isfinite(eps) or eps < 0:
        raise WeatInputError(f"--eps: {eps:g}; expected a radius >= 0")
    if norm == "linf" and eps > 1:
        raise WeatInputError(f"--eps: {eps:g} is not a linf radius; expected a value in [0, 1] (pixels are in [0, 1])")
    for flag, value, low in (("--steps", steps, 0), ("--restarts", restarts, 1), ("--batch-size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise WeatInputError(f"{flag}: {value!r}; expected an integer >= {low}")
    if not math.isfinite(step_size) or step_size <= 0:
        raise WeatInputError(f"--step-size: {step_size:g}; expected a step > 0")
    if targeted and isinstance(target, int) and not 0 <= target < num_classes:
        raise WeatInputError(f"--target-class: {target}; the model has {num_classes} classes, expected 0..{num_classes - 1}")
    if targeted and not any(name in TARGETED_ATTACKS for name in attack_names):
        raise WeatInputError(f"--targeted: applies to {' and '.join(TARGETED_ATTACKS)}; the AutoAttack parts choose their "
                             "own targets (apgd-t, fab-t)")
    for name in attack_names:
        for part in ATTACKS[name]:
            need = attacks_mod.AUTOATTACK_MIN_CLASSES.get(part, 2)
            if num_classes < need:
                raise WeatInputError(f"--attack: {name} ({part}) needs a model with at least {need} classes; "
                                     f"this one has {num_classes}")


# ----------------------------------------------------------------------------- the engine


def evaluate_model(
    *,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attacks: Sequence[str] = ("pgd",),
    eps: float,
    norm: str = "linf",
    steps: int = 20,
    step_size: float | None = None,
    restarts: int = 1,
    targeted: bool = False,
    target_class: int | str = "random",
    batch_size: int = 500,
    seed: int = 0,
    keep_adversarial: bool = False,
    state_path: Path | str | None = None,
    model_name: str = "model",
    on_event: EventFn | None = None,
    index_offset: int = 0,
) -> Evaluation:
    """Attack the images x (n, C, H, W; uint8, or float in [0,1]) with labels y (n,) on x's device.

    attacks: names from ATTACKS. eps in [0,1] pixel units (linf) or the L2 norm of the whole image;
    0 is allowed (robust = clean accuracy). steps, step_size (default eps/4) and restarts configure
    pgd and cw. targeted (pgd, cw): minimise the objective towards target_class (an int, "random"
    or "least-likely"); robust accuracy still counts correct predictions of the true label.
    keep_adversarial keeps x and every attack's x* (CPU float32) in the result. The model is cast
    to fp32 (in place) and attacked through attacks.folded_eval_model.
    index_offset: where x starts in a larger set split into shards (batch-aligned): each batch's
    random starts are then those the whole set's evaluation would draw for it.
    on_event(kind, payload): "warning" {message}, "resume" {path, progress}, "attack" {attack,
    stages}, "stage" {attack, stage, done, total}, "progress" {attack, stage, done, total},
    "stage_done" {attack, stage, robust_accuracy}, "done" {attack, result}.
    """
    emit = on_event or ignore_event
    names = check_attack_names(attacks)
    if x.ndim != 4 or y.shape != (x.shape[0],):
        raise ValueError(f"expected x (n, C, H, W) and y (n,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise WeatInputError(f"--batch-size: {batch_size!r}; expected an integer >= 1")
    device = x.device
    n = len(x)
    target = parse_target(target_class)
    if step_size is None:
        step_size = eps / 4 if eps > 0 else 1 / 255  # a 0-radius ball has one point; any step stays there
    model = model.float()
    # The state file is checked before any work, so a foreign one is refused at once.
    settings = {"eps": eps, "norm": norm, "steps": steps, "step_size": step_size, "restarts": restarts,
                "targeted": targeted, "target_class": target if targeted else None, "seed": seed,
                "batch_size": batch_size}
    state = _State(Path(state_path) if state_path is not None else None, {})
    if state.path is not None:
        state.fingerprint = {
            "model": tensor_digest(sorted(model.state_dict().items())), "images": tensor_digest([("x", x), ("y", y)]),
            "attacks": names, "save_adv": keep_adversarial, **settings,
        }
        if state.load():
            emit("resume", {"path": str(state.path), "progress": state.progress})

    def images(i: int | torch.Tensor, j: int | None = None) -> torch.Tensor:
        part = x[i:j] if j is not None else x[i]
        return part.float().div_(255) if part.dtype == torch.uint8 else part.float()

    with attacks_mod.attack_mode(model):
        if n == 0:
            raise WeatInputError("--n: no images to attack; expected at least 1")
        # What the attacks run: BN folded, channels_last; the same function up to float rounding.
        fast = attacks_mod.folded_eval_model(model, images(0, CHECK_N))
        with torch.no_grad():
            logits_nat = torch.cat([fast(images(i, i + batch_size)).float() for i in range(0, n, batch_size)])
        num_classes = int(logits_nat.shape[1])
        _check_settings(eps=eps, norm=norm, steps=steps, step_size=step_size, restarts=restarts, batch_size=batch_size,
                        target=target, targeted=targeted, num_classes=num_classes, attack_names=names)
        warnings = sanity_checks(model, images(0, CHECK_N), y[:CHECK_N], logits_nat[:CHECK_N])
        for message in warnings:
            emit("warning", {"message": message})

        from .energy import energy, joint_energy

        correct = logits_nat.argmax(1) == y
        e_nat, j_nat = energy(logits_nat), joint_energy(logits_nat, y)
        targets = None
        if targeted:
            targets = attacks_mod.choose_targets(y, logits_nat, target,
                                                 generator=generator_for(device, seed, Stream.ATTACK_TARGETS))

        results: dict[str, AttackResult] = {}
        try:
            for name in names:
                results[name] = _run_attack(
                    name, model=fast, images=images, y=y, n=n, correct=correct, e_nat=e_nat, j_nat=j_nat,
                    targets=targets, settings=settings, num_classes=num_classes, keep=keep_adversarial,
                    state=state, emit=emit, warnings=warnings, index_offset=index_offset,
                )
        finally:
            state.save(force=True)  # also when interrupted: a rerun continues from here

    robust_all = correct.clone().cpu()
    for r in results.values():
        robust_all &= r.robust
    return Evaluation(
        model=model_name, eps=eps, norm=norm, n=n, clean_accuracy=_fraction(correct),
        attacks=results, worst_case_accuracy=_fraction(robust_all),
        y=y.cpu(), correct=correct.cpu(), energy_natural=e_nat.cpu(), joint_natural=j_nat.cpu(), warnings=warnings,
        info={"device": str(device), "num_classes": num_classes, **settings},
        x=torch.cat([images(i, i + batch_size).cpu() for i in range(0, n, batch_size)]) if keep_adversarial else None,
    )


def _fraction(flags: torch.Tensor) -> float:
    """Share of True in a bool tensor, as an exact ratio of counts (no float32 rounding)."""
    return int(flags.sum()) / max(flags.numel(), 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autoattack_fitting(model, x: torch.Tensor, y: torch.Tensor, *, on_warning, **kwargs) -> torch.Tensor:
    """AutoAttack on the batch as given (pass the largest --batch-size you like); a batch that does
    not fit in GPU memory is split in halves, recursively, with one warning."""
    try:
        return attacks_mod.autoattack(model, x, y, on_warning=on_warning, **kwargs)
    except torch.cuda.OutOfMemoryError:
        if len(x) == 1:
            raise
    torch.cuda.empty_cache()
    on_warning(f"AutoAttack: a batch of {len(x)} images did not fit in GPU memory; ran it in halves")
    half = len(x) // 2
    return torch.cat([_autoattack_fitting(model, x[:half], y[:half], on_warning=on_warning, **kwargs),
                      _autoattack_fitting(model, x[half:], y[half:], on_warning=on_warning, **kwargs)])


def _run_attack(name: str, *, model, images, y, n, correct, e_nat, j_nat, targets, settings, num_classes, keep,
                state: _State, emit: EventFn, warnings: list[str], index_offset: int = 0) -> AttackResult:
    """One attack, stage by stage and batch by batch, resuming from `state`."""
    from .energy import energy, joint_energy

    device = y.device
    stages = ATTACKS[name]
    bs, eps, norm = settings["batch_size"], settings["eps"], settings["norm"]
    targeted = settings["targeted"] and name in TARGETED_ATTACKS

    key = f"{name}/"
    prog = state.progress.setdefault(name, {"stage": 0, "pos": 0, "seconds": 0.0, "stages": {}})
    t = state.tensors
    if key + "robust" not in t:
        t[key + "robust"] = correct.clone()
        t[key + "energy_adversarial"] = e_nat.clone()  # AutoAttack's x* is x until a part succeeds
        t[key + "joint_adversarial"] = j_nat.clone()
        if targeted:
            t[key + "hit"] = torch.zeros(n, dtype=torch.bool, device=device)
        if keep:
            t[key + "x_adv"] = torch.cat([images(i, i + bs).cpu() for i in range(0, n, bs)])
    robust, e_adv, j_adv = (t[key + k].to(device) for k in ("robust", "energy_adversarial", "joint_adversarial"))
    hit = t[key + "hit"].to(device) if targeted else None
    x_adv_all = t.get(key + "x_adv")
    t[key + "robust"], t[key + "energy_adversarial"], t[key + "joint_adversarial"] = robust, e_adv, j_adv
    if hit is not None:
        t[key + "hit"] = hit

    emit("attack", {"attack": name, "stages": list(stages)})
    aa_warnings: list[str] = []
    for s in range(prog["stage"], len(stages)):
        stage = stages[s]
        t0 = time.perf_counter()
        engine = stage in _OBJECTIVE
        # Engine PGD attacks every example; AutoAttack parts only those still robust (its protocol).
        todo = torch.arange(prog["pos"], n, device=device) if engine else \
            (robust & (torch.arange(n, device=device) >= prog["pos"])).nonzero().squeeze(1)
        total, done = (n, prog["pos"]) if engine else (len(todo), 0)
        emit("stage", {"attack": name, "stage": stage, "total": total, "done": done})
        for c in range(0, len(todo), bs):
            idx = todo[c : c + bs]
            if engine:
                i, j = prog["pos"], min(prog["pos"] + bs, n)
                xb, yb = images(i, j), y[i:j]
                goal = targets[i:j] if targeted else yb
                g = generator_for(device, settings["seed"], Stream.ATTACK, name_part(name), index_offset + i)
                xa = attacks_mod.pgd_restarts(
                    model, xb, goal, restarts=settings["restarts"], targeted=targeted, generator=g, eps=eps,
                    step_size=settings["step_size"], steps=settings["steps"], norm=norm, objective=_OBJECTIVE[stage],
                    init="uniform",
                )
                with torch.no_grad():
                    logits = model(xa).float()
                pred = logits.argmax(1)
                robust[i:j] = correct[i:j] & (pred == yb)
                e_adv[i:j], j_adv[i:j] = energy(logits), joint_energy(logits, yb)
                if hit is not None:
                    hit[i:j] = pred == goal
                if x_adv_all is not None:
                    x_adv_all[i:j] = xa.cpu()
                prog["pos"] = j
                done = j
            else:
                xb, yb = images(idx), y[idx]
                xa = _autoattack_fitting(model, xb, yb, eps=eps, norm=norm, parts=(stage,), seed=settings["seed"],
                                         num_classes=num_classes, on_warning=aa_warnings.append)
                with torch.no_grad():
                    logits = model(xa).float()
                fooled = logits.argmax(1) != yb
                where = idx[fooled]
                robust[where] = False
                e_adv[where] = energy(logits[fooled])
                j_adv[where] = joint_energy(logits[fooled], yb[fooled])
                if x_adv_all is not None:
                    x_adv_all[where.cpu()] = xa[fooled].cpu()
                prog["pos"] = int(idx[-1]) + 1
                done += len(idx)
            _sync(device)
            prog["seconds"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            emit("progress", {"attack": name, "stage": stage, "done": done, "total": total})
            state.save()
        prog["seconds"] += time.perf_counter() - t0
        prog["stage"], prog["pos"] = s + 1, 0
        prog["stages"][stage] = _fraction(robust)
        emit("stage_done", {"attack": name, "stage": stage, "robust_accuracy": prog["stages"][stage]})
        state.save(force=True)

    for message in dict.fromkeys(aa_warnings):
        if message not in warnings:
            warnings.append(message)
            emit("warning", {"message": message})
    gradient = [v for k, v in prog["stages"].items() if k != "square"]
    if "square" in prog["stages"] and len(prog["stages"]) > 1 and prog["stages"]["square"] < min(gradient) - 0.002:
        # AutoAttack's own check: a gradient-free attack beating the gradient ones hints at masking.
        message = (f"{name}: Square (gradient-free) lowered robust accuracy from {min(gradient):.2%} to "
                   f"{prog['stages']['square']:.2%}: gradient masking? the evaluation may be unreliable")
        warnings.append(message)
        emit("warning", {"message": message})

    success = None
    if hit is not None:
        aimed = targets != y
        success = _fraction(hit[aimed]) if bool(aimed.any()) else 0.0
    stage_settings = {k: settings[k] for k in ("eps", "norm")}
    if name in _OBJECTIVE:
        stage_settings.update({k: settings[k] for k in ("steps", "step_size", "restarts")})
        stage_settings.update({"objective": _OBJECTIVE[name], "targeted": targeted})
        if targeted:
            stage_settings["target_class"] = settings["target_class"]
    else:
        stage_settings.update({"version": "standard" if name == "autoattack" else "custom", "parts": list(stages)})
    result = AttackResult(
        name=name, robust_accuracy=_fraction(robust), seconds=prog["seconds"],
        energy=energy_summary(e_nat, e_adv, j_nat, j_adv), settings=stage_settings,
        robust=robust.cpu(), energy_adversarial=e_adv.cpu(), joint_adversarial=j_adv.cpu(),
        stages=dict(prog["stages"]) if name not in _OBJECTIVE else {},
        targets=targets.cpu().clone() if targeted else None, target_success_rate=success,
        x_adv=x_adv_all,
    )
    emit("done", {"attack": name, "result": result})
    return result


# ----------------------------------------------------------------------------- checkpoints


def newest_checkpoint(root: Path | str = "runs") -> Path | None:
    """The most recently modified runs/*/model.safetensors (relative to the working directory)."""
    found = [p for p in Path(root).glob("*/model.safetensors") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def evaluate_checkpoint(
    *,
    checkpoint: Path | str,
    attacks: Sequence[str] = ("pgd",),
    eps: float | None = None,
    norm: str | None = None,
    steps: int = 20,
    step_size: float | None = None,
    restarts: int = 1,
    targeted: bool = False,
    target_class: int | str | None = None,
    n: int | None = None,
    split: str = "test",
    batch_size: int = 500,
    dataset: str | None = None,
    data_dir: str | None = None,
    download: bool = False,
    device: str = "auto",
    seed: int = 0,
    save_adv: Path | str | None = None,
    state_path: Path | str | None = None,
    on_event: EventFn | None = None,
    default_n: int = DEFAULT_N,
) -> Evaluation:
    """`weat attack`: the checkpoint says which model, data and threat; arguments override.

    Defaults: the checkpoint's eps and norm, its dataset's first min(10,000, split size) images,
    PGD-20 with a step of eps/4 scaled as in training (2/255 per 8/255), 1 restart, seed 0.
    A target class (target_class) implies targeted. Writes `save_adv` (see save_adversarial).
    """
    from . import checkpoint as ckpt_mod
    from . import data as data_mod

    emit = on_event or ignore_event
    names = check_attack_names(attacks)
    if split not in ("test", "train"):
        raise WeatInputError(f"--split: unknown {split!r}; expected test or train")
    for flag, path in (("--save-adv", save_adv), ("--state", state_path)):
        if path is not None:
            check_writable(flag, Path(path))
    if state_path is not None and Path(state_path).exists():
        _State.read(Path(state_path), metadata_only=True)  # a foreign file is refused before any work
    from . import distributed as dist_mod

    ctx, device = dist_mod.init(device)  # under torchrun: this rank's device, and its shard of the images
    dev = eval_device(device)
    ck = ckpt_mod.load(checkpoint, device=dev)
    threat = ck.config.attack
    norm = (norm or threat.norm).strip().lower()
    if norm not in NORMS:
        raise WeatInputError(f"--norm: unknown {norm!r}; expected linf or l2")
    if eps is None:
        if norm != threat.norm:
            raise WeatInputError(f"--eps: required with --norm {norm}: the checkpoint was trained for "
                                 f"{threat.norm} eps {threat.eps:.6g}")
        eps = threat.eps
    if step_size is None and eps > 0:
        step_size = eps * threat.step_size / threat.eps  # the training ratio, 2/255 per 8/255
    if target_class is not None:
        targeted = True
    target = parse_target(target_class)
    _check_settings(eps=eps, norm=norm, steps=steps, step_size=1.0 if step_size is None else step_size, restarts=restarts,
                    batch_size=batch_size, target=target, targeted=targeted, num_classes=ck.num_classes,
                    attack_names=names)

    name = dataset or ck.config.data.dataset
    root = data_dir if data_dir is not None else (ck.config.data.data_dir if name == ck.config.data.dataset else None)
    ds = data_mod.load(name, root, download=download, device="cpu")
    for what, have, want in (("channels", ds.in_channels, ck.in_channels), ("image size", ds.image_size, ck.image_size)):
        if have != want:
            raise WeatInputError(f"--dataset: {name} has {what} {have}; the checkpoint's model ({ck.config.model.arch} "
                                 f"trained on {ck.config.data.dataset}) expects {want}")
    if ds.num_classes > ck.num_classes:
        raise WeatInputError(f"--dataset: {name} has {ds.num_classes} classes; the checkpoint's model has {ck.num_classes}")
    xs, ys = (ds.test_x, ds.test_y) if split == "test" else (ds.train_x, ds.train_y)
    if n is None:
        n = min(default_n, len(xs))
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise WeatInputError(f"--n: {n!r}; expected an integer >= 1")
    if n > len(xs):
        raise WeatInputError(f"--n: {n} is more than the {len(xs)} images of the {name} {split} split")
    # Each rank takes whole consecutive batches, so its batches (and their random starts) are the
    # single-process run's.
    batches = range(math.ceil(n / batch_size))[ctx.shard(math.ceil(n / batch_size))]
    part = slice(batches.start * batch_size, min(batches.stop * batch_size, n))
    x, y = xs[:n][part].to(dev), ys[:n][part].to(dev)  # uint8 on the device; batches become float there
    if ctx.enabled:
        if not ctx.main:
            emit = ignore_event
        if state_path is not None:  # one state file per rank: each resumes its own shard
            state_path = Path(state_path).with_name(f"{Path(state_path).name}.rank{ctx.rank}-of-{ctx.world}")
    start = {"model": str(checkpoint), "dataset": name, "split": split, "n": n, "device": str(dev),
             "eps": eps, "norm": norm, "attacks": names}

    def emit_after_start(kind: str, payload: dict[str, Any]) -> None:
        # "start" waits for evaluate_model's first event, so that bad input it finds (a --state file of
        # another evaluation) is the only line printed.
        if start:
            emit("start", dict(start))
            start.clear()
        emit(kind, payload)

    if ctx.enabled and len(x) == 0:  # fewer batches than ranks: this one has nothing to do
        parts = dist_mod.gather_objects(None, ctx)
        return merge_evaluations([p for p in parts if p is not None])
    result = evaluate_model(
        model=ck.model, x=x, y=y, attacks=names, eps=eps, norm=norm, steps=steps, step_size=step_size,
        restarts=restarts, targeted=targeted, target_class=target, batch_size=batch_size, seed=seed,
        keep_adversarial=save_adv is not None, state_path=state_path, model_name=str(checkpoint),
        on_event=emit_after_start, index_offset=part.start,
    )
    if ctx.enabled:
        result = merge_evaluations([p for p in dist_mod.gather_objects(result, ctx) if p is not None])
        result.info["ranks"] = ctx.world
    result.info.update({"dataset": name, "split": split, "arch": ck.config.model.arch,
                        "method": ck.method})  # "imported" for weat import
    if save_adv is not None and ctx.main:
        save_adversarial(Path(save_adv), result)
        result.info["save_adv"] = str(save_adv)
    return result


def merge_evaluations(parts: list[Evaluation]) -> Evaluation:
    """One evaluation from the evaluations of consecutive shards of the images (rank order).
    Accuracies are recomputed from the per-example flags, stage accuracies and target success
    rates from the counts behind each shard's share; seconds are the slowest shard's."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]

    def cat(tensors) -> torch.Tensor:
        return torch.cat(list(tensors))

    y, correct = cat(p.y for p in parts), cat(p.correct for p in parts)
    e_nat, j_nat = cat(p.energy_natural for p in parts), cat(p.joint_natural for p in parts)
    n = len(y)
    attacks: dict[str, AttackResult] = {}
    for name, r0 in first.attacks.items():
        rs = [p.attacks[name] for p in parts]
        robust = cat(r.robust for r in rs)
        e_adv, j_adv = cat(r.energy_adversarial for r in rs), cat(r.joint_adversarial for r in rs)
        sizes = [len(r.robust) for r in rs]
        stages = {k: sum(r.stages[k] * m for r, m in zip(rs, sizes)) / n for k in r0.stages}
        targets = cat(r.targets for r in rs) if r0.targets is not None else None
        rate = None
        if r0.target_success_rate is not None:
            aimed = [int((r.targets != p.y).sum()) for r, p in zip(rs, parts)]
            rate = sum(r.target_success_rate * m for r, m in zip(rs, aimed)) / max(sum(aimed), 1)
        attacks[name] = AttackResult(
            name=name, robust_accuracy=_fraction(robust), seconds=max(r.seconds for r in rs),
            energy=energy_summary(e_nat, e_adv, j_nat, j_adv), settings=r0.settings, robust=robust,
            energy_adversarial=e_adv, joint_adversarial=j_adv, stages=stages, targets=targets,
            target_success_rate=rate, x_adv=cat(r.x_adv for r in rs) if r0.x_adv is not None else None,
        )
    robust_all = correct.clone()
    for r in attacks.values():
        robust_all &= r.robust
    return Evaluation(
        model=first.model, eps=first.eps, norm=first.norm, n=n, clean_accuracy=_fraction(correct), attacks=attacks,
        worst_case_accuracy=_fraction(robust_all), y=y, correct=correct, energy_natural=e_nat, joint_natural=j_nat,
        warnings=list(dict.fromkeys(w for p in parts for w in p.warnings)), info=dict(first.info),
        x=cat(p.x for p in parts) if first.x is not None else None,
    )


def save_adversarial(path: Path, result: Evaluation) -> None:
    """Write x, y, natural energies and per attack x* and its energies as safetensors, atomically.

    Tensors: `x` (n, C, H, W) float32, `y` int64, `energy_natural`, `joint_natural`, `correct`;
    per attack `<name>/x_adv` (float32, exactly as attacked), `<name>/energy_adversarial`,
    `<name>/joint_adversarial`, `<name>/robust` (and `<name>/target` when targeted). Metadata:
    format "weat-adv/1", model, eps, norm, n, attacks (JSON: settings and results per attack).
    """
    from safetensors.torch import save as st_save

    if result.x is None:
        raise ValueError("save_adversarial needs an evaluation run with keep_adversarial=True")
    tensors = {"x": result.x, "y": result.y, "energy_natural": result.energy_natural,
               "joint_natural": result.joint_natural, "correct": result.correct}
    for name, r in result.attacks.items():
        tensors[f"{name}/x_adv"] = r.x_adv
        tensors[f"{name}/energy_adversarial"] = r.energy_adversarial
        tensors[f"{name}/joint_adversarial"] = r.joint_adversarial
        tensors[f"{name}/robust"] = r.robust
        if r.targets is not None:
            tensors[f"{name}/target"] = r.targets
    meta = {
        "format": ADV_FORMAT, "model": result.model, "eps": repr(result.eps), "norm": result.norm, "n": str(result.n),
        "attacks": json.dumps({name: {**r.settings, **r.summary()} for name, r in result.attacks.items()}),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    try:
        atomic_write_bytes(path, st_save(tensors, metadata=meta))
    except OSError as e:
        raise WeatRunError(f"--save-adv: cannot write {path}: {e.strerror}") from None
