"""Robust accuracy under attack, with the energies of the adversarial points (docs/science.md#evaluation-protocol).

`evaluate_model` attacks one set of images with any mix of our PGD (CE objective), CW (PGD on
the margin loss) and AutoAttack or its parts (the official package, see attacks.autoattack), and
returns per attack the robust accuracy, the seconds it took and the energy summary of the natural
and adversarial points (energy.summarize); plus the worst case over all attacks per example.
`weat attack` reaches it through attack_checkpoint.evaluate_checkpoint, which rebuilds the model
and loads the images. Only cli.py prints: progress and warnings come out through `on_event`.

Protocol and conventions (docs/design.md#engine-rules):
- fp32, the model in eval mode with frozen weights (attacks.attack_mode), fixed batches of
  `batch_size` images; clean logits are computed once.
- An example is robust under an attack when the model classifies it correctly both clean and at
  the attack's point x*. Worst case: robust under every attack.
- PGD / CW: x* is the final iterate for every example (restarts keep the first successful one), so
  E(x*) describes the attack's whole output. AutoAttack: the package's convention, x* is the
  adversarial point where a part succeeded and x itself elsewhere (dE = 0 there). Its parts run in
  order on the examples still robust, batches formed as the package forms them.
- Randomness (docs/design.md#randomness): PGD starts come from the stream (seed, Stream.ATTACK,
  the attack's name, first example of the batch), random targets from (seed, Stream.ATTACK_TARGETS),
  so a result does not depend on which other attacks run and a resumed or sharded evaluation
  replays the same batches. AutoAttack gets `seed` (and seeds torch's global generators itself;
  they are restored afterwards).
- `state_path`: a resumable evaluation (attack_state.AttackState).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from pydantic import ValidationError

from . import attacks as attacks_mod
from .attack_state import AttackState, fingerprint
from .config import AttackConfig, EvaluateConfig, parse_fraction
from .energy import energy, joint_energy, summarize
from .errors import WeatInputError, WeatRunError
from .fileio import atomic_write_bytes
from .runtime import EventFn, Stream, generator_for, ignore_event, name_part
from .sanity import CHECK_N, SEE, sanity_checks

# Attack name -> the stages it runs, in order. "pgd"/"cw" are our engine's PGD; the rest are
# parts of AutoAttack ("autoattack" = its standard version). The names are config.EVAL_ATTACKS.
ATTACKS: dict[str, tuple[str, ...]] = {
    "pgd": ("pgd",),
    "cw": ("cw",),
    "autoattack": attacks_mod.AUTOATTACK_STANDARD,
    **{part: (part,) for part in attacks_mod.AUTOATTACK_PARTS},
}
_OBJECTIVE = {"pgd": "ce", "cw": "cw"}  # engine stages and their PGD objective
TARGETED_ATTACKS = tuple(_OBJECTIVE)  # what --targeted applies to: config.EVAL_TARGETED_ATTACKS (a test checks)
ADV_FORMAT = "weat-adv/1"
_FLAGS = {"attacks": "--attack"}  # config field -> weat attack's flag, where the names differ


# ----------------------------------------------------------------------------- results


@dataclass
class AttackResult:
    """One attack on n images. Per-example tensors are on the CPU, (n,) unless noted."""

    name: str
    robust_accuracy: float
    seconds: float
    energy: dict[str, dict[str, float]]  # energy.summarize: quantity -> {mean, std, q05, ..., n}
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
                               "energy": {k: dict(v) for k, v in self.energy.items()}}
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
    config: dict[str, Any] | None = None  # the resolved config sections it ran with (weat attack)

    def summary(self) -> dict[str, Any]:
        """The `weat attack --json` object: snake_case keys, accuracies in [0, 1]."""
        out = {
            "model": self.model,
            "eps": self.eps,
            "norm": self.norm,
            "n": self.n,
            "clean_accuracy": self.clean_accuracy,
            "attacks": {name: r.summary() for name, r in self.attacks.items()},
            "worst_case_accuracy": self.worst_case_accuracy,
        }
        if self.config is not None:
            out["config"] = self.config
        return out


def energy_summary(e_nat: torch.Tensor, e_adv: torch.Tensor, j_nat: torch.Tensor, j_adv: torch.Tensor
                   ) -> dict[str, dict[str, float]]:
    """energy.summarize of E(x), E(x*), dE(x) = E(x) - E(x*) and the joint versions with the true
    label. All inputs (n,); the differences are taken in float64."""
    e_nat, e_adv, j_nat, j_adv = (t.double() for t in (e_nat, e_adv, j_nat, j_adv))
    return summarize({"energy_natural": e_nat, "energy_adversarial": e_adv, "delta_energy": e_nat - e_adv,
                      "joint_natural": j_nat, "joint_adversarial": j_adv, "delta_joint": j_nat - j_adv})


# ----------------------------------------------------------------------------- settings


def _flag(field: str) -> str:
    """weat attack's flag for a field of [attack] or [evaluate]: step_size -> --step-size."""
    return _FLAGS.get(field, "--" + field.replace("_", "-"))


