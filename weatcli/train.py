"""The training loop: schedule, precision, per-epoch evaluation and energy tracking, model
selection, exact resume.

Randomness: the model is initialised from `train.seed`; every epoch draws its shuffling, crops,
flips and attack starts from its own generator seeded by (seed, epoch), so a resumed run replays
exactly what an uninterrupted one would have done. A stop requested mid-epoch (Ctrl-C) saves the
generator state and the epoch's running sums with the weights, and resumes from that batch.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from contextlib import nullcontext

from . import checkpoint as ckpt
from . import data as data_mod
from . import distributed as dist_mod
from . import recipe as recipe_mod
from .attacks import attack_mode, engine_options, pgd, predict
from .config import RunConfig
from .energy import energy_stats
from .errors import WeatInputError, WeatRunError
from .fileio import atomic_write_text, remove_stale_temps
from .losses import LOSSES, Loss, method_attack
from .models import ARCHS, build, keep_ends_in_fp32
from .phases import detect_phases, energy_selection
from .runtime import EventFn, Stream, configure_backends, generator_for, ignore_event, resolve_device

SYNC_EVERY = 10  # batches between host syncs (progress display and the non-finite-loss check)
LOCK_NAME = ".lock"
# --select energy: phase 3 is confirmed some epochs after it starts (phases.py: smoothing window,
# sustained excursion), so the last SNAPSHOTS epochs stay on disk until it is.
SNAPSHOTS = 16


class Interrupt:
    """Set `.requested` (e.g. from a SIGINT handler) to stop after the current batch and save."""

    def __init__(self) -> None:
        self.requested = False


class TrainingInterrupted(Exception):
    def __init__(self, run_dir: Path, epoch: int, batch: int) -> None:
        super().__init__(f"interrupted at epoch {epoch} batch {batch}; resume with: weat train --resume {run_dir}")
        self.run_dir = run_dir


@dataclass
class FitResult:
    checkpoint: Path
    run_dir: Path
    clean_accuracy: float
    robust_accuracy: float
    epochs: int
    best_epoch: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The `weat train --json` object; phase3_epoch, catastrophic_overfitting_epoch and
        co_recovery_epoch are read from the whole history by phases.detect_phases (None: not seen)."""
        phases = detect_phases(self.history)
        return {
            "checkpoint": str(self.checkpoint),
            "run_dir": str(self.run_dir),
            "clean_accuracy": self.clean_accuracy,
            "robust_accuracy": self.robust_accuracy,
            "epochs": self.epochs,
            "best_epoch": self.best_epoch,
            "seconds": round(self.seconds, 3),
            "phase3_epoch": phases.phase3_start,
            "catastrophic_overfitting_epoch": phases.catastrophic_overfitting_epoch,
            "co_recovery_epoch": phases.co_recovery_epoch,
        }


# ----------------------------------------------------------------------------- helpers


