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
from .attacks import attack_mode, engine_options, pgd, predict
from .config import RunConfig
from .energy import energy_stats
from .errors import WeatInputError, WeatRunError
from .fileio import atomic_write_text, remove_stale_temps
from .losses import LOSSES, method_attack
from .models import ARCHS, build, keep_ends_in_fp32
from .phases import energy_select_epoch
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
        return {
            "checkpoint": str(self.checkpoint),
            "run_dir": str(self.run_dir),
            "clean_accuracy": self.clean_accuracy,
            "robust_accuracy": self.robust_accuracy,
            "epochs": self.epochs,
            "best_epoch": self.best_epoch,
            "seconds": round(self.seconds, 3),
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
    method's own training attack. The raw material of the paper's three phases."""
    bs = cfg.train.eval_batch_size
    parts: list[dict[str, torch.Tensor]] = []
    for i in range(0, len(x_u8), bs):
        x, yb = data_mod.to_float(x_u8[i : i + bs]), y[i : i + bs]
        x_adv = method_attack(model, x, yb, cfg, generator=generator)
        with attack_mode(model):
            parts.append(energy_stats(predict(model, x), predict(model, x_adv), yb))
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
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in extra.items():
        if key.startswith(ckpt.OPTIM_PREFIX):
            idx, name = key[len(ckpt.OPTIM_PREFIX) :].split("/", 1)
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
        resume = Path(resume)
        last = resume if resume.suffix == ".safetensors" else resume / "last.safetensors"
        if not last.is_file():
            raise WeatInputError(f"--resume: {last} not found (expected a run directory written by weat train)")
        resumed = ckpt.load(last)
        cfg = resumed.config
        run_dir = last.parent
        try:
            state = json.loads(resumed.metadata["resume"])
        except (KeyError, ValueError):
            raise WeatInputError(f"--resume: {last} has no resume state (a model.safetensors?); expected a run directory or its last.safetensors") from None
    elif cfg is None:
        raise ValueError("fit() needs a config unless it resumes a run")

    t = cfg.train
    if cfg.model.arch not in ARCHS:
        raise WeatInputError(f"model.arch: unknown {cfg.model.arch!r}; expected one of {', '.join(ARCHS)}")
    ctx, device_name = dist_mod.init(t.device)  # a single process unless started by torchrun
    completed = False
    try:
        device = resolve_device(device_name, "train.device")
        if t.batch_size % ctx.world:
            raise WeatInputError(f"train.batch_size: {t.batch_size} is the global batch; expected a multiple of "
                                 f"the {ctx.world} ranks")
        dataset = data_mod.load(cfg.data.dataset, cfg.data.data_dir, download=cfg.data.download, device=device)
        if resume is None:  # rank 0 names (and creates) the run directory, the others follow
            run_dir = Path(dist_mod.broadcast_object(str(_new_run_dir(cfg)) if ctx.main else None))
        lock = _RunLock(run_dir) if ctx.main else nullcontext()
        with lock, engine_options(cuda_graphs=t.cuda_graphs, fused_update=t.compile):
            result = _fit_locked(cfg, dataset, device, run_dir, resumed, state, emit if ctx.main else ignore_event,
                                 interrupt, ctx)
        completed = True
        return result
    except TrainingInterrupted:
        completed = True  # every rank stopped at the same agreed batch
        raise
    finally:
        if ctx.enabled:
            dist_mod.shutdown(completed=completed)


def _fit_locked(cfg, dataset, device, run_dir: Path, resumed, state, emit, interrupt, ctx) -> FitResult:
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
    loss_fn = LOSSES[t.method]
    meta_common = dict(num_classes=dataset.num_classes, in_channels=dataset.in_channels, image_size=dataset.image_size)

    n_train = len(dataset.train_x)
    batch_size = min(t.batch_size, n_train)
    batches = n_train // batch_size  # drop the ragged last batch: fixed shapes every step
    total_steps = batches * t.epochs
    eval_x, eval_y = dataset.test_x[: t.eval_n], dataset.test_y[: t.eval_n]
    energy_x, energy_y = dataset.train_x[: t.energy_n], dataset.train_y[: t.energy_n]

    start_epoch, start_batch = 0, 0
    sums: dict[str, torch.Tensor] = {}
    best: dict[str, Any] = {"robust_accuracy": -1.0, "epoch": 0, "clean_accuracy": 0.0, "score": -1.0}
    gen_state = None
    if resumed is not None:
        model.load_state_dict(resumed.model.state_dict())
        _restore_optimizer(optimizer, resumed.extra, device)
        start_epoch, start_batch = state["epoch"], state["batch"]
        best = state["best"]
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        sums = {k[len(ckpt.STATE_PREFIX) + 4 :]: v.to(device) for k, v in resumed.extra.items()
                if k.startswith(ckpt.STATE_PREFIX + "sum/")}
        if not ctx.main:  # the saved sums are global: rank 0 carries them on, the others start at 0
            sums = {k: torch.zeros_like(v) for k, v in sums.items()}
        gen_state = resumed.extra.get(ckpt.STATE_PREFIX + "generator")
    metrics_path = run_dir / "metrics.jsonl"
    history = _read_metrics(metrics_path, start_epoch)
    if ctx.main:
        # Temp files of atomic writes a killed run left behind (rank 0 holds the lock: nobody else writes here).
        remove_stale_temps(run_dir / "last.safetensors", run_dir / "model.safetensors", metrics_path,
                           run_dir / "config.toml", run_dir / "snapshots" / "epoch-*.safetensors")
        atomic_write_text(run_dir / "config.toml", cfg.to_toml())
        atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))

    def save_last(epoch: int, batch: int, generator: torch.Generator | None) -> None:
        global_sums = dist_mod.all_reduce_sums(sums) if batch else {}  # a collective: every rank calls it
        if not ctx.main:
            return
        tensors = ckpt.state_dict_of(model)
        tensors.update(_optimizer_tensors(optimizer))
        if batch:  # mid-epoch: the epoch's generator and running sums make the replay exact
            tensors[ckpt.STATE_PREFIX + "generator"] = generator.get_state().cpu()
            tensors.update({f"{ckpt.STATE_PREFIX}sum/{k}": v.detach().cpu().reshape(()) for k, v in global_sums.items()})
        meta = ckpt.model_metadata(cfg, epoch=epoch, metrics=history[-1] if history else {}, **meta_common)
        resume_state = {"epoch": epoch, "batch": batch, "best": best}
        if scaler.is_enabled():
            resume_state["scaler"] = scaler.state_dict()
        meta["resume"] = json.dumps(resume_state)
        _write_checkpoint(run_dir / "last.safetensors", tensors, meta)

    if resumed is None:  # from here on the run directory always holds a last.safetensors to resume from
        save_last(0, 0, None)
    emit("start", {"run_dir": str(run_dir), "epochs": t.epochs, "batches": batches, "start_epoch": start_epoch,
                   "device": str(device), "method": t.method, "dataset": cfg.data.dataset, "history": list(history)})
    t0 = time.perf_counter()
    for epoch in range(start_epoch, t.epochs):
        e0 = time.perf_counter()
        g = generator_for(device, t.seed, epoch)
        perm = torch.randperm(n_train, generator=g, device=device)
        if epoch == start_epoch and start_batch:
            g.set_state(gen_state.to(g.get_state().device))
        else:
            sums = {}
        net.train()
        first_bad = torch.full((), -1, dtype=torch.long, device=device)
        for b in range(start_batch if epoch == start_epoch else 0, batches):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            x = data_mod.augment(dataset.train_x[idx], generator=g, padding=cfg.data.crop_padding, flip=cfg.data.flip)
            y = dataset.train_y[idx]
            # Every rank augmented the whole global batch (the generators stay in step); keep our slice.
            x, y = dist_mod.local_batch(x, ctx), dist_mod.local_batch(y, ctx)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            lr = lr_at(epoch * batches + b, total_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with _autocast(device, t.precision), engine_options(shard=(ctx.rank, ctx.world)):
                loss, stats = loss_fn(train_net, x, y, cfg, generator=g, progress=epoch / t.epochs)
            if t.nan_policy == "skip-batch" and not _all_finite(loss, ctx):
                # No update from this batch and nothing of it in the epoch's averages.
                stats = {"skipped_batches": torch.ones((), device=device)}
            else:
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)  # fp16: skipped by the scaler itself when its gradients overflowed
                scaler.update()
                stats = {"loss": loss.detach().float() * len(y), "n": torch.tensor(float(len(y)), device=device), **stats}
                # The first non-finite batch, recorded on the device (no sync) and reported at the next check.
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), b + 1, first_bad)
            for k, v in stats.items():
                sums[k] = sums[k] + v.float() if k in sums else v.detach().float().clone()
            at_check = (b + 1) % SYNC_EVERY == 0 or b + 1 == batches
            if at_check and "n" in sums:
                seen = dist_mod.all_reduce_sums({"loss": sums["loss"], "n": sums["n"]})
                running = float(seen["loss"] / seen["n"])
                if not math.isfinite(running):
                    where = torch.where(first_bad > 0, first_bad, batches + 1)
                    raise WeatRunError(
                        f"non-finite loss at epoch {epoch + 1} batch {int(dist_mod.all_reduce_(where, 'min'))} "
                        f"(of {batches}); the last good checkpoint is kept in {run_dir}"
                    )
                emit("batch", {"epoch": epoch + 1, "batch": b + 1, "batches": batches, "loss": running, "lr": lr})
            if _stop_requested(interrupt, ctx, at_check, device):
                if b + 1 < batches:
                    save_last(epoch, b + 1, g)
                else:
                    break  # the epoch is complete: finish it normally, then stop below
                raise TrainingInterrupted(run_dir, epoch + 1, b + 1)
        start_batch = 0
        train_seconds = time.perf_counter() - e0

        sums = dist_mod.all_reduce_sums(sums)  # the epoch's totals over every rank
        eval_gen = generator_for(device, t.seed, Stream.EVAL_ATTACK)
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr_at((epoch + 1) * batches - 1, total_steps, cfg)}
        if "n" not in sums:
            raise WeatRunError(f"every batch of epoch {epoch + 1} had a non-finite loss (--nan-policy skip-batch); "
                               f"the last good checkpoint is kept in {run_dir}")
        n = float(sums["n"])
        row["train_loss"] = float(sums["loss"]) / n
        if "skipped_batches" in sums:
            row["skipped_batches"] = int(sums["skipped_batches"])
        if "correct" in sums:
            row["train_accuracy"] = float(sums["correct"]) / n
        if "adv_correct" in sums:
            row["train_adv_accuracy"] = float(sums["adv_correct"]) / n
        if "weight" in sums:
            row["mean_weight"] = float(sums["weight"]) / n
        row.update(evaluate(net, eval_x, eval_y, cfg, generator=eval_gen))
        row.update(track_energies(net, energy_x, energy_y, cfg, generator=eval_gen))
        row["seconds"] = round(time.perf_counter() - e0, 3)
        row["train_seconds"] = round(train_seconds, 3)
        bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise WeatRunError(f"non-finite weights ({bad[0]}) after epoch {epoch + 1}; the last good checkpoint is kept in {run_dir}")
        history.append(row)
        if ctx.main:  # every rank evaluated the same model on the same images; rank 0 writes
            atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
            if t.select == "energy":
                best = _select_by_energy(run_dir, model, cfg, history, best, meta_common)
            else:
                best = _select_by_accuracy(run_dir, model, cfg, row, best, meta_common)
        save_last(epoch + 1, 0, None)
        emit("epoch", {"row": row, "epochs": t.epochs, "best_epoch": best["epoch"]})
        if _stop_requested(interrupt, ctx, True, device):
            raise TrainingInterrupted(run_dir, epoch + 1, batches)

    return FitResult(
        checkpoint=run_dir / "model.safetensors",
        run_dir=run_dir,
        clean_accuracy=best["clean_accuracy"],
        robust_accuracy=best["robust_accuracy"],
        epochs=t.epochs,
        best_epoch=best["epoch"],
        seconds=time.perf_counter() - t0,
        history=history,
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
    """--select energy: model.safetensors follows the latest epoch until phase 3 is detected in the
    dE(x) series, then holds the epoch just before it. No held-out accuracy is consulted."""
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
    chosen = energy_select_epoch(history)
    if chosen is None:  # no phase 3 yet: the latest epoch is the candidate
        _write_checkpoint(run_dir / "model.safetensors", ckpt.state_dict_of(model), meta)
        return {"epoch": epoch, "robust_accuracy": row["robust_accuracy"], "clean_accuracy": row["clean_accuracy"], "score": 0.0}
    snaps = sorted(snap_dir.glob("epoch-*.safetensors"))
    # The snapshot of the chosen epoch, or the oldest one kept if detection lagged beyond the ring.
    pick = next((p for p in snaps if int(p.stem.split("-")[1]) >= chosen), snaps[0])
    tensors, meta = ckpt.read(pick)
    _write_checkpoint(run_dir / "model.safetensors", tensors, meta)
    chosen_row = next(r for r in history if r["epoch"] == int(meta["epoch"]))
    return {"epoch": chosen_row["epoch"], "robust_accuracy": chosen_row["robust_accuracy"],
            "clean_accuracy": chosen_row["clean_accuracy"], "score": 0.0, "fixed": True,
            "phase3_detected_at": epoch}


def _write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    try:
        ckpt.save(path, tensors, meta)
    except OSError as e:
        raise WeatRunError(f"cannot write {path}: {e.strerror}; earlier checkpoints are intact") from None
