"""The `weat` command line. Every command is thin: resolve the config, call one engine function,
render. This is the only module that prints results and maps errors to exit codes:
0 success, 1 failure while running, 2 bad input, 130 interrupted. stdout carries results only;
progress and logs go to stderr. torch is imported lazily so `weat --help` is instant.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console

from . import __version__
from . import config as config_mod
from .errors import WeatInputError, WeatRunError

app = typer.Typer(
    name="weat",
    help="Robust classifiers as energy-based models: adversarial training (WEAT, TRADES, MART, ...), "
    "attacks, the energy lens, SGLD sampling and scoring.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
presets_app = typer.Typer(help="List and show the bundled presets.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(presets_app, name="presets")

err = Console(stderr=True, highlight=False)
# click's UsageError, whether typer uses click or vendors its own copy of it (typer >= 0.20).
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
EXIT_INPUT, EXIT_RUN, EXIT_INTERRUPTED = 2, 1, 130


def _fail(message: str, code: int) -> typer.Exit:
    err.print(f"weat: error: {message}", markup=False, soft_wrap=True)
    return typer.Exit(code)


def _guard(fn: Callable[[], Any]) -> Any:
    """Run a command body, turning weat's errors into one line on stderr and an exit code."""
    if os.environ.get("WEAT_DEBUG") == "1":
        return fn()
    try:
        return fn()
    except WeatInputError as e:
        raise _fail(str(e), EXIT_INPUT) from None
    except WeatRunError as e:
        raise _fail(str(e), EXIT_RUN) from None
    except KeyboardInterrupt:
        raise _fail("interrupted", EXIT_INTERRUPTED) from None


def _emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=False) + "\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------- shared options

PresetOpt = Annotated[Optional[str], typer.Option("--preset", "-p", help="Preset name (weat presets list) or a .toml path.")]
DatasetOpt = Annotated[Optional[str], typer.Option(help="digits, cifar10, cifar100, svhn, tiny-imagenet or npz:PATH.")]
DataDirOpt = Annotated[Optional[str], typer.Option(help="Dataset root (default $WEAT_DATA_DIR, else ~/.cache/weat/data).")]
DownloadOpt = Annotated[bool, typer.Option("--download", help="Allow downloading a missing dataset.")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N.")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Random seed.")]
EpsOpt = Annotated[Optional[str], typer.Option(help="Threat radius in [0,1] pixel units; fractions allowed: 8/255.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override any config key: section.key=value (repeatable).")]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"weat {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


# ----------------------------------------------------------------------------- train


def _epsilon_text(row: dict[str, Any]) -> str:
    parts = [f"loss {row['train_loss']:.4f}", f"clean {row['clean_accuracy']:.3f}", f"robust {row['robust_accuracy']:.3f}"]
    parts += [f"E(x) {row['energy_natural']:.2f}", f"E(x*) {row['energy_adversarial']:.2f}", f"dE(x) {row['delta_energy']:+.3f}"]
    return "  ".join(parts)


