"""The three phases of adversarial training, and catastrophic overfitting, read from a run's
metrics.jsonl (docs/science.md#phase-detector, docs/science.md#catastrophic-overfitting).

(1) robust error drops fast while the mean energy gap dE(x) = E(x) - E(x*) leaves 0;
(2) a long plateau; (3) robust overfitting: dE(x) of PGD-AT moves away from its plateau
(natural and adversarial energies diverge) while test robust error stops improving.

Phase 3 is detected from the training subset's energies alone, so it needs no held-out robust
accuracy and can pick a checkpoint (`weat train --select energy`) without touching test data. Pure numpy.

The rule (`detect_phase3`), in energy units (logits) and epochs:
  1. s = centred running median of dE(x) over `window` epochs (a one-epoch spike vanishes).
  2. sigma = noise scale of dE(x): 1.4826 * MAD of the first differences / sqrt(2), which a trend
     or a single step barely moves; raised to the plateau's own MAD scale where that is larger.
     band(level) = `threshold`, or max(4 sigma, 10% of |level|, 1e-3).
  3. A plateau starts at the first epoch p whose window of `min_plateau` epochs is flat: s stays
     within the band of its median AND the least-squares drift of dE(x) across the window is under
     a quarter of the band. The drift test is what keeps phase 1 out: a descent slow enough to stay
     within 10% of its level over a few epochs still drifts, and is not a plateau.
  4. The plateau must be established before a departure from it can count: it must last
     2 * `min_plateau` epochs, or 3 * `min_plateau` when it sits at the level training started
     from (dE(x) has not left its first value by a band: the flat start may be the lag before
     phase 1 under small warm-up learning rates). Where the rows have E(x,y) and E(x), such a
     start-level plateau counts from the epoch the model began to learn at the earliest (the
     training subset's -log p(y|x) = E(x,y) - E(x) `LEARNED_DROP` below its first value): a lag
     can outlast any fixed duration. A departure before that is still phase 1 (a pause in the
     descent, or the lag): the plateau is dropped and the next one searched after it.
  5. For each later epoch t, the plateau level is the median of dE(x) over [p, t) - only the past,
     so the change never contaminates its own reference - and band = band(level), with sigma at
     least the MAD scale of [p, t). Phase 3 starts at the first t from which s stays beyond
     level +- band, on the same side, for `sustain` consecutive epochs. Either sign counts: the
     paper's "collapse" of dE(x) for PGD-AT is a move away from the plateau, and which way depends
     on the method and dataset.
  6. The reported epoch is the onset of that excursion: from t, step back while the smoothed
     series is still beyond half the band on the same side (a slow drift crosses the full band
     a few epochs after it starts), never into the establishing epochs of step 4.
A flat or noisy series, a short blip, a descent that never settles, or a series too short to hold
phase 1, an established plateau and `sustain` epochs of excursion gives None.

Catastrophic overfitting (`detect_catastrophic_overfitting`) is a different shape: a break of
dE(x) out of its recent range within one or two epochs, of many robust sigmas of its epoch-to-epoch
changes, kept the next epoch. See that function for the rule. A run can recover from it
(`co_recovery_epoch`): the training attack works again for several epochs in a row.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import WeatInputError

MAD_TO_SIGMA = 1.4826  # sigma of a normal distribution = 1.4826 * its median absolute deviation
NOISE_K = 4.0  # band half-width in noise sigmas: five epochs in a row beyond 4 sigma is never noise
REL_FLOOR = 0.10  # ... and at least 10% of the plateau level, so a tiny-noise run needs a real change
ABS_FLOOR = 1e-3  # energy units; keeps a noise-free constant series from flagging rounding errors
ONSET_FRACTION = 0.5  # step back from the confirmed crossing while beyond this fraction of the band
SETTLE_FRACTION = 0.25  # a plateau window's fitted drift is under a quarter of the band: the trend is over
PLATEAU_FACTOR = 2  # a plateau must last this many times min_plateau before a departure from it is phase 3
LAG_FACTOR = 3  # ... and this many where it sits at the level training started from (maybe the lag before phase 1)
LEARNED_DROP = 0.25  # ... and, where the rows tell, only once -log p(y|x) = E(x,y) - E(x) fell 25% below its first value
RATE_FRACTION = 0.10  # phase 2 (from robust error): improvement per epoch below 10% of its peak rate
# Catastrophic overfitting (detect_catastrophic_overfitting): a break of dE(x) within CO_SPAN epochs
# of CO_K robust sigmas of its last CO_HISTORY epoch-to-epoch changes, that the next epoch keeps.
CO_HISTORY = 5
CO_SPAN = 2
CO_K = 10.0
CO_K_SUPPORTED = 6.0  # ... when the accuracy under the training attack jumps up with it (CO's other sign)
CO_ACC_JUMP = 0.15  # that jump: train_attack_accuracy 15 points above its best before the break
CO_REL_FLOOR = 0.02  # the change scale is at least 2% of the recent |dE(x)| (a noise-free series needs a real break)
CO_ENERGY_FLOOR = 0.02  # ... and 2% of the recent |E(x)| where the rows have it: phase 1 leaving a flat start is no break
CO_STARTED = 0.05  # no break counts before dE(x) has once moved 5% of |E(x)| from its first value (phase 1 has begun)
CO_KEEP = 0.5  # confirmation: the epoch after the break is still beyond half of it
RECOVERY_EPOCHS = 5  # CO is over after this many epochs in a row where the training attack works again


@dataclass(frozen=True)
class Phases:
    """Phase boundaries of one training run, as 1-based epochs (None: not seen in this run)."""

    phase2_start: int | None  # first plateau epoch: the fast initial drop of robust error is over
    phase3_start: int | None  # first epoch of robust overfitting, from the energy gap dE(x) alone
    plateau_delta: float | None  # plateau level of mean dE(x) (energy units), median over phase 2
    best_epoch: int | None  # epoch of best test robust accuracy, where the rows have it
    catastrophic_overfitting_epoch: int | None = None  # first epoch of a sharp break of dE(x) (single-step AT)
    co_recovery_epoch: int | None = None  # the run had recovered from that overfitting by this epoch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of RUN_DIR/metrics.jsonl (or of that file, given directly), sorted by epoch.

    A missing or unreadable file, a line that is not a JSON object, or a row without an integer
    `epoch` raises WeatInputError naming the file (and line). An empty file gives [].
    """
    path = Path(run_dir)
    if path.is_dir() or path.suffix != ".jsonl":
        path = path / "metrics.jsonl"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WeatInputError(f"{path}: no such file; expected the metrics.jsonl that `weat train` writes") from None
    except (OSError, UnicodeDecodeError) as e:
        raise WeatInputError(f"{path}: cannot read ({e.__class__.__name__}: {e})") from None
    rows: dict[int, dict] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise WeatInputError(f"{path}:{lineno}: not valid JSON ({e.msg}); expected one JSON object per epoch") from None
        if not isinstance(row, dict):
            raise WeatInputError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
        epoch = row.get("epoch")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
            raise WeatInputError(f"{path}:{lineno}: 'epoch' must be an integer >= 1, got {epoch!r}")
        rows[epoch] = row  # a repeated epoch (a replayed resume) keeps its last row
    return [rows[e] for e in sorted(rows)]


