"""Figures: a valid PNG and the plotted numbers as JSON next to it, with no global pyplot state."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from weatcli import plots
from weatcli.phases import Phases

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_outputs(png: Path, returned: dict) -> dict:
    """The PNG decodes at a sensible size, the JSON beside it equals what was returned, and no
    temp files are left in the folder."""
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    pixels = mpimg.imread(png)
    height, width = pixels.shape[:2]
    assert 400 <= width <= 4000 and 400 <= height <= 4000
    assert pixels.std() > 0  # something was drawn
    data = json.loads(png.with_suffix(".json").read_text())
    assert data == returned
    assert sorted(p.name for p in png.parent.iterdir()) == sorted([png.name, png.with_suffix(".json").name])
    pyplot = sys.modules.get("matplotlib.pyplot")
    assert pyplot is None or pyplot.get_fignums() == []
    return data


def energies(rng: np.random.Generator, n: int, shift: float, points: str = "adversarial") -> dict[str, np.ndarray]:
    """A series as the lens gives it: energy_<points> and joint_<points> (energy.ENERGY_QUANTITIES names)."""
    e = rng.normal(-8.0 + shift, 1.0, n)
    return {f"energy_{points}": e, f"joint_{points}": e + rng.gamma(2.0, 0.5, n)}


PANEL_KEYS = {"energy": ("energy_natural", "energy_adversarial"), "joint": ("joint_natural", "joint_adversarial")}


def quantity(series: dict, panel: str) -> str:
    """The key of `series` drawn in `panel`."""
    return next(k for k in PANEL_KEYS[panel] if k in series)


def test_energy_histograms(tmp_path):
    rng = np.random.default_rng(0)
    series = {"clean": energies(rng, 500, 0.0, "natural"), "pgd": energies(rng, 300, -2.5),
              "pgd-targeted": energies(rng, 400, 1.5)}
    series["pgd"]["energy_adversarial"][:3] = [-1e6, 1e6, 5e3]  # extreme outliers land in the edge bins
    out = tmp_path / "figs" / "hist.png"  # the folder does not exist yet
    data = check_outputs(out, plots.energy_histograms(series, out, title="test", bins=40))
    for panel in ("energy", "joint"):
        edges = np.asarray(data["bins"][panel])
        assert len(edges) == 41 and np.all(np.diff(edges) > 0)
        assert edges[0] > -100 and edges[-1] < 100  # the outliers did not stretch the range
    for name, s in series.items():
        assert data["n"][name] == len(s[quantity(s, "energy")])
        assert set(data["counts"][name]) == set(s)  # keyed by the series' quantity names
        for panel in ("energy", "joint"):
            q = quantity(s, panel)
            assert sum(data["counts"][name][q]) == len(s[q])
            assert data["means"][name][q] == pytest.approx(float(np.mean(s[q])))
    assert data["clipped"]["pgd"]["energy_adversarial"][0] >= 1 and data["clipped"]["pgd"]["energy_adversarial"][1] >= 2
    assert data["counts"]["pgd"]["energy_adversarial"][0] >= 1 and data["counts"]["pgd"]["energy_adversarial"][-1] >= 2


def test_energy_histograms_constant_and_single_panel(tmp_path):
    out = tmp_path / "const.png"
    data = check_outputs(out, plots.energy_histograms({"clean": {"energy_natural": np.full(50, -3.0)}}, out))
    assert list(data["bins"]) == ["energy"]
    assert sum(data["counts"]["clean"]["energy_natural"]) == 50


def test_energy_histograms_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="non-finite"):
        plots.energy_histograms({"clean": {"energy_natural": [1.0, float("nan")]}}, tmp_path / "h.png")
    with pytest.raises(ValueError, match="different lengths"):
        plots.energy_histograms({"clean": {"energy_natural": [1.0, 2.0], "joint_natural": [1.0]}}, tmp_path / "h.png")
    with pytest.raises(ValueError, match=r"\.png"):
        plots.energy_histograms({"clean": {"energy_natural": [1.0, 2.0]}}, tmp_path / "h.json")
    with pytest.raises(ValueError, match="share a panel"):
        plots.energy_histograms({"pgd": {"energy_natural": [1.0], "energy_adversarial": [2.0]}}, tmp_path / "h.png")
    with pytest.raises(ValueError, match="unknown keys"):
        plots.energy_histograms({"clean": {"energy": [1.0, 2.0]}}, tmp_path / "h.png")
    assert list(tmp_path.iterdir()) == []


def dynamics_rows(seed: int, n: int = 30, drop_at: int | None = None) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for e in range(1, n + 1):
        delta = 0.5 * (1 - np.exp(-e / 3)) + rng.normal(0, 0.02)
        if drop_at is not None and e >= drop_at:
            delta -= 0.1 * (e - drop_at + 1)
        rows.append({"epoch": e, "robust_accuracy": 0.5 - 0.4 * np.exp(-e / 4) + rng.normal(0, 0.005),
                     "delta_energy": delta})
    return rows


def test_training_dynamics(tmp_path):
    runs = {"pgd-at": dynamics_rows(0, drop_at=20), "trades": dynamics_rows(1)}
    runs["trades"][3] = {"epoch": 4, "delta_energy": 0.1}  # an epoch without robust accuracy
    phases = {"pgd-at": Phases(phase2_start=8, phase3_start=20, plateau_delta=0.5, best_epoch=19)}
    out = tmp_path / "dynamics.png"
    data = check_outputs(out, plots.training_dynamics(runs, out, phases=phases, title="digits"))
    assert list(data) == ["pgd-at", "trades"]
    for label, rows in runs.items():
        assert data[label]["epoch"] == [r["epoch"] for r in rows]
        expected = [None if "robust_accuracy" not in r else 1 - r["robust_accuracy"] for r in rows]
        assert data[label]["robust_error"] == pytest.approx(expected)
        assert data[label]["delta_energy"] == pytest.approx([r["delta_energy"] for r in rows])
    assert data["pgd-at"]["phases"] == phases["pgd-at"].to_dict()
    assert data["trades"]["phases"] is None
    with pytest.raises(ValueError, match="unknown runs"):
        plots.training_dynamics(runs, out, phases={"mart": phases["pgd-at"]})


def violin_models(rng: np.random.Generator) -> dict[str, dict]:
    return {
        "weat-adv": {"delta_energy": rng.normal(0.1, 0.3, 400), "delta_joint": rng.normal(0.2, 0.6, 400), "robust_accuracy": 0.534},
        "sat": {"delta_energy": rng.normal(1.5, 1.0, 400), "delta_joint": rng.normal(3.0, 2.0, 400), "robust_accuracy": 0.49},
        "trades": {"delta_energy": rng.normal(0.2, 0.4, 300), "delta_joint": rng.normal(0.4, 0.8, 300), "robust_accuracy": 0.5265},
    }


def test_compare_violins(tmp_path):
    rng = np.random.default_rng(2)
    models = violin_models(rng)
    models["sat"]["delta_energy"][0] = 1e6  # one outlier must not break the statistics or the plot
    out = tmp_path / "violins.png"
    data = check_outputs(out, plots.compare_violins(models, out))
    assert data["order"] == ["sat", "trades", "weat-adv"]  # ascending robust accuracy
    for label, m in models.items():
        for key in ("delta_energy", "delta_joint"):
            stats = data["models"][label][key]
            assert stats["n"] == len(m[key])
            assert stats["mean"] == pytest.approx(float(np.mean(m[key])))
            assert set(stats) == {"mean", "std", "q05", "q25", "q50", "q75", "q95", "n"}  # energy.describe's keys
            assert stats["q50"] == pytest.approx(float(np.median(m[key])))
            assert stats["std"] == pytest.approx(float(np.std(m[key])))
            q = [stats[p] for p in ("q05", "q25", "q50", "q75", "q95")]
            assert q == sorted(q)
        assert data["models"][label]["robust_accuracy"] == m["robust_accuracy"]


def test_compare_violins_explicit_order(tmp_path):
    models = violin_models(np.random.default_rng(3))
    models["trades"]["delta_joint"] = np.zeros(300)  # a degenerate distribution still plots
    out = tmp_path / "v.png"
    data = check_outputs(out, plots.compare_violins(models, out, order=["weat-adv", "sat"]))
    assert data["order"] == ["weat-adv", "sat"] and list(data["models"]) == ["weat-adv", "sat"]
    with pytest.raises(ValueError, match="order"):
        plots.compare_violins(models, out, order=["mart"])


@pytest.mark.parametrize("dtype", ["uint8", "float32", "torch"])
def test_sample_grid(tmp_path, dtype):
    rng = np.random.default_rng(4)
    images = rng.random((12, 3, 16, 16)).astype(np.float32)  # 3 classes x 4 samples
    if dtype == "uint8":
        images = (images * 255).astype(np.uint8)
    elif dtype == "torch":
        torch = pytest.importorskip("torch")
        images = torch.from_numpy(images)
    out = tmp_path / "samples.png"
    data = check_outputs(out, plots.sample_grid(images, out, nrow=4, labels=["cat", "dog", "ship"]))
    assert data["shape"] == [12, 3, 16, 16] and data["nrow"] == 4 and data["rows"] == 3
    assert data["labels"] == ["cat", "dog", "ship"]


def test_sample_grid_grayscale_per_image_labels(tmp_path):
    images = np.random.default_rng(5).random((6, 1, 8, 8))
    out = tmp_path / "gray.png"
    data = check_outputs(out, plots.sample_grid(images, out, nrow=3, labels=list("abcdef")))
    assert data["shape"] == [6, 1, 8, 8] and data["rows"] == 2


def test_sample_grid_rejects_bad_images(tmp_path):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        plots.sample_grid(np.full((2, 3, 8, 8), 2.0), tmp_path / "g.png", nrow=2)
    with pytest.raises(ValueError, match="N, C, H, W"):
        plots.sample_grid(np.zeros((2, 8, 8, 3)), tmp_path / "g.png", nrow=2)
    with pytest.raises(ValueError, match="labels"):
        plots.sample_grid(np.zeros((4, 3, 8, 8)), tmp_path / "g.png", nrow=2, labels=["a"])


def test_overwrite_is_atomic_and_clean(tmp_path):
    out = tmp_path / "h.png"
    first = plots.energy_histograms({"a": {"energy_natural": [1.0, 2.0, 3.0]}}, out)
    second = plots.energy_histograms({"a": {"energy_natural": [1.0, 2.0, 3.0, 4.0]}}, out)
    assert first["n"]["a"] == 3
    check_outputs(out, second)


def test_import_needs_neither_pyplot_nor_torch():
    code = "import sys, weatcli.plots, weatcli.phases; print('matplotlib.pyplot' in sys.modules, 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_violin_statistics_are_energy_describe():
    """plots' numpy twin of energy.describe gives its numbers (plots itself imports no torch)."""
    torch = pytest.importorskip("torch")
    from weatcli.energy import describe

    x = np.random.default_rng(6).normal(0.3, 2.0, 257)
    ours, theirs = plots._describe(x), describe(torch.from_numpy(x))
    assert list(ours) == list(theirs)
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-12)
