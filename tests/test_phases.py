"""Phases of adversarial training from synthetic metrics with planted change points."""

from __future__ import annotations

import json

import numpy as np
import pytest

from weatcli.errors import WeatInputError
from weatcli.phases import (RECOVERY_EPOCHS, EnergySelection, Phases, co_recovery_epoch,
                            detect_catastrophic_overfitting, detect_phase3, detect_phases, energy_selection,
                            read_metrics)

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
    assert energy_selection(synthetic_rows(4, change=None)).epoch is None


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
    assert energy_selection(rows).epoch == energy_selection(without).epoch


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


def test_energy_selection_is_the_epoch_before_phase3():
    rows = synthetic_rows(9)
    phase3 = detect_phases(rows).phase3_start
    assert phase3 is not None
    assert energy_selection(rows).epoch == phase3 - 1


def test_best_epoch_is_argmax_of_robust_accuracy():
    rows = synthetic_rows(10)
    best = max(rows, key=lambda r: r["robust_accuracy"])["epoch"]
    assert detect_phases(rows).best_epoch == best


def test_phases_to_dict():
    p = Phases(phase2_start=10, phase3_start=70, plateau_delta=0.5, best_epoch=69, catastrophic_overfitting_epoch=12)
    assert p.to_dict() == {"phase2_start": 10, "phase3_start": 70, "plateau_delta": 0.5, "best_epoch": 69,
                           "catastrophic_overfitting_epoch": 12, "co_recovery_epoch": None}
    assert json.loads(json.dumps(p.to_dict())) == p.to_dict()
    assert Phases(10, 70, 0.5, 69).catastrophic_overfitting_epoch is None


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


# ----------------------------------------------------------------------------- phase 3 only after a plateau
# PGD-AT's dE(x) leaves 0 in phase 1: it falls from 0 to a negative level, then plateaus. The descent
# itself (however slow, noisy, or delayed by a warm-up lag) is never phase 3.


def pgd_at_delta(seed: int, *, n: int = 120, level: float = -1.5, tau: float = 8.0, sigma: float = 0.03,
                 shape: str = "exp", lag: int = 0, change: int | None = None, rate: float = 0.0) -> np.ndarray:
    """dE(x) per epoch: `lag` epochs at 0, a descent to `level` (exponential with time constant tau,
    or linear over 3 tau epochs), a plateau, and from epoch `change` a drift of `rate` per epoch."""
    rng = np.random.default_rng(seed)
    t = np.maximum(np.arange(n, dtype=float) - lag, 0.0)
    x = level * (1 - np.exp(-t / tau)) if shape == "exp" else level * np.minimum(t / (3 * tau), 1.0)
    if change is not None:
        x = x + rate * np.maximum(np.arange(1, n + 1) - change + 1, 0)
    return x + rng.normal(0.0, sigma, n)


def _rows(delta, **extra_columns) -> list[dict]:
    return [{"epoch": i + 1, "delta_energy": float(v), **{k: float(c[i]) for k, c in extra_columns.items()}}
            for i, v in enumerate(delta)]


@pytest.mark.parametrize("tau", [2.0, 8.0, 15.0])
@pytest.mark.parametrize("rate", [-0.05, 0.05])
def test_divergence_after_a_plateau_is_phase3_and_the_descent_is_not(tau, rate):
    for seed in range(10):
        delta = pgd_at_delta(seed, tau=tau, change=80, rate=rate)
        phase3 = detect_phase3(delta)
        assert phase3 is not None and 80 <= phase3 <= 80 + 6, (seed, phase3)  # never before the planted start
        phases = detect_phases(_rows(delta))
        assert phases.phase3_start == phase3 and phases.plateau_delta == pytest.approx(-1.5, abs=0.1)
        assert phases.phase2_start > tau  # the plateau starts after the descent, not during it


@pytest.mark.parametrize("shape, tau, sigma, seeds", [
    ("exp", 8.0, 0.03, 200),  # the PGD-AT-like case: 200 noise draws
    *((shape, tau, sigma, 25) for shape in ("exp", "linear") for tau, sigma in ((2.0, 0.01), (5.0, 0.1), (20.0, 0.03))),
])
def test_descent_then_plateau_has_no_phase3_and_no_co(shape, tau, sigma, seeds):
    """Noise draws of a descent and a plateau: no phase 3, no catastrophic overfitting, ever."""
    flagged = []
    for seed in range(seeds):
        delta = pgd_at_delta(seed, tau=tau, sigma=sigma, shape=shape)
        phases = detect_phases(_rows(delta))
        if phases.phase3_start is not None or phases.catastrophic_overfitting_epoch is not None:
            flagged.append((seed, phases.phase3_start, phases.catastrophic_overfitting_epoch))
    assert flagged == []