def _running_median(x: np.ndarray, window: int) -> np.ndarray:
    """Centred running median; the window shrinks at the ends instead of padding."""
    h = window // 2
    return np.array([np.median(x[max(0, i - h) : i + h + 1]) for i in range(len(x))])


def _noise_sigma(x: np.ndarray) -> float:
    """Robust sigma of i.i.d. noise on x from its first differences (blind to trends and steps)."""
    if len(x) < 3:
        return 0.0
    d = np.diff(x)
    return float(MAD_TO_SIGMA * np.median(np.abs(d - np.median(d))) / math.sqrt(2.0))


def _mad_sigma(x: np.ndarray) -> float:
    return float(MAD_TO_SIGMA * np.median(np.abs(x - np.median(x))))


def _band(level: float, sigma: float, threshold: float | None) -> float:
    if threshold is not None:
        return threshold
    return max(NOISE_K * sigma, REL_FLOOR * abs(level), ABS_FLOOR)


def _as_series(values: Sequence[float], epochs: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray]:
    """Finite values and their epochs (1-based positions when epochs is None)."""
    x = np.asarray(values, dtype=float).reshape(-1)
    e = np.arange(1, len(x) + 1) if epochs is None else np.asarray(epochs, dtype=int).reshape(-1)
    if len(e) != len(x):
        raise ValueError(f"epochs has {len(e)} entries but the series has {len(x)}")
    keep = np.isfinite(x)
    return x[keep], e[keep]