class _TrainDisplay:
    """rich progress on stderr: one bar per epoch, one summary line per finished epoch."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), console=err, transient=True,
        )
        self.task = None
        self.epochs = 0

    def __enter__(self) -> _TrainDisplay:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, kind: str, p: dict[str, Any]) -> None:
        if kind == "start":
            self.epochs = p["epochs"]
            verb = "resuming" if p["start_epoch"] else "training"
            err.print(f"{verb} {p['method']} on {p['dataset']} ({p['device']}) -> {p['run_dir']}", markup=False)
        elif kind == "batch":
            if self.task is None:
                self.task = self.progress.add_task("", total=p["batches"], info="")
            self.progress.update(self.task, completed=p["batch"], total=p["batches"],
                                 description=f"epoch {p['epoch']}/{self.epochs}", info=f"loss {p['loss']:.4f}")
        elif kind == "epoch":
            row = p["row"]
            star = " *" if p["best_epoch"] == row["epoch"] else ""
            self.progress.console.print(
                f"epoch {row['epoch']:>3}/{p['epochs']}  {_epsilon_text(row)}  ({row['seconds']:.1f} s){star}", markup=False, soft_wrap=True
            )
            if self.task is not None:
                self.progress.reset(self.task, total=None)


@app.command()
def train(
    preset: PresetOpt = None,
    dataset: DatasetOpt = None,
    method: Annotated[Optional[str], typer.Option(help="standard, pgd-at, trades, mart, mail-trades, weat-adv (= weat), weat-nat.")] = None,
    arch: Annotated[Optional[str], typer.Option(help="small-cnn, resnet18, resnet18-64, preact-resnet18, wrn-28-10, wrn-34-10.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate.")] = None,
    eps: EpsOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    data_dir: DataDirOpt = None,
    out: Annotated[Optional[str], typer.Option(help="Run directory (default runs/<dataset>-<method>-<time>).")] = None,
    download: DownloadOpt = False,
    select: Annotated[Optional[str], typer.Option(help="best (highest held-out PGD accuracy) or last.")] = None,
    eval_n: Annotated[Optional[int], typer.Option(help="Held-out test images evaluated each epoch.")] = None,
    precision: Annotated[Optional[str], typer.Option(help="fp32 or bf16 (autocast for training).")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the run in this directory (its config is used).")] = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Adversarially train a classifier. With no options: WEAT on the bundled digits set (offline).

    Prints the path of the selected model checkpoint as the last line of stdout.
    """

    def body() -> None:
        from .train import Interrupt, TrainingInterrupted, fit

        cfg = None
        if resume is None:
            overrides = {
                "data.dataset": dataset, "data.data_dir": data_dir, "data.download": download or None,
                "train.method": method, "model.arch": arch, "train.epochs": epochs, "train.batch_size": batch_size,
                "train.lr": lr, "attack.eps": eps, "train.seed": seed, "train.device": device, "train.out": out,
                "train.select": select, "train.eval_n": eval_n, "train.precision": precision,
            }
            cfg = config_mod.resolve(preset=preset, overrides=overrides, sets=set_)
        elif any(v is not None for v in (preset, dataset, method, arch, epochs, batch_size, lr, eps, seed, out)) or set_:
            err.print("weat: note: --resume continues with the run's stored config; other options are ignored", markup=False)

        interrupt = Interrupt()

        def on_sigint(signum, frame):  # first Ctrl-C: finish the batch, save, exit 130; second: now
            interrupt.requested = True
            signal.signal(signal.SIGINT, signal.default_int_handler)
            err.print("weat: stopping after this batch (Ctrl-C again to abort without saving)", markup=False)

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            with _TrainDisplay() as display:
                result = fit(cfg, resume=resume, on_event=display, interrupt=interrupt) if cfg else fit(
                    None, resume=resume, on_event=display, interrupt=interrupt)  # type: ignore[arg-type]
        except TrainingInterrupted as e:
            raise _fail(str(e), EXIT_INTERRUPTED) from None
        finally:
            signal.signal(signal.SIGINT, previous)
        err.print(
            f"selected epoch {result.best_epoch}: clean {result.clean_accuracy:.3f}, robust {result.robust_accuracy:.3f} "
            f"({result.seconds:.0f} s); run in {result.run_dir}", markup=False,
        )
        if as_json:
            _emit_json(result.summary())
        else:
            typer.echo(str(result.checkpoint))

    _guard(body)


# ----------------------------------------------------------------------------- presets


@presets_app.command("list")
def presets_list(as_json: JsonOpt = False) -> None:
    """The bundled presets with their descriptions."""

    def body() -> None:
        rows = {name: config_mod.load_preset(name).description for name in config_mod.preset_names()}
        if as_json:
            _emit_json(rows)
            return
        width = max(map(len, rows))
        for name, desc in rows.items():
            typer.echo(f"{name:<{width}}  {desc}")

    _guard(body)


@presets_app.command("show")
def presets_show(
    name: Annotated[str, typer.Argument(help="Preset name or .toml path.")],
    as_json: JsonOpt = False,
) -> None:
    """The fully resolved config of a preset (every default filled in), as TOML."""

    def body() -> None:
        cfg = config_mod.load_preset(name)
        if as_json:
            _emit_json(cfg.to_dict())
        else:
            typer.echo(cfg.to_toml(), nl=False)

    _guard(body)


# ----------------------------------------------------------------------------- later issues


def _not_yet(command: str) -> None:
    raise _fail(f"'weat {command}' is not available yet in weat {__version__}", EXIT_INPUT)


_PENDING = {
    "attack": "Robust accuracy under PGD, CW and AutoAttack, with the energies of adversarial points.",
    "energy": "The energy lens: natural vs adversarial energies, training phases, model comparison.",
    "sample": "Generate images from a robust classifier with SGLD.",
    "score": "Inception Score / FID / KID of generated samples.",
}


def _pending_command(name: str, help_text: str) -> None:
    def command(args: Annotated[Optional[list[str]], typer.Argument(hidden=True)] = None) -> None:
        _not_yet(name)

    command.__doc__ = help_text
    app.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})(command)


for _name, _help in _PENDING.items():
    _pending_command(_name, _help)


# ----------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    """Console entry point: click's usage errors become one line and exit code 2 as well."""
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="weat")
    except _UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError" and e.ctx is not None:
            typer.echo(e.ctx.get_help(), err=True)
        else:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            err.print(f"weat: error: {e.format_message()}{hint}", markup=False, soft_wrap=True)
        sys.exit(EXIT_INPUT)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err.print("weat: error: aborted", markup=False)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(rv if isinstance(rv, int) else 0)
