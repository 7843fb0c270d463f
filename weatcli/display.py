"""What the CLI shows while engines work and after: progress displays fed by engine events
(`runtime.EventFn`) on stderr, and the rich tables of results. Only cli.py uses this module.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

err = Console(stderr=True, highlight=False)


def _row_text(row: dict[str, Any]) -> str:
    parts = [f"loss {row['train_loss']:.4f}", f"clean {row['clean_accuracy']:.3f}", f"robust {row['robust_accuracy']:.3f}"]
    parts += [f"E(x) {row['energy_natural']:.2f}", f"E(x*) {row['energy_adversarial']:.2f}", f"dE(x) {row['delta_energy']:+.3f}"]
    return "  ".join(parts)


def _co_text(rows: list[dict[str, Any]], epoch: int) -> str:
    """What broke at catastrophic-overfitting epoch `epoch`: dE(x) from the epoch before to it, and
    the accuracy under the training attack where the rows have it."""
    by_epoch = {r["epoch"]: r for r in rows}
    before, at = by_epoch.get(epoch - 1, {}), by_epoch.get(epoch, {})

    def change(key: str, fmt: str) -> str | None:
        a, b = before.get(key), at.get(key)
        return None if a is None or b is None else f"{a:{fmt}} -> {b:{fmt}}"

    parts = [f"dE(x) jumped {change('delta_energy', '+.3f') or 'out of its recent range'}"]
    acc = change("train_attack_accuracy", ".0%")
    if acc is not None:
        parts.append(f"accuracy under the training attack {acc}")
    return ", ".join(parts)


class ProgressDisplay:
    """A transient rich progress bar on stderr with one reusable task; lines printed above it."""

    def __init__(self, *extra_columns: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *extra_columns,
                                 TimeElapsedColumn(), console=err, transient=True)
        self.task = None

    def __enter__(self):
        self.live = err.is_terminal  # in a log file the bar is noise (and its last refresh a blank line)
        if self.live:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self.progress.__exit__(*exc)

    def _print(self, text: str) -> None:
        self.progress.console.print(text, markup=False, soft_wrap=True)


class TrainDisplay(ProgressDisplay):
    """rich progress on stderr: one bar per epoch, one summary line per finished epoch."""

    def __init__(self) -> None:
        from rich.progress import TextColumn

        super().__init__(TextColumn("{task.fields[info]}"))
        self.epochs = 0
        self.rows: list[dict[str, Any]] = []
        self.phase3: int | None = None
        self.co: int | None = None  # catastrophic overfitting, warned about once
        self.recovered: int | None = None  # ... and the recovery from it, told once

    def __call__(self, kind: str, p: dict[str, Any]) -> None:
        if kind == "start":
            self.epochs = p["epochs"]
            self.rows = list(p.get("history", []))  # a resumed run's earlier epochs
            verb = "resuming" if p["start_epoch"] else "training"
            self._print(f"{verb} {p['method']} on {p['dataset']} ({p['device']}) -> {p['run_dir']}")
        elif kind == "batch":
            if self.task is None:
                self.task = self.progress.add_task("", total=p["batches"], info="")
            self.progress.update(self.task, completed=p["batch"], total=p["batches"],
                                 description=f"epoch {p['epoch']}/{self.epochs}", info=f"loss {p['loss']:.4f}")
        elif kind == "epoch":
            row = p["row"]
            star = " *" if p["best_epoch"] == row["epoch"] else ""
            self._print(f"epoch {row['epoch']:>3}/{p['epochs']}  {_row_text(row)}  ({row['seconds']:.1f} s){star}")
            if self.task is not None:
                self.progress.reset(self.task, total=None)
            self._watch_phase3(row)

    def _watch_phase3(self, row: dict[str, Any]) -> None:
        """Warn once when the energy gap dE(x) leaves its plateau: phase 3 (robust overfitting); and
        once when it breaks away within an epoch or two: catastrophic overfitting (single-step AT)."""
        from .phases import detect_phases

        self.rows.append(row)
        if self.phase3 is not None and self.recovered is not None:
            return
        phases = detect_phases(self.rows)
        if self.phase3 is None:
            self.phase3 = phases.phase3_start
            if self.phase3 is not None:
                self._print(f"weat: warning: dE(x) left its plateau at epoch {self.phase3}: phase 3 (robust overfitting) "
                            "may have begun; --select energy keeps the epoch before it")
        if self.co is None:
            self.co = phases.catastrophic_overfitting_epoch
            if self.co is not None:
                self._print(f"weat: warning: catastrophic overfitting at epoch {self.co}: {_co_text(self.rows, self.co)}; "
                            "--select energy keeps the epoch before it")
        if self.co is not None and self.recovered is None:
            self.recovered = phases.co_recovery_epoch
            if self.recovered is not None:
                self._print(f"weat: training recovered from catastrophic overfitting by epoch {self.recovered} "
                            "(the training attack lowers the true class's logit again); --select energy follows the "
                            "latest epoch again")



class AttackDisplay(ProgressDisplay):
    """rich progress on stderr: one bar per attack stage; warnings and per-attack lines as they come."""

    def __init__(self) -> None:
        super().__init__()
        self.stages: dict[str, list[str]] = {}

    def __call__(self, kind: str, p: dict[str, Any]) -> None:
        if kind == "start":
            self._print(f"attacking {p['model']} on {p['dataset']} {p['split']} ({p['n']} images, {p['device']}), "
                        f"{p['norm']} eps {p['eps']:.6g}: {', '.join(p['attacks'])}")
        elif kind == "resume":
            self._print(f"resuming from {p['path']}")
        elif kind == "warning":
            self._print(f"weat: warning: {p['message']}")
        elif kind == "attack":
            self.stages[p["attack"]] = p["stages"]
        elif kind == "stage":
            label = p["attack"] if self.stages.get(p["attack"]) == [p["stage"]] else f"{p['attack']}: {p['stage']}"
            if self.task is None:
                self.task = self.progress.add_task(label, total=p["total"], completed=p["done"])
            else:
                self.progress.reset(self.task, total=p["total"], completed=p["done"], description=label)
        elif kind == "progress" and self.task is not None:
            self.progress.update(self.task, completed=p["done"])
        elif kind == "stage_done" and len(self.stages.get(p["attack"], [])) > 1:
            self._print(f"{p['attack']}: robust accuracy after {p['stage']} {p['robust_accuracy']:.2%}")
        elif kind == "done":
            r = p["result"]
            extra = f", target success {r.target_success_rate:.2%}" if r.target_success_rate is not None else ""
            self._print(f"{p['attack']}: robust accuracy {r.robust_accuracy:.2%}{extra} ({r.seconds:.1f} s)")



class StepDisplay(ProgressDisplay):
    """rich progress on stderr for sample / score: one bar per stage; notes as they come."""

    def _bar(self, label: str, total: int) -> None:
        if self.task is None:
            self.task = self.progress.add_task(label, total=total)
        else:
            self.progress.reset(self.task, total=total, completed=0, description=label)

    def __call__(self, kind: str, p: dict[str, Any]) -> None:
        if kind == "start" and "init" in p:
            classes = ",".join(map(str, p["classes"]))
            self._print(f"sampling {p['n']} images of classes {classes} from {p['checkpoint']} ({p['init']} init, "
                        f"{p['steps']} SGLD steps, {p['device']})")
            self._bar("SGLD image-steps", p["n"] * p["steps"])
        elif kind == "start":
            self._print(f"scoring {p['samples']}: n={p['n']}, reference {p['reference']}, features {p['features']} "
                        f"({p['device']})")
        elif kind == "stats":
            self._print(f"computing class statistics of {p['dataset']} once -> {p['path']}")
        elif kind == "step" and self.task is not None:
            self.progress.update(self.task, completed=p["done"])  # image-steps so far
        elif kind == "stage":
            self._bar("judge" if p["name"] == "judge" else f"features: {p['name']}", p["total"])
        elif kind == "progress" and self.task is not None:
            self.progress.update(self.task, completed=p["done"])



def attack_table(result: Any) -> Any:
    from rich.table import Table

    def pm(mean: float, std: float) -> str:
        return f"{mean:.3f} ± {std:.3f}"

    info = result.info
    table = Table(title=f"{result.model}: {info.get('dataset', '')} {info.get('split', '')}, n={result.n}, "
                        f"{result.norm} eps={result.eps:.6g}", title_justify="left")
    for col in ("attack", "accuracy", "E(x*) mean ± std", "dE(x)", "E(x*,y) mean", "dE(x,y)", "seconds"):
        table.add_column(col, justify="left" if col == "attack" else "right")
    e = next(iter(result.attacks.values())).energy  # energy.summarize: quantity -> {mean, std, ...}
    table.add_row("clean", f"{result.clean_accuracy:.2%}", pm(e["energy_natural"]["mean"], e["energy_natural"]["std"]),
                  "", f"{e['joint_natural']['mean']:.3f}", "", "")
    for name, r in result.attacks.items():
        e = r.energy
        label = name
        if r.target_success_rate is not None:
            label += f" (targeted {r.settings['target_class']}, success {r.target_success_rate:.2%})"
        table.add_row(label, f"{r.robust_accuracy:.2%}", pm(e["energy_adversarial"]["mean"], e["energy_adversarial"]["std"]),
                      f"{e['delta_energy']['mean']:+.3f}", f"{e['joint_adversarial']['mean']:.3f}",
                      f"{e['delta_joint']['mean']:+.3f}", f"{r.seconds:.1f}")
    if len(result.attacks) > 1:
        table.add_row("worst case", f"{result.worst_case_accuracy:.2%}", "", "", "", "", "")
    return table



def score_table(result: Any) -> Any:
    """`weat score`: quality (left) and variety (right) side by side, each metric that was computed.

    Quality: FID, KID and IS (which fold in variety too), precision and density (fidelity), the
    judge's recognition; variety: recall, coverage, the diversity ratio (with its range over classes)."""
    from rich.table import Table

    m = result.metrics
    got = lambda key: m.get(key) is not None  # noqa: E731
    quality, variety = [], []
    if got("fid"):
        quality.append(("FID", f"{m['fid']:.3f}"))
    if got("kid"):
        quality.append(("KID", f"{m['kid']:.5f}"))
    if got("is_mean"):
        quality.append(("IS (10 splits)", f"{m['is_mean']:.3f} ± {m['is_std']:.3f}"))
    if got("precision"):
        quality.append(("precision", f"{m['precision']:.3f}"))
        quality.append(("density", f"{m['density']:.3f}"))
        variety.append(("recall", f"{m['recall']:.3f}"))
        variety.append(("coverage", f"{m['coverage']:.3f}"))
    if got("judge_accuracy"):
        quality.append(("judge recognises", f"{m['judge_accuracy']:.1%}"))
    if got("diversity"):
        variety.append(("diversity (1 = data's)", f"{m['diversity']:.3f}"))
        per = [v for v in (m.get("diversity_per_class") or {}).values() if v is not None]
        if per:
            variety.append(("  per class", f"{min(per):.2f} .. {max(per):.2f}"))
    table = Table(title_justify="left")
    for col in ("quality", "value", "variety", "value"):
        table.add_column(col, justify="left" if col != "value" else "right")
    for i in range(max(len(quality), len(variety))):
        q = quality[i] if i < len(quality) else ("", "")
        v = variety[i] if i < len(variety) else ("", "")
        table.add_row(*q, *v)
    return table


