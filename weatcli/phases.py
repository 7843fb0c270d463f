"""The three phases of adversarial training, read from a run's metrics.jsonl (docs/science.md#phase-detector).

(1) robust error drops fast while the mean energy gap dE(x) = E(x) - E(x*) leaves 0;
(2) a long plateau; (3) robust overfitting: dE(x) of PGD-AT moves away from its plateau
(natural and adversarial energies diverge) while test robust error stops improving.

Phase 3 is detected from the dE(x) series alone, so it needs no held-out robust accuracy and can
pick a checkpoint (`weat train --select energy`) without touching test data. Pure numpy.

The rule (`detect_phase3`), in energy units (logits) and epochs:
  1. s = centred running median of dE(x) over `window` epochs (a one-epoch spike vanishes).
  2. sigma = noise scale of dE(x): 1.4826 * MAD of the first differences / sqrt(2), which a trend
     or a single step barely moves; raised to the plateau's own MAD scale where that is larger.
  3. Phase 2 starts at the first epoch p from which s stays within `band` of its median for
     `min_plateau` epochs (the fast phase-1 change is over).
  4. For each later epoch t (at least `min_plateau` plateau epochs before it), the plateau level is
     the median of dE(x) over [p, t) - only the past, so the change never contaminates its own
     reference - and band = `threshold` or max(4 sigma, 10% of |level|, 1e-3).
     Phase 3 starts at the first t from which s stays beyond level +- band, on the same side, for
     `sustain` consecutive epochs. Either sign counts: the paper's "collapse" of dE(x) for PGD-AT
     is a move away from the plateau, and which way depends on the method and dataset.
  5. The reported epoch is the onset of that excursion: from t, step back while the smoothed
     series is still beyond half the band on the same side (a slow drift crosses the full band
     a few epochs after it starts).
A flat or noisy series, a short blip, or a series too short to hold phase 1, a plateau of
`min_plateau` epochs and `sustain` epochs of excursion gives None.
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
RATE_FRACTION = 0.10  # phase 2 (from robust error): improvement per epoch below 10% of its peak rate


@dataclass(frozen=True)
class Phases:
    """Phase boundaries of one training run, as 1-based epochs (None: not seen in this run)."""

    phase2_start: int | None  # first plateau epoch: the fast initial drop of robust error is over
    phase3_start: int | None  # first epoch of robust overfitting, from the energy gap dE(x) alone
    plateau_delta: float | None  # plateau level of mean dE(x) (energy units), median over phase 2
    best_epoch: int | None  # epoch of best test robust accuracy, where the rows have it

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


def _scan(x: np.ndarray, *, min_plateau: int, window: int, sustain: int, threshold: float | None) -> _Scan:
    n = len(x)
    if n < min_plateau:
        return _Scan(None, None, None)
    s = _running_median(x, window)
    sigma_noise = _noise_sigma(x)

    # Phase 2: the first index from which s stays within the band of its local median for
    # min_plateau points.
    p = None
    for i in range(n - min_plateau + 1):
        seg = s[i : i + min_plateau]
        level = float(np.median(seg))
        if np.all(np.abs(seg - level) <= _band(level, sigma_noise, threshold)):
            p = i
            break
    if p is None:
        return _Scan(None, None, None)

    # Phase 3: the first t whose excursion beyond the past plateau's band lasts `sustain` points.
    for t in range(p + min_plateau, n - sustain + 1):
        ref = x[p:t]
        level = float(np.median(ref))
        band = _band(level, max(sigma_noise, _mad_sigma(ref)), threshold)
        dev = s[t : t + sustain] - level
        if np.all(dev > band) or np.all(dev < -band):
            sign = 1.0 if dev[0] > 0 else -1.0
            onset = t
            while onset - 1 >= p + min_plateau and sign * (s[onset - 1] - level) > ONSET_FRACTION * band:
                onset -= 1
            return _Scan(p, onset, float(np.median(x[p:onset])))
    return _Scan(p, None, float(np.median(x[p:])))


def detect_phase3(
    delta: Sequence[float],
    *,
    epochs: Sequence[int] | None = None,
    min_plateau: int = 5,
    window: int = 3,
    threshold: float | None = None,
    sustain: int = 5,
) -> int | None:
    """First epoch of robust overfitting, from the per-epoch mean dE(x) = E(x) - E(x*) alone.

    delta: mean dE(x) per epoch (energy units); non-finite entries are skipped.
    epochs: the 1-based epoch of each entry (default 1, 2, ...).
    min_plateau: epochs the plateau must last before phase 3 can start (also the flatness
        window that marks its start).
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


def detect_phases(rows: list[dict], *, min_plateau: int = 5, window: int = 3, sustain: int = 5) -> Phases:
    """Phase boundaries of one run from its metrics rows (see `read_metrics`).

    phase3_start and plateau_delta come from `delta_energy` alone (`detect_phase3`).
    phase2_start comes from test robust error (1 - robust_accuracy) where the rows have it - the
    first epoch after its steepest drop where it improves by less than 10% of that peak rate -
    and otherwise from dE(x) settling onto its plateau. best_epoch is the first epoch with the
    highest robust_accuracy (None without it).
    """
    _check_args(min_plateau, window, sustain, None)
    e_delta, delta = _column(rows, "delta_energy")
    scan = _scan(delta, min_plateau=min_plateau, window=window, sustain=sustain, threshold=None)
    phase3 = None if scan.change is None else int(e_delta[scan.change])

    e_rob, rob = _column(rows, "robust_accuracy")
    phase2 = _phase2_from_robust_error(1.0 - rob, e_rob, window) if len(rob) else None
    if phase2 is None and scan.plateau is not None and len(rob) == 0:
        phase2 = int(e_delta[scan.plateau])
    best = int(e_rob[int(np.argmax(rob))]) if len(rob) else None
    return Phases(phase2_start=phase2, phase3_start=phase3, plateau_delta=scan.level, best_epoch=best)


def energy_select_epoch(rows: list[dict]) -> int | None:
    """The last epoch before phase 3 (model selection without held-out data); None if no phase 3."""
    phase3 = detect_phases(rows).phase3_start
    if phase3 is None:
        return None
    before = [int(r["epoch"]) for r in rows if int(r["epoch"]) < phase3]
    return max(before) if before else None