def _check_args(min_plateau: int, window: int, sustain: int, threshold: float | None) -> None:
    if min_plateau < 2:
        raise ValueError(f"min_plateau must be >= 2 epochs, got {min_plateau}")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd number of epochs, got {window}")
    if sustain < 1:
        raise ValueError(f"sustain must be >= 1 epoch, got {sustain}")
    if threshold is not None and not threshold > 0:
        raise ValueError(f"threshold must be > 0 (energy units), got {threshold}")


@dataclass(frozen=True)
class _Scan:
    plateau: int | None  # index of the first plateau point
    change: int | None  # index of the first phase-3 point
    level: float | None  # median dE(x) over the plateau


def _drift(seg: np.ndarray) -> float:
    """Change across a window of the least-squares line through it (slope * (len - 1))."""
    t = np.arange(len(seg), dtype=float)
    t -= t.mean()
    return float((t * (seg - seg.mean())).sum() / (t * t).sum() * (len(seg) - 1))


def _find_plateau(x: np.ndarray, s: np.ndarray, start: int, sigma: float, min_plateau: int,
                  threshold: float | None) -> int | None:
    """The first index i >= start whose window of min_plateau points is flat: the smoothed series
    stays within the band of its median, and the least-squares drift across the window is under
    SETTLE_FRACTION of the band (the phase-1 trend has died out, not merely slowed under the band)."""
    for i in range(start, len(x) - min_plateau + 1):
        seg = s[i : i + min_plateau]
        level = float(np.median(seg))
        band = _band(level, sigma, threshold)
        if np.all(np.abs(seg - level) <= band) and abs(_drift(x[i : i + min_plateau])) <= SETTLE_FRACTION * band:
            return i
    return None


def _scan(x: np.ndarray, *, min_plateau: int, window: int, sustain: int, threshold: float | None,
          learned: int | None = None) -> _Scan:
    """learned: index of the first point by which the model has begun to learn (`_learned_index`);
    None when unknown. A plateau at the starting level counts from there on at the earliest."""
    n = len(x)
    if n < min_plateau:
        return _Scan(None, None, None)
    s = _running_median(x, window)
    sigma_noise = _noise_sigma(x)
    start_level = float(s[0])

    first_plateau = None
    i = 0
    while True:
        p = _find_plateau(x, s, i, sigma_noise, min_plateau, threshold)
        if p is None:
            # No (further) plateau: report the first one seen, if any, without a phase 3.
            return _Scan(first_plateau, None, None if first_plateau is None else float(np.median(x[first_plateau:])))
        if first_plateau is None:
            first_plateau = p
        # A plateau at the level training started from (dE has not left it by a band yet) may be the
        # lag before phase 1 (small warm-up learning rates): it must last LAG_FACTOR times longer.
        plateau_level = float(np.median(s[p : p + min_plateau]))
        moved = abs(plateau_level - start_level) > _band(plateau_level, sigma_noise, threshold)
        need = (PLATEAU_FACTOR if moved else LAG_FACTOR) * min_plateau
        # Where the rows say when the model began to learn, a plateau at the starting level before that
        # is the lag whatever its length: it is established only `need` points after learning began.
        established = p + need if moved or learned is None else max(p, learned) + need
        # Phase 3: the first t whose excursion beyond the past plateau's band lasts `sustain` points.
        for t in range(p + min_plateau, n - sustain + 1):
            ref = x[p:t]
            level = float(np.median(ref))
            band = _band(level, max(sigma_noise, _mad_sigma(ref)), threshold)
            dev = s[t : t + sustain] - level
            if not (np.all(dev > band) or np.all(dev < -band)):
                continue
            if t < established:
                # It left the plateau before the plateau was established: that was still phase 1
                # (a pause in the descent, or the lag before it). Look for the real plateau after it.
                first_plateau = None if first_plateau == p else first_plateau
                i = t
                break
            sign = 1.0 if dev[0] > 0 else -1.0
            onset = t
            while onset - 1 >= established and sign * (s[onset - 1] - level) > ONSET_FRACTION * band:
                onset -= 1
            return _Scan(p, onset, float(np.median(x[p:onset])))
        else:
            return _Scan(p, None, float(np.median(x[p:])))