@pytest.mark.parametrize("lag", [3, 6, 10])
def test_a_lag_before_the_descent_is_not_a_plateau(lag):
    """A few flat epochs at 0 (warm-up learning rates) then the descent: not phase 2 then phase 3."""
    for seed in range(20):
        assert detect_phase3(pgd_at_delta(seed, lag=lag, tau=5.0)) is None
        assert detect_phase3(pgd_at_delta(seed, lag=lag, tau=5.0, change=80, rate=-0.05)) in range(80, 87)


# A real run (pgd-at, eps 0.15, 10 training images per class, lr 0.01): 31 epochs of lag at dE(x) = 0
# while -log p(y|x) = E(x,y) - E(x) on the training subset barely moves, then phase 1. PGD-20 kept
# rising to its best at epoch 165; the duration rule alone took the lag for a plateau and flagged
# phase 3 at epoch 32.
PC10_DELTA = [0.0, 0.0, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, -0.0, -0.002, -0.003, -0.003,
              -0.003, -0.001, 0.001, 0.001, -0.002, -0.003, -0.002, -0.001, -0.0, -0.0, -0.002, -0.005,
              -0.008, -0.009, -0.008, -0.002, -0.0, -0.008, -0.017, -0.018, -0.015, -0.014, -0.014, -0.018,
              -0.021, -0.026, -0.027, -0.02, -0.007, -0.0, -0.017, -0.049, -0.059, -0.056, -0.06, -0.061,
              -0.064, -0.066, -0.069, -0.072, -0.075, -0.078, -0.081, -0.083, -0.087, -0.089]
PC10_NLL = [2.3, 2.3, 2.3, 2.3, 2.3, 2.29, 2.29, 2.28, 2.27, 2.26, 2.26, 2.25, 2.23, 2.22, 2.2, 2.19, 2.18,
            2.17, 2.15, 2.13, 2.12, 2.11, 2.11, 2.1, 2.09, 2.08, 2.07, 2.06, 2.03, 2.01, 1.99, 1.96, 1.93,
            1.9, 1.87, 1.85, 1.84, 1.82, 1.8, 1.78, 1.76, 1.74, 1.72, 1.7, 1.66, 1.61, 1.57, 1.55, 1.54, 1.53,
            1.51, 1.5, 1.49, 1.47, 1.46, 1.44, 1.43, 1.42, 1.4, 1.39]


def _rows_with_nll(delta, nll, energy_natural=-2.3):
    return [{"epoch": i + 1, "delta_energy": d, "energy_natural": energy_natural, "joint_natural": energy_natural + v}
            for i, (d, v) in enumerate(zip(delta, nll))]


def test_a_long_lag_is_not_a_plateau_while_the_model_has_not_begun_to_learn():
    """The lag outlasted LAG_FACTOR * min_plateau (24 epochs): by duration alone it is phase 2 and
    its end phase 3. The energies say the model had not begun to learn (-log p(y|x) 13% below its
    first value at epoch 31), so that departure is phase 1 and nothing is flagged."""
    assert detect_phase3(PC10_DELTA) == 32  # dE(x) alone: the false alarm
    rows = _rows_with_nll(PC10_DELTA, PC10_NLL)
    assert detect_phases(rows).phase3_start is None
    assert energy_selection(rows) == EnergySelection(None, None)


def test_the_same_departure_after_learning_is_still_phase3():
    """The rule does not blind the detector: with the same dE(x) but a model that learned within
    five epochs (-log p(y|x) halved), the flat stretch at the starting level is an established
    plateau and the departure from it at epoch 32 is flagged."""
    learned_early = [2.3 * (0.5 + 0.5 * np.exp(-i / 2.0)) for i in range(len(PC10_DELTA))]
    assert detect_phases(_rows_with_nll(PC10_DELTA, learned_early)).phase3_start == 32