def stats_table(stats: dict[str, Any]) -> Any:
    """`weat energy stats`: one row per quantity of each set of points (energy.ENERGY_QUANTITIES);
    an attack's rows leave out the natural energies, which the clean rows already show."""
    from rich.table import Table

    labels = {"energy_natural": "E(x)", "energy_adversarial": "E(x*)", "delta_energy": "dE(x)",
              "joint_natural": "E(x,y)", "joint_adversarial": "E(x*,y)", "delta_joint": "dE(x,y)"}
    table = Table(title=f"energies of {stats['model']} ({stats['norm']} eps {stats['eps']:.4g}, n={stats['n']})")
    for col in ("points", "quantity", "mean", "std", "q05", "median", "q95", "robust acc."):
        table.add_column(col, justify="left" if col in ("points", "quantity") else "right")
    for points, block in stats["energies"].items():
        acc = stats["clean_accuracy"] if points == "clean" else stats["robust_accuracy"][points]
        rows = [(q, d) for q, d in block.items() if points == "clean" or q not in ("energy_natural", "joint_natural")]
        for i, (quantity, d) in enumerate(rows):
            table.add_row(points if i == 0 else "", labels[quantity], f"{d['mean']:.3f}", f"{d['std']:.3f}",
                          f"{d['q05']:.3f}", f"{d['q50']:.3f}", f"{d['q95']:.3f}", f"{acc:.2%}" if i == 0 else "")
    return table