def lr_at(step: int, total: int, cfg: RunConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`, stepped per batch.

    onecycle follows torch's OneCycleLR with cosine annealing and its defaults (start at lr/25,
    end at lr/25/1e4), without momentum cycling: momentum stays at train.momentum.
    """
    t = cfg.train
    frac = step / max(total, 1)
    if t.schedule == "constant":
        return t.lr
    if t.schedule == "cosine":
        if t.warmup_epochs:  # recipe: linear warm-up, then cosine
            return recipe_mod.warm_cosine(step, total, cfg)
        return t.lr * 0.5 * (1 + math.cos(math.pi * frac))
    if t.schedule == "multistep":
        return t.lr * t.gamma ** sum(frac >= m for m in t.milestones)
    initial, final = t.lr / 25.0, t.lr / 25.0 / 1e4
    up = max(t.pct_start * total - 1, 1.0)

    def anneal(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2.0 * (math.cos(math.pi * min(max(pct, 0.0), 1.0)) + 1)

    if step <= up:
        return anneal(initial, t.lr, step / up)
    return anneal(t.lr, final, (step - up) / max(total - 1 - up, 1.0))


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(device: torch.device, precision: str):
    """Mixed precision for the training step (attack and update). Weights, optimizer state and
    BatchNorm statistics stay fp32 (autocast casts per op); evaluation never runs under it."""
    dtype = _AUTOCAST_DTYPES.get(precision, torch.bfloat16)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=precision in _AUTOCAST_DTYPES)


def compiled(model: nn.Module, enabled: bool) -> nn.Module:
    """torch.compile'd view of `model` (shares its parameters) or the model itself."""
    return torch.compile(model) if enabled else model


@torch.no_grad()
def _mean(t: torch.Tensor) -> float:
    return float(t.float().mean()) if t.numel() else float("nan")


def evaluate(model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, cfg: RunConfig, *, generator) -> dict[str, float]:
    """Clean and PGD robust accuracy (CE, uniform start, attack.eval_steps) in eval mode, fp32."""
    a, bs = cfg.attack, cfg.train.eval_batch_size
    clean = robust = 0
    with attack_mode(model):
        for i in range(0, len(x_u8), bs):
            x, yb = data_mod.to_float(x_u8[i : i + bs]), y[i : i + bs]
            with torch.no_grad():
                clean += int((model(x).argmax(1) == yb).sum())
            x_adv = pgd(model, x, yb, eps=a.eps, step_size=a.step_size, steps=a.eval_steps, norm=a.norm,
                        objective="ce", init="uniform", generator=generator)
            with torch.no_grad():
                robust += int((model(x_adv).argmax(1) == yb).sum())
    n = max(len(x_u8), 1)
    return {"clean_accuracy": clean / n, "robust_accuracy": robust / n}


def track_energies(model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, cfg: RunConfig, *, generator) -> dict[str, float]:
    """Mean E(x), E(x*), dE(x), and the joint versions on a fixed training subset, x* being the
    method's own training attack, and the accuracy under that attack (`train_attack_accuracy`:
    it jumps up when single-step AT overfits catastrophically). The raw material of the paper's
    three phases."""
    bs = cfg.train.eval_batch_size
    parts: list[dict[str, torch.Tensor]] = []
    for i in range(0, len(x_u8), bs):
        x, yb = data_mod.to_float(x_u8[i : i + bs]), y[i : i + bs]
        x_adv = method_attack(model, x, yb, cfg, generator=generator)
        with attack_mode(model):
            logits_adv = predict(model, x_adv)
            parts.append({**energy_stats(predict(model, x), logits_adv, yb),
                          "train_attack_accuracy": (logits_adv.argmax(1) == yb).float()})
    return {k: _mean(torch.cat([p[k] for p in parts])) for k in parts[0]}


class _RunLock:
    """An exclusive lock on the run directory: a second `weat train` there refuses to start."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self) -> _RunLock:
        import fcntl

        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # an unwritable run directory: exit 1 naming it, not a traceback
            raise WeatRunError(f"cannot write {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise WeatInputError(f"run directory {self.path.parent} is in use by another weat train") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)


def _new_run_dir(cfg: RunConfig) -> Path:
    if cfg.train.out:
        run_dir = Path(cfg.train.out)
        if (run_dir / "last.safetensors").exists() or (run_dir / "model.safetensors").exists():
            raise WeatInputError(
                f"train.out: {run_dir} already holds a run; resume it with --resume {run_dir} or choose another --out"
            )
    else:
        base = cfg.default_run_dir()
        run_dir, k = base, 1
        while run_dir.exists():  # two runs started in the same second never share a directory
            k += 1
            run_dir = base.with_name(f"{base.name}-{k}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WeatRunError(f"cannot create run directory {run_dir}: {e.strerror}") from None
    return run_dir


def _read_metrics(path: Path, upto_epoch: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["epoch"] <= upto_epoch]


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for idx, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                out[f"{ckpt.OPTIM_PREFIX}{idx}/{name}"] = value.detach().cpu().contiguous().clone()
    return out


def _restore_optimizer(opt: torch.optim.Optimizer, extra: dict[str, torch.Tensor], device) -> None:
    """Load the saved optimizer state. A state tensor shaped like its parameter takes that
    parameter's memory layout: fused SGD pairs momentum and weight by raw memory order, so a
    contiguous momentum buffer for a channels_last weight (CUDA) would be applied scrambled."""
    params = [p for group in opt.param_groups for p in group["params"]]  # state_dict's indices
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in extra.items():
        if key.startswith(ckpt.OPTIM_PREFIX):
            idx, name = key[len(ckpt.OPTIM_PREFIX) :].split("/", 1)
            param = params[int(idx)]
            if value.shape == param.shape:
                value = torch.empty_like(param, dtype=value.dtype).copy_(value)
            state.setdefault(int(idx), {})[name] = value.to(device)
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)


# ----------------------------------------------------------------------------- the loop


def fit(
    cfg: RunConfig | None,
    *,
    resume: Path | None = None,
    on_event: EventFn | None = None,
    interrupt: Interrupt | None = None,
) -> FitResult:
    """Train `cfg`'s model with its method; write the run directory; return the selected model.

    resume: a run directory (or its last.safetensors) to continue; its stored config is used
    (cfg may then be None).
    on_event(kind, payload): "start", "batch" (every SYNC_EVERY batches), "epoch" (metrics row).
    """
    emit = on_event or ignore_event
    interrupt = interrupt or Interrupt()
    state: dict[str, Any] = {}
    resumed = None
    if resume is not None:
        resumed, state, run_dir = _read_resume(Path(resume))
        cfg = resumed.config
    elif cfg is None:
        raise ValueError("fit() needs a config unless it resumes a run")

    t = cfg.train
    if cfg.model.arch not in ARCHS:
        raise WeatInputError(f"model.arch: unknown {cfg.model.arch!r}; expected one of {', '.join(ARCHS)}")
    recipe_mod.check_config(cfg)
    ctx, device_name = dist_mod.init(t.device)  # a single process unless started by torchrun
    completed = False
    try:
        device = resolve_device(device_name, "train.device")
        if t.batch_size % ctx.world:
            raise WeatInputError(f"train.batch_size: {t.batch_size} is the global batch; expected a multiple of "
                                 f"the {ctx.world} ranks")
        dataset = data_mod.load(cfg.data.dataset, cfg.data.data_dir, download=cfg.data.download, device=device)
        dataset = data_mod.first_per_class(dataset, cfg.data.train_per_class)
        dataset = data_mod.noisy_labels(dataset, cfg.data.label_noise)
        recipe_mod.check_extra(cfg, dataset)  # before the run directory exists
        if resume is None:  # rank 0 names (and creates) the run directory, the others follow
            run_dir = Path(dist_mod.broadcast_object(str(_new_run_dir(cfg)) if ctx.main else None))
        lock = _RunLock(run_dir) if ctx.main else nullcontext()
        with lock, engine_options(cuda_graphs=t.cuda_graphs, fused_update=t.compile):
            result = _fit_locked(cfg=cfg, dataset=dataset, device=device, run_dir=run_dir, ctx=ctx,
                                 emit=emit if ctx.main else ignore_event, interrupt=interrupt, resumed=resumed,
                                 state=state)
        completed = True
        return result
    except TrainingInterrupted:
        completed = True  # every rank stopped at the same agreed batch
        raise
    finally:
        if ctx.enabled:
            dist_mod.shutdown(completed=completed)


def _read_resume(resume: Path) -> tuple[ckpt.Checkpoint, dict[str, Any], Path]:
    """--resume (a run directory or its last.safetensors): the checkpoint, its parsed resume state
    and the run directory, checked before any slow work."""
    last = resume if resume.suffix == ".safetensors" else resume / "last.safetensors"
    if not last.is_file():
        raise WeatInputError(f"--resume: {last} not found (expected a run directory written by weat train)")
    resumed = ckpt.load(last)
    try:
        state = json.loads(resumed.metadata["resume"])
    except (KeyError, ValueError):
        raise WeatInputError(f"--resume: {last} has no resume state (a model.safetensors?); expected a run directory or its last.safetensors") from None
    return resumed, state, last.parent


@dataclass
class _Run:
    """What every step of one run reads: its inputs and what `_set_up` built from them. Set once;
    what moves from batch to batch lives in `_Progress`."""

    cfg: RunConfig
    dataset: data_mod.Dataset
    device: torch.device
    run_dir: Path
    ctx: dist_mod.Context
    emit: EventFn  # the caller's on_event on rank 0, ignore_event on the other ranks
    interrupt: Interrupt
    model: nn.Module  # the weights: the optimizer steps them, checkpoints are written from them
    net: nn.Module  # `model` or its torch.compile'd view (same parameters): attacks and evaluation
    train_net: nn.Module  # `net`, inside DDP with several ranks (gradient all-reduce): the training forward
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    loss_fn: Loss
    batch_size: int  # the global batch, at most the training set's size
    batches: int  # per epoch: the ragged last batch is dropped (fixed shapes every step)
    meta_common: dict[str, int]  # num_classes, in_channels, image_size for every checkpoint's metadata
    recipe: recipe_mod.Recipe  # EMA, AWP, extra data, TensorBoard (recipe.py): inert when all are off

    @property
    def total_steps(self) -> int:
        """Optimizer steps in the whole run: the learning-rate schedule's length."""
        return self.batches * self.cfg.train.epochs

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"


def _initial_best() -> dict[str, Any]:
    return {"robust_accuracy": -1.0, "epoch": 0, "clean_accuracy": 0.0, "score": -1.0}


@dataclass
class _Progress:
    """Where the run stands: what last.safetensors saves and `_restore` reads back."""

    start_epoch: int = 0  # the first epoch (0-based) this process trains
    start_batch: int = 0  # the batch that epoch starts at: non-zero only after a mid-epoch stop
    generator_state: torch.Tensor | None = None  # that epoch's generator at start_batch
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # the epoch's running 0-d sums (this rank's)
    best: dict[str, Any] = field(default_factory=_initial_best)  # the selected epoch and its accuracies
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl rows, one an epoch


def _fit_locked(*, cfg: RunConfig, dataset: data_mod.Dataset, device: torch.device, run_dir: Path,
                ctx: dist_mod.Context, emit: EventFn, interrupt: Interrupt, resumed: ckpt.Checkpoint | None,
                state: dict[str, Any]) -> FitResult:
    """The run, top to bottom, once the run directory is ours (rank 0 holds its lock).

    resumed/state: the last.safetensors being continued and its parsed resume state, or None/{}.
    """
    run = _set_up(cfg=cfg, dataset=dataset, device=device, run_dir=run_dir, ctx=ctx, emit=emit, interrupt=interrupt)
    progress = _restore(run, resumed=resumed, state=state)
    _write_run_files(run, progress)
    if resumed is None:  # from here on the run directory always holds a last.safetensors to resume from
        _save_last(run, progress, epoch=0, batch=0, generator=None)
    t = cfg.train
    emit("start", {"run_dir": str(run_dir), "epochs": t.epochs, "batches": run.batches,
                   "start_epoch": progress.start_epoch, "device": str(device), "method": t.method,
                   "dataset": cfg.data.dataset, "history": list(progress.history)})
    t0 = time.perf_counter()
    for epoch in range(progress.start_epoch, t.epochs):
        e0 = time.perf_counter()
        _train_epoch(run, progress, epoch=epoch)
        train_seconds = time.perf_counter() - e0
        row = _epoch_row(run, progress, epoch=epoch, started=e0, train_seconds=train_seconds)
        run.recipe.log_epoch(run_dir, row)
        _select_and_save(run, progress, row=row)
        emit("epoch", {"row": row, "epochs": t.epochs, "best_epoch": progress.best["epoch"]})
        if _stop_requested(interrupt, ctx, True, device):
            raise TrainingInterrupted(run_dir, epoch + 1, run.batches)
    run.recipe.close()
    return _result(run, progress, seconds=time.perf_counter() - t0)


def _set_up(*, cfg: RunConfig, dataset: data_mod.Dataset, device: torch.device, run_dir: Path,
            ctx: dist_mod.Context, emit: EventFn, interrupt: Interrupt) -> _Run:
    """Model (initialised from train.seed: the only use of the global RNG), precision, backends,
    memory format, compile, DDP, optimizer and gradient scaler, in that order."""
    t = cfg.train
    torch.manual_seed(t.seed)  # model initialisation only; everything else uses explicit generators
    model = build(cfg.model.arch, num_classes=dataset.num_classes, in_channels=dataset.in_channels,
                  image_size=dataset.image_size, mean=cfg.model.mean, std=cfg.model.std).to(device)
    if ctx.enabled and t.sync_bn:
        dist_mod.convert_batch_norm(model)
    if t.precision != "fp32":
        keep_ends_in_fp32(model)
    configure_backends(device, t.tf32)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    net = compiled(model, t.compile)  # what the loop calls; checkpoints are written from `model`
    train_net = net  # the training forward; attacks and evaluation use `net` (no gradient all-reduce)
    if ctx.enabled:
        train_net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    # One fused kernel for the whole update on CUDA, multi-tensor (foreach) kernels elsewhere.
    fused = device.type == "cuda"
    optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                                nesterov=t.nesterov, foreach=None if fused else True, fused=fused or None)
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    n_train = len(dataset.train_x)
    batch_size = min(t.batch_size, n_train)
    recipe = recipe_mod.Recipe(cfg, model=model, dataset=dataset, device=device, ctx=ctx)
    return _Run(cfg=cfg, dataset=dataset, device=device, run_dir=run_dir, ctx=ctx, emit=emit, interrupt=interrupt,
                model=model, net=net, train_net=train_net, optimizer=optimizer, scaler=scaler,
                loss_fn=LOSSES[t.method], batch_size=batch_size,
                batches=recipe.steps_per_epoch or n_train // batch_size,
                meta_common=dict(num_classes=dataset.num_classes, in_channels=dataset.in_channels,
                                 image_size=dataset.image_size), recipe=recipe)


def _restore(run: _Run, *, resumed: ckpt.Checkpoint | None, state: dict[str, Any]) -> _Progress:
    """Weights, optimizer, scaler, selection and (after a mid-epoch stop) the epoch's generator and
    running sums from last.safetensors; the metrics rows up to the resumed epoch. A fresh run: none."""
    progress = _Progress()
    if resumed is not None:
        run.model.load_state_dict(resumed.model.state_dict())
        _restore_optimizer(run.optimizer, resumed.extra, run.device)
        run.recipe.load_state(resumed.extra, resumed.path)
        progress.start_epoch, progress.start_batch = state["epoch"], state["batch"]
        progress.best = state["best"]
        if "scaler" in state:
            run.scaler.load_state_dict(state["scaler"])
        prefix = ckpt.STATE_PREFIX + "sum/"
        sums = {k[len(prefix) :]: v.to(run.device) for k, v in resumed.extra.items() if k.startswith(prefix)}
        if not run.ctx.main:  # the saved sums are global: rank 0 carries them on, the others start at 0
            sums = {k: torch.zeros_like(v) for k, v in sums.items()}
        progress.sums = sums
        progress.generator_state = resumed.extra.get(ckpt.STATE_PREFIX + "generator")
    progress.history = _read_metrics(run.metrics_path, progress.start_epoch)
    return progress


def _write_run_files(run: _Run, progress: _Progress) -> None:
    """Rank 0: clear the temp files of atomic writes a killed run left behind (it holds the lock:
    nobody else writes here), then write config.toml and the metrics kept so far."""
    if not run.ctx.main:
        return
    d = run.run_dir
    remove_stale_temps(d / "last.safetensors", d / "model.safetensors", run.metrics_path,
                       d / "config.toml", d / "snapshots" / "epoch-*.safetensors")
    atomic_write_text(d / "config.toml", run.cfg.to_toml())
    _write_metrics(run, progress.history)


def _write_metrics(run: _Run, history: list[dict[str, Any]]) -> None:
    atomic_write_text(run.metrics_path, "".join(json.dumps(r) + "\n" for r in history))


def _save_last(run: _Run, progress: _Progress, *, epoch: int, batch: int, generator: torch.Generator | None) -> None:
    """Write last.safetensors: weights, optimizer state and where to resume (`epoch` epochs done,
    `batch` batches into the next). Mid-epoch (batch > 0) the epoch's generator and running sums
    make the replay exact; their all-reduce is a collective, so every rank calls this."""
    global_sums = dist_mod.all_reduce_sums(progress.sums) if batch else {}
    if not run.ctx.main:
        return
    tensors = ckpt.state_dict_of(run.model)
    tensors.update(_optimizer_tensors(run.optimizer))
    tensors.update(run.recipe.state_tensors())
    if batch:
        tensors[ckpt.STATE_PREFIX + "generator"] = generator.get_state().cpu()
        tensors.update({f"{ckpt.STATE_PREFIX}sum/{k}": v.detach().cpu().reshape(()) for k, v in global_sums.items()})
    history = progress.history
    meta = ckpt.model_metadata(run.cfg, epoch=epoch, metrics=history[-1] if history else {}, **run.meta_common)
    resume_state = {"epoch": epoch, "batch": batch, "best": progress.best}
    if run.scaler.is_enabled():
        resume_state["scaler"] = run.scaler.state_dict()
    meta["resume"] = json.dumps(resume_state)
    _write_checkpoint(run.run_dir / "last.safetensors", tensors, meta)


def _train_epoch(run: _Run, progress: _Progress, *, epoch: int) -> None:
    """One pass over the training set in the order drawn from the epoch's own generator (seed,
    epoch), which then draws the crops, flips and attack starts. The running loss is checked every
    SYNC_EVERY batches. A stop mid-epoch saves and raises TrainingInterrupted; a stop at the last
    batch lets the epoch finish (the caller stops after it)."""
    t, device = run.cfg.train, run.device
    g = generator_for(device, t.seed, epoch)
    perm = torch.randperm(len(run.dataset.train_x), generator=g, device=device)
    if progress.start_batch:  # resuming mid-epoch: the saved stream and sums carry on
        g.set_state(progress.generator_state.to(g.get_state().device))
    else:
        progress.sums = {}
    run.net.train()
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # 1-based batch, -1: none yet
    for b in range(progress.start_batch, run.batches):
        x, y = _batch(run, perm=perm, batch=b, generator=g, epoch=epoch)
        lr = lr_at(epoch * run.batches + b, run.total_steps, run.cfg)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        stats, first_bad = _train_step(run, x=x, y=y, generator=g, epoch=epoch, batch=b, first_bad=first_bad)
        sums = progress.sums
        for k, v in stats.items():
            sums[k] = sums[k] + v.float() if k in sums else v.detach().float().clone()
        at_check = (b + 1) % SYNC_EVERY == 0 or b + 1 == run.batches
        if at_check and "n" in sums:
            _check_running_loss(run, progress, epoch=epoch, batch=b, lr=lr, first_bad=first_bad)
        if _stop_requested(run.interrupt, run.ctx, at_check, device):
            if b + 1 < run.batches:
                _save_last(run, progress, epoch=epoch, batch=b + 1, generator=g)
            else:
                break  # the epoch is complete: finish it normally, then stop
            raise TrainingInterrupted(run.run_dir, epoch + 1, b + 1)
    progress.start_batch = 0


def _batch(run: _Run, *, perm: torch.Tensor, batch: int, generator: torch.Generator,
           epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `batch` (0-based) of the epoch's permutation, augmented: float images (B, C, H, W) in
    [0, 1] and labels (B,), B being this rank's slice of the global batch. With extra data the
    recipe mixes the step's real and generated images."""
    ds, d = run.dataset, run.cfg.data
    if run.recipe.stream is not None:
        x_u8, y = run.recipe.global_batch(ds, perm=perm, epoch=epoch, step=batch)
    else:
        idx = perm[batch * run.batch_size : (batch + 1) * run.batch_size]
        x_u8, y = ds.train_x[idx], ds.train_y[idx]
    x = data_mod.augment(x_u8, generator=generator, padding=d.crop_padding, flip=d.flip)
    # Every rank augmented the whole global batch (the generators stay in step); keep our slice.
    x, y = dist_mod.local_batch(x, run.ctx), dist_mod.local_batch(y, run.ctx)
    if run.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def _train_step(run: _Run, *, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, epoch: int,
                batch: int, first_bad: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The method's loss (attack included) under autocast, then one optimizer step. Returns the
    batch's 0-d sums (loss x B, n = B, the method's own) and first_bad, updated on the device (no
    sync) if this batch's loss is non-finite. --nan-policy skip-batch: a batch non-finite on any
    rank makes no update and counts only as skipped."""
    t = run.cfg.train
    with _autocast(run.device, t.precision), engine_options(shard=(run.ctx.rank, run.ctx.world)):
        # recipe: AWP attacks first and moves the weights to w + v (x_adv None: the loss attacks itself)
        x_adv, awp_diff = run.recipe.perturb_weights(run.model, run.train_net, x, y, generator=generator, epoch=epoch)
        loss, stats = run.loss_fn(run.train_net, x, y, run.cfg, generator=generator, progress=epoch / t.epochs,
                                  **({} if x_adv is None else {"x_adv": x_adv}))
    if t.nan_policy == "skip-batch" and not _all_finite(loss, run.ctx):
        run.recipe.restore_weights(run.model, awp_diff)
        return {"skipped_batches": torch.ones((), device=run.device)}, first_bad
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.recipe.restore_weights(run.model, awp_diff)  # back to exactly w before the update
    run.scaler.step(run.optimizer)  # fp16: skipped by the scaler itself when its gradients overflowed
    run.scaler.update()
    run.recipe.after_step(run.model)  # EMA
    stats = {"loss": loss.detach().float() * len(y), "n": torch.tensor(float(len(y)), device=run.device), **stats}
    first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), batch + 1, first_bad)
    return stats, first_bad


def _check_running_loss(run: _Run, progress: _Progress, *, epoch: int, batch: int, lr: float,
                        first_bad: torch.Tensor) -> None:
    """A host sync: the epoch's mean loss so far over every rank. Non-finite: stop (exit 1) naming
    the first bad batch; last.safetensors still holds the last good state. Else report progress."""
    sums = progress.sums
    seen = dist_mod.all_reduce_sums({"loss": sums["loss"], "n": sums["n"]})
    running = float(seen["loss"] / seen["n"])
    if not math.isfinite(running):
        where = torch.where(first_bad > 0, first_bad, run.batches + 1)
        raise WeatRunError(
            f"non-finite loss at epoch {epoch + 1} batch {int(dist_mod.all_reduce_(where, 'min'))} "
            f"(of {run.batches}); the last good checkpoint is kept in {run.run_dir}"
        )
    run.emit("batch", {"epoch": epoch + 1, "batch": batch + 1, "batches": run.batches, "loss": running, "lr": lr})


def _epoch_row(run: _Run, progress: _Progress, *, epoch: int, started: float, train_seconds: float) -> dict[str, Any]:
    """The epoch's metrics row: training averages over every rank, held-out clean and PGD accuracy
    on the first eval_n test images, energies on the first energy_n training images (both attacks
    drawn from the fixed EVAL_ATTACK stream), times in seconds. Appended to metrics.jsonl."""
    t, cfg, ds = run.cfg.train, run.cfg, run.dataset
    sums = progress.sums = dist_mod.all_reduce_sums(progress.sums)  # the epoch's totals over every rank
    eval_gen = generator_for(run.device, t.seed, Stream.EVAL_ATTACK)
    row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr_at((epoch + 1) * run.batches - 1, run.total_steps, cfg)}
    if "n" not in sums:
        raise WeatRunError(f"every batch of epoch {epoch + 1} had a non-finite loss (--nan-policy skip-batch); "
                           f"the last good checkpoint is kept in {run.run_dir}")
    row.update(_train_averages(sums))
    net = run.recipe.eval_model(run.net)  # recipe: the EMA weights when averaging
    row.update(evaluate(net, ds.test_x[: t.eval_n], ds.test_y[: t.eval_n], cfg, generator=eval_gen))
    row.update(track_energies(net, ds.train_x[: t.energy_n], ds.train_y[: t.energy_n], cfg, generator=eval_gen))
    row["seconds"] = round(time.perf_counter() - started, 3)
    row["train_seconds"] = round(train_seconds, 3)
    bad = [k for k, v in run.model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise WeatRunError(f"non-finite weights ({bad[0]}) after epoch {epoch + 1}; "
                           f"the last good checkpoint is kept in {run.run_dir}")
    progress.history.append(row)
    if run.ctx.main:  # every rank evaluated the same model on the same images; rank 0 writes
        _write_metrics(run, progress.history)
    return row


def _train_averages(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-example means of the epoch's sums (n: examples that made an update)."""
    n = float(sums["n"])
    out: dict[str, float] = {"train_loss": float(sums["loss"]) / n}
    if "skipped_batches" in sums:
        out["skipped_batches"] = int(sums["skipped_batches"])
    # der: train.der_weight > 0, the mean DER term (docs/science.md#der); energy_anchor: train.der_anchor
    # > 0, mean E(x)^2 + mean E(x*)^2.
    for key, name in (("correct", "train_accuracy"), ("adv_correct", "train_adv_accuracy"), ("weight", "mean_weight"),
                      ("der", "der"), ("energy_anchor", "energy_anchor")):
        if key in sums:
            out[name] = float(sums[key]) / n
    return out


def _select_and_save(run: _Run, progress: _Progress, *, row: dict[str, Any]) -> None:
    """Rank 0 updates model.safetensors by --select (best/last/energy); every rank then joins the
    end-of-epoch last.safetensors write."""
    if run.ctx.main:
        model = run.recipe.eval_model(run.model)  # recipe: the EMA weights when averaging
        if run.cfg.train.select == "energy":
            progress.best = _select_by_energy(run.run_dir, model, run.cfg, progress.history, progress.best,
                                              run.meta_common)
        else:
            progress.best = _select_by_accuracy(run.run_dir, model, run.cfg, row, progress.best, run.meta_common)
    _save_last(run, progress, epoch=row["epoch"], batch=0, generator=None)


def _result(run: _Run, progress: _Progress, *, seconds: float) -> FitResult:
    """The selected model (model.safetensors), its accuracies and the whole history."""
    best = progress.best
    return FitResult(
        checkpoint=run.run_dir / "model.safetensors",
        run_dir=run.run_dir,
        clean_accuracy=best["clean_accuracy"],
        robust_accuracy=best["robust_accuracy"],
        epochs=run.cfg.train.epochs,
        best_epoch=best["epoch"],
        seconds=seconds,
        history=progress.history,
    )


def _all_finite(loss: torch.Tensor, ctx) -> bool:
    """Is the loss finite on every rank? (They must agree on skipping a batch.)"""
    finite = torch.isfinite(loss.detach()).float()
    return bool(dist_mod.all_reduce_(finite, "min")) if ctx.enabled else bool(finite)


def _stop_requested(interrupt: Interrupt, ctx, at_check: bool, device: torch.device) -> bool:
    """A stop (Ctrl-C) is acted on at once in one process; with several ranks only at a check,
    where they agree on it (any rank asked), so every rank saves and stops at the same batch."""
    if not ctx.enabled:
        return interrupt.requested
    if not at_check:
        return False
    flag = torch.tensor(float(interrupt.requested), device=device)
    return bool(dist_mod.all_reduce_(flag, "max"))


def _select_by_accuracy(run_dir: Path, model: nn.Module, cfg: RunConfig, row: dict[str, Any],
                        best: dict[str, Any], meta_common: dict[str, int]) -> dict[str, Any]:
    """--select best|last. best: the highest held-out robust accuracy after `select_after` epochs
    (a standard model has ~0 robust accuracy everywhere: it is selected on clean accuracy)."""
    t, epoch = cfg.train, row["epoch"]
    last_epoch = epoch == t.epochs
    key = "clean_accuracy" if t.method == "standard" else "robust_accuracy"
    eligible = epoch > t.select_after
    improved = row[key] > best.get("score", -1.0)
    if t.select == "last" or (eligible and improved) or (last_epoch and best["epoch"] == 0):
        meta = ckpt.model_metadata(cfg, epoch=epoch, metrics=row, **meta_common)
        _write_checkpoint(run_dir / "model.safetensors", ckpt.state_dict_of(model), meta)
        return {"robust_accuracy": row["robust_accuracy"], "epoch": epoch, "clean_accuracy": row["clean_accuracy"],
                "score": row[key]}
    return best


def _select_by_energy(run_dir: Path, model: nn.Module, cfg: RunConfig, history: list[dict[str, Any]],
                      best: dict[str, Any], meta_common: dict[str, int]) -> dict[str, Any]:
    """--select energy: model.safetensors follows the latest epoch until phase 3 or catastrophic
    overfitting is detected in the energies, then holds the epoch just before it. Phase 3 is final;
    a run that recovers from catastrophic overfitting is followed again (phases.energy_selection).
    No held-out accuracy is consulted."""
    row = history[-1]
    epoch = row["epoch"]
    snap_dir = run_dir / "snapshots"
    snap_dir.mkdir(exist_ok=True)
    meta = ckpt.model_metadata(cfg, epoch=epoch, metrics=row, **meta_common)
    _write_checkpoint(snap_dir / f"epoch-{epoch:04d}.safetensors", ckpt.state_dict_of(model), meta)
    for old in sorted(snap_dir.glob("epoch-*.safetensors"))[:-SNAPSHOTS]:
        old.unlink()
    if best.get("fixed"):
        return best
    selection = energy_selection(history)
    if selection.epoch is None:  # nothing ended the run (or it recovered): the latest epoch is the candidate
        _write_checkpoint(run_dir / "model.safetensors", ckpt.state_dict_of(model), meta)
        return {"epoch": epoch, "robust_accuracy": row["robust_accuracy"], "clean_accuracy": row["clean_accuracy"], "score": 0.0}
    if best.get("held_for") == selection.epoch:  # already holding it (whichever snapshot stood in for it)
        return best
    snaps = sorted(snap_dir.glob("epoch-*.safetensors"))
    # The snapshot of the chosen epoch, or the oldest one kept if detection lagged beyond the ring.
    pick = next((p for p in snaps if int(p.stem.split("-")[1]) >= selection.epoch), snaps[0])
    tensors, meta = ckpt.read(pick)
    _write_checkpoint(run_dir / "model.safetensors", tensors, meta)
    chosen_row = next(r for r in history if r["epoch"] == int(meta["epoch"]))
    return {"epoch": chosen_row["epoch"], "robust_accuracy": chosen_row["robust_accuracy"],
            "clean_accuracy": chosen_row["clean_accuracy"], "score": 0.0, "held_for": selection.epoch,
            "fixed": selection.ended_by == "phase3"}


def _write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    try:
        ckpt.save(path, tensors, meta)
    except OSError as e:
        raise WeatRunError(f"cannot write {path}: {e.strerror}; earlier checkpoints are intact") from None
