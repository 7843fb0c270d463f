"""The RobustBench leaders' ingredients on digits, one at a time and all together with WEAT.

Each row is `weat train --preset digits-weat` plus the flags named in ROWS, for every seed; the
table reports, over seeds, the best PGD-20 accuracy (the selected epoch's, --select best), the last
epoch's PGD-20 and clean accuracy, and the training time (the sum of the epochs' train_seconds:
the optimizer steps without the per-epoch evaluation; and the sum of the epochs' seconds, evaluation
included). The extra
data is a digits stand-in for generated images (benchmarks/digits_extra.py), made first if missing.

    python benchmarks/recipe_table.py                                # every row, seeds 0 1 2, 40 epochs
    python benchmarks/recipe_table.py --seeds 0 --epochs 20          # what fits a busy machine
    python benchmarks/recipe_table.py --rows baseline awp --seeds 3  # more seeds of some rows

Runs go to runs/recipe-table/<row>-e<epochs>-s<seed>/ and are reused: a finished run is read, a
stopped one is resumed (`weat train --resume`), so rerunning the command fills in what is missing.
Writes benchmarks/results/recipe/recipe-table-e<epochs>.json and .md (every run found, not only
the ones asked for this time) after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
EXTRA = "{extra}"  # replaced by the extra-data file's path
ROWS: dict[str, tuple[str, list[str]]] = {
    "baseline": ("WEAT, the digits-weat preset (OneCycle)", []),
    "ema": ("+ weight EMA 0.995", ["--ema", "0.995"]),
    "label-smoothing": ("+ label smoothing 0.1", ["--label-smoothing", "0.1"]),
    "awp": ("+ AWP gamma 5e-3", ["--awp-gamma", "0.005"]),
    "extra-data": ("+ generated data, half of every batch", ["--extra-data", EXTRA, "--extra-fraction", "0.5"]),
    "cosine-warmup": ("cosine with 2 warm-up epochs instead of OneCycle",
                      ["--set", "train.schedule='cosine'", "--set", "train.warmup_epochs=2"]),
    "all": ("all of the above together (WEAT)",
            ["--ema", "0.995", "--label-smoothing", "0.1", "--awp-gamma", "0.005", "--extra-data", EXTRA,
             "--extra-fraction", "0.5", "--set", "train.schedule='cosine'", "--set", "train.warmup_epochs=2"]),
}


def _rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_one(row: str, seed: int, epochs: int, extra: Path, runs: Path, threads: int) -> Path:
    """Train (or finish) one run; returns its directory."""
    out = runs / f"{row}-e{epochs}-s{seed}"
    if len(_rows(out)) >= epochs and (out / "model.safetensors").exists():
        return out
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if (out / "last.safetensors").exists():
        cmd = ["train", "--resume", str(out), "--json"]
    else:
        flags = [str(extra) if f == EXTRA else f for f in ROWS[row][1]]
        cmd = ["train", "--preset", "digits-weat", "--epochs", str(epochs), "--seed", str(seed), "--device", "cpu",
               *flags, "--out", str(out), "--json"]
    subprocess.run([sys.executable, "-m", "weatcli", *cmd], check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return out


def summarise(run: Path) -> dict:
    rows = _rows(run)
    best = max(rows, key=lambda r: r["robust_accuracy"])  # --select best with select_after 0
    last = rows[-1]
    return {"best_robust": best["robust_accuracy"], "best_epoch": best["epoch"], "best_clean": best["clean_accuracy"],
            "last_robust": last["robust_accuracy"], "last_clean": last["clean_accuracy"],
            "train_seconds": round(sum(r["train_seconds"] for r in rows), 1),
            "seconds": round(sum(r["seconds"] for r in rows), 1), "epochs": len(rows)}


def _fmt(values: list[float], pct: bool = True) -> str:
    scale = 100 if pct else 1
    mean = statistics.mean(values) * scale
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {statistics.stdev(values) * scale:.1f}"


def write_table(runs: Path, epochs: int, results: Path) -> dict:
    table: dict[str, dict] = {}
    for row in ROWS:
        done = sorted(runs.glob(f"{row}-e{epochs}-s*"), key=lambda p: int(p.name.rsplit("-s", 1)[1]))
        per_seed = {int(p.name.rsplit("-s", 1)[1]): summarise(p) for p in done
                    if len(_rows(p)) >= epochs and (p / "model.safetensors").exists()}
        if per_seed:
            table[row] = {"description": ROWS[row][0], "flags": ROWS[row][1], "seeds": per_seed}
    meta = {"epochs": epochs, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "written": time.strftime("%Y-%m-%d %H:%M")}
    results.mkdir(parents=True, exist_ok=True)
    (results / f"recipe-table-e{epochs}.json").write_text(json.dumps({"meta": meta, "rows": table}, indent=1) + "\n")
    lines = [f"digits, small-cnn, {epochs} epochs, Linf eps 0.1, PGD-20 on the 360 test images; mean ± std over "
             "seeds (one seed: the value)", "",
             "| row | seeds | best PGD-20 | last PGD-20 | last clean | train s | run s |", "|---|---|---|---|---|---|---|"]
    for row, entry in table.items():
        s = list(entry["seeds"].values())
        lines.append(f"| {entry['description']} | {len(s)} | {_fmt([r['best_robust'] for r in s])} | "
                     f"{_fmt([r['last_robust'] for r in s])} | {_fmt([r['last_clean'] for r in s])} | "
                     f"{_fmt([r['train_seconds'] for r in s], pct=False)} | {_fmt([r['seconds'] for r in s], pct=False)} |")
    (results / f"recipe-table-e{epochs}.md").write_text("\n".join(lines) + "\n")
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--extra", type=Path, default=ROOT / "runs" / "digits-extra.npz")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "recipe-table")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "recipe")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (runs go one after another)")
    args = p.parse_args()
    if not args.extra.exists():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "digits_extra.py"), "--out", str(args.extra)],
                       check=True, cwd=ROOT)
    for seed in args.seeds:  # seed-major: a stopped table has whole seeds of every row
        for row in args.rows:
            print(f"{row} seed {seed} ...", file=sys.stderr, flush=True)
            run_one(row, seed, args.epochs, args.extra, args.runs, args.threads)
            write_table(args.runs, args.epochs, args.results)
    print((args.results / f"recipe-table-e{args.epochs}.md").read_text(), end="")


if __name__ == "__main__":
    main()
