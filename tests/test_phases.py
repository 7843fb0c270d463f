"""Phases of adversarial training from synthetic metrics with planted change points."""

from __future__ import annotations

import json

import numpy as np
import pytest

from weatcli.errors import WeatInputError
from weatcli.phases import Phases, detect_phase3, detect_phases, energy_select_epoch, read_metrics

N_EPOCHS, CHANGE = 100, 70


def synthetic_rows(seed: int, *, change: int | None = CHANGE, kind: str = "linear", sigma: float = 0.02) -> list[dict]:
    """PGD-AT-like metrics: dE(x) rises fast to a 0.5 plateau (noise sigma), then from `change`
    moves to -1.0 (linearly or as a step); robust error drops fast, plateaus, then worsens."""
    rng = np.random.default_rng(seed)
    ep = np.arange(1, N_EPOCHS + 1)
    delta = 0.5 * (1 - np.exp(-(ep - 1) / 3.0))
    if change is not None:
        after = ep >= change
        ramp = -1.0 if kind == "step" else 0.5 - 1.5 * (ep - change + 1) / (N_EPOCHS - change + 1)
        delta = np.where(after, ramp, delta)
    delta = delta + rng.normal(0.0, sigma, N_EPOCHS)
    robust = 0.5 - 0.4 * np.exp(-(ep - 1) / 4.0) + rng.normal(0.0, 0.005, N_EPOCHS)
    if change is not None:
        robust = np.where(ep >= change, robust - 0.002 * (ep - change), robust)
    return [{"epoch": int(e), "lr": 0.1, "delta_energy": float(d), "robust_accuracy": float(r), "clean_accuracy": 0.8}
            for e, d, r in zip(ep, delta, robust)]


@pytest.mark.parametrize("kind", ["linear", "step"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_change_point_is_found(kind, seed):
    rows = synthetic_rows(seed, kind=kind)
    phases = detect_phases(rows)
    assert phases.phase3_start is not None and abs(phases.phase3_start - CHANGE) <= 3
    assert phases.phase2_start is not None and 3 <= phases.phase2_start <= 20
    assert phases.plateau_delta == pytest.approx(0.5, abs=0.03)
    assert detect_phase3([r["delta_energy"] for r in rows]) == phases.phase3_start


def test_upward_excursion_counts_too():
    rows = synthetic_rows(3)
    flipped = [{**r, "delta_energy": 1.0 - r["delta_energy"]} for r in rows]  # plateau 0.5, then up to 2.0
    assert abs(detect_phases(flipped).phase3_start - CHANGE) <= 3


@pytest.mark.parametrize("seed", range(5))
def test_flat_noisy_series_has_no_phase3(seed):
    rng = np.random.default_rng(100 + seed)
    assert detect_phase3(0.5 + rng.normal(0.0, 0.02, N_EPOCHS)) is None
    assert detect_phase3(0.5 + 0.02 * rng.standard_t(3, N_EPOCHS)) is None  # heavy-tailed noise


def test_flat_series_from_rows_has_plateau_but_no_phase3():
    phases = detect_phases(synthetic_rows(4, change=None))
    assert phases.phase3_start is None
    assert phases.plateau_delta == pytest.approx(0.5, abs=0.03)
    assert energy_select_epoch(synthetic_rows(4, change=None)) is None


@pytest.mark.parametrize("width", [1, 2])
def test_short_blip_is_not_phase3(width):
    rng = np.random.default_rng(7)
    delta = 0.5 + rng.normal(0.0, 0.02, N_EPOCHS)
    delta[60 : 60 + width] = -5.0
    assert detect_phase3(delta) is None
    assert detect_phase3(delta, window=1) is None  # even unsmoothed: the excursion is not sustained


def test_constant_and_short_series():
    assert detect_phase3([0.5] * N_EPOCHS) is None
    assert detect_phase3([0.0] * N_EPOCHS) is None
    assert detect_phase3([]) is None
    assert detect_phase3([0.1, 0.5, 0.5, -1.0]) is None
    assert detect_phase3([0.5] * 70 + [-1.0] * 30) == 71  # noise-free step: exact


def test_phase3_ignores_robust_accuracy():
    rows = synthetic_rows(5)
    without = [{k: v for k, v in r.items() if k != "robust_accuracy"} for r in rows]
    scrambled = [{**r, "robust_accuracy": 0.3} for r in rows]
    full, bare = detect_phases(rows), detect_phases(without)
    assert full.phase3_start == bare.phase3_start == detect_phases(scrambled).phase3_start
    assert full.plateau_delta == bare.plateau_delta
    assert bare.best_epoch is None
    assert bare.phase2_start is not None  # falls back to dE(x) settling onto its plateau
    assert energy_select_epoch(rows) == energy_select_epoch(without)


def test_explicit_epochs_and_threshold():
    rows = synthetic_rows(6, kind="step")
    delta = [r["delta_energy"] for r in rows]
    assert detect_phase3(delta, epochs=[e + 10 for e in range(1, N_EPOCHS + 1)]) == detect_phase3(delta) + 10
    assert detect_phase3(delta, threshold=5.0) is None  # a band wider than the step
    with pytest.raises(ValueError, match="window"):
        detect_phase3(delta, window=2)
    with pytest.raises(ValueError, match="epochs"):
        detect_phase3(delta, epochs=[1, 2, 3])


def test_deterministic():
    rows = synthetic_rows(8)
    assert detect_phases(rows) == detect_phases(list(rows)) == detect_phases(list(reversed(rows)))


def test_energy_select_epoch_is_the_epoch_before_phase3():
    rows = synthetic_rows(9)
    phase3 = detect_phases(rows).phase3_start
    assert phase3 is not None
    assert energy_select_epoch(rows) == phase3 - 1


def test_best_epoch_is_argmax_of_robust_accuracy():
    rows = synthetic_rows(10)
    best = max(rows, key=lambda r: r["robust_accuracy"])["epoch"]
    assert detect_phases(rows).best_epoch == best


def test_phases_to_dict():
    p = Phases(phase2_start=10, phase3_start=70, plateau_delta=0.5, best_epoch=69)
    assert p.to_dict() == {"phase2_start": 10, "phase3_start": 70, "plateau_delta": 0.5, "best_epoch": 69}
    assert json.loads(json.dumps(p.to_dict())) == p.to_dict()


def test_read_metrics_round_trip(tmp_path):
    rows = synthetic_rows(11)[:5]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)) + "\n")
    assert read_metrics(tmp_path) == rows  # sorted by epoch, blank lines skipped
    assert read_metrics(tmp_path / "metrics.jsonl") == rows
    (tmp_path / "metrics.jsonl").write_text("")
    assert read_metrics(tmp_path) == []


@pytest.mark.parametrize("text, match", [
    ('{"epoch": 1}\n{"epoch": 2, "delta_en', r"metrics\.jsonl:2: not valid JSON"),
    ("[1, 2]\n", r"metrics\.jsonl:1: expected a JSON object"),
    ('{"lr": 0.1}\n', r"metrics\.jsonl:1: 'epoch' must be an integer"),
    ('{"epoch": "3"}\n', r"'epoch' must be an integer"),
])
def test_read_metrics_corrupt_file(tmp_path, text, match):
    (tmp_path / "metrics.jsonl").write_text(text)
    with pytest.raises(WeatInputError, match=match) as info:
        read_metrics(tmp_path)
    assert "\n" not in str(info.value)


def test_read_metrics_missing_file(tmp_path):
    with pytest.raises(WeatInputError, match=r"run/metrics\.jsonl: no such file") as info:
        read_metrics(tmp_path / "run")
    assert "\n" not in str(info.value)