def _checked(section: type, **fields: Any) -> Any:
    """section(**fields): a broken rule of the config model is bad input naming weat attack's flag."""
    try:
        return section(**fields)
    except ValidationError as e:
        parts = []
        for err in e.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["loc"]:
                parts.append(f"{_flag(str(err['loc'][0]))}: {msg} (got {err['input']!r})")
            else:  # a rule across fields names its key ("attack.eps must be ..."): name the flag instead
                parts.append(re.sub(r"\b(?:attack|evaluate)\.(\w+)", lambda m: _flag(m.group(1)), msg))
        raise WeatInputError("; ".join(parts)) from None


def zero_radius(eps: Any) -> bool:
    """eps (a number or a fraction like 0/255) is exactly 0; a bad value is left to the validation."""
    try:
        return parse_fraction(eps) == 0
    except ValueError:
        return False


def attack_threat(**fields: Any) -> AttackConfig:
    """AttackConfig(**fields) as the threat of an evaluation: its rules but one, eps may be 0 (the
    ball is x itself, robust accuracy = clean accuracy), which training refuses."""
    zero = zero_radius(fields.get("eps"))
    threat = _checked(AttackConfig, **{**fields, "eps": 1.0} if zero else fields)
    return threat.model_copy(update={"eps": 0.0}) if zero else threat


def _flat_settings(threat: AttackConfig, ev: EvaluateConfig) -> dict[str, Any]:
    """What an evaluation's numbers depend on besides model and images: reported, and fingerprinted."""
    return {"eps": threat.eps, "norm": threat.norm, "steps": ev.steps, "step_size": threat.step_size,
            "restarts": ev.restarts, "targeted": ev.targeted, "target_class": ev.target if ev.targeted else None,
            "seed": ev.seed, "batch_size": ev.batch_size}


def _check_against_model(ev: EvaluateConfig, num_classes: int) -> None:
    """The rules that need the model: a target class among its classes, enough classes per attack."""
    target = ev.target
    if ev.targeted and isinstance(target, int) and not 0 <= target < num_classes:
        raise WeatInputError(f"--target-class: {target}; the model has {num_classes} classes, expected 0..{num_classes - 1}")
    for name in ev.attacks:
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

    The keyword form of `run_evaluation` for notebooks: the settings are validated by the config
    models (AttackConfig for the threat, EvaluateConfig for the rest), so a bad value is a
    WeatInputError naming weat attack's flag. attacks: names from ATTACKS. eps in [0,1] pixel units
    (linf) or the L2 norm of the whole image; 0 is allowed (robust = clean accuracy). steps,
    step_size (default eps/4) and restarts configure pgd and cw. targeted (pgd, cw): minimise the
    objective towards target_class (an int, "random" or "least-likely"); robust accuracy still
    counts correct predictions of the true label.
    """
    if step_size is None:  # a 0-radius ball has one point; any step stays there
        step_size = eps / 4 if isinstance(eps, (int, float)) and eps > 0 else 1 / 255
    threat = attack_threat(eps=eps, norm=norm, step_size=step_size)
    ev = _checked(EvaluateConfig, attacks=list(attacks), steps=steps, restarts=restarts, targeted=targeted,
                  target_class=target_class, batch_size=batch_size, seed=seed)
    return run_evaluation(model, x, y, threat, ev, keep_adversarial=keep_adversarial, state_path=state_path,
                          model_name=model_name, on_event=on_event, index_offset=index_offset)


@dataclass
class _Clean:
    """The clean pass, shared by every attack of an evaluation: tensors (n,) on the images' device."""

    images: Callable[..., torch.Tensor]  # images(i, j) / images(index): float32 [0,1] batches
    y: torch.Tensor
    logits: torch.Tensor  # (n, K) float32
    correct: torch.Tensor
    e_nat: torch.Tensor
    j_nat: torch.Tensor
    targets: torch.Tensor | None  # targeted: the target class of each example

    @property
    def n(self) -> int:
        return len(self.y)