def test_the_reported_phase1_false_positive_is_gone():
    """A slow, smooth descent (robust accuracy still climbing): the old rule took its first five
    epochs for a plateau (within 10% of the level) and flagged phase 3 at epoch 6."""
    delta = pgd_at_delta(0, tau=25.0, sigma=0.005, shape="linear")
    assert detect_phase3(delta) is None
    assert detect_phases(_rows(delta)).phase2_start is None or detect_phases(_rows(delta)).phase2_start > 20


# ----------------------------------------------------------------------------- catastrophic overfitting


def co_delta(seed: int, *, n: int = 30, at: int = 15, jump: float = 2.0, width: int = 1, sigma: float = 0.03):
    """Single-step AT: dE(x) descends to a stable level, then at epoch `at` breaks by `jump` within
    `width` epochs and stays there (noisier)."""
    rng = np.random.default_rng(seed)
    ep = np.arange(1, n + 1)
    x = -1.5 * (1 - np.exp(-(ep - 1) / 3.0)) + rng.normal(0.0, sigma, n)
    return x + jump * np.clip((ep - at + 1) / width, 0, 1) + np.where(ep >= at, rng.normal(0.0, 2 * sigma, n), 0.0)


@pytest.mark.parametrize("jump", [-2.0, 1.0, 3.0])
@pytest.mark.parametrize("width", [1, 2])
def test_catastrophic_overfitting_is_found_at_its_epoch(jump, width):
    for seed in range(40):
        at = 12 + seed % 12
        epoch = detect_catastrophic_overfitting(_rows(co_delta(seed, at=at, jump=jump, width=width)))
        assert epoch is not None and abs(epoch - at) <= 1, (seed, at, epoch)


@pytest.mark.parametrize("rate", [0.05, -0.05, 0.1])
def test_no_catastrophic_overfitting_on_smooth_pgd_at_series(rate):
    """Phase 1, a plateau and a gradual phase-3 drift: robust overfitting, not CO."""
    for seed in range(30):
        for tau in (1.0, 5.0):
            delta = pgd_at_delta(seed, tau=tau, sigma=0.01, change=60, rate=rate)
            assert detect_catastrophic_overfitting(_rows(delta)) is None


def test_catastrophic_overfitting_needs_the_break_to_stay():
    delta = co_delta(0, at=15, jump=2.0)
    glitch = delta.copy()
    glitch[15:] -= 2.0  # back after one epoch
    assert detect_catastrophic_overfitting(_rows(glitch)) is None
    assert detect_catastrophic_overfitting(_rows(delta[:15])) is None  # the last epoch: not confirmed yet
    assert detect_catastrophic_overfitting(_rows(delta[:16])) == 15
    assert detect_catastrophic_overfitting(_rows(delta[:5])) is None  # too short to have a recent range


def test_training_attack_accuracy_is_supporting_evidence_only():
    """A moderate break (8 sigma) counts only with the training attack's accuracy jumping up with it;
    a large one counts from dE(x) alone, whatever that accuracy does."""
    rng = np.random.default_rng(3)
    delta = -1.5 + rng.normal(0.0, 0.01, 30)
    delta[18:] += 8 * 0.03  # 8 sigma of the changes (floored at 2% of |dE|, 0.03)
    acc_flat = np.full(30, 0.45)
    acc_jump = np.where(np.arange(1, 31) >= 19, 0.9, 0.45)
    assert detect_catastrophic_overfitting(_rows(delta)) is None
    assert detect_catastrophic_overfitting(_rows(delta, train_attack_accuracy=acc_flat)) is None
    assert detect_catastrophic_overfitting(_rows(delta, train_attack_accuracy=acc_jump)) == 19
    big = delta.copy()
    big[18:] += 2.0
    assert detect_catastrophic_overfitting(_rows(big)) == detect_catastrophic_overfitting(
        _rows(big, train_attack_accuracy=acc_flat)) == 19


def co_recovery_rows(seed: int, *, recover_at: int | None, n: int = 30, at: int = 12) -> list[dict]:
    """CO at `at`: dE(x) breaks and dE(x,y) rises from about -1 to about +1 (the training attack stops
    lowering the true class's logit); from `recover_at` (if any) dE(x,y) falls to about -2.5 again
    and dE(x) settles back near its old level."""
    rng = np.random.default_rng(seed)
    ep = np.arange(1, n + 1)
    delta = co_delta(seed, n=n, at=at, jump=-3.0)
    joint = np.where(ep < at, -1.0 * (1 - np.exp(-(ep - 1) / 3.0)), 1.0) + rng.normal(0.0, 0.1, n)
    if recover_at is not None:
        back = ep >= recover_at
        delta[back] = -1.8 + rng.normal(0.0, 0.03, back.sum())
        joint[back] = -2.5 + rng.normal(0.0, 0.1, back.sum())
    return _rows(delta, delta_joint=joint)


