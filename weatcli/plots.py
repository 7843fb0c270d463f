"""Figures of the energy lens: numbers in, a PNG and the plotted numbers (JSON) out.

Every function renders with matplotlib's object API on an Agg canvas (no pyplot, so no global
figure state and no display needed), writes the image to `out` and the numbers it drew to the
same path with a .json suffix, both atomically, creating missing parent folders, and returns
the dict it wrote. The image format follows the suffix of `out` (.png, .pdf or .svg).
Colours: tab10 (colour-blind friendly), one colour per series, the same in every panel.
"""

from __future__ import annotations

import io
import json
import math
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.transforms import blended_transform_factory

from .fileio import atomic_write_bytes

DPI = 150
CLIP_PERCENTILES = (0.5, 99.5)  # shared bins / violin range; values beyond are clipped into the edges
RANGE_PAD = 0.05  # of the clipped range, each side
FENCE = 3.0  # Tukey's "far out" fence, in inter-quartile ranges
QUANTILES = (5, 25, 50, 75, 95)
PANELS = {  # key -> (x label, panel title)
    "energy": ("E(x) = -logsumexp f(x)", "marginal energy E(x)"),
    "joint": ("E(x, y) = -f(x)_y", "joint energy E(x, y)"),
}
# Histogram series hold energies named as energy.ENERGY_QUANTITIES (README "Energy summaries");
# each quantity is drawn in its panel: E(x) of clean points or of adversarial points x*, likewise E(x, y).
PANEL_OF = {"energy_natural": "energy", "energy_adversarial": "energy",
            "joint_natural": "joint", "joint_adversarial": "joint"}
DELTA_PANELS = {
    "delta_energy": ("ΔE(x) = E(x) - E(x*)", "marginal energy gap ΔE(x)"),
    "delta_joint": ("ΔE(x, y) = E(x, y) - E(x*, y)", "joint energy gap ΔE(x, y)"),
}
_FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}
FIGURE_SUFFIXES = tuple(_FORMATS)


# tab10, spelled out so a user's matplotlib style cannot change it.
TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
         "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def _colour(i: int) -> str:
    return TAB10[i % len(TAB10)]


def _new_figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas: nothing registered with pyplot, nothing to close."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _jsonable(value: Any) -> Any:
    """numpy arrays/scalars to lists/floats; NaN and inf to None (JSON has neither)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _json_path(out: Path) -> Path:
    return out.with_suffix(".json")


def _check_out(out: Path) -> Path:
    out = Path(out)
    if out.suffix.lower() not in _FORMATS:
        raise ValueError(f"{out}: figure path must end in one of {', '.join(_FORMATS)}; the numbers go next to it as .json")
    return out


def _save(fig: Figure, out: Path, data: dict) -> dict:
    """Write the figure and its numbers; returns the JSON-ready dict that was written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format=_FORMATS[out.suffix.lower()], dpi=DPI, facecolor="white")
    data = _jsonable(data)
    atomic_write_bytes(out, buf.getvalue())
    atomic_write_bytes(_json_path(out), (json.dumps(data, indent=1) + "\n").encode("utf-8"))
    return data


def _values(x: Any, what: str) -> np.ndarray:
    """A 1-D float array of finite values; anything else is a ValueError naming `what`."""
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=float).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{what}: no values")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what}: {int(np.sum(~np.isfinite(a)))} non-finite values (NaN/inf energies point to a broken model)")
    return a


