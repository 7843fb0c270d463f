"""The journal extension's experiments (issue 13) on the bundled digits set, in one command.

    python benchmarks/journal_runs.py                       # every part, 3 seeds (hours on 2 CPU cores)
    python benchmarks/journal_runs.py --part co --seeds 1   # one part, fewer seeds
    python benchmarks/journal_runs.py --report-only         # tables again from the runs already made

Parts (each a list of `weat train ... --json` runs, in subprocesses, plus what is computed from
their metrics.jsonl with weatcli.phases):

  time  Time to robustness: `--preset digits-n-fgsm` and `--preset digits-fgsm-rs` (wall seconds,
        the first epoch at >= 70% PGD-20 and the seconds until then), and the training-epoch time of
        pgd-at, fgsm-rs and n-fgsm (and DER) measured in this process, interleaved (`epoch_times`).
  co    Catastrophic overfitting: `--preset digits-fgsm-rs-co` per seed; the collapse epoch (PGD-20
        below 10% of its best so far) against the epoch the detector flags.
  der   DER on the CO setting: fgsm-rs vs `--preset digits-fgsm-rs-der` vs n-fgsm at the same eps,
        per seed (best and last PGD-20, time); pgd-at with and without DER at the same eps (PGD_AT_015:
        no crops, no weight decay, 50 epochs multistep, a long stretch at lr 0.01 after the first decay,
        where robust overfitting would show; on digits it did not).
  dersweep  DER's lambda and gamma on the CO setting, seed 0 (DER_SWEEP), and the preset's energy
        anchor (ANCHOR_SWEEP); in the DER tables.
  ro    Robust overfitting and the phase-3 detector (with the pgd-at runs of `der`):
        the issue's failure case `--preset digits-pgd-at --epochs 120 --set train.schedule=multistep
        --select energy`; `digits-trades` and `digits-weat` (40 epochs) for false alarms.

Every run writes its directory under --out (default runs/journal) and `NAME.result.json` next to
it; a run whose result exists is not run again (delete it, or pass --fresh), so an interrupted
invocation continues where it stopped. At the end `journal.json` (everything) and `journal.md`
(the tables) are written to --out. --figures DIR also draws `weat energy plot` of the CO run
(`co-digits.png`) there.

Timings depend on what else runs on the machine: each result records the 1-minute load average
before and after, the thread count and how many runs went in parallel (--jobs).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from weatcli.phases import detect_phases, energy_selection, read_metrics  # noqa: E402

PARTS = ("time", "co", "der", "dersweep", "ro")
DER_SWEEP = [(0.1, 0.0), (0.3, 0.0), (3.0, 0.0), (1.0, 0.5)]  # (lambda, gamma) besides the preset's (1, 0)
ANCHOR_SWEEP = [0.0003, 0.003, 0.01]  # train.der_anchor besides the preset's 0.001
TARGET = 0.70  # time to robustness: PGD-20 accuracy of the per-epoch evaluation (eval_n test images)
DER_BOTH = ["--set", "train.der_grad=both"]  # the default reading; digits-fgsm-rs-der's own is DER_ADV
DER_ADV = ["--set", "train.der_grad=adversarial"]
NO_ANCHOR = ["--set", "train.der_anchor=0"]  # digits-fgsm-rs-der's own anchor is 0.001
ANCHOR = ["--set", "train.der_anchor=0.001"]
COLLAPSE = 0.10  # catastrophic overfitting: PGD-20 accuracy below 10% of its best so far


@dataclass
class Run:
    name: str
    part: str
    argv: list[str]
    group: str = ""  # rows of one table line (the seeds of one setting)
    seed: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


# pgd-at at the CO setting's eps 0.15, set up as Rice et al. see robust overfitting: no crops, no weight
# decay, lr 0.1 for 15 epochs then 0.01 for 30 (and 0.001 for 5).
PGD_AT_015 = ["--preset", "digits-pgd-at", "--eps", "0.15", "--epochs", "50", "--set", "data.crop_padding=0",
              "--set", "train.weight_decay=0.0", "--set", "train.lr=0.1", "--set", "train.schedule=multistep",
              "--set", "train.milestones=[0.3,0.9]", "--select", "energy"]


def plan(parts: list[str], seeds: int, *, with_long: bool) -> list[Run]:
    s = range(seeds)
    runs: list[Run] = []
    if "time" in parts:
        runs += [Run("time-n-fgsm", "time", ["--preset", "digits-n-fgsm"], "n-fgsm"),
                 Run("time-fgsm-rs", "time", ["--preset", "digits-fgsm-rs"], "fgsm-rs")]
    if "co" in parts or "der" in parts:
        runs += [Run(f"co-fgsm-rs-s{i}", "co", ["--preset", "digits-fgsm-rs-co", "--seed", str(i)], "fgsm-rs", i)
                 for i in s]
    if "der" in parts:
        runs += [Run(f"der-fgsm-rs-der-s{i}", "der", ["--preset", "digits-fgsm-rs-der", *DER_BOTH, *NO_ANCHOR,
                                                       "--seed", str(i)], "fgsm-rs + DER (through both)", i) for i in s]
        runs += [Run(f"der-fgsm-rs-der-adv-s{i}", "der", ["--preset", "digits-fgsm-rs-der", *NO_ANCHOR, "--seed", str(i)],
                     "fgsm-rs + DER (through x* only)", i) for i in s]
        runs += [Run(f"der-fgsm-rs-der-anchor-s{i}", "der", ["--preset", "digits-fgsm-rs-der", "--seed", str(i)],
                     "fgsm-rs + DER (x* only) + anchor: the preset", i) for i in s]
        runs += [Run(f"der-fgsm-rs-anchor-s{i}", "der", ["--preset", "digits-fgsm-rs-der", "--set", "train.der_weight=0",
                                                          "--seed", str(i)], "fgsm-rs + anchor alone", i) for i in s]
        runs += [Run(f"der-n-fgsm-s{i}", "der", ["--preset", "digits-fgsm-rs-co", "--method", "n-fgsm",
                                                  "--set", "train.fgsm_alpha=1.0", "--seed", str(i)], "n-fgsm", i)
                 for i in s]
        # pgd-at on the robust-overfitting preset, with and without DER; `--select energy` only
        # chooses which epoch model.safetensors holds, so these runs are also the ro part's seeds.
        runs += [Run(f"der-pgd-at-s{i}", "der", [*PGD_AT_015, "--seed", str(i)], "pgd-at", i) for i in s]
        runs += [Run(f"der-pgd-at-der-s{i}", "der", [*PGD_AT_015, "--seed", str(i), "--set", "train.der_weight=1.0",
                                                      *DER_BOTH], "pgd-at + DER (through both)", i) for i in s]
        runs += [Run(f"der-pgd-at-der-adv-s{i}", "der", [*PGD_AT_015, "--seed", str(i), "--set", "train.der_weight=1.0",
                                                          *DER_ADV],
                     "pgd-at + DER (through x* only)", i) for i in s]
        runs += [Run(f"der-pgd-at-der-anchor-s{i}", "der", [*PGD_AT_015, "--seed", str(i), "--set",
                                                             "train.der_weight=1.0", *DER_ADV, *ANCHOR],
                     "pgd-at + DER (x* only) + anchor", i) for i in s]
    if "dersweep" in parts:
        runs += [Run(f"dersweep-l{lam:g}-g{gamma:g}-s0", "dersweep",
                     ["--preset", "digits-fgsm-rs-der", *DER_BOTH, *NO_ANCHOR, "--set", f"train.der_weight={lam:g}",
                      "--set", f"train.der_margin={gamma:g}", "--seed", "0"], f"fgsm-rs + DER (through both, lambda {lam:g}, gamma {gamma:g})")
                 for lam, gamma in DER_SWEEP]
        runs += [Run(f"dersweep-anchor{mu:g}-s0", "dersweep",
                     ["--preset", "digits-fgsm-rs-der", "--set", f"train.der_anchor={mu:g}", "--seed", "0"],
                     f"fgsm-rs + DER (x* only) + anchor {mu:g}") for mu in ANCHOR_SWEEP]
    if "ro" in parts:
        runs += [Run("ro-trades", "ro", ["--preset", "digits-trades", "--select", "energy"], "digits-trades"),
                 Run("ro-weat", "ro", ["--preset", "digits-weat", "--select", "energy"], "digits-weat")]
        if with_long:
            runs.append(Run("ro-pgd-at-120-multistep", "ro",
                            ["--preset", "digits-pgd-at", "--epochs", "120", "--set", "train.schedule=multistep",
                             "--select", "energy"], "digits-pgd-at, 120 epochs, multistep"))
    # Every setting's first seed first (a wrong setting shows early), the longest runs of a seed
    # first; the ro part's single runs last.
    return sorted(runs, key=lambda r: (r.seed if r.part != "ro" else len(runs), "pgd-at" not in r.name))


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def execute(run: Run, out: Path, *, threads: int, jobs: int, fresh: bool) -> dict[str, Any]:
    """`weat train ARGV --out OUT/NAME --json` in a subprocess; its summary and wall seconds."""
    result_path = out / f"{run.name}.result.json"
    if result_path.exists() and not fresh:
        return json.loads(result_path.read_text())
    run_dir = out / run.name
    if run_dir.exists() and not (run_dir / "last.safetensors").exists() or fresh:
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    print(f"[journal] {run.name}: weat train {' '.join(run.argv)}", file=sys.stderr, flush=True)
    load0, wall, cpu, attempts = _load(), 0.0, 0.0, 0
    while True:
        # A run stopped by a signal (exit 130: another user's pkill, a reboot) is resumed from its
        # last.safetensors: the weights end bit-identical to an uninterrupted run's.
        resume = (run_dir / "last.safetensors").exists()
        argv = ["--resume", str(run_dir)] if resume else [*run.argv, "--out", str(run_dir)]
        t0 = time.perf_counter()
        with open(out / f"{run.name}.log", "a") as log:
            proc = subprocess.Popen([sys.executable, __file__, "--train-child", *argv, "--json"],
                                    stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=ROOT)
            stdout = proc.stdout.read()
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU time, whatever runs beside it
            code = os.waitstatus_to_exitcode(status)
        wall += time.perf_counter() - t0
        cpu += usage.ru_utime + usage.ru_stime
        attempts += 1
        if code == 0:
            break
        if code != 130 or attempts >= 5:
            raise SystemExit(f"[journal] {run.name} failed (exit {code}); see {out / (run.name + '.log')}")
        print(f"[journal] {run.name}: interrupted (exit 130), resuming", file=sys.stderr, flush=True)
    result = {"name": run.name, "part": run.part, "group": run.group, "seed": run.seed,
              "command": "weat train " + shlex.join(run.argv), "wall_seconds": round(wall, 1),
              "cpu_seconds": round(cpu, 1), "attempts": attempts,
              "load_before": load0, "load_after": _load(), "threads": threads, "jobs": jobs,
              "summary": json.loads(stdout), **run.meta}
    result_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"[journal] {run.name}: done in {wall:.0f} s", file=sys.stderr, flush=True)
    return result


def attack_full(result: dict[str, Any], out: Path, *, threads: int) -> dict[str, Any]:
    """The run's model under `weat attack` PGD-20 and APGD-CE on the whole digits test split (360
    images): the time-to-robustness runs evaluate a third of it each epoch. Saved into the result."""
    if "full_test" in result:
        return result
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    ckpt = result["summary"]["checkpoint"]
    cmd = [sys.executable, "-m", "weatcli", "attack", ckpt, "-a", "pgd", "-a", "apgd-ce", "--steps", "20",
           "--n", "360", "--json"]
    proc = subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True, text=True)
    report = json.loads(proc.stdout)
    result["full_test"] = {"command": "weat attack " + shlex.join(cmd[4:]), "report": report}
    (out / f"{result['name']}.result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


# ----------------------------------------------------------------------------- reading a run


def collapse_epoch(rows: list[dict]) -> int | None:
    """The first epoch whose PGD-20 accuracy is below COLLAPSE of the best before it (catastrophic
    overfitting seen on held-out data), or None."""
    best = 0.0
    for r in rows:
        if best > 0 and r["robust_accuracy"] < COLLAPSE * best:
            return int(r["epoch"])
        best = max(best, r["robust_accuracy"])
    return None


def analyse(result: dict[str, Any], out: Path) -> dict[str, Any]:
    rows = read_metrics(out / result["name"])
    ph = detect_phases(rows)
    rob = [r["robust_accuracy"] for r in rows]
    best_i = max(range(len(rob)), key=lambda i: rob[i])
    elapsed, reached = 0.0, None
    for r in rows:
        elapsed += r["seconds"]
        if reached is None and r["robust_accuracy"] >= TARGET:
            reached = {"epoch": r["epoch"], "seconds": round(elapsed, 1)}
    chosen = energy_selection(rows).epoch or rows[-1]["epoch"]  # None: the latest epoch
    by_epoch = {r["epoch"]: r for r in rows}
    collapse = collapse_epoch(rows)
    co = ph.catastrophic_overfitting_epoch
    return {
        "epochs": len(rows),
        "best_robust": rob[best_i], "best_epoch": rows[best_i]["epoch"], "best_clean": rows[best_i]["clean_accuracy"],
        "last_robust": rob[-1], "last_clean": rows[-1]["clean_accuracy"],
        "selected_robust": result["summary"]["robust_accuracy"], "selected_epoch": result["summary"]["best_epoch"],
        "phase2_start": ph.phase2_start, "phase3_start": ph.phase3_start, "plateau_delta": ph.plateau_delta,
        "co_epoch": co, "co_recovery_epoch": ph.co_recovery_epoch, "collapse_epoch": collapse,
        "co_minus_collapse": None if co is None or collapse is None else co - collapse,
        "energy_select_epoch": chosen,
        "energy_select_robust": by_epoch[chosen]["robust_accuracy"],
        "reached_70": reached,
        "train_seconds_per_epoch": statistics.median(r["train_seconds"] for r in rows),
        "seconds_per_epoch": statistics.median(r["seconds"] for r in rows),
        "der_last": rows[-1].get("der"),
        "energy_natural_last": rows[-1].get("energy_natural"),  # the training subset's E(x): its scale
    }


# ----------------------------------------------------------------------------- epoch times, in process


def epoch_times(methods: list[tuple[str, dict]], *, repeats: int, threads: int) -> dict[str, Any]:
    """Seconds of one training epoch (digits, batch 64, 22 batches: attack + update, no evaluation)
    per method, the methods interleaved `repeats` times in this process on the same data; medians."""
    import torch

    from weatcli import data as data_mod
    from weatcli.config import resolve
    from weatcli.losses import LOSSES
    from weatcli.models import build

    torch.set_num_threads(threads)
    times: dict[str, list[float]] = {label: [] for label, _ in methods}
    cfgs = {label: resolve(preset=preset["preset"], overrides={"train.device": "cpu", **preset.get("overrides", {})})
            for label, preset in methods}
    ds = data_mod.load("digits", device="cpu")
    for rep in range(repeats + 1):  # the first round warms up and is not counted
        for label, _ in methods:
            cfg = cfgs[label]
            torch.manual_seed(0)
            model = build(cfg.model.arch, num_classes=ds.num_classes, in_channels=ds.in_channels,
                          image_size=ds.image_size)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            g = torch.Generator().manual_seed(rep)
            bs = cfg.train.batch_size
            perm = torch.randperm(len(ds.train_x), generator=g)
            model.train()
            t0 = time.perf_counter()
            for b in range(len(ds.train_x) // bs):
                idx = perm[b * bs:(b + 1) * bs]
                x = data_mod.augment(ds.train_x[idx], generator=g, padding=cfg.data.crop_padding, flip=cfg.data.flip)
                loss, _ = LOSSES[cfg.train.method](model, x, ds.train_y[idx], cfg, generator=g)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if rep:
                times[label].append(time.perf_counter() - t0)
    med = {label: statistics.median(v) for label, v in times.items()}
    base = med[methods[0][0]]
    return {"seconds": {k: round(v, 3) for k, v in med.items()},
            "all_seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "ratio_to_" + methods[0][0]: {k: round(v / base, 3) for k, v in med.items()},
            "threads": threads, "repeats": repeats, "load": _load()}


EPOCH_METHODS = [
    ("pgd-at", {"preset": "digits-pgd-at"}),
    ("fgsm-rs", {"preset": "digits-fgsm-rs"}),
    ("n-fgsm", {"preset": "digits-n-fgsm"}),
    ("fgsm-rs + DER", {"preset": "digits-fgsm-rs", "overrides": {"train.der_weight": 1.0}}),
    ("pgd-at + DER", {"preset": "digits-pgd-at", "overrides": {"train.der_weight": 1.0}}),
]


# ----------------------------------------------------------------------------- tables


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _energy_range(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    return f"{min(known):.0f} .. {max(known):.0f}" if len(known) > 1 else f"{known[0]:.0f}"


def _opt(v: Any) -> str:
    return "-" if v is None else str(v)


def tables(results: list[dict[str, Any]], timing: dict[str, Any] | None) -> str:
    md: list[str] = []
    by_part: dict[str, list[dict]] = {}
    for r in results:
        by_part.setdefault(r["part"], []).append(r)

    if by_part.get("time") or timing:
        md += ["### Time to robustness", "",
               "| run | epochs | wall s | first epoch >= 70% PGD-20 (s into training) | last PGD-20 | last clean | "
               "all 360 test images: clean / PGD-20 / APGD-CE / worst (`weat attack`) | train s/epoch | "
               "s/epoch with evaluation |", "|---|---|---|---|---|---|---|---|---|"]
        for r in by_part.get("time", []):
            a = r["analysis"]
            reached = "not reached" if a["reached_70"] is None else f"{a['reached_70']['epoch']} ({a['reached_70']['seconds']:.0f} s)"
            full = "-"
            if "full_test" in r:
                rep = r["full_test"]["report"]
                full = " / ".join(_pct(v) for v in (rep["clean_accuracy"], rep["attacks"]["pgd"]["robust_accuracy"],
                                                     rep["attacks"]["apgd-ce"]["robust_accuracy"],
                                                     rep["worst_case_accuracy"]))
            md.append(f"| `{r['command']}` | {a['epochs']} | {r['wall_seconds']:.0f} | {reached} | "
                      f"{_pct(a['last_robust'])} | {_pct(a['last_clean'])} | {full} | "
                      f"{a['train_seconds_per_epoch']:.2f} | {a['seconds_per_epoch']:.2f} |")
        if timing:
            md += ["", f"Training epoch (22 batches of 64, attack + update, no evaluation), {timing['threads']} "
                       f"thread(s), median of {timing['repeats']} interleaved rounds in one process "
                       f"(load average {timing['load']}):", "",
                   "| method | s/epoch | vs pgd-at |", "|---|---|---|"]
            ratio = timing["ratio_to_pgd-at"]
            for k, v in timing["seconds"].items():
                md.append(f"| {k} | {v:.2f} | {ratio[k]:.2f}x |")
        md.append("")

    for part, title in (("co", "Catastrophic overfitting (fgsm-rs)"), ("der", "DER")):
        rs = by_part.get(part, [])
        if part == "der":
            rs = by_part.get("co", []) + rs + by_part.get("dersweep", [])
        if not rs:
            continue
        md += [f"### {title}", "", "| setting | seed | best PGD-20 (epoch) | last PGD-20 | last clean | PGD collapse "
               "epoch | CO flagged | flagged - collapse | --select energy epoch (PGD-20, vs best) | train s/epoch | wall s |",
               "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rs:
            a = r["analysis"]
            sel = (f"{a['energy_select_epoch']} ({_pct(a['energy_select_robust'])}, "
                   f"{100 * (a['energy_select_robust'] - a['best_robust']):+.1f})")
            md.append(f"| {r['group']} | {r['seed']} | {_pct(a['best_robust'])} ({a['best_epoch']}) | "
                      f"{_pct(a['last_robust'])} | {_pct(a['last_clean'])} | {_opt(a['collapse_epoch'])} | "
                      f"{_opt(a['co_epoch'])} | {_opt(a['co_minus_collapse'])} | {sel} | "
                      f"{a['train_seconds_per_epoch']:.2f} | {r['wall_seconds']:.0f} |")
        groups: dict[str, list[dict]] = {}
        for r in rs:
            groups.setdefault(r["group"], []).append(r)
        md += ["", "| setting | seeds | best PGD-20 (mean) | last PGD-20 (mean) | runs with CO (collapse) | "
               "runs flagged | last E(x) (range) | train s/epoch (median) |", "|---|---|---|---|---|---|---|---|"]
        for g, members in groups.items():
            an = [m["analysis"] for m in members]
            md.append(f"| {g} | {len(members)} | {_pct(_mean([a['best_robust'] for a in an]))} | "
                      f"{_pct(_mean([a['last_robust'] for a in an]))} | "
                      f"{sum(a['collapse_epoch'] is not None for a in an)} | {sum(a['co_epoch'] is not None for a in an)} | "
                      f"{_energy_range([a['energy_natural_last'] for a in an])} | "
                      f"{statistics.median(a['train_seconds_per_epoch'] for a in an):.2f} |")
        md.append("")

    rs = [r for r in by_part.get("der", []) if r["group"].startswith("pgd-at")] + by_part.get("ro", [])
    if rs:
        md += ["### Robust overfitting and --select energy", "",
               "| run | epochs | best PGD-20 (epoch) | last PGD-20 | best - last | phase 3 flagged | CO flagged | "
               "--select energy kept (PGD-20) | vs best |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rs:
            a = r["analysis"]
            md.append(f"| `{r['command']}` | {a['epochs']} | {_pct(a['best_robust'])} ({a['best_epoch']}) | "
                      f"{_pct(a['last_robust'])} | {100 * (a['best_robust'] - a['last_robust']):.1f} | "
                      f"{_opt(a['phase3_start'])} | {_opt(a['co_epoch'])} | {a['selected_epoch']} "
                      f"({_pct(a['selected_robust'])}) | {100 * (a['selected_robust'] - a['best_robust']):+.1f} |")
        md.append("")
    return "\n".join(md)


def figures(results: list[dict[str, Any]], out: Path, fig_dir: Path) -> list[str]:
    """`weat energy plot` of the first CO run, of fgsm-rs, fgsm-rs + DER and n-fgsm (seed 0), and of
    a CO run that stayed collapsed beside one that recovered (seeds 0 and 1)."""
    made = []
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    names = {r["name"] for r in results}
    plots = [("co-digits.png", ["co-fgsm-rs-s0"]),
             ("co-der-digits.png", ["co-fgsm-rs-s0", "der-fgsm-rs-der-s0", "der-fgsm-rs-der-adv-s0",
                                    "der-fgsm-rs-der-anchor-s0", "der-n-fgsm-s0"]),
             ("co-recovery-digits.png", ["co-fgsm-rs-s0", "co-fgsm-rs-s1"])]
    for png, runs in plots:
        if not all(n in names for n in runs):
            continue
        fig_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "weatcli", "energy", "plot", *[str(out / n) for n in runs], "-o", str(fig_dir / png)]
        subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        made.append(str(fig_dir / png))
    return made


def main() -> None:
    if sys.argv[1:2] == ["--train-child"]:
        # `weat train ARGS` itself (weatcli.cli.main, the code behind the `weat` command), run as a
        # child of this script: the child's command line names this script, so a broad
        # `pkill -f weatcli` aimed at other work on a shared machine leaves these runs alone.
        from weatcli import cli

        cli.main(["train", *sys.argv[2:]])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "journal")
    ap.add_argument("--part", action="append", choices=PARTS, help="repeatable; default: every part")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per run")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (wall times then count each other)")
    ap.add_argument("--epoch-repeats", type=int, default=3, help="interleaved rounds of the epoch-time benchmark")
    ap.add_argument("--no-long", action="store_true", help="skip the 120-epoch multistep PGD-AT run (~10 min idle)")
    ap.add_argument("--only", action="append", metavar="NAME", help="run only these runs of the parts (repeatable)")
    ap.add_argument("--fresh", action="store_true", help="run again even where a result exists")
    ap.add_argument("--report-only", action="store_true", help="only read the results already in --out")
    ap.add_argument("--figures", type=Path, default=None, help="draw the CO figures into this directory")
    args = ap.parse_args()

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    parts = args.part or list(PARTS)
    runs = plan(parts, args.seeds, with_long=not args.no_long)
    if args.only:
        runs = [r for r in runs if r.name in args.only]
    if args.report_only:
        results = [json.loads(p.read_text()) for p in sorted(out.glob("*.result.json"))]
    else:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(lambda r: execute(r, out, threads=args.threads, jobs=args.jobs, fresh=args.fresh),
                                    runs))
    for r in results:
        if r["part"] == "time" and not args.report_only:
            attack_full(r, out, threads=args.threads)
        r["analysis"] = analyse(r, out)

    timing_path = out / "epoch-times.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else None
    if "time" in parts and not args.report_only and (timing is None or args.fresh):
        print("[journal] epoch times, in process", file=sys.stderr, flush=True)
        timing = epoch_times(EPOCH_METHODS, repeats=args.epoch_repeats, threads=args.threads)
        timing_path.write_text(json.dumps(timing, indent=1) + "\n")

    made = figures(results, out, args.figures) if args.figures else []
    report = {"results": results, "epoch_times": timing, "figures": made,
              "python": sys.version.split()[0], "cpus": os.cpu_count()}
    (out / "journal.json").write_text(json.dumps(report, indent=1) + "\n")
    md = tables(results, timing)
    (out / "journal.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