def test_energy_select_stops_before_catastrophic_overfitting():
    rows = _rows(co_delta(1, at=18, jump=3.0))
    phases = detect_phases(rows)
    assert phases.catastrophic_overfitting_epoch == 18
    assert energy_selection(rows).epoch == 17
    with pytest.raises(ValueError, match="history"):
        detect_catastrophic_overfitting(rows, history=1)


def test_a_recovery_from_catastrophic_overfitting_is_seen_and_selected_again():
    """Unrecovered: --select energy holds the epoch before the break. Recovered (dE(x,y) back below
    its pre-break level for RECOVERY_EPOCHS epochs in a row): the latest epoch again."""
    for seed in range(20):
        stuck = co_recovery_rows(seed, recover_at=None)
        phases = detect_phases(stuck)
        assert phases.catastrophic_overfitting_epoch == 12 and phases.co_recovery_epoch is None
        assert energy_selection(stuck) == EnergySelection(11, "co")
        rows = co_recovery_rows(seed, recover_at=18)
        assert co_recovery_epoch(rows, 12) == 18 + RECOVERY_EPOCHS - 1
        assert detect_phases(rows).co_recovery_epoch == 22
        assert energy_selection(rows) == EnergySelection(None, None)
        # Before the fifth recovered epoch the break still holds the selection.
        assert energy_selection(rows[:21]) == EnergySelection(11, "co")


def test_recovery_needs_consecutive_epochs_and_the_joint_gap():
    rows = co_recovery_rows(0, recover_at=18)
    rows[19]["delta_joint"] = 1.0  # one epoch where the attack fails again restarts the count
    assert co_recovery_epoch(rows, 12) == 25
    no_joint = [{k: v for k, v in r.items() if k != "delta_joint"} for r in rows]
    assert co_recovery_epoch(no_joint, 12) is None  # older metrics without dE(x,y): no recovery is claimed
    assert co_recovery_epoch(rows, 12, epochs=0) is None


def test_a_second_break_after_recovery_ends_the_selection_again():
    rows = co_recovery_rows(1, recover_at=16, n=40)
    for r in rows[30:]:  # a second collapse at epoch 31
        r["delta_energy"] -= 4.0
        r["delta_joint"] = 1.0
    selection = energy_selection(rows)
    assert selection == EnergySelection(30, "co")