def _robust_range(arrays: Sequence[np.ndarray]) -> tuple[float, float]:
    """A display range that holds every series' bulk and no outlier, padded.

    Per series: the 0.5-99.5 percentile range, narrowed to Tukey's far fences (quartiles -+ 3 IQR)
    when a few far outliers drag a percentile (2 points in 300 already move the 99.5th);
    for normal data the percentiles are the narrower pair. Then the union over series.
    """
    los, his = [], []
    for a in arrays:
        p_lo, q25, q75, p_hi = np.percentile(a, [CLIP_PERCENTILES[0], 25, 75, CLIP_PERCENTILES[1]])
        iqr = q75 - q25
        los.append(max(p_lo, q25 - FENCE * iqr) if iqr > 0 else p_lo)
        his.append(min(p_hi, q75 + FENCE * iqr) if iqr > 0 else p_hi)
    lo, hi = float(min(los)), float(max(his))
    span = hi - lo
    pad = RANGE_PAD * span if span > 0 else max(0.5, 0.05 * abs(lo))
    return lo - pad, hi + pad


def energy_histograms(
    series: Mapping[str, Mapping[str, Any]],
    out: Path,
    *,
    title: str = "",
    bins: int = 60,
) -> dict:
    """Overlaid density histograms of E(x) (left) and E(x, y) (right), one per series (docs/science.md#attacks-and-energy).

    series: {name: {quantity: values per example}}, e.g. clean: {"energy_natural", "joint_natural"},
        pgd: {"energy_adversarial", "joint_adversarial"} (PANEL_OF: at most one quantity per panel,
        either panel may be missing). The arrays of a series describe the same examples.
    bins: number of bins; the edges are shared by all series of a panel and span the padded
        0.5-99.5 percentile range (narrowed to quartiles -+ 3 IQR against far outliers); values
        beyond it are counted in the edge bins (so every series' counts sum to its n; the JSON
        says how many were clipped).
    JSON: {"bins": {panel: edges}, "counts": {name: {quantity: counts}}, "means": {name: {quantity: mean}},
    "std": ..., "clipped": {name: {quantity: [below, above]}}, "n": {name: n}, "title": title}, with
    panel "energy" or "joint" and quantity the series' key (energy_natural, energy_adversarial, ...).
    """
    out = _check_out(out)
    if not series:
        raise ValueError("energy_histograms: no series to plot")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    values: dict[str, dict[str, np.ndarray]] = {}
    n: dict[str, int] = {}
    quantity: dict[str, dict[str, str]] = {}  # name -> panel -> the quantity drawn there
    for name, d in series.items():
        unknown = set(d) - set(PANEL_OF)
        if unknown:
            raise ValueError(f"series {name!r}: unknown keys {sorted(unknown)}; expected {list(PANEL_OF)}")
        quantity[name] = {PANEL_OF[k]: k for k in d}
        if len(quantity[name]) < len(d):
            raise ValueError(f"series {name!r}: {sorted(d)} share a panel; expected at most one energy and one joint quantity")
        values[name] = {p: _values(d[k], f"series {name!r} {k}") for p, k in quantity[name].items()}
        if not values[name]:
            raise ValueError(f"series {name!r}: needs energy and/or joint values ({', '.join(PANEL_OF)})")
        sizes = {len(v) for v in values[name].values()}
        if len(sizes) > 1:
            raise ValueError(f"series {name!r}: {sorted(d)} have different lengths {sorted(sizes)}; they must describe the same examples")
        n[name] = sizes.pop()
    panels = [k for k in PANELS if any(k in v for v in values.values())]
    colours = {name: _colour(i) for i, name in enumerate(values)}

    fig = _new_figure(5.2 * len(panels), 4.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    data: dict[str, Any] = {"title": title, "bins": {}, "counts": {k: {} for k in values},
                            "means": {k: {} for k in values}, "std": {k: {} for k in values},
                            "clipped": {k: {} for k in values}, "n": n}
    for ax, panel in zip(axes, panels):
        present = {name: v[panel] for name, v in values.items() if panel in v}
        lo, hi = _robust_range(list(present.values()))
        edges = np.linspace(lo, hi, bins + 1)
        data["bins"][panel] = edges
        for name, x in present.items():
            counts, _ = np.histogram(np.clip(x, lo, hi), bins=edges)
            mean = float(x.mean())
            density = counts / (len(x) * np.diff(edges))
            c = colours[name]
            ax.stairs(density, edges, fill=True, alpha=0.25, color=c)
            ax.stairs(density, edges, color=c, linewidth=1.4, label=f"{name}  (mean {mean:.2f}, n={len(x)})")
            ax.axvline(min(max(mean, lo), hi), color=c, linestyle="--", linewidth=1.0)
            q = quantity[name][panel]
            data["counts"][name][q] = counts
            data["means"][name][q] = mean
            data["std"][name][q] = float(x.std())
            data["clipped"][name][q] = [int(np.sum(x < lo)), int(np.sum(x > hi))]
        xlabel, panel_title = PANELS[panel]
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density")
        ax.set_title(panel_title)
        ax.set_xlim(lo, hi)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", title="dashed: mean", title_fontsize="x-small")
    if title:
        fig.suptitle(title)
    return _save(fig, out, data)


def _phase_value(phases: Any, key: str) -> Any:
    return phases.get(key) if isinstance(phases, Mapping) else getattr(phases, key, None)


def _run_series(rows: Sequence[Mapping[str, Any]], key: str) -> list[float | None]:
    out: list[float | None] = []
    for r in rows:
        v = r.get(key)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        out.append(float(v) if ok else None)
    return out


def training_dynamics(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    out: Path,
    *,
    phases: Mapping[str, Any] | None = None,
    title: str = "",
) -> dict:
    """Per-epoch PGD robust error (test, left axis, solid) and mean ΔE(x) (train, right axis,
    dashed) of one or more runs, one colour per run (docs/science.md#three-phases).

    runs: {label: metrics rows} as in metrics.jsonl (see phases.read_metrics).
    phases: {label: Phases (or its dict)}: phase boundaries drawn as dotted lines in the run's
        colour, labelled "phase 1/2/3"; the overfitting phase is shaded; catastrophic overfitting,
        where found, is a dash-dot line labelled "CO".
    JSON: {label: {"epoch", "robust_error" (1 - robust_accuracy, None where missing),
    "delta_energy", "phases"}}.
    """
    out = _check_out(out)
    if not runs:
        raise ValueError("training_dynamics: no runs to plot")
    phases = dict(phases or {})
    unknown = set(phases) - set(runs)
    if unknown:
        raise ValueError(f"phases given for unknown runs {sorted(unknown)}; runs are {list(runs)}")

    fig = _new_figure(8.5, 4.8)
    ax = fig.subplots()
    ax_e = ax.twinx()
    ax_e.axhline(0.0, color="0.6", linewidth=0.8)
    text_at = blended_transform_factory(ax.transData, ax.transAxes)
    data: dict[str, Any] = {}
    handles = []
    for i, (label, rows) in enumerate(runs.items()):
        rows = sorted(rows, key=lambda r: r["epoch"])
        epochs = [int(r["epoch"]) for r in rows]
        rob = _run_series(rows, "robust_accuracy")
        error = [None if a is None else 1.0 - a for a in rob]
        delta = _run_series(rows, "delta_energy")
        c = _colour(i)
        nan = float("nan")
        ax.plot(epochs, [nan if v is None else v for v in error], color=c, linewidth=1.6)
        ax_e.plot(epochs, [nan if v is None else v for v in delta], color=c, linewidth=1.4, linestyle="--")
        handles.append(Line2D([], [], color=c, linewidth=2.0, label=label))
        ph = phases.get(label)
        ph_dict = None
        if ph is not None:
            ph_dict = {k: _phase_value(ph, k) for k in ("phase2_start", "phase3_start", "plateau_delta", "best_epoch",
                                                        "catastrophic_overfitting_epoch", "co_recovery_epoch")}
            _draw_phases(ax, ax_e, text_at, ph_dict, epochs, c, row=i)
        data[label] = {"epoch": epochs, "robust_error": error, "delta_energy": delta, "phases": ph_dict}

    ax.set_xlabel("epoch")
    ax.set_ylabel("robust error, test (1 - PGD-20 robust accuracy)")
    ax_e.set_ylabel("mean ΔE(x) = E(x) - E(x*), train")
    ax.grid(alpha=0.3)
    style = [Line2D([], [], color="0.2", linewidth=1.6, label="robust error (left)"),
             Line2D([], [], color="0.2", linewidth=1.4, linestyle="--", label="mean ΔE(x) (right)")]
    # Below the axes: the phase labels live along the top edge, the curves anywhere inside.
    ax.legend(handles=handles + style, fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.13),
              ncol=min(len(handles) + len(style), 5), frameon=False)
    ax.set_title(title or "training dynamics: robust error and energy gap")
    return _save(fig, out, data)