def detect_phase3(
    delta: Sequence[float],
    *,
    epochs: Sequence[int] | None = None,
    min_plateau: int = 8,
    window: int = 3,
    threshold: float | None = None,
    sustain: int = 5,
) -> int | None:
    """First epoch of robust overfitting, from the per-epoch mean dE(x) = E(x) - E(x*) alone.

    delta: mean dE(x) per epoch (energy units); non-finite entries are skipped.
    epochs: the 1-based epoch of each entry (default 1, 2, ...).
    min_plateau: the flatness window that marks a plateau's start, in epochs; the plateau must
        last twice that (three times at the starting level) before phase 3 can start.
    window: width of the centred running median, in epochs (odd; 1 = no smoothing).
    threshold: band half-width around the plateau level, energy units; None = automatic,
        max(4 sigma, 10% of |level|, 1e-3) with sigma the robust noise scale of the series.
    sustain: consecutive epochs the smoothed dE(x) must stay beyond the band, on one side.
    Returns the epoch where the excursion starts, or None (see the module docstring for the rule).
    """
    _check_args(min_plateau, window, sustain, threshold)
    x, e = _as_series(delta, epochs)
    scan = _scan(x, min_plateau=min_plateau, window=window, sustain=sustain, threshold=threshold)
    return None if scan.change is None else int(e[scan.change])


def _phase2_from_robust_error(error: np.ndarray, epochs: np.ndarray, window: int = 3) -> int | None:
    """First epoch after the steepest drop where the drop per epoch is under 10% of its peak.

    Robust error is smoothed with the running median; the rate at i is the centred difference
    (s[i-1] - s[i+1]) / 2, in error per epoch.
    """
    if len(error) < 5:
        return None
    s = _running_median(error, window)
    rate = np.full(len(s), np.nan)
    rate[1:-1] = (s[:-2] - s[2:]) / 2.0
    peak_i = int(np.nanargmax(rate))
    peak = rate[peak_i]
    if not peak > 0:
        return None
    for i in range(peak_i + 1, len(s) - 1):
        if rate[i] < RATE_FRACTION * peak:
            return int(epochs[i])
    return None


