"""Generation from a robust classifier: SGLD with momentum on the joint energy (docs/science.md#sgld).

    v_0 = 0;  v_{n+1} = zeta * v_n - (eta / 2) * grad_x E(x_n, y)
    x_{n+1} = clip_[0,1](x_n + v_{n+1} + alpha * noise),  noise ~ N(0, sigma^2)

with E(x, y) = -f(x)_y, the model in eval mode with frozen weights. zeta = 0 is plain SGLD;
alpha defaults to sqrt(2 * eta). Starting points (`INITS`): uniform U(0,1); informative
N(mu_c, Sigma_c + 1e-4 I); the paper's class-wise PCA; class-wise PCA at the data's spread and the
journal's local class-wise PCA (inits.py); a real training image plus Gaussian noise.
Optional energy-adaptive stopping freezes a sample once E(x, y) has reached the class-mean E(x, y)
of the training data (inits.stop_reached). The settings and their defaults are config.SampleConfig's.

Engine rules (docs/design.md#engine-rules): batched, gradients w.r.t. the input only, fixed shapes, no host sync
(but for adaptive stopping's one look every ADAPTIVE_CHECK_EVERY steps), garbage collection or cache emptying
inside the step loop; randomness from explicit generators.
Class statistics (means and per-class SVDs of the training images) are computed once per dataset
and cached as safetensors under `cache_dir()/stats`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from .config import PCA_VARIANCE_MAX, SAMPLE_INITS, SAMPLE_N_PER_CLASS, RunConfig, SampleConfig
from .energy import joint_energy
from .errors import WeatInputError
from .fileio import check_writable, file_digest
from .runtime import EventFn, Stream, eval_device, generator_for, ignore_event, tensor_digest


INITS = SAMPLE_INITS
ADAPTIVE_CHECK_EVERY = 10  # SGLD steps between the host's looks at whether every sample has stopped
INFORMATIVE_JITTER = 1e-4  # Sigma_c + 1e-4 I: keeps the Gaussian proper where a class has no variance
# The cached per-class SVD keeps the leading components holding this fraction of the class variance;
# the rest (1e-4 of it) is far below the 1e-4 * D of the informative jitter, so the informative
# Gaussian is unchanged to that precision, and sample.pca_variance may go up to this value.
SVD_KEEP = PCA_VARIANCE_MAX
STATS_FORMAT = "weat-class-stats/1"
SAMPLES_FORMAT = "weat-samples/1"
GRID_COLUMNS = 10  # samples per class shown in the grid
ENERGY_IMAGES_PER_CLASS = 1000  # training images per class behind the class-mean E(x, y)


def cache_dir() -> Path:
    """$WEAT_CACHE_DIR, else ~/.cache/weat."""
    return Path(os.environ.get("WEAT_CACHE_DIR") or "~/.cache/weat").expanduser()


# ----------------------------------------------------------------------------- SGLD


@dataclass
class SGLDOutput:
    x: torch.Tensor  # (B, C, H, W) float in [0, 1], detached
    energy_initial: torch.Tensor  # (B,) E(x_0, y)
    steps_taken: torch.Tensor  # (B,) int64: steps that moved the sample (< steps once stopped early)


def sgld(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    step_size: float,
    momentum: float = SampleConfig.model_fields["momentum"].default,
    noise: float = SampleConfig.model_fields["noise"].default,
    alpha: float | None = None,
    stop_energy: torch.Tensor | None = None,
    threshold: float | None = None,
    rule: str = SampleConfig.model_fields["adaptive_rule"].default,
    generator: torch.Generator | None = None,
    on_step: Callable[[int], None] | None = None,
) -> SGLDOutput:
    """`steps` SGLD steps with momentum on E(x, y) = -f(x)_y from x (B, C, H, W) in [0, 1].

    step_size is eta, momentum zeta, noise sigma; alpha defaults to sqrt(2 * eta). Every step draws
    one standard normal tensor of x's shape from `generator` (so a caller can replay the noise).
    The caller puts the model in eval mode with frozen weights (attacks.attack_mode).
    Adaptive stopping: with `stop_energy` (B,) and `threshold`, a sample stops for good at the
    first step where inits.stop_reached(E(x_n, y), stop_energy, threshold, rule=rule): by default
    ("below") E(x_n, y) <= stop_energy + threshold (it has come within the threshold of the
    class-mean energy, or below it), with "squared" (E - stop_energy)^2 < threshold; a per-sample
    mask, and every ADAPTIVE_CHECK_EVERY steps one look from the host ends the loop once every
    sample has stopped (what it returns is what the remaining steps would return).
    `on_step(n)` is called after step n with a Python int (no device sync); after an early end,
    once with `steps`.
    """
    from .inits import stop_reached  # which refuses an unknown rule

    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    a = math.sqrt(2.0 * step_size) if alpha is None else alpha
    noise_scale = a * noise  # alpha * N(0, sigma^2) = (alpha * sigma) * N(0, 1)
    half_eta = 0.5 * step_size
    adaptive = stop_energy is not None and threshold is not None
    x = x.detach().clone()
    v = torch.zeros_like(x)
    done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    taken = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    e_init = None
    for n in range(steps):
        with torch.enable_grad():
            x.requires_grad_(True)
            e = joint_energy(model(x), y)  # (B,); samples are independent in eval mode
            (grad,) = torch.autograd.grad(e.sum(), x)
        with torch.no_grad():
            x = x.detach()
            e = e.detach()
            if e_init is None:
                e_init = e
            v = momentum * v - half_eta * grad
            eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            moved = (x + v + noise_scale * eps).clamp_(0.0, 1.0)
            if adaptive:
                done = done | stop_reached(e, stop_energy, threshold, rule=rule)
                x = torch.where(done.view(-1, 1, 1, 1), x, moved)
            else:
                x = moved
            taken += ~done
        if adaptive and (n + 1) % ADAPTIVE_CHECK_EVERY == 0 and n + 1 < steps and bool(done.all()):
            if on_step is not None:
                on_step(steps)
            break
        if on_step is not None:
            on_step(n + 1)
    if e_init is None:
        with torch.no_grad():
            e_init = joint_energy(model(x), y)
    return SGLDOutput(x=x, energy_initial=e_init, steps_taken=taken)


# ----------------------------------------------------------------------------- class statistics


@dataclass
class ClassStats:
    """Per-class statistics of training images flattened to D = C*H*W values in [0, 1].

    components[c, :rank[c]] are the principal directions of class c (rows, unit norm), singular[c]
    the singular values of its centred data matrix (zero-padded past rank[c]).
    """

    mean: torch.Tensor  # (K, D) float32
    count: torch.Tensor  # (K,) int64: training images per class
    singular: torch.Tensor  # (K, R) float32
    components: torch.Tensor  # (K, R, D) float32
    rank: torch.Tensor  # (K,) int64
    shape: tuple[int, int, int]  # (C, H, W)

    def to(self, device: torch.device) -> ClassStats:
        return ClassStats(self.mean.to(device), self.count.to(device), self.singular.to(device),
                          self.components.to(device), self.rank.to(device), self.shape)


def compute_class_stats(x_u8: torch.Tensor, y: torch.Tensor, num_classes: int) -> ClassStats:
    """Means and truncated SVDs (SVD_KEEP of each class's variance) of (N, C, H, W) images,
    uint8 or float in [0, 1]."""
    n, c, h, w = x_u8.shape
    d = c * h * w
    scale = 255.0 if x_u8.dtype == torch.uint8 else 1.0
    means = torch.zeros(num_classes, d, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.int64)
    svals, comps = [], []
    for k in range(num_classes):
        xk = x_u8[y == k].reshape(-1, d).to(torch.float64) / scale  # (n_k, D)
        counts[k] = len(xk)
        if len(xk) == 0:
            svals.append(torch.zeros(0, dtype=torch.float64))
            comps.append(torch.zeros(0, d, dtype=torch.float64))
            continue
        means[k] = xk.mean(0)
        _, s, vh = torch.linalg.svd(xk - means[k], full_matrices=False)
        var = s.square()
        total = var.sum()
        if total > 0:
            keep = int(torch.searchsorted(var.cumsum(0) / total, torch.tensor(SVD_KEEP, dtype=torch.float64))) + 1
        else:
            keep = 0
        keep = min(keep, len(s))
        svals.append(s[:keep])
        comps.append(vh[:keep])
    r = max(1, max(len(s) for s in svals))
    singular = torch.zeros(num_classes, r)
    components = torch.zeros(num_classes, r, d)
    for k, (s, v) in enumerate(zip(svals, comps)):
        singular[k, : len(s)] = s.float()
        components[k, : len(s)] = v.float()
    rank = torch.tensor([len(s) for s in svals], dtype=torch.int64)
    return ClassStats(means.float(), counts, singular, components, rank, (c, h, w))


def class_stats(x_u8: torch.Tensor, y: torch.Tensor, num_classes: int, *, name: str,
                on_event: EventFn | None = None) -> ClassStats:
    """compute_class_stats, cached in cache_dir()/stats/<name>-<hash>.safetensors (by content)."""
    from . import checkpoint as ckpt_mod

    emit = on_event or ignore_event
    key = tensor_digest([("x", x_u8), ("y", y)])[:16]
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name.split(":", 1)[0])[:40] or "dataset"
    path = cache_dir() / "stats" / f"{safe}-{key}.safetensors"
    if path.is_file():
        try:
            t, meta = ckpt_mod.read(path)
            if meta.get("format") == STATS_FORMAT and int(meta.get("num_classes", -1)) == num_classes:
                shape = tuple(json.loads(meta["shape"]))
                return ClassStats(t["mean"], t["count"], t["singular"], t["components"], t["rank"], shape)
        except (WeatInputError, KeyError, ValueError):
            pass  # a damaged cache entry is recomputed and overwritten
    emit("stats", {"dataset": name, "path": str(path)})
    stats = compute_class_stats(x_u8.cpu(), y.cpu(), num_classes)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt_mod.save(path, {"mean": stats.mean, "count": stats.count, "singular": stats.singular,
                         "components": stats.components, "rank": stats.rank},
                  {"format": STATS_FORMAT, "dataset": name, "num_classes": str(num_classes),
                   "shape": json.dumps(list(stats.shape)), "svd_keep": str(SVD_KEEP)})
    return stats


# ----------------------------------------------------------------------------- initialisations


def init_uniform(y: torch.Tensor, shape: tuple[int, int, int], *, generator=None, device=None) -> torch.Tensor:
    """x_0 ~ U(0, 1), JEM-style. -> (B, C, H, W)"""
    return torch.rand((len(y), *shape), generator=generator, device=device)


def init_informative(y: torch.Tensor, stats: ClassStats, *, generator=None) -> torch.Tensor:
    """x_0 ~ N(mu_c, Sigma_c + 1e-4 I), clipped to [0, 1].

    Sigma_c = V^T diag(s^2 / (n_c - 1)) V from the class SVD, so a draw is
    mu_c + V^T (s / sqrt(n_c - 1) * z) + 1e-2 * z' with z, z' standard normal: no D x D matrix.
    """
    b, (r, d) = len(y), stats.components.shape[1:]
    dev = stats.mean.device
    z = torch.randn(b, r, generator=generator, device=dev)
    z2 = torch.randn(b, d, generator=generator, device=dev)
    scale = stats.singular[y] / (stats.count[y].clamp_min(2) - 1).float().sqrt()[:, None]  # (B, R) std per direction
    x = stats.mean[y] + torch.einsum("br,brd->bd", scale * z, stats.components[y]) + math.sqrt(INFORMATIVE_JITTER) * z2
    return x.clamp_(0.0, 1.0).view(b, *stats.shape)


def pca_keep(stats: ClassStats, variance: float) -> torch.Tensor:
    """k_c: the fewest leading components whose share of class c's variance reaches `variance`. (K,)"""
    var = stats.singular.square()
    total = var.sum(1, keepdim=True).clamp_min(1e-30)
    share = var.cumsum(1) / total  # (K, R)
    k = (share < variance - 1e-12).sum(1) + 1
    return torch.minimum(k, stats.rank)


def init_pca(y: torch.Tensor, stats: ClassStats, *, variance: float, sigma: float, generator=None) -> torch.Tensor:
    """The paper's class-wise PCA init: x_0 = mu_c + sum_{i<k_c} s_i z_i sigma_pca U_i, clipped.

    U_i, s_i: principal directions and singular values of class c's centred data matrix (s_i^2 is
    (n_c - 1) times the variance along U_i); k_c from `variance` (r); z_i ~ N(0, 1).
    """
    b, r = len(y), stats.components.shape[1]
    dev = stats.mean.device
    keep = pca_keep(stats, variance)[y]  # (B,)
    mask = torch.arange(r, device=dev)[None, :] < keep[:, None]  # (B, R)
    z = torch.randn(b, r, generator=generator, device=dev)
    coef = stats.singular[y] * z * sigma * mask
    x = stats.mean[y] + torch.einsum("br,brd->bd", coef, stats.components[y])
    return x.clamp_(0.0, 1.0).view(b, *stats.shape)


def init_noise(y: torch.Tensor, x_u8: torch.Tensor, y_train: torch.Tensor, *, std: float, generator=None) -> torch.Tensor:
    """A uniformly drawn training image of the class plus N(0, std^2) noise, clipped. -> (B, C, H, W)"""
    dev = x_u8.device
    counts = torch.bincount(y_train, minlength=int(y.max()) + 1)
    order = torch.argsort(y_train, stable=True)  # indices grouped by class
    start = torch.cumsum(counts, 0) - counts
    u = torch.rand(len(y), generator=generator, device=dev)
    pick = order[start[y] + (u * counts[y]).long().clamp_max(counts[y] - 1)]
    x = x_u8[pick].float() / 255.0
    x = x + std * torch.randn(x.shape, generator=generator, device=dev)
    return x.clamp_(0.0, 1.0)


# ----------------------------------------------------------------------------- checkpoint -> samples


@dataclass
class SampleResult:
    samples: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64: the wanted class
    predictions: torch.Tensor  # (N,) int64: the model's class of the saved (uint8) sample
    energy_initial: torch.Tensor  # (N,) E(x_0, y)
    energy_final: torch.Tensor  # (N,) E(x, y) of the saved sample
    steps_taken: torch.Tensor  # (N,)
    seconds: float
    settings: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # the resolved [data] and [sample] sections, as JSON

    @property
    def fraction_as_asked(self) -> float:
        return float((self.predictions == self.labels).float().mean()) if len(self.labels) else 0.0

    def summary(self) -> dict[str, Any]:
        per_class = {}
        for c in self.labels.unique().tolist():
            m = self.labels == c
            per_class[str(c)] = float((self.predictions[m] == c).float().mean())
        return {
            "n": int(len(self.labels)),
            "seconds": round(self.seconds, 3),
            "energy_final_mean": float(self.energy_final.mean()),
            "energy_initial_mean": float(self.energy_initial.mean()),
            "fraction_classified_as_asked": self.fraction_as_asked,
            "fraction_per_class": per_class,
            "mean_steps": float(self.steps_taken.float().mean()),
            **{k: self.settings[k] for k in ("checkpoint", "init", "steps", "step_size", "momentum", "noise", "alpha", "seed")},
            "files": dict(self.files),
            "config": dict(self.config),
        }


def parse_classes(value: str | Sequence[int] | None, num_classes: int) -> list[int]:
    """`0,3,7` (or a list) -> [0, 3, 7], checked against the model's classes; None -> all."""
    if value is None:
        return list(range(num_classes))
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            items = [int(p) for p in parts]
        except ValueError:
            raise WeatInputError(f"--classes: {value!r}; expected class indices like 0,3,7") from None
    else:
        items = [int(v) for v in value]
    if not items:
        raise WeatInputError(f"--classes: {value!r}; expected at least one class index")
    bad = [c for c in items if not 0 <= c < num_classes]
    if bad:
        raise WeatInputError(f"--classes: class {bad[0]} out of range; expected class indices 0..{num_classes - 1} "
                             f"(the model has {num_classes} classes)")
    return list(dict.fromkeys(items))


def wanted_labels(classes: list[int], n_per_class: int | None, n: int | None) -> torch.Tensor:
    """Labels grouped by class in `classes` order: n_per_class each (SAMPLE_N_PER_CLASS when neither
    count is given), or n split as evenly as possible, the first n mod K classes getting one more.
    The counts were validated by SampleConfig (>= 1, not both). -> (N,) int64"""
    if n is not None:
        base, extra = divmod(n, len(classes))
        counts = [base + (i < extra) for i in range(len(classes))]
    else:
        counts = [SAMPLE_N_PER_CLASS if n_per_class is None else n_per_class] * len(classes)
    return torch.cat([torch.full((c,), cls, dtype=torch.int64) for cls, c in zip(classes, counts)])


@torch.no_grad()
def class_energy_means(model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, num_classes: int, *,
                       batch_size: int, key: str | None = None) -> torch.Tensor:
    """Mean E(x, y) per class over (at most ENERGY_IMAGES_PER_CLASS of) the training images. (K,)

    With `key` (identifying model and data) the result is cached in cache_dir()/stats.
    """
    from . import checkpoint as ckpt_mod

    path = cache_dir() / "stats" / f"energy-{key}.safetensors" if key else None
    if path is not None and path.is_file():
        try:
            t, meta = ckpt_mod.read(path)
            if t["mean"].shape == (num_classes,) and meta.get("per_class") == str(ENERGY_IMAGES_PER_CLASS):
                return t["mean"]
        except (WeatInputError, KeyError):
            pass
    dev = next(model.parameters()).device
    means = torch.full((num_classes,), float("nan"))
    for k in range(num_classes):
        xk = x_u8[y == k][:ENERGY_IMAGES_PER_CLASS]
        if len(xk) == 0:
            continue
        e = torch.cat([joint_energy(model(xk[i : i + batch_size].to(dev).float() / 255.0),
                                    torch.full((len(xk[i : i + batch_size]),), k, device=dev))
                       for i in range(0, len(xk), batch_size)])
        means[k] = e.mean().cpu()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        ckpt_mod.save(path, {"mean": means}, {"format": "weat-energy-means/1", "per_class": str(ENERGY_IMAGES_PER_CLASS)})
    return means


def save_samples(path: Path, result: SampleResult) -> None:
    """uint8 NCHW `samples`, int64 `labels` and `predictions`, float32 `energy_initial` and
    `energy_final` (E(x, y) of the saved samples), int64 `steps_taken`; settings in the metadata."""
    from . import __version__
    from . import checkpoint as ckpt_mod

    s = result.settings
    meta = {"format": SAMPLES_FORMAT, "weat_version": __version__, "checkpoint": s["checkpoint"],
            "checkpoint_sha256": s.get("checkpoint_sha256") or "",
            "dataset": s["dataset"], "data_dir": s.get("data_dir") or "", "num_classes": str(s["num_classes"]),
            "settings": json.dumps(s, sort_keys=True)}
    tensors = {"samples": result.samples, "labels": result.labels, "predictions": result.predictions,
               "energy_initial": result.energy_initial.float(), "energy_final": result.energy_final.float(),
               "steps_taken": result.steps_taken}
    ckpt_mod.save(path, {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, meta)


# ----------------------------------------------------------------------------- sample_checkpoint's steps


def resolve_outputs(checkpoint: Path, init: str, out: Path | str | None,
                    grid: Path | str | None) -> tuple[Path, Path]:
    """--out (default <checkpoint dir>/samples-<init>.safetensors) and --grid (default --out with
    .png), both checked writable before any work."""
    out = Path(out) if out is not None else checkpoint.parent / f"samples-{init}.safetensors"
    grid = Path(grid) if grid is not None else out.with_suffix(".png")
    check_writable("--out", out)
    check_writable("--grid", grid)
    if grid.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise WeatInputError(f"--grid: {grid}; expected a .png, .pdf or .svg file name")
    return out, grid


def load_training_data(cfg: RunConfig, checkpoint: Path, shape: tuple[int, int, int], wanted: list[int]) -> Any:
    """The training split (uint8, on the CPU) when the init or adaptive stopping needs it, else None.

    Bad input before any slow work: a dataset whose images are not the model's (C, H, W), or a
    wanted class without training images for a data-driven init."""
    from . import data as data_mod

    s, dataset = cfg.sample, cfg.data.dataset
    if s.init == "uniform" and s.adaptive is None:
        return None
    ds = data_mod.load(dataset, cfg.data.data_dir, download=cfg.data.download, device="cpu")
    if (ds.in_channels, ds.image_size) != shape[:2]:
        raise WeatInputError(f"checkpoint: {checkpoint} expects {shape} images; its dataset {dataset} has "
                             f"{ds.in_channels}x{ds.image_size}x{ds.image_size}")
    missing = [c for c in wanted if not bool((ds.train_y == c).any())]
    if missing and s.init in DATA_INITS:
        raise WeatInputError(f"--classes: class {missing[0]} has no training images in {dataset}; use --init uniform")
    return ds


@dataclass
class StartingPoints:
    """Draws x_0 (B, C, H, W) in [0, 1] for labels y with `init` (docs/science.md#initialisations):
    from the class statistics (informative, pca, pca-scaled) or the training images (local-pca,
    noise) on the sampling device."""

    init: str
    shape: tuple[int, int, int]  # (C, H, W)
    settings: SampleConfig  # pca_variance, pca_sigma, pca_scale, local_neighbours, init_noise
    stats: ClassStats | None = None  # informative, pca, pca-scaled
    x_train: torch.Tensor | None = None  # local-pca, noise: (N, C, H, W) uint8
    y_train: torch.Tensor | None = None  # local-pca, noise: (N,) int64

    def draw(self, y: torch.Tensor, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        from . import inits

        s = self.settings
        if self.init == "uniform":
            return init_uniform(y, self.shape, generator=generator, device=device)
        if self.init == "informative":
            return init_informative(y, self.stats, generator=generator)
        if self.init == "pca":
            return init_pca(y, self.stats, variance=s.pca_variance, sigma=s.pca_sigma, generator=generator)
        if self.init == "pca-scaled":
            return inits.init_pca_scaled(y, self.stats, variance=s.pca_variance, scale=s.pca_scale, generator=generator)
        if self.init == "local-pca":
            return inits.local_class_pca(y, self.x_train, self.y_train, neighbours=s.local_neighbours,
                                         variance=s.pca_variance, scale=s.pca_scale, generator=generator)
        return init_noise(y, self.x_train, self.y_train, std=s.init_noise, generator=generator)


STATS_INITS = ("informative", "pca", "pca-scaled")  # draw from the cached class statistics
IMAGE_INITS = ("local-pca", "noise")  # draw from the training images themselves
DATA_INITS = STATS_INITS + IMAGE_INITS


def starting_points(ds: Any, s: SampleConfig, num_classes: int, shape: tuple[int, int, int], dataset: str,
                    device: torch.device, emit: EventFn) -> StartingPoints:
    """The class statistics (cached per dataset) for the informative, pca and pca-scaled inits, the
    training images (on the sampling device) for local-pca and noise; nothing more for uniform."""
    start = StartingPoints(s.init, shape, s)
    if s.init in STATS_INITS:
        k = max(num_classes, ds.num_classes)
        start.stats = class_stats(ds.train_x, ds.train_y, k, name=dataset, on_event=emit).to(device)
    elif s.init in IMAGE_INITS:
        start.x_train, start.y_train = ds.train_x.to(device), ds.train_y.to(device)
    return start


def stopping_thresholds(model: nn.Module, ds: Any, checkpoint: Path, num_classes: int, wanted: list[int],
                        s: SampleConfig, device: torch.device) -> torch.Tensor | None:
    """Adaptive stopping's class-mean E(x, y) over the training images, (K,) on `device`, cached by
    checkpoint and data content; None without --adaptive."""
    if s.adaptive is None:
        return None
    data_key = tensor_digest([("x", ds.train_x), ("y", ds.train_y)])
    key = f"{file_digest(checkpoint)[:16]}-{data_key[:16]}"
    stop = class_energy_means(model, ds.train_x, ds.train_y, num_classes, batch_size=s.batch_size, key=key).to(device)
    bad = [c for c in wanted if not math.isfinite(float(stop[c]))]
    if bad:
        raise WeatInputError(f"--adaptive: class {bad[0]} has no training images to take its mean energy from")
    return stop


def sample_settings(checkpoint: Path, cfg: RunConfig, num_classes: int, wanted: list[int]) -> dict[str, Any]:
    """What a samples file records in its metadata ("settings"): the sampler's settings, alpha resolved."""
    s = cfg.sample
    return {"checkpoint": str(checkpoint), "checkpoint_sha256": file_digest(checkpoint), "dataset": cfg.data.dataset, "data_dir": cfg.data.data_dir,
            "num_classes": num_classes, "classes": wanted, "init": s.init, "steps": s.steps, "step_size": s.step_size,
            "momentum": s.momentum, "noise": s.noise, "alpha": math.sqrt(2 * s.step_size) if s.alpha is None else s.alpha,
            "pca_variance": s.pca_variance, "pca_sigma": s.pca_sigma, "pca_scale": s.pca_scale,
            "local_neighbours": s.local_neighbours, "init_noise": s.init_noise, "adaptive": s.adaptive,
            "adaptive_rule": s.adaptive_rule, "batch_size": s.batch_size, "seed": s.seed}


Batches = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]  # uint8 samples, E(x_0, y), steps taken


def sgld_batches(model: nn.Module, labels: torch.Tensor, starts: StartingPoints, stop: torch.Tensor | None,
                 s: SampleConfig, ctx: Any, device: torch.device, emit: EventFn) -> Batches:
    """SGLD on this rank's consecutive share of the batches of `labels` (all of them in one process).

    Every batch's starting points are drawn, in order, from the one Stream.SAMPLE_INIT generator
    (a batch another rank runs is drawn and dropped, to keep that generator in step) and batch b's
    noise comes from (Stream.SGLD_NOISE, b): the samples do not depend on the number of ranks.
    BatchNorm is folded into the convolutions for the steps (the same function with fewer ops);
    reported energies and predictions come from the checkpoint's own model (measure_samples).
    """
    from .attacks import attack_mode, folded_eval_model

    total, size = len(labels), s.batch_size
    batches = math.ceil(total / size)
    mine = range(batches)[ctx.shard(batches)]
    work = max(min(mine.stop * size, total) - mine.start * size, 0) * s.steps  # image-steps on this rank
    g_init = generator_for(device, s.seed, Stream.SAMPLE_INIT)
    outs: Batches = ([], [], [])
    example = torch.zeros((min(size, 8), *starts.shape), device=device)
    with attack_mode(folded_eval_model(model.eval(), example)) as folded:
        for b in range(batches):
            yb = labels[b * size : (b + 1) * size].to(device)
            x0 = starts.draw(yb, g_init, device)
            if b not in mine:
                continue
            done_before = (b - mine.start) * size * s.steps

            def on_step(i: int, done_before: int = done_before, n: int = len(yb)) -> None:
                emit("step", {"done": done_before + n * i, "total": work})  # image-steps

            res = sgld(folded, x0, yb, steps=s.steps, step_size=s.step_size, momentum=s.momentum, noise=s.noise,
                       alpha=s.alpha, stop_energy=None if stop is None else stop[yb], threshold=s.adaptive,
                       rule=s.adaptive_rule, generator=generator_for(device, s.seed, Stream.SGLD_NOISE, b), on_step=on_step)
            outs[0].append((res.x * 255.0).round_().to(torch.uint8))
            outs[1].append(res.energy_initial)
            outs[2].append(res.steps_taken)
    return outs


def gather_batches(outs: Batches, ctx: Any, device: torch.device) -> Batches:
    """Every rank's batches on every rank, in batch order (the shards are consecutive)."""
    from . import distributed as dist_mod

    parts = dist_mod.gather_objects(outs, ctx)
    return tuple([t.to(device) for p in parts for t in p[i]] for i in range(3))  # type: ignore[return-value]


@torch.no_grad()
def measure_samples(model: nn.Module, samples: torch.Tensor, labels: torch.Tensor, batch_size: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The checkpoint model's class (N,) and E(x, y) (N,) of what is saved: the uint8 samples."""
    preds, energies = [], []
    for i in range(0, len(samples), batch_size):
        logits = model(samples[i : i + batch_size].float() / 255.0)
        preds.append(logits.argmax(1))
        energies.append(joint_energy(logits, labels[i : i + batch_size].to(device)))
    return torch.cat(preds).cpu(), torch.cat(energies).float().cpu()


def grid_rows(result: SampleResult, wanted: list[int]) -> tuple[torch.Tensor, int, list[str]]:
    """The grid: one row per wanted class, its first GRID_COLUMNS samples (white where it has fewer),
    labelled with the fraction classified as asked. -> (images (rows * cols, C, H, W), cols, labels)"""
    labels, shape = result.labels, tuple(result.samples.shape[1:])
    rows, row_labels = [], []
    for c in wanted:
        idx = (labels == c).nonzero().squeeze(1)[:GRID_COLUMNS]
        pad = GRID_COLUMNS - len(idx)
        row = result.samples[idx]
        if pad:
            row = torch.cat([row, torch.full((pad, *shape), 255, dtype=torch.uint8)])
        rows.append(row)
        row_labels.append(f"class {c}\n{float((result.predictions[labels == c] == c).float().mean()):.0%} as asked")
    cols = min(GRID_COLUMNS, max(int((labels == c).sum()) for c in wanted))
    return torch.cat([r[:cols] for r in rows]), cols, row_labels


def write_outputs(result: SampleResult, out: Path, grid: Path, checkpoint: Path, wanted: list[int],
                  s: SampleConfig) -> None:
    """The samples file and the grid (with its numbers as .json); their paths go into result.files."""
    from .plots import sample_grid

    out.parent.mkdir(parents=True, exist_ok=True)
    save_samples(out, result)
    result.files["samples"] = str(out)
    images, cols, row_labels = grid_rows(result, wanted)
    detail = {"pca": f" (r {s.pca_variance:g}, sigma_pca {s.pca_sigma:g})",
              "pca-scaled": f" (r {s.pca_variance:g}, scale {s.pca_scale:g})",
              "local-pca": f" (K {s.local_neighbours}, r {s.pca_variance:g}, scale {s.pca_scale:g})",
              "noise": f" (std {s.init_noise:g})"}.get(s.init, "")
    steps = f"{s.steps} SGLD steps"
    if s.adaptive is not None:  # how far the chains went before they reached the class-mean energy
        steps = (f"SGLD stopped at m_y {s.adaptive:+g} ({s.adaptive_rule}): mean "
                 f"{float(result.steps_taken.double().mean()):.0f} of {s.steps} steps")
    title = (f"{checkpoint.parent.name or checkpoint.name}: {s.init} init{detail}, {steps}, "
             f"eta {s.step_size:g}" + (f", momentum {s.momentum:g}" if s.momentum else ""))
    sample_grid(images, grid, nrow=cols, labels=row_labels, title=title)
    result.files["grid"] = str(grid)
    result.files["grid_json"] = str(grid.with_suffix(".json"))


def _empty_result(labels: torch.Tensor, seconds: float, settings: dict[str, Any]) -> SampleResult:
    """What a rank other than 0 returns: rank 0 gathers, measures and writes."""
    empty = torch.empty(0)
    return SampleResult(samples=empty, labels=labels, predictions=empty, energy_initial=empty, energy_final=empty,
                        steps_taken=empty, seconds=seconds, settings=settings)


def sample_checkpoint(path: Path | str, cfg: RunConfig, *, out: Path | str | None = None,
                      grid: Path | str | None = None, on_event: EventFn | None = None) -> SampleResult:
    """`weat sample`: SGLD samples of the wanted classes from a checkpoint, saved with a grid.

    `cfg` is resolved on the checkpoint's stored config (config.resolve_command(stored=
    checkpoint.stored_config(path), ...)): cfg.sample holds the sampler's settings, cfg.data the
    dataset, its root and the download flag, used only for the informative, pca and noise inits and
    adaptive stopping. `out` defaults to <checkpoint dir>/samples-<init>.safetensors and `grid` to
    `out` with .png (its numbers go next to it as .json). Under torchrun each rank runs its share
    of the batches and rank 0 writes the files; the other ranks return an empty result.
    """
    from . import checkpoint as ckpt_mod
    from . import distributed as dist_mod

    s, path = cfg.sample, Path(path)
    out, grid = resolve_outputs(path, s.init, out, grid)
    ctx, device = dist_mod.init(s.device)
    emit = (on_event or ignore_event) if ctx.main else ignore_event
    dev = eval_device(device)
    ck = ckpt_mod.load(path, device=dev)
    shape = (ck.in_channels, ck.image_size, ck.image_size)
    wanted = parse_classes(s.classes, ck.num_classes)
    labels = wanted_labels(wanted, s.n_per_class, s.n)
    ds = load_training_data(cfg, path, shape, wanted)
    starts = starting_points(ds, s, ck.num_classes, shape, cfg.data.dataset, dev, emit)
    stop = stopping_thresholds(ck.model, ds, path, ck.num_classes, wanted, s, dev)
    settings = sample_settings(path, cfg, ck.num_classes, wanted)
    emit("start", {"checkpoint": str(path), "n": len(labels), "classes": wanted, "init": s.init, "steps": s.steps,
                   "device": str(dev)})
    t0 = time.perf_counter()
    outs = sgld_batches(ck.model, labels, starts, stop, s, ctx, dev, emit)
    if ctx.enabled:
        outs = gather_batches(outs, ctx, dev)
        if not ctx.main:
            return _empty_result(labels, time.perf_counter() - t0, settings)
    samples = torch.cat(outs[0])
    predictions, energy_final = measure_samples(ck.model, samples, labels, s.batch_size, dev)
    result = SampleResult(
        samples=samples.cpu(), labels=labels, predictions=predictions,
        energy_initial=torch.cat(outs[1]).float().cpu(), energy_final=energy_final,
        steps_taken=torch.cat(outs[2]).cpu(), seconds=time.perf_counter() - t0, settings=settings,
        config=cfg.model_dump(mode="json", include={"data", "sample"}),
    )
    write_outputs(result, out, grid, path, wanted, s)
    emit("done", {"result": result})
    return result