def _draw_phases(ax, ax_e, text_at, ph: dict, epochs: list[int], colour: str, *, row: int) -> None:
    if not epochs:
        return
    first, last = epochs[0], epochs[-1]
    p2, p3 = ph.get("phase2_start"), ph.get("phase3_start")
    bounds = [first] + [b for b in (p2, p3) if b is not None] + [last]
    names = ["phase 1"] if p2 is not None else []
    names += ["phase 2"] if p2 is not None or p3 is not None else []
    names += ["phase 3"] if p3 is not None else []
    if p2 is None and p3 is not None:
        names = ["phase 1-2", "phase 3"]
    for b in (p2, p3):
        if b is not None:
            ax.axvline(b, color=colour, linestyle=":", linewidth=1.3)
    if p3 is not None:
        ax.axvspan(p3, last, color=colour, alpha=0.07, linewidth=0)
    if ph.get("plateau_delta") is not None and p2 is not None:
        ax_e.hlines(ph["plateau_delta"], p2, p3 if p3 is not None else last, color=colour, linewidth=0.8, alpha=0.6)
    y = 0.97 - 0.1 * row  # a row of labels per run: the phase names, and below them CO and its recovery
    co = ph.get("catastrophic_overfitting_epoch")
    if co is not None:  # catastrophic overfitting: a dash-dot line and its label below the phase names
        ax.axvline(co, color=colour, linestyle="-.", linewidth=1.3)
        ax.text(co, y - 0.045, " CO", transform=text_at, ha="left", va="top", fontsize="x-small", color=colour)
    recovered = ph.get("co_recovery_epoch")
    if co is not None and recovered is not None:  # ... and the epoch by which training had recovered from it
        ax.axvline(recovered, color=colour, linestyle="-.", linewidth=0.8, alpha=0.6)
        ax.text(recovered, y - 0.045, " recovered", transform=text_at, ha="left", va="top", fontsize="x-small",
                color=colour)
    for name, a, b in zip(names, bounds[:-1], bounds[1:]):
        ax.text((a + b) / 2, y, name, transform=text_at, ha="center", va="top", fontsize="x-small", color=colour,
                bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1.0})