def _column(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, values) of the rows where `key` is a finite number, in epoch order."""
    pairs = sorted(
        (int(r["epoch"]), float(r[key])) for r in rows
        if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])
    )
    if not pairs:
        return np.zeros(0, dtype=int), np.zeros(0)
    e, v = zip(*pairs)
    return np.asarray(e, dtype=int), np.asarray(v, dtype=float)


def detect_catastrophic_overfitting(
    rows: list[dict],
    *,
    history: int = CO_HISTORY,
    k: float = CO_K,
    span: int = CO_SPAN,
) -> int | None:
    """First epoch of catastrophic overfitting, from the training-set dE(x) (`delta_energy`) alone.

    Catastrophic overfitting of single-step AT happens within an epoch or two, and dE(x) - measured
    with the method's own training attack - breaks away from its recent range when it does
    (docs/science.md#catastrophic-overfitting). For each epoch i after the first `history` + 1:
      1. sigma = the robust size of dE(x)'s epoch-to-epoch changes: the noise of its changes over
         all epochs before i (1.4826 * MAD of the second differences / sqrt(3), which a smooth trend
         does not move), or the recent trend |median d| over the last `history` changes d (so phase
         1's steady descent is not a break), or 2% of the recent max |dE(x)|, or 2% of the recent
         max |E(x)| where the rows have `energy_natural` (dE(x) starts near 0 with tiny noise, and
         phase 1 leaving that flat start is a change of a few % of |E(x)| per epoch, not a break),
         or 1e-3, the largest;
      2. a break: for some s in 1..`span`, dE(i + s - 1) lies J beyond the range (min to max) of the
         last `history` + 1 epochs before i, with |J| > k sigma;
      3. confirmation: the epoch after the break is still beyond that range by half of J (a
         one-epoch glitch, or the return from one, is not CO); a break at the last epoch waits.
    Where the rows have `energy_natural`, breaks are looked for only after dE(x) has once moved
    CO_STARTED of |E(x)| away from its first value: phase 1 leaving the flat start is not CO.
    Returns the epoch with the largest single-epoch change inside the break, or None.

    `train_attack_accuracy` (accuracy under the training attack on the same training subset), where
    the rows have it, is supporting evidence only: a break of CO_K_SUPPORTED sigmas (instead of k)
    counts when that accuracy reaches CO_ACC_JUMP or more above its best before the break, the
    other face of CO (the single-step attack stops finding adversarial points), and dE(x,y)
    (`delta_joint`, where the rows have it) rises with it: x* no longer lowers the true class's
    logit as much. While the model learns in phase 1 the accuracy rises too, but dE(x,y) falls;
    a recovery after a dip is not a rise above the best either. dE(x) alone suffices otherwise.
    A smooth series - phase 1, a plateau, a gradual phase-3 drift - is not flagged.
    """
    if history < 2 or span < 1 or not k > 0:
        raise ValueError(f"history must be >= 2, span >= 1 and k > 0; got {history}, {span}, {k}")
    e, x = _column(rows, "delta_energy")
    e_acc, acc = _column(rows, "train_attack_accuracy")
    accuracy = dict(zip(e_acc.tolist(), acc.tolist()))
    e_nat, nat = _column(rows, "energy_natural")
    natural = dict(zip(e_nat.tolist(), np.abs(nat).tolist()))
    e_joint, dj = _column(rows, "delta_joint")
    joint = dict(zip(e_joint.tolist(), dj.tolist()))
    n = len(x)
    # Phase 1 first: the first epoch from which dE(x) has left its starting value by CO_STARTED of
    # |E(x)|, where the rows have E(x) (else from the start). Before it, dE(x) sits near 0 and its
    # first departure - however sudden against that flat start - is phase 1, not a break.
    started = 0
    if natural:
        moved = [ep in natural and abs(v - x[0]) > CO_STARTED * natural[ep] for ep, v in zip(e.tolist(), x)]
        started = moved.index(True) + 1 if any(moved) else n
    for i in range(max(history + 1, started), n):
        recent = x[i - history - 1 : i]
        recent_epochs = e[i - history - 1 : i].tolist()
        d2 = np.diff(x[:i], 2)  # second differences: the noise, blind to smooth trends (var 6 s^2 vs 2 s^2)
        scale = max(MAD_TO_SIGMA * float(np.median(np.abs(d2 - np.median(d2)))) / math.sqrt(3.0),
                    abs(float(np.median(np.diff(recent)))),
                    CO_REL_FLOOR * float(np.abs(recent).max()),
                    CO_ENERGY_FLOOR * max((natural.get(ep, 0.0) for ep in recent_epochs), default=0.0), ABS_FLOOR)
        lo, hi = float(recent.min()), float(recent.max())
        best_acc = max((accuracy[ep] for ep in e[:i].tolist() if ep in accuracy), default=None)
        for s in range(1, min(span, n - i) + 1):
            value = x[i + s - 1]
            jump = value - hi if value > hi else value - lo if value < lo else 0.0  # beyond the recent range
            a1 = accuracy.get(int(e[i + s - 1]))
            supported = best_acc is not None and a1 is not None and a1 - best_acc >= CO_ACC_JUMP
            j0, j1 = joint.get(int(e[i - 1])), joint.get(int(e[i + s - 1]))
            if supported and j0 is not None and j1 is not None:
                # CO: x* stops being adversarial for the true class, so dE(x,y) = E(x,y) - E(x*,y)
                # rises towards 0 or above; while the model learns (phase 1) it falls as the accuracy rises.
                supported = j1 > j0
            if abs(jump) <= (CO_K_SUPPORTED if supported else k) * scale:
                continue
            after = i + s
            if after >= n:
                return None  # a break at the very last epoch: the next epoch confirms or clears it
            edge = hi if jump > 0 else lo
            if np.sign(jump) * (x[after] - edge) < CO_KEEP * abs(jump):
                continue  # not kept: a glitch
            steps = np.abs(np.diff(x[i - 1 : i + s]))
            return int(e[i + int(np.argmax(steps))])
    return None


def detect_phases(rows: list[dict], *, min_plateau: int = 8, window: int = 3, sustain: int = 5) -> Phases:
    """Phase boundaries of one run from its metrics rows (see `read_metrics`).

    phase3_start and plateau_delta come from `delta_energy` (`detect_phase3`; where the rows have
    `joint_natural` and `energy_natural`, their difference tells when the model began to learn).
    catastrophic_overfitting_epoch comes from `delta_energy` too (`detect_catastrophic_overfitting`,
    which also reads `train_attack_accuracy` where the rows have it, as supporting evidence).
    phase2_start comes from test robust error (1 - robust_accuracy) where the rows have it - the
    first epoch after its steepest drop where it improves by less than 10% of that peak rate -
    and otherwise from dE(x) settling onto its plateau. best_epoch is the first epoch with the
    highest robust_accuracy (None without it).
    """
    _check_args(min_plateau, window, sustain, None)
    e_delta, delta = _column(rows, "delta_energy")
    scan = _scan(delta, min_plateau=min_plateau, window=window, sustain=sustain, threshold=None,
                 learned=_learned_index(rows, e_delta))
    phase3 = None if scan.change is None else int(e_delta[scan.change])

    e_rob, rob = _column(rows, "robust_accuracy")
    phase2 = _phase2_from_robust_error(1.0 - rob, e_rob, window) if len(rob) else None
    if phase2 is None and scan.plateau is not None and len(rob) == 0:
        phase2 = int(e_delta[scan.plateau])
    best = int(e_rob[int(np.argmax(rob))]) if len(rob) else None
    co = detect_catastrophic_overfitting(rows)
    return Phases(phase2_start=phase2, phase3_start=phase3, plateau_delta=scan.level, best_epoch=best,
                  catastrophic_overfitting_epoch=co,
                  co_recovery_epoch=None if co is None else co_recovery_epoch(rows, co))


def _learned_index(rows: list[dict], epochs: np.ndarray) -> int | None:
    """Index into `epochs` of the first epoch by which the model has begun to learn: the training
    subset's mean -log p(y|x) = E(x,y) - E(x) (`joint_natural` - `energy_natural`) has fallen
    LEARNED_DROP below its first value. len(epochs) when it never has; None when the rows lack
    those energies (the plateau rule then goes by duration alone)."""
    e_joint, joint = _column(rows, "joint_natural")
    e_marg, marg = _column(rows, "energy_natural")
    common, i_joint, i_marg = np.intersect1d(e_joint, e_marg, return_indices=True)
    if len(common) == 0:
        return None
    nll = joint[i_joint] - marg[i_marg]
    below = np.flatnonzero(nll <= (1.0 - LEARNED_DROP) * nll[0])
    if len(below) == 0:
        return len(epochs)
    return int(np.searchsorted(epochs, common[below[0]]))


def co_recovery_epoch(rows: list[dict], co_epoch: int, *, epochs: int = RECOVERY_EPOCHS) -> int | None:
    """The epoch by which a run has recovered from catastrophic overfitting flagged at `co_epoch`,
    or None (not yet, or the rows lack `delta_joint`).

    During CO the single-step training attack stops finding adversarial points: dE(x,y) =
    E(x,y) - E(x*,y) rises to 0 or above (x* no longer lowers the true class's logit). Training
    can leave that state again (with a falling learning rate it often does, and PGD accuracy comes
    back). Recovered: `epochs` consecutive epochs after `co_epoch` with dE(x,y) at or below its
    value at the epoch before `co_epoch` - the attack lowers the true class's logit at least as
    much as it did before the break. The last of those epochs is returned.
    """
    e, dj = _column(rows, "delta_joint")
    before = [v for ep, v in zip(e.tolist(), dj.tolist()) if ep < co_epoch]
    if not before or epochs < 1:
        return None
    reference, run = before[-1], 0
    for ep, v in zip(e.tolist(), dj.tolist()):
        if ep <= co_epoch:
            continue
        run = run + 1 if v <= reference else 0
        if run == epochs:
            return int(ep)
    return None


@dataclass(frozen=True)
class EnergySelection:
    """What `--select energy` keeps: `epoch` (None: the latest one) and why it stopped there."""

    epoch: int | None
    ended_by: str | None  # "phase3", "co" (catastrophic overfitting, not recovered from) or None


def energy_selection(rows: list[dict]) -> EnergySelection:
    """Model selection without held-out data: the last epoch before phase 3 or catastrophic
    overfitting, whichever comes first, or the latest epoch when neither is seen.

    A run that recovers from catastrophic overfitting (`co_recovery_epoch`) is selected afresh from
    the recovered epochs on, as if it had started there: a later phase 3 or CO ends it again. So
    an unrecovered collapse keeps the epoch before it, a recovered one the latest model.
    """
    phases = detect_phases(rows)
    co, p3 = phases.catastrophic_overfitting_epoch, phases.phase3_start
    if co is not None and (p3 is None or co <= p3):
        recovered = phases.co_recovery_epoch
        before = [int(r["epoch"]) for r in rows if int(r["epoch"]) < co]
        if recovered is None:
            return EnergySelection(max(before) if before else None, "co")
        start = recovered - RECOVERY_EPOCHS + 1  # the first epoch of the recovered run
        tail = [r for r in rows if int(r["epoch"]) >= start]
        again = energy_selection(tail)
        if again.ended_by is not None and again.epoch is None:  # it ended at once: its first epoch
            return EnergySelection(start, again.ended_by)
        return again
    if p3 is None:
        return EnergySelection(None, None)
    before = [int(r["epoch"]) for r in rows if int(r["epoch"]) < p3]
    return EnergySelection(max(before) if before else None, "phase3")