def run_evaluation(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: AttackConfig, ev: EvaluateConfig, *,
                   keep_adversarial: bool = False, state_path: Path | str | None = None, model_name: str = "model",
                   on_event: EventFn | None = None, index_offset: int = 0) -> Evaluation:
    """Attack x (n, C, H, W) with labels y (n,) under `threat` with ev's attacks and settings.

    keep_adversarial keeps x and every attack's x* (CPU float32) in the result. The model is cast
    to fp32 (in place) and attacked through attacks.folded_eval_model. index_offset: where x starts
    in a larger set split into shards (batch-aligned): each batch's random starts are then those the
    whole set's evaluation would draw for it. on_event(kind, payload): "warning" {message}, "resume"
    {path, progress}, "attack" {attack, stages}, "stage" {attack, stage, done, total}, "progress"
    {attack, stage, done, total}, "stage_done" {attack, stage, robust_accuracy}, "done" {attack, result}.
    """
    emit = on_event or ignore_event
    if x.ndim != 4 or y.shape != (x.shape[0],):
        raise ValueError(f"expected x (n, C, H, W) and y (n,), got {tuple(x.shape)} and {tuple(y.shape)}")
    model = model.float()
    settings = _flat_settings(threat, ev)
    # The state file is checked before any work, so a foreign one is refused at once.
    state = _open_state(state_path, model, x, y, ev.attacks, keep_adversarial, settings, emit)

    def images(i: int | torch.Tensor, j: int | None = None) -> torch.Tensor:
        part = x[i:j] if j is not None else x[i]
        return part.float().div_(255) if part.dtype == torch.uint8 else part.float()

    with attacks_mod.attack_mode(model):
        if len(x) == 0:
            raise WeatInputError("--n: no images to attack; expected at least 1")
        # What the attacks run: BN folded, channels_last; the same function up to float rounding.
        fast = attacks_mod.folded_eval_model(model, images(0, CHECK_N))
        clean = _clean_pass(fast, images, y, ev)
        warnings = sanity_checks(model, images(0, CHECK_N), y[:CHECK_N], clean.logits[:CHECK_N])
        for message in warnings:
            emit("warning", {"message": message})
        runner = _AttackRunner(fast, clean, settings, int(clean.logits.shape[1]), keep_adversarial, state, emit,
                               warnings, index_offset)
        try:
            results = {name: runner.run(name) for name in ev.attacks}
        finally:
            state.save(force=True)  # also when interrupted: a rerun continues from here
    return _evaluation(clean, results, threat, settings, model_name, warnings, runner.num_classes, keep_adversarial)


def _open_state(state_path: Path | str | None, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                attacks: list[str], keep: bool, settings: dict[str, Any], emit: EventFn) -> AttackState:
    state = AttackState(Path(state_path) if state_path is not None else None, {})
    if state.path is not None:
        state.fingerprint = fingerprint(model, x, y, attacks, keep, settings)
        if state.load():
            emit("resume", {"path": str(state.path), "progress": state.progress})
    return state


def _clean_pass(model: Callable[[torch.Tensor], torch.Tensor], images: Callable[..., torch.Tensor], y: torch.Tensor,
                ev: EvaluateConfig) -> _Clean:
    """Clean logits in fixed batches, their energies, and the targets of a targeted evaluation."""
    n, bs = len(y), ev.batch_size
    with torch.no_grad():
        logits = torch.cat([model(images(i, i + bs)).float() for i in range(0, n, bs)])
    _check_against_model(ev, int(logits.shape[1]))
    targets = None
    if ev.targeted:
        targets = attacks_mod.choose_targets(y, logits, ev.target,
                                             generator=generator_for(y.device, ev.seed, Stream.ATTACK_TARGETS))
    return _Clean(images=images, y=y, logits=logits, correct=logits.argmax(1) == y, e_nat=energy(logits),
                  j_nat=joint_energy(logits, y), targets=targets)