def _describe(x: np.ndarray) -> dict[str, Any]:
    """energy.describe's keys and numbers ({mean, std (population), q05, q25, q50, q75, q95, n},
    linear quantiles) in numpy: this module imports no torch."""
    q = np.percentile(x.astype(np.float64), QUANTILES)
    return {"mean": float(x.mean()), "std": float(x.std()), **{f"q{p:02d}": float(v) for p, v in zip(QUANTILES, q)},
            "n": int(len(x))}


def compare_violins(
    models: Mapping[str, Mapping[str, Any]],
    out: Path,
    *,
    order: list[str] | None = None,
    title: str = "",
) -> dict:
    """Per-example ΔE(x) (left) and ΔE(x, y) (right) as one violin per model (docs/science.md#smoothing).

    models: {label: {"delta_energy": per-example ΔE(x), "delta_joint": per-example ΔE(x, y),
        "robust_accuracy": fraction in [0, 1] (optional)}}.
    order: labels left to right (a subset is fine); default ascending robust accuracy, models
        without it last. The violin shapes use values clipped to the panel's robust range (as in
        energy_histograms) so one outlier cannot flatten them; the JSON statistics use all values.
    JSON: {"order": [...], "models": {label: {"robust_accuracy", "delta_energy": {"mean", "std", "q05",
    "q25", "q50", "q75", "q95", "n"}, "delta_joint": {...}}}, "title": title}: energy.describe's keys.
    """
    out = _check_out(out)
    if not models:
        raise ValueError("compare_violins: no models to plot")
    if order is None:
        ranked = sorted(enumerate(models), key=lambda t: (models[t[1]].get("robust_accuracy") is None,
                                                          models[t[1]].get("robust_accuracy") or 0.0, t[0]))
        order = [label for _, label in ranked]
    else:
        unknown = [m for m in order if m not in models]
        if unknown or len(set(order)) != len(order) or not order:
            raise ValueError(f"order must name distinct models among {list(models)}, got {order}")
        order = list(order)
    values: dict[str, dict[str, np.ndarray]] = {}
    for label in order:
        d = models[label]
        values[label] = {k: _values(d[k], f"model {label!r} {k}") for k in DELTA_PANELS if k in d}
    panels = [k for k in DELTA_PANELS if any(k in v for v in values.values())]
    if not panels:
        raise ValueError(f"compare_violins: models need 'delta_energy' and/or 'delta_joint'; got keys {sorted(models[order[0]])}")
    colours = {label: _colour(i) for i, label in enumerate(models)}  # by input order: stable across orders

    def tick(label: str) -> str:
        acc = models[label].get("robust_accuracy")
        return label if acc is None else f"{label}\n(rob {100 * float(acc):.1f}%)"

    fig = _new_figure(max(4.5, 1.6 + 1.15 * len(order)) * len(panels), 4.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        present = [(pos, label, values[label][panel]) for pos, label in enumerate(order) if panel in values[label]]
        lo, hi = _robust_range([x for _, _, x in present])
        for pos, label, x in present:
            shown = np.clip(x, lo, hi)
            c = colours[label]
            if np.ptp(shown) > 0:
                parts = ax.violinplot([shown], positions=[pos], widths=0.8, showextrema=False)
                for body in parts["bodies"]:
                    body.set_facecolor(c)
                    body.set_edgecolor(c)
                    body.set_alpha(0.35)
            q5, q25, q50, q75, q95 = np.percentile(shown, QUANTILES)
            ax.vlines(pos, q5, q95, color=c, linewidth=1.0)
            ax.vlines(pos, q25, q75, color=c, linewidth=4.0)
            ax.scatter([pos], [q50], color="white", edgecolor=c, s=22, zorder=3)
        ax.axhline(0.0, color="0.3", linewidth=0.9, linestyle="--")
        ax.set_xticks(range(len(order)), [tick(m) for m in order], fontsize="small")
        ax.set_xlim(-0.6, len(order) - 0.4)
        ax.set_ylim(lo, hi)
        ylabel, panel_title = DELTA_PANELS[panel]
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title + "\n(bar: 25-75%, line: 5-95%, dot: median)", fontsize="medium")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title or "energy gaps per model")
    data = {"title": title, "order": order, "models": {
        label: {"robust_accuracy": models[label].get("robust_accuracy"),
                **{k: _describe(v) for k, v in values[label].items()}}
        for label in order}}
    return _save(fig, out, data)