# Two real digits-fgsm-rs-co runs (seeds 0 and 1): both overfit catastrophically at epoch 9; seed 1
# recovers (PGD-20 accuracy back to 37.5% at the end, 40.6% at best), seed 0 does not (3.6%).
REAL_CO = {
    "no recovery": dict(
        delta_energy=[0.004, -0.005, -0.016, -0.028, -0.055, -0.053, -0.091, -0.28, -1.106, -1.187, -1.934, -2.368,
                      -0.562, -2.117, -3.324, -4.444, -4.118, -9.949, -8.406, -14.059, -17.426, -18.936, -17.634,
                      -18.867, -18.031, -20.654, -18.765, -19.74, -19.504, -19.497],
        energy_natural=[-2.384, -2.449, -2.472, -2.499, -2.566, -2.782, -3.221, -4.063, -5.232, -5.707, -7.777, -8.219,
                        -5.926, -9.083, -9.806, -11.188, -11.224, -17.903, -16.37, -21.89, -25.391, -27.345, -25.871,
                        -27.448, -26.454, -29.056, -27.327, -28.269, -28.092, -28.115],
        delta_joint=[-0.061, -0.189, -0.237, -0.306, -0.433, -0.707, -0.967, -1.039, -0.995, -1.438, -0.355, 0.051,
                     -1.183, -0.258, 0.536, 0.409, -0.078, 1.034, 0.878, 1.165, 1.434, 1.284, 1.184, 1.16, 1.198, 1.269,
                     1.093, 1.139, 1.127, 1.146],
        train_attack_accuracy=[0.059, 0.078, 0.199, 0.246, 0.297, 0.301, 0.328, 0.391, 0.543, 0.547, 0.727, 0.754,
                               0.582, 0.77, 0.895, 0.918, 0.707, 0.988, 0.938, 0.945, 0.988, 1.0, 0.988, 1.0, 0.992,
                               0.984, 1.0, 1.0, 1.0, 1.0]),
    "recovery": dict(
        delta_energy=[0.002, -0.004, -0.014, -0.032, -0.045, -0.043, -0.244, -0.204, -0.976, -2.503, -4.261, 2.769,
                      -1.053, -1.459, -1.228, -1.288, -1.405, -1.559, -1.716, -1.688, -1.821, -2.025, -2.001, -2.115,
                      -2.097, -2.085, -2.212, -2.179, -2.197, -2.197],
        energy_natural=[-2.375, -2.466, -2.495, -2.5, -2.543, -2.677, -3.137, -3.757, -5.228, -7.787, -10.252, -6.537,
                        -5.419, -5.626, -5.263, -5.667, -5.683, -5.866, -6.241, -6.608, -6.623, -7.019, -7.017, -7.189,
                        -7.236, -7.313, -7.544, -7.509, -7.584, -7.59],
        delta_joint=[-0.061, -0.185, -0.212, -0.27, -0.362, -0.586, -0.833, -1.119, -0.691, 0.076, 0.249, -4.547,
                     -2.599, -2.53, -2.179, -2.221, -2.329, -2.356, -2.404, -2.375, -2.405, -2.581, -2.579, -2.61,
                     -2.597, -2.52, -2.643, -2.587, -2.603, -2.597],
        train_attack_accuracy=[0.066, 0.082, 0.172, 0.281, 0.27, 0.305, 0.359, 0.328, 0.555, 0.789, 0.867, 0.117,
                               0.246, 0.469, 0.547, 0.555, 0.551, 0.594, 0.695, 0.695, 0.738, 0.77, 0.738, 0.785,
                               0.785, 0.809, 0.816, 0.832, 0.832, 0.836]),
}


def test_real_co_runs_recovered_and_not():
    rows = {name: [{"epoch": i + 1, **{k: v[i] for k, v in c.items()}} for i in range(30)] for name, c in REAL_CO.items()}
    stuck, recovered = detect_phases(rows["no recovery"]), detect_phases(rows["recovery"])
    assert stuck.catastrophic_overfitting_epoch == recovered.catastrophic_overfitting_epoch == 9
    assert stuck.co_recovery_epoch is None and energy_selection(rows["no recovery"]) == EnergySelection(8, "co")
    assert recovered.co_recovery_epoch == 16 and energy_selection(rows["recovery"]) == EnergySelection(None, None)