def _evaluation(clean: _Clean, results: dict[str, AttackResult], threat: AttackConfig, settings: dict[str, Any],
                model_name: str, warnings: list[str], num_classes: int, keep: bool) -> Evaluation:
    robust_all = clean.correct.clone().cpu()
    for r in results.values():
        robust_all &= r.robust
    bs, device = settings["batch_size"], clean.y.device
    x = torch.cat([clean.images(i, i + bs).cpu() for i in range(0, clean.n, bs)]) if keep else None
    return Evaluation(
        model=model_name, eps=threat.eps, norm=threat.norm, n=clean.n, clean_accuracy=_fraction(clean.correct),
        attacks=results, worst_case_accuracy=_fraction(robust_all), y=clean.y.cpu(), correct=clean.correct.cpu(),
        energy_natural=clean.e_nat.cpu(), joint_natural=clean.j_nat.cpu(), warnings=warnings,
        info={"device": str(device), "num_classes": num_classes, **settings}, x=x,
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


# ----------------------------------------------------------------------------- one attack


@dataclass
class _Buffers:
    """One attack's per-example results so far (on the device; x_adv on the CPU), kept in the state."""

    robust: torch.Tensor  # (n,) bool
    e_adv: torch.Tensor  # (n,) E(x*)
    j_adv: torch.Tensor  # (n,) E(x*, y)
    hit: torch.Tensor | None  # (n,) bool, targeted: x* classified as the target
    x_adv: torch.Tensor | None  # (n, C, H, W) float32 when kept


class _AttackRunner:
    """Runs the attacks of one evaluation, stage by stage and batch by batch, resuming from `state`."""

    def __init__(self, model, clean: _Clean, settings: dict[str, Any], num_classes: int, keep: bool,
                 state: AttackState, emit: EventFn, warnings: list[str], index_offset: int):
        self.model, self.clean, self.settings, self.num_classes = model, clean, settings, num_classes
        self.keep, self.state, self.emit, self.warnings, self.index_offset = keep, state, emit, warnings, index_offset
        self.device = clean.y.device

    def run(self, name: str) -> AttackResult:
        """One attack: each of its stages in order (from where the state left off), then its result."""
        stages = ATTACKS[name]
        targeted = self.settings["targeted"] and name in TARGETED_ATTACKS
        prog = self.state.progress.setdefault(name, {"stage": 0, "pos": 0, "seconds": 0.0, "stages": {}})
        buf = self._buffers(name, targeted)
        self.emit("attack", {"attack": name, "stages": list(stages)})
        aa_warnings: list[str] = []
        for s in range(prog["stage"], len(stages)):
            self._run_stage(name, stages[s], prog, buf, targeted, aa_warnings)
            prog["stage"], prog["pos"] = s + 1, 0
            prog["stages"][stages[s]] = _fraction(buf.robust)
            self.emit("stage_done", {"attack": name, "stage": stages[s], "robust_accuracy": prog["stages"][stages[s]]})
            self.state.save(force=True)
        self._warn([m for m in dict.fromkeys(aa_warnings) if m not in self.warnings])
        self._warn(_masking_warning(name, prog["stages"]))
        result = self._result(name, stages, targeted, prog, buf)
        self.emit("done", {"attack": name, "result": result})
        return result

    def _warn(self, messages: list[str]) -> None:
        for message in messages:
            self.warnings.append(message)
            self.emit("warning", {"message": message})

    def _buffers(self, name: str, targeted: bool) -> _Buffers:
        """The attack's buffers from the state, created on first use: robust = clean-correct and
        E(x*) = E(x) until an attack moves x (AutoAttack's x* is x until a part succeeds)."""
        c, t, key = self.clean, self.state.tensors, f"{name}/"
        if key + "robust" not in t:
            t[key + "robust"] = c.correct.clone()
            t[key + "energy_adversarial"] = c.e_nat.clone()
            t[key + "joint_adversarial"] = c.j_nat.clone()
            if targeted:
                t[key + "hit"] = torch.zeros(c.n, dtype=torch.bool, device=self.device)
            if self.keep:
                bs = self.settings["batch_size"]
                t[key + "x_adv"] = torch.cat([c.images(i, i + bs).cpu() for i in range(0, c.n, bs)])
        for k in ("robust", "energy_adversarial", "joint_adversarial") + (("hit",) if targeted else ()):
            t[key + k] = t[key + k].to(self.device)  # a resumed state comes back on the CPU
        return _Buffers(robust=t[key + "robust"], e_adv=t[key + "energy_adversarial"],
                        j_adv=t[key + "joint_adversarial"], hit=t.get(key + "hit") if targeted else None,
                        x_adv=t.get(key + "x_adv"))

    def _run_stage(self, name: str, stage: str, prog: dict[str, Any], buf: _Buffers, targeted: bool,
                   aa_warnings: list[str]) -> None:
        """One stage, batch by batch from prog["pos"]. Engine PGD attacks every example; AutoAttack
        parts only those still robust (its protocol)."""
        n, bs, t0 = self.clean.n, self.settings["batch_size"], time.perf_counter()
        engine = stage in _OBJECTIVE
        index = torch.arange(n, device=self.device)
        todo = index[prog["pos"]:] if engine else (buf.robust & (index >= prog["pos"])).nonzero().squeeze(1)
        total, done = (n, prog["pos"]) if engine else (len(todo), 0)
        self.emit("stage", {"attack": name, "stage": stage, "total": total, "done": done})
        for c in range(0, len(todo), bs):
            if engine:
                done = self._engine_batch(name, stage, prog, buf, targeted)
            else:
                done += self._autoattack_batch(stage, todo[c : c + bs], prog, buf, aa_warnings)
            _sync(self.device)
            prog["seconds"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            self.emit("progress", {"attack": name, "stage": stage, "done": done, "total": total})
            self.state.save()
        prog["seconds"] += time.perf_counter() - t0

    def _engine_batch(self, name: str, stage: str, prog: dict[str, Any], buf: _Buffers, targeted: bool) -> int:
        """PGD / CW on the batch at prog["pos"], from random starts of the stream (seed, ATTACK,
        the attack's name, the batch's first example in the whole set). Returns the examples done."""
        c, s = self.clean, self.settings
        i, j = prog["pos"], min(prog["pos"] + s["batch_size"], c.n)
        xb, yb = c.images(i, j), c.y[i:j]
        goal = c.targets[i:j] if targeted else yb
        g = generator_for(self.device, s["seed"], Stream.ATTACK, name_part(name), self.index_offset + i)
        xa = attacks_mod.pgd_restarts(
            self.model, xb, goal, restarts=s["restarts"], targeted=targeted, generator=g, eps=s["eps"],
            step_size=s["step_size"], steps=s["steps"], norm=s["norm"], objective=_OBJECTIVE[stage], init="uniform",
        )
        with torch.no_grad():
            logits = self.model(xa).float()
        pred = logits.argmax(1)
        buf.robust[i:j] = c.correct[i:j] & (pred == yb)
        buf.e_adv[i:j], buf.j_adv[i:j] = energy(logits), joint_energy(logits, yb)
        if buf.hit is not None:
            buf.hit[i:j] = pred == goal
        if buf.x_adv is not None:
            buf.x_adv[i:j] = xa.cpu()
        prog["pos"] = j
        return j

    def _autoattack_batch(self, stage: str, idx: torch.Tensor, prog: dict[str, Any], buf: _Buffers,
                          aa_warnings: list[str]) -> int:
        """One AutoAttack part on the still-robust examples idx; x* replaces x where it fools the model."""
        c, s = self.clean, self.settings
        xb, yb = c.images(idx), c.y[idx]
        xa = _autoattack_fitting(self.model, xb, yb, eps=s["eps"], norm=s["norm"], parts=(stage,), seed=s["seed"],
                                 num_classes=self.num_classes, on_warning=aa_warnings.append)
        with torch.no_grad():
            logits = self.model(xa).float()
        fooled = logits.argmax(1) != yb
        where = idx[fooled]
        buf.robust[where] = False
        buf.e_adv[where] = energy(logits[fooled])
        buf.j_adv[where] = joint_energy(logits[fooled], yb[fooled])
        if buf.x_adv is not None:
            buf.x_adv[where.cpu()] = xa[fooled].cpu()
        prog["pos"] = int(idx[-1]) + 1
        return len(idx)

    def _result(self, name: str, stages: tuple[str, ...], targeted: bool, prog: dict[str, Any],
                buf: _Buffers) -> AttackResult:
        c = self.clean
        success = None
        if buf.hit is not None:
            aimed = c.targets != c.y
            success = _fraction(buf.hit[aimed]) if bool(aimed.any()) else 0.0
        return AttackResult(
            name=name, robust_accuracy=_fraction(buf.robust), seconds=prog["seconds"],
            energy=energy_summary(c.e_nat, buf.e_adv, c.j_nat, buf.j_adv),
            settings=_attack_settings(name, stages, targeted, self.settings),
            robust=buf.robust.cpu(), energy_adversarial=buf.e_adv.cpu(), joint_adversarial=buf.j_adv.cpu(),
            stages=dict(prog["stages"]) if name not in _OBJECTIVE else {},
            targets=c.targets.cpu().clone() if targeted else None, target_success_rate=success, x_adv=buf.x_adv,
        )


def _masking_warning(name: str, stages: dict[str, float]) -> list[str]:
    """AutoAttack's own check: a gradient-free attack (Square) beating the gradient ones hints at
    gradient masking. `stages`: robust accuracy after each part."""
    gradient = [v for k, v in stages.items() if k != "square"]
    if "square" not in stages or not gradient or stages["square"] >= min(gradient) - 0.002:
        return []
    return [f"{name}: Square (gradient-free) lowered robust accuracy from {min(gradient):.2%} to "
            f"{stages['square']:.2%}: gradient masking? the evaluation may be unreliable ({SEE})"]


def _attack_settings(name: str, stages: tuple[str, ...], targeted: bool, settings: dict[str, Any]) -> dict[str, Any]:
    """The settings one attack ran with (what --save-adv stores per attack)."""
    out = {k: settings[k] for k in ("eps", "norm")}
    if name in _OBJECTIVE:
        out.update({k: settings[k] for k in ("steps", "step_size", "restarts")})
        out.update({"objective": _OBJECTIVE[name], "targeted": targeted})
        if targeted:
            out["target_class"] = settings["target_class"]
    else:
        out.update({"version": "standard" if name == "autoattack" else "custom", "parts": list(stages)})
    return out


# ----------------------------------------------------------------------------- ranks and files


def merge_evaluations(parts: list[Evaluation]) -> Evaluation:
    """One evaluation from the evaluations of consecutive shards of the images (rank order).
    Accuracies are recomputed from the per-example flags, stage accuracies and target success
    rates from the counts behind each shard's share; seconds are the slowest shard's."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    y, correct = _cat(p.y for p in parts), _cat(p.correct for p in parts)
    e_nat, j_nat = _cat(p.energy_natural for p in parts), _cat(p.joint_natural for p in parts)
    attacks = {name: _merge_attack([p.attacks[name] for p in parts], [p.y for p in parts], e_nat, j_nat)
               for name in first.attacks}
    robust_all = correct.clone()
    for r in attacks.values():
        robust_all &= r.robust
    return Evaluation(
        model=first.model, eps=first.eps, norm=first.norm, n=len(y), clean_accuracy=_fraction(correct), attacks=attacks,
        worst_case_accuracy=_fraction(robust_all), y=y, correct=correct, energy_natural=e_nat, joint_natural=j_nat,
        warnings=list(dict.fromkeys(w for p in parts for w in p.warnings)), info=dict(first.info),
        x=_cat(p.x for p in parts) if first.x is not None else None, config=first.config,
    )


def _cat(tensors) -> torch.Tensor:
    return torch.cat(list(tensors))


def _merge_attack(rs: list[AttackResult], ys: list[torch.Tensor], e_nat: torch.Tensor, j_nat: torch.Tensor
                  ) -> AttackResult:
    """One attack's results over the shards (rank order); e_nat, j_nat: the merged natural energies."""
    r0 = rs[0]
    robust = _cat(r.robust for r in rs)
    e_adv, j_adv = _cat(r.energy_adversarial for r in rs), _cat(r.joint_adversarial for r in rs)
    sizes = [len(r.robust) for r in rs]
    stages = {k: sum(r.stages[k] * m for r, m in zip(rs, sizes)) / len(robust) for k in r0.stages}
    rate = None
    if r0.target_success_rate is not None:
        aimed = [int((r.targets != y).sum()) for r, y in zip(rs, ys)]
        rate = sum(r.target_success_rate * m for r, m in zip(rs, aimed)) / max(sum(aimed), 1)
    return AttackResult(
        name=r0.name, robust_accuracy=_fraction(robust), seconds=max(r.seconds for r in rs),
        energy=energy_summary(e_nat, e_adv, j_nat, j_adv), settings=r0.settings, robust=robust,
        energy_adversarial=e_adv, joint_adversarial=j_adv, stages=stages,
        targets=_cat(r.targets for r in rs) if r0.targets is not None else None, target_success_rate=rate,
        x_adv=_cat(r.x_adv for r in rs) if r0.x_adv is not None else None,
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