def sample_grid(
    images: Any,
    out: Path,
    *,
    nrow: int,
    labels: Sequence[str] | None = None,
    title: str = "",
) -> dict:
    """Images in a grid, `nrow` images per row (torchvision's meaning), e.g. one row per class.

    images: (N, C, H, W) with C in {1, 3} (or (N, H, W)), uint8 or float in [0, 1]; numpy or torch.
    labels: one per row (drawn left of the row) or one per image (drawn above each image, or left
        of the row when the whole row shares it).
    The images are upscaled by an integer factor without interpolation, so each pixel is a square.
    JSON: {"shape", "nrow", "rows", "labels", "dtype", "title"}.
    """
    out = _check_out(out)
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    x = np.asarray(images)
    dtype = str(x.dtype)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f"images must be (N, C, H, W) with C in {{1, 3}} and N >= 1, got shape {tuple(np.shape(images))}")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    else:
        x = x.astype(np.float32)
        if not np.all(np.isfinite(x)) or x.min() < -1e-3 or x.max() > 1 + 1e-3:
            raise ValueError(f"float images must lie in [0, 1], got range [{np.nanmin(x):.3g}, {np.nanmax(x):.3g}]")
        x = np.clip(x, 0.0, 1.0)
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    n, c, h, w = x.shape
    rows = math.ceil(n / nrow)
    cols = min(nrow, n)
    labels = None if labels is None else [str(s) for s in labels]
    if labels is not None and len(labels) not in (rows, n):
        raise ValueError(f"labels: expected {rows} (one per row) or {n} (one per image), got {len(labels)}")

    row_labels: list[str] | None = None
    cell_labels: list[str] | None = None
    if labels is not None and len(labels) == rows and (rows != n or nrow == 1):
        row_labels = labels
    elif labels is not None:
        per_row = [labels[r * nrow : (r + 1) * nrow] for r in range(rows)]
        if all(len(set(p)) == 1 for p in per_row):
            row_labels = [p[0] for p in per_row]
        else:
            cell_labels = labels

    pad = 2  # image pixels of white between images
    vpad = max(pad, math.ceil(0.3 * h)) if cell_labels else pad  # room for a label above each image
    grid = np.ones((rows * (h + vpad) + pad, cols * (w + pad) + pad, c), dtype=np.float32)
    for i in range(n):
        r, k = divmod(i, nrow)
        top, left = vpad + r * (h + vpad), pad + k * (w + pad)
        grid[top : top + h, left : left + w] = x[i].transpose(1, 2, 0)
    if cell_labels:
        grid = grid[vpad - pad :]  # the first row needs no label room above the grid's own top
        offset = vpad - pad
    else:
        offset = 0

    # An integer upscale so the longer side is ~900 screen pixels at DPI (at least 1x).
    scale = max(1, round(900 / max(grid.shape[:2])))
    gw, gh = grid.shape[1] * scale / DPI, grid.shape[0] * scale / DPI  # inches
    left_in = 1.3 if row_labels else 0.15
    # A long title wraps to the figure's width (~9 characters of the default font per inch).
    lines = textwrap.wrap(title, width=max(20, int((gw + left_in + 0.15) * 9))) if title else []
    top_in = (0.2 + 0.25 * len(lines) if lines else 0.1) + (0.2 if cell_labels else 0.0)
    fig = Figure(figsize=(gw + left_in + 0.15, gh + top_in + 0.15), dpi=DPI)
    FigureCanvasAgg(fig)
    fw, fh = fig.get_size_inches()
    ax = fig.add_axes((left_in / fw, 0.15 / fh, gw / fw, gh / fh))
    ax.imshow(grid[..., 0] if c == 1 else grid, cmap="gray" if c == 1 else None, vmin=0.0, vmax=1.0,
              interpolation="nearest", aspect="equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if row_labels:
        ax.set_yticks([vpad + r * (h + vpad) - offset + h / 2 - 0.5 for r in range(rows)], row_labels, fontsize="small")
        ax.tick_params(axis="y", length=0)
    if cell_labels:
        for i, s in enumerate(cell_labels):
            r, k = divmod(i, nrow)
            ax.text(pad + k * (w + pad) + w / 2 - 0.5, vpad + r * (h + vpad) - offset - 1.0, s,
                    ha="center", va="bottom", fontsize="x-small", clip_on=False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        fig.suptitle("\n".join(lines), y=1 - 0.08 / fh, va="top")
    data = {"title": title, "shape": [n, c, h, w], "nrow": nrow, "rows": rows, "labels": labels, "dtype": dtype}
    return _save(fig, out, data)