# Real single-step digits runs (fgsm-rs alpha 2, n-fgsm) whose PGD-20 accuracy rose to its
# best near the end (no catastrophic overfitting). Their dE(x) leaves a flat start (the lag before
# phase 1) and dips at the learning-rate peak; the training attack's accuracy recovers after a dip.
REAL_NO_CO = {
    "eps 0.1": dict(
        delta_energy=[0.0, -0.01, -0.005, -0.022, -0.127, -0.359, -0.712, -0.457, 0.624, 0.642, -0.85, -1.14, -0.998,
                      -0.977, -1.255, -1.385, -1.433, -1.49, -1.45, -1.53, -0.777, -1.875, -1.807, -1.925, -1.945,
                      -2.037, -2.046, -2.055, -2.064, -2.083],
        energy_natural=[-2.39, -2.46, -2.47, -2.63, -2.95, -3.62, -4.32, -5.25, -6.13, -5.8, -5.37, -6.15, -5.39, -5.87,
                        -6.11, -5.98, -6.32, -6.39, -6.98, -6.98, -6.81, -7.26, -6.77, -7.31, -7.44, -7.64, -7.68, -7.62,
                        -7.66, -7.69],
        train_attack_accuracy=[0.094, 0.164, 0.211, 0.234, 0.328, 0.391, 0.461, 0.25, 0.18, 0.109, 0.461, 0.508, 0.422,
                               0.297, 0.461, 0.531, 0.594, 0.57, 0.469, 0.609, 0.383, 0.703, 0.758, 0.695, 0.734,
                               0.758, 0.766, 0.797, 0.789, 0.812]),
    "eps 0.125": dict(
        delta_energy=[0.0, -0.008, -0.004, -0.006, -0.03, -0.021, -0.427, -0.293, -0.484, 0.132, -0.684, -0.039,
                      -0.812, -0.768, -0.858, -1.066, -1.36, -1.164, -1.39, -1.354, -0.821, -1.448, -1.576, -1.65,
                      -1.707, -1.805, -1.81, -1.842, -1.854, -1.861],
        energy_natural=[-2.39, -2.47, -2.45, -2.49, -2.6, -3.21, -3.55, -4.47, -4.2, -4.58, -4.65, -5.14, -4.87, -4.71,
                        -5.03, -4.82, -5.54, -5.33, -5.6, -5.69, -5.59, -5.82, -6.01, -6.21, -6.36, -6.59, -6.68, -6.67,
                        -6.71, -6.73],
        train_attack_accuracy=[0.094, 0.172, 0.172, 0.195, 0.25, 0.219, 0.297, 0.203, 0.289, 0.133, 0.352, 0.133,
                               0.375, 0.406, 0.367, 0.414, 0.453, 0.445, 0.469, 0.602, 0.375, 0.633, 0.648, 0.664,
                               0.664, 0.703, 0.648, 0.711, 0.688, 0.695]),
    "n-fgsm, crop": dict(  # eps 0.1, lr 0.1, 20 epochs: phase 1 starts at epoch 8 and the attack's accuracy rises
        delta_energy=[0.005, -0.001, -0.0, -0.001, -0.022, -0.059, -0.013, -0.425, -0.514, -0.485, -0.685, -0.696,
                      -0.779, -0.917, -0.94, -1.035, -1.091, -1.148, -1.151, -1.168],
        energy_natural=[-2.38, -2.46, -2.47, -2.49, -2.56, -2.88, -3.13, -3.67, -3.71, -4.02, -4.24, -4.24, -4.52,
                        -4.63, -4.68, -4.83, -4.95, -5.07, -5.1, -5.11],
        train_attack_accuracy=[0.094, 0.109, 0.133, 0.086, 0.188, 0.227, 0.18, 0.367, 0.453, 0.32, 0.469, 0.445,
                               0.375, 0.609, 0.555, 0.594, 0.641, 0.648, 0.656, 0.664]),
    "eps 0.1, no crops": dict(  # lr 0.1: phase 1 accelerates at epochs 8-10 while the attack's accuracy jumps 20 points
        delta_energy=[0.004, -0.005, -0.018, -0.033, -0.069, -0.147, -0.246, -0.446, -0.844, -1.035, -1.295, -1.018,
                      -1.3, -1.504, -1.967, -1.961, -2.044, -2.033, -2.08, -2.067],
        energy_natural=[-2.39, -2.45, -2.48, -2.52, -2.6, -2.84, -3.24, -4.01, -4.56, -5.28, -6.01, -6.48, -6.17, -6.72,
                        -7.36, -7.57, -7.93, -7.96, -7.89, -8.28],
        delta_joint=[-0.058, -0.19, -0.245, -0.326, -0.464, -0.674, -0.885, -1.175, -1.481, -1.634, -1.983, -2.013,
                     -1.969, -2.256, -2.48, -2.593, -2.612, -2.613, -2.563, -2.764],
        train_attack_accuracy=[0.031, 0.109, 0.266, 0.43, 0.398, 0.5, 0.508, 0.484, 0.688, 0.711, 0.672, 0.555, 0.625,
                               0.648, 0.773, 0.758, 0.734, 0.773, 0.828, 0.625]),
}


@pytest.mark.parametrize("run", sorted(REAL_NO_CO))
def test_no_catastrophic_overfitting_on_real_single_step_runs_that_kept_improving(run):
    """The first rule flagged these at epochs 11, 7 and 8: phase 1 leaving the flat start, measured
    against the start's tiny noise, with the training attack's accuracy rising as the model learns
    (or recovering after a dip) taken as CO's jump. Now sigma is at least 2% of |E(x)|, the
    accuracy must rise 15 points above its best before the break while dE(x,y) rises (x* stops
    being adversarial; while the model learns dE(x,y) falls), and no break counts before dE(x) has
    moved 5% of |E(x)| from its first value."""
    c = REAL_NO_CO[run]
    rows = [{"epoch": i + 1, **{k: v[i] for k, v in c.items()}} for i in range(len(c["delta_energy"]))]
    assert detect_catastrophic_overfitting(rows) is None
    assert detect_phases(rows).phase3_start is None and energy_selection(rows).epoch is None
