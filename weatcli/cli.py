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
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console

from . import __version__
from . import config as config_mod
from . import display as ui
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

from .display import err
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
        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every rank sees the same bad input: rank 0 says it
            raise typer.Exit(EXIT_INPUT) from None
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
DevicesOpt = Annotated[Optional[int], typer.Option(
    min=1, help="Shard the images over N local processes (GPUs, or CPU with gloo) through torchrun's launcher.")]
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


def _name_flags(message: str, flags: dict[str, str]) -> str:
    """A config error about a key the user set with a flag names the flag: `--epochs (train.epochs): ...`."""
    for key, flag in flags.items():
        if key in message:
            message = message.replace(f"config: {key}:", f"{flag} ({key}):").replace(f" {key} ", f" {flag} ({key}) ")
    return message


def _flag_of(key: str) -> str:
    return "--" + key.split(".", 1)[1].replace("_", "-")


def _resolve(resolver: Callable[..., Any], overrides: dict[str, Any], flag_names: dict[str, str] | None = None,
             **kwargs: Any) -> Any:
    """config.resolve / resolve_command with the flags' values; errors name the flag the user gave."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return resolver(overrides=given, **kwargs)
    except WeatInputError as e:
        names = {k: (flag_names or {}).get(k) or _flag_of(k) for k in given}
        raise WeatInputError(_name_flags(str(e), names)) from None


def cfg_option(section: type, field: str, *decls: str, **kwargs: Any) -> Any:
    """A Typer option whose help text and shown default come from a config model's field: the
    default itself stays in config.py (the option defaults to None = "not given")."""
    info = section.model_fields[field]
    default = info.default
    shown = ",".join(map(str, default)) if isinstance(default, list) else default
    text = (info.description or "").rstrip(".")
    text = text[:1].upper() + text[1:] + "." if text else ""
    if shown is not None:
        text += f" [default: {shown}]"
    return typer.Option(*decls, help=text, show_default=False, **kwargs)


_TRAIN, _DATA = config_mod.TrainConfig, config_mod.DataConfig  # the recipe flags' help comes from their fields


@app.command()
def train(
    preset: PresetOpt = None,
    dataset: DatasetOpt = None,
    method: Annotated[Optional[str], typer.Option(help="standard, pgd-at, trades, mart, mail-trades, weat-adv (= weat), weat-nat, "
                                                     "fgsm-rs (= fgsm), n-fgsm (= nfgsm).")] = None,
    arch: Annotated[Optional[str], typer.Option(help="small-cnn, small-cnn-wide, mlp, resnet18, resnet18-64, preact-resnet18, wrn-28-10, wrn-34-10.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate.")] = None,
    eps: EpsOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    data_dir: DataDirOpt = None,
    out: Annotated[Optional[str], typer.Option(help="Run directory (default runs/<dataset>-<method>-<time>).")] = None,
    download: DownloadOpt = False,
    select: Annotated[Optional[str], typer.Option(help="best (highest held-out PGD accuracy), last, or energy "
                                                     "(the epoch before phase 3 or catastrophic overfitting, from the energies alone; the latest "
                                                     "epoch again once training recovers from catastrophic overfitting).")] = None,
    eval_n: Annotated[Optional[int], typer.Option(help="Held-out test images evaluated each epoch.")] = None,
    precision: Annotated[Optional[str], typer.Option(help="fp32, bf16 or fp16: autocast for the training step (evaluation stays fp32).")] = None,
    compile_: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the model and fuse the PGD update.")] = None,
    cuda_graphs: Annotated[Optional[bool], typer.Option("--cuda-graphs/--no-cuda-graphs", help="Replay the PGD inner loop as CUDA graphs (CUDA only).")] = None,
    tf32: Annotated[Optional[bool], typer.Option("--tf32/--no-tf32", help="Allow TF32 in fp32 matmuls/convolutions on CUDA.")] = None,
    nan_policy: Annotated[Optional[str], typer.Option(help="Non-finite loss: stop (exit 1) or skip-batch.")] = None,
    devices: Annotated[Optional[int], typer.Option(min=1, help="Train on N local processes (GPUs, or CPU with gloo) "
                                                   "through torchrun's launcher; --batch-size is the global batch.")] = None,
    sync_bn: Annotated[Optional[bool], typer.Option("--sync-bn/--no-sync-bn", help="Several ranks: batch norm over the global batch.")] = None,
    ema: Annotated[Optional[float], cfg_option(_TRAIN, "ema_decay", "--ema", metavar="DECAY")] = None,
    label_smoothing: Annotated[Optional[float], cfg_option(_TRAIN, "label_smoothing", "--label-smoothing")] = None,
    awp_gamma: Annotated[Optional[float], cfg_option(_TRAIN, "awp_gamma", "--awp-gamma")] = None,
    extra_data: Annotated[Optional[Path], cfg_option(_DATA, "extra_data", "--extra-data", metavar="FILE.npz")] = None,
    extra_fraction: Annotated[Optional[float], cfg_option(_DATA, "extra_fraction", "--extra-fraction")] = None,
    tensorboard: Annotated[Optional[Path], cfg_option(_TRAIN, "tensorboard", "--tensorboard", metavar="DIR")] = None,
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
                "train.compile": compile_, "train.cuda_graphs": cuda_graphs, "train.tf32": tf32,
                "train.nan_policy": nan_policy, "train.sync_bn": sync_bn,
                # Paths stored absolute: `--resume` from another directory finds them again.
                "train.ema_decay": ema, "train.label_smoothing": label_smoothing, "train.awp_gamma": awp_gamma,
                "data.extra_data": _absolute(extra_data), "data.extra_fraction": extra_fraction,
                "train.tensorboard": _absolute(tensorboard),
            }
            cfg = _resolve(config_mod.resolve, overrides, {"train.ema_decay": "--ema"}, preset=preset, sets=set_)
        elif any(v is not None for v in (preset, dataset, method, arch, epochs, batch_size, lr, eps, seed, out, ema,
                                         label_smoothing, awp_gamma, extra_data, extra_fraction, tensorboard)) or set_:
            err.print("weat: note: --resume continues with the run's stored config; other options are ignored", markup=False)

        if devices is not None and cfg is not None and cfg.train.batch_size % devices:
            raise WeatInputError(f"--batch-size: {cfg.train.batch_size} is the global batch; expected a multiple "
                                 f"of --devices {devices}")
        _launch_if_asked(devices, cfg.train.device if cfg is not None else device)
        main_rank = _main_rank()

        interrupt = Interrupt()

        def on_stop(signum, frame):
            # The first Ctrl-C or SIGTERM (a pre-empted job, or torchrun stopping its workers): finish
            # the batch (with several ranks: reach the next agreed check), save, exit 130. A second: now.
            interrupt.requested = True
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            if main_rank:
                err.print("weat: stopping: saving the run's state (Ctrl-C again to abort without saving)", markup=False)

        previous = {sig: signal.signal(sig, on_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            with (ui.TrainDisplay() if main_rank else nullcontext()) as display:
                result = fit(cfg, resume=resume, on_event=display, interrupt=interrupt)
        except TrainingInterrupted as e:
            if not main_rank:
                raise typer.Exit(EXIT_INTERRUPTED) from None
            raise _fail(str(e), EXIT_INTERRUPTED) from None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if not main_rank:
            return
        err.print(
            f"selected epoch {result.best_epoch}: clean {result.clean_accuracy:.3f}, robust {result.robust_accuracy:.3f} "
            f"({result.seconds:.0f} s); run in {result.run_dir}", markup=False,
        )
        if as_json:
            _emit_json(result.summary())
        else:
            typer.echo(str(result.checkpoint))

    _guard(body)


def _absolute(path: Path | None) -> str | None:
    return None if path is None else str(path.expanduser().absolute())


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


# ----------------------------------------------------------------------------- attack


def _threat_option(field: str) -> Any:
    """An [attack] option of `weat attack`: help from AttackConfig; its default is the checkpoint's
    threat (stored config), not AttackConfig's, so none is shown."""
    from typing import get_args

    info = config_mod.AttackConfig.model_fields[field]
    text = info.description or f"{field}: " + " or ".join(get_args(info.annotation))
    note = {"step_size": "the checkpoint's, scaled with --eps as in training: 2/255 per 8/255"}.get(field, "the checkpoint's")
    return typer.Option(help=f"{text[:1].upper()}{text[1:]} (default: {note}).", show_default=False)


_EvalCfg = config_mod.EvaluateConfig  # weat attack's section, for cfg_option


@app.command()
def attack(
    ckpt: Annotated[Optional[Path], typer.Argument(
        metavar="CKPT", help="Checkpoint (model.safetensors); default: the newest runs/*/model.safetensors.")] = None,
    attack_: Annotated[Optional[list[str]], cfg_option(_EvalCfg, "attacks", "--attack", "-a")] = None,
    eps: Annotated[Optional[str], _threat_option("eps")] = None,
    norm: Annotated[Optional[str], _threat_option("norm")] = None,
    steps: Annotated[Optional[int], cfg_option(_EvalCfg, "steps", "--steps")] = None,
    step_size: Annotated[Optional[str], _threat_option("step_size")] = None,
    restarts: Annotated[Optional[int], cfg_option(_EvalCfg, "restarts", "--restarts")] = None,
    targeted: Annotated[Optional[bool], cfg_option(_EvalCfg, "targeted", "--targeted/--no-targeted")] = None,
    target_class: Annotated[Optional[str], cfg_option(_EvalCfg, "target_class", "--target-class")] = None,
    n: Annotated[Optional[int], cfg_option(_EvalCfg, "n", "--n")] = None,
    split: Annotated[Optional[str], cfg_option(_EvalCfg, "split", "--split")] = None,
    batch_size: Annotated[Optional[int], cfg_option(_EvalCfg, "batch_size", "--batch-size")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Dataset (default: the checkpoint's); must fit the model.")] = None,
    data_dir: DataDirOpt = None,
    download: DownloadOpt = False,
    device: Annotated[Optional[str], cfg_option(_EvalCfg, "device", "--device")] = None,
    seed: Annotated[Optional[int], cfg_option(_EvalCfg, "seed", "--seed")] = None,
    save_adv: Annotated[Optional[Path], typer.Option(
        help="Write the images, adversarial images and per-image energies to this .safetensors file.")] = None,
    state: Annotated[Optional[Path], typer.Option(
        help="Save progress to this file and resume from it when it exists (same options).")] = None,
    devices: DevicesOpt = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Robust accuracy under PGD, CW and AutoAttack, with the energies of adversarial points.

    The checkpoint alone says which model, data and threat (eps, norm) to use; options override.
    """

    def body() -> None:
        from . import checkpoint as ckpt_mod
        from .attack_checkpoint import evaluate_checkpoint, resolve_config

        path = _checkpoint_or_newest(ckpt)
        overrides = {
            "evaluate.attacks": attack_, "attack.eps": eps, "attack.norm": norm, "evaluate.steps": steps,
            "attack.step_size": step_size, "evaluate.restarts": restarts, "evaluate.target_class": target_class,
            "evaluate.targeted": True if target_class is not None else targeted,  # a target class implies --targeted
            "evaluate.n": n, "evaluate.split": split, "evaluate.batch_size": batch_size, "data.dataset": dataset,
            "data.data_dir": data_dir, "data.download": download or None, "evaluate.device": device,
            "evaluate.seed": seed,
        }
        cfg = _resolve(resolve_config, overrides, flag_names={"evaluate.attacks": "--attack"},
                       stored=ckpt_mod.stored_config(path), preset=preset, sets=set_)
        _launch_if_asked(devices, cfg.evaluate.device)
        with _ranks_done(), (ui.AttackDisplay() if _main_rank() else nullcontext()) as display:
            result = evaluate_checkpoint(path, cfg, save_adv=save_adv, state_path=state, on_event=display)
        if not _main_rank():
            return
        if save_adv is not None:
            err.print(f"adversarial images written to {save_adv}", markup=False, soft_wrap=True)
        if as_json:
            _emit_json(result.summary())
        else:
            width = None if sys.stdout.isatty() else 160
            Console(highlight=False, width=width).print(ui.attack_table(result))

    _guard(body)


def _main_rank() -> bool:
    """Under torchrun only rank 0 prints and writes; a plain process is rank 0."""
    return int(os.environ.get("RANK", "0")) == 0


def _launch_if_asked(devices: Optional[int], device: Optional[str]) -> None:
    """`--devices N` (N > 1) outside torchrun: run this same command on N workers, exit with their code.
    On a machine with GPUs (and a device other than cpu) each worker takes one GPU."""
    if devices is None or devices <= 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    import torch

    from . import distributed as dist_mod

    gpus = torch.cuda.device_count() if device != "cpu" and torch.cuda.is_available() else 0
    if gpus and devices > gpus:
        raise WeatInputError(f"--devices: {devices}; this machine has {gpus} GPU(s); expected at most {gpus} "
                             "(or --device cpu for CPU processes)")

    raise typer.Exit(dist_mod.launch(devices, dist_mod.strip_devices_option(_ARGV)))


@contextmanager
def _ranks_done():
    """Leave the process group (if the command joined one) when the command ends."""
    completed = False
    try:
        yield
        completed = True
    finally:
        if "torch.distributed" in sys.modules:
            from . import distributed as dist_mod

            dist_mod.shutdown(completed=completed)


@app.command("import")
def import_(
    file: Annotated[Path, typer.Argument(
        metavar="FILE", help="PyTorch state dict (.pt/.pth, read with weights_only=True) or a plain .safetensors file.")],
    dataset: Annotated[str, typer.Option(help="digits, cifar10, cifar100, svhn, tiny-imagenet or npz:PATH (sets classes and image shape).")],
    arch: Annotated[Optional[str], typer.Option(help="small-cnn, small-cnn-wide, mlp, resnet18, resnet18-64, preact-resnet18, wrn-28-10, wrn-34-10, wrn-28-10-swish, wrn-70-16-swish (or --robustbench).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Checkpoint to write (default: FILE with suffix .weat.safetensors).")] = None,
    mean: Annotated[Optional[str], typer.Option(help="Per-channel mean of a Normalize layer in front of the net, e.g. 0.4914,0.4822,0.4465 (default: none, as in RobustBench).")] = None,
    std: Annotated[Optional[str], typer.Option(help="Per-channel std, with --mean.")] = None,
    eps: Annotated[Optional[str], typer.Option(help="Threat radius the model was trained for; fractions allowed: 8/255 (default: the dataset's recipe).")] = None,
    norm: Annotated[Optional[str], typer.Option(help="linf or l2 (needs --eps; default: the dataset's recipe).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
    robustbench: Annotated[Optional[str], typer.Option(help="A RobustBench zoo entry, e.g. Wang2023Better_WRN-28-10: its architecture comes from the robustbench package (pip install 'weat[robustbench]').")] = None,
    threat: Annotated[Optional[str], typer.Option(help="With --robustbench: the zoo's threat model, Linf, L2 or corruptions (default Linf).")] = None,
    download: Annotated[bool, typer.Option("--download", help="With --robustbench: let robustbench fetch the published weights into FILE when it does not exist.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Convert someone else's PyTorch checkpoint (RobustBench key names) into a weat checkpoint.

    Nothing is unpickled beyond tensors and plain containers. Every tensor must be used, every model
    key present and every shape right; one forward pass must give finite logits. Prints the path of
    the written checkpoint as the last line of stdout.
    """

    def body() -> None:
        from .importer import import_checkpoint

        r = import_checkpoint(file, arch=arch, dataset=dataset, out=out, mean=mean, std=std, eps=eps, norm=norm,
                              force=force, robustbench=robustbench, threat=threat, download=download)
        notes = [f"weights under {r.unwrapped!r}" if r.unwrapped else "", f"prefix {r.stripped_prefix!r} stripped"
                 if r.stripped_prefix else "", ", ".join(f"renamed {k} ({n} keys)" for k, n in r.renamed.items()),
                 f"ignored {len(r.ignored)} tensors the reference model never uses" if r.ignored else ""]
        norm_text = (f"mean {r.mean}, std {r.std}" if r.mean is not None else
                     f"RobustBench {r.robustbench_threat} entry, its own normalisation" if r.robustbench_threat else "no normalisation")
        err.print(f"imported {r.tensors} tensors ({r.parameters:,} parameters) from {r.source} ({r.source_format})"
                  + "".join(f"; {n}" for n in notes if n), markup=False, soft_wrap=True)
        err.print(f"arch {r.arch}, dataset {r.dataset} ({r.num_classes} classes, {r.in_channels}x{r.image_size}x"
                  f"{r.image_size}), {norm_text}, threat {r.threat}", markup=False, soft_wrap=True)
        if as_json:
            _emit_json(r.summary())
        else:
            typer.echo(str(r.checkpoint))

    _guard(body)


# ----------------------------------------------------------------------------- sample / score


def _checkpoint_or_newest(ckpt: Optional[Path]) -> Path:
    """CKPT, else the newest runs/*/model.safetensors (named on stderr), else bad input."""
    if ckpt is not None:
        return ckpt
    from .checkpoint import newest_checkpoint

    path = newest_checkpoint()
    if path is None:
        raise WeatInputError(f"CKPT: none given and no runs/*/model.safetensors under {Path.cwd()}; "
                             "run 'weat train' first or pass a checkpoint path")
    err.print(f"using the newest checkpoint {path}", markup=False, soft_wrap=True)
    return path


_SAMPLE, _SCORE = config_mod.SampleConfig, config_mod.ScoreConfig  # [sample] and [score]: defaults and help


@app.command()
def sample(
    ckpt: Annotated[Optional[Path], typer.Argument(
        metavar="CKPT", help="Checkpoint (model.safetensors); default: the newest runs/*/model.safetensors.")] = None,
    preset: PresetOpt = None,
    sgld_steps: Annotated[Optional[int], cfg_option(_SAMPLE, "steps", "--sgld-steps")] = None,
    n_per_class: Annotated[Optional[int], cfg_option(_SAMPLE, "n_per_class")] = None,
    n: Annotated[Optional[int], cfg_option(_SAMPLE, "n", "--n")] = None,
    classes: Annotated[Optional[str], cfg_option(_SAMPLE, "classes")] = None,
    init: Annotated[Optional[str], cfg_option(_SAMPLE, "init")] = None,
    step_size: Annotated[Optional[str], cfg_option(_SAMPLE, "step_size")] = None,
    momentum: Annotated[Optional[float], cfg_option(_SAMPLE, "momentum")] = None,
    noise: Annotated[Optional[float], cfg_option(_SAMPLE, "noise")] = None,
    alpha: Annotated[Optional[float], cfg_option(_SAMPLE, "alpha")] = None,
    pca_variance: Annotated[Optional[float], cfg_option(_SAMPLE, "pca_variance")] = None,
    pca_sigma: Annotated[Optional[float], cfg_option(_SAMPLE, "pca_sigma")] = None,
    pca_scale: Annotated[Optional[float], cfg_option(_SAMPLE, "pca_scale")] = None,
    local_neighbours: Annotated[Optional[int], cfg_option(_SAMPLE, "local_neighbours")] = None,
    init_noise: Annotated[Optional[float], cfg_option(_SAMPLE, "init_noise")] = None,
    adaptive: Annotated[Optional[str], cfg_option(_SAMPLE, "adaptive", metavar="T|off")] = None,
    adaptive_rule: Annotated[Optional[str], cfg_option(_SAMPLE, "adaptive_rule")] = None,
    batch_size: Annotated[Optional[int], cfg_option(_SAMPLE, "batch_size")] = None,
    seed: Annotated[Optional[int], cfg_option(_SAMPLE, "seed")] = None,
    device: Annotated[Optional[str], cfg_option(_SAMPLE, "device")] = None,
    data_dir: DataDirOpt = None,
    out: Annotated[Optional[Path], typer.Option(
        help="Samples file (default <checkpoint dir>/samples-<init>.safetensors).")] = None,
    grid: Annotated[Optional[Path], typer.Option(help="PNG grid, one row per class (default: --out with .png).")] = None,
    devices: DevicesOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Generate images from a robust classifier: SGLD with momentum on the joint energy E(x,y).

    Writes the samples (uint8), their labels and initial / final E(x,y) to a safetensors file and a
    PNG grid (first 10 per class); prints the samples path, so `weat score "$(weat sample)"` works.
    Settings: the [sample] defaults <- the checkpoint's stored config <- --preset <- flags <- --set.
    """

    def body() -> None:
        from . import checkpoint as ckpt_mod
        from .sampling import sample_checkpoint

        path = _checkpoint_or_newest(ckpt)
        overrides = {
            "sample.steps": sgld_steps, "sample.n_per_class": n_per_class, "sample.n": n, "sample.classes": classes,
            "sample.init": init, "sample.step_size": step_size, "sample.momentum": momentum, "sample.noise": noise,
            "sample.alpha": alpha, "sample.pca_variance": pca_variance, "sample.pca_sigma": pca_sigma,
            "sample.pca_scale": pca_scale, "sample.local_neighbours": local_neighbours,
            "sample.init_noise": init_noise, "sample.adaptive": adaptive, "sample.adaptive_rule": adaptive_rule,
            "sample.batch_size": batch_size,
            "sample.seed": seed, "sample.device": device, "data.data_dir": data_dir,
        }
        cfg = _resolve(config_mod.resolve_command, overrides, flag_names={"sample.steps": "--sgld-steps"},
                       stored=ckpt_mod.stored_config(path), preset=preset, sets=set_)
        _launch_if_asked(devices, cfg.sample.device)
        with _ranks_done(), (ui.StepDisplay() if _main_rank() else nullcontext()) as display:
            result = sample_checkpoint(path, cfg, out=out, grid=grid, on_event=display)
        if not _main_rank():
            return
        s = result.summary()
        err.print(f"{s['n']} samples in {s['seconds']:.1f} s: {s['fraction_classified_as_asked']:.1%} classified as asked, "
                  f"mean E(x,y) {s['energy_initial_mean']:.3f} -> {s['energy_final_mean']:.3f}; grid {s['files']['grid']}",
                  markup=False, soft_wrap=True)
        if as_json:
            _emit_json(s)
        else:
            typer.echo(s["files"]["samples"])

    _guard(body)


@app.command()
def score(
    samples: Annotated[Path, typer.Argument(
        metavar="SAMPLES", help="A 'weat sample' .safetensors file, an .npz of images or a folder of PNGs.")],
    preset: PresetOpt = None,
    ref: Annotated[Optional[str], cfg_option(_SCORE, "ref")] = None,
    metrics: Annotated[Optional[str], cfg_option(_SCORE, "metrics")] = None,
    n: Annotated[Optional[int], cfg_option(_SCORE, "n", "--n")] = None,
    features: Annotated[Optional[str], cfg_option(_SCORE, "features")] = None,
    judge: Annotated[Optional[str], cfg_option(_SCORE, "judge")] = None,
    inception_weights: Annotated[Optional[Path], cfg_option(_SCORE, "inception_weights")] = None,
    download: Annotated[bool, typer.Option(
        "--download", help="Allow downloading the Inception weights or a missing reference dataset.")] = False,
    batch_size: Annotated[Optional[int], cfg_option(_SCORE, "batch_size")] = None,
    device: Annotated[Optional[str], cfg_option(_SCORE, "device")] = None,
    data_dir: DataDirOpt = None,
    seed: Annotated[Optional[int], cfg_option(_SCORE, "seed")] = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """FID and KID (clean-fid, clean mode) against a reference set, and the Inception Score (10 splits).

    Reference statistics are cached ($WEAT_CACHE_DIR, else ~/.cache/weat), so a second call is fast.
    Settings: the [score] defaults <- --preset <- flags <- --set (--download is data.download).
    """

    def body() -> None:
        from .scoring import score_samples

        overrides = {
            "score.ref": ref, "score.metrics": metrics, "score.n": n, "score.features": features, "score.judge": judge,
            "score.inception_weights": None if inception_weights is None else str(inception_weights),
            "score.batch_size": batch_size, "score.device": device, "score.seed": seed,
            "data.data_dir": data_dir, "data.download": download or None,
        }
        cfg = _resolve(config_mod.resolve_command, overrides, preset=preset, sets=set_)
        with ui.StepDisplay() as display:
            result = score_samples(samples, cfg, on_event=display)
        if as_json:
            _emit_json(result.summary())
        else:
            width = None if sys.stdout.isatty() else 160
            out = Console(highlight=False, width=width)
            out.print(f"{samples}: n={result.n}" + (f" vs {result.reference}" if result.reference else "")
                      + f"; features: {result.features}", markup=False, soft_wrap=True)
            out.print(ui.score_table(result))
            for note in result.notes:
                out.print(f"note: {note}", markup=False, soft_wrap=True)

    _guard(body)


# ----------------------------------------------------------------------------- energy

energy_app = typer.Typer(help="The energy lens: natural vs adversarial energies, training phases, model comparison.",
                         no_args_is_help=True, rich_markup_mode=None)
app.add_typer(energy_app, name="energy")


def _stored_option(section: type, field: str, *decls: str) -> Any:
    """cfg_option for a key whose default is the checkpoint's own value (its stored config)."""
    text = (section.model_fields[field].description or "").rstrip(".")
    return typer.Option(*decls, help=f"{text[:1].upper()}{text[1:]} [default: the checkpoint's].", show_default=False)


_Lens = config_mod.LensConfig
CkptArg = Annotated[Optional[Path], typer.Argument(
    metavar="CKPT", help="Checkpoint; default: the newest runs/*/model.safetensors.")]
LensAttackOpt = Annotated[Optional[list[str]], cfg_option(_Lens, "attacks", "--attack", "-a")]
LensNOpt = Annotated[Optional[int], cfg_option(_Lens, "n", "--n")]
LensStepsOpt = Annotated[Optional[int], cfg_option(_Lens, "steps", "--steps")]
LensBatchOpt = Annotated[Optional[int], cfg_option(_Lens, "batch_size", "--batch-size")]
LensDeviceOpt = Annotated[Optional[str], cfg_option(_Lens, "device", "--device")]
LensSeedOpt = Annotated[Optional[int], cfg_option(_Lens, "seed", "--seed")]
LensEpsOpt = Annotated[Optional[str], _stored_option(config_mod.AttackConfig, "eps", "--eps")]
LensDatasetOpt = Annotated[Optional[str], _stored_option(config_mod.DataConfig, "dataset", "--dataset")]
LensDataDirOpt = Annotated[Optional[str], _stored_option(config_mod.DataConfig, "data_dir", "--data-dir")]


def _fraction_opt(flag: str, value: Optional[str]) -> Optional[float]:
    if value is None:
        return None
    try:
        return config_mod.parse_fraction(value)
    except ValueError as e:
        raise WeatInputError(f"{flag}: {e}") from None


def _lens_config(path: Path, overrides: dict[str, Any], preset: Optional[str], set_: Optional[list[str]],
                 flag_names: Optional[dict[str, str]] = None) -> Any:
    """The RunConfig of an energy command on one checkpoint: its stored config (metadata only, so bad
    input is found before any slow work) <- preset <- flags <- --set."""
    from .checkpoint import stored_config

    names = {"lens.attacks": "--attack", **(flag_names or {})}
    return _resolve(config_mod.resolve_command, overrides, flag_names=names, stored=stored_config(path),
                    preset=preset, sets=set_)


def _lens(path: Path, cfg: Any) -> Any:
    """The energy lens of one checkpoint, with `weat attack`'s progress display."""
    from .lens import energy_lens

    with ui.AttackDisplay() as display:
        return energy_lens(path, cfg, on_event=display)


def _print_table(table: Any) -> None:
    Console(highlight=False, width=None if sys.stdout.isatty() else 160).print(table)


@energy_app.command("stats")
def energy_stats(
    ckpt: CkptArg = None,
    attack_: LensAttackOpt = None,
    n: LensNOpt = None,
    eps: LensEpsOpt = None,
    steps: LensStepsOpt = None,
    per_class: Annotated[Optional[bool], cfg_option(_Lens, "per_class", "--per-class/--no-per-class")] = None,
    batch_size: LensBatchOpt = None,
    dataset: LensDatasetOpt = None,
    data_dir: LensDataDirOpt = None,
    device: LensDeviceOpt = None,
    seed: LensSeedOpt = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Distributions of E(x), E(x,y), dE(x), dE(x,y) for clean images and each attack."""

    def body() -> None:
        from .lens import lens_stats

        path = _checkpoint_or_newest(ckpt)
        cfg = _lens_config(path, {
            "lens.attacks": attack_ or None, "lens.n": n, "attack.eps": eps, "lens.steps": steps,
            "lens.per_class": per_class, "lens.batch_size": batch_size, "data.dataset": dataset,
            "data.data_dir": data_dir, "lens.device": device, "lens.seed": seed}, preset, set_)
        stats = lens_stats(_lens(path, cfg), per_class=cfg.lens.per_class)
        if as_json:
            _emit_json(stats)
        else:
            _print_table(ui.stats_table(stats))

    _guard(body)


def _check_figure_out(out: Path) -> None:
    """--out of `energy plot` / `energy compare`, checked before the (slow) lens runs."""
    from .plots import FIGURE_SUFFIXES

    if out.suffix.lower() not in FIGURE_SUFFIXES or out.is_dir():
        raise WeatInputError(f"--out: {out}; expected a file name ending in {', '.join(FIGURE_SUFFIXES)} "
                             "(the plotted numbers go next to it as .json)")


def _run_label(run_dir: Path, taken: set[str]) -> str:
    """A run's label in plots: what its checkpoint says it is (the metadata's method, e.g. "imported"
    for `weat import`), else its config.toml's train.method, else the directory's name; "+ DER"
    where the run trained with the Delta Energy Regulariser ("+ DER (x* only)" with der_grad adversarial),
    "+ anchor" with the energy anchor (train.der_anchor)."""
    from . import checkpoint as ckpt_mod

    model, config = run_dir / "model.safetensors", run_dir / "config.toml"
    label, train = run_dir.name, None
    try:
        if model.is_file():
            label = ckpt_mod.read(model, metadata_only=True)[1].get("method") or label
        if config.is_file():
            train = config_mod.validate(config_mod.read_toml(config)).train
    except WeatInputError:
        pass
    if train is not None:
        if not model.is_file():
            label = train.method
        if train.der_weight > 0:
            label += " + DER" + (" (x* only)" if train.der_grad == "adversarial" else "")
        if train.der_anchor > 0:
            label += " + anchor"
    return label if label not in taken else f"{label} ({run_dir.name})"


def _plot_runs(run_dirs: list[Path], out: Path) -> dict[str, Any]:
    """`energy plot RUN_DIR...`: robust error and mean dE(x) per epoch from each run's metrics.jsonl."""
    from . import plots
    from .phases import detect_phases, read_metrics

    runs, phases, taken = {}, {}, set()
    for run_dir in run_dirs:
        label = _run_label(run_dir, taken)
        taken.add(label)
        runs[label] = read_metrics(run_dir)
        if not runs[label]:
            raise WeatInputError(f"{run_dir / 'metrics.jsonl'}: no epochs recorded yet")
        phases[label] = detect_phases(runs[label])
        p = phases[label]
        where = f"phase 3 (robust overfitting) from epoch {p.phase3_start}" if p.phase3_start else "no phase 3 detected"
        if p.catastrophic_overfitting_epoch is not None:
            where += f"; catastrophic overfitting at epoch {p.catastrophic_overfitting_epoch}"
            if p.co_recovery_epoch is not None:
                where += f", recovered by epoch {p.co_recovery_epoch}"
        err.print(f"{label}: {where}; best robust epoch {p.best_epoch}", markup=False, soft_wrap=True)
    plots.training_dynamics(runs, out, phases=phases, title="training dynamics")
    # The runs' metrics are plotted as recorded: no config section is used.
    return {"png": str(out), "json": str(out.with_suffix(".json")),
            "phases": {k: v.to_dict() for k, v in phases.items()}, "config": {}}


@energy_app.command("plot")
def energy_plot(
    targets: Annotated[list[Path], typer.Argument(metavar="CKPT | RUN_DIR...", help="One checkpoint (energy histograms) or run directories (training dynamics).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write; the plotted numbers go next to it as .json.")],
    attack_: LensAttackOpt = None,
    n: LensNOpt = None,
    eps: LensEpsOpt = None,
    steps: LensStepsOpt = None,
    batch_size: LensBatchOpt = None,
    dataset: LensDatasetOpt = None,
    data_dir: LensDataDirOpt = None,
    device: LensDeviceOpt = None,
    seed: LensSeedOpt = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A checkpoint: overlaid histograms of E(x) and E(x,y), clean vs each attack.
    Run directories: PGD robust error (test) and mean dE(x) (train) per epoch, phases marked."""

    def body() -> None:
        from . import plots

        _check_figure_out(out)
        overrides = {"lens.attacks": attack_ or None, "lens.n": n, "attack.eps": eps, "lens.steps": steps,
                     "lens.batch_size": batch_size, "data.dataset": dataset, "data.data_dir": data_dir,
                     "lens.device": device, "lens.seed": seed}
        if all(t.is_dir() for t in targets):
            _resolve(config_mod.resolve_command, overrides, flag_names={"lens.attacks": "--attack"}, preset=preset,
                     sets=set_)  # bad options are bad input here too
            summary = _plot_runs(targets, out)
        elif len(targets) == 1 and targets[0].is_file():
            cfg = _lens_config(targets[0], overrides, preset, set_)
            lens = _lens(targets[0], cfg)
            title = f"{targets[0]}: {lens.norm} eps {lens.eps:.4g}, n={lens.n}"
            written = plots.energy_histograms(lens.series(), out, title=title)
            summary = {"png": str(out), "json": str(out.with_suffix(".json")), "n": lens.n,
                       "means": written.get("means"), "config": lens.config}
        else:
            missing = [str(t) for t in targets if not t.exists()]
            raise WeatInputError(f"{missing[0]} not found" if missing else
                                 "expected one checkpoint file or one or more run directories, not a mix")
        if as_json:
            _emit_json(summary)
        else:
            typer.echo(str(out))

    _guard(body)


@energy_app.command("compare")
def energy_compare(
    ckpts: Annotated[list[Path], typer.Argument(metavar="CKPT...", help="Checkpoints to compare.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write; the numbers go next to it as .json.")],
    attack_: Annotated[Optional[str], typer.Option(
        "--attack", "-a", help="The attack whose dE is compared, a name as in weat attack ('-targeted' suffix for pgd / "
        f"cw) [default: {_Lens.model_fields['attacks'].default[0]}, the first of lens.attacks].")] = None,
    n: LensNOpt = None,
    eps: LensEpsOpt = None,
    steps: LensStepsOpt = None,
    batch_size: LensBatchOpt = None,
    device: LensDeviceOpt = None,
    seed: LensSeedOpt = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Per model, violins of dE(x) and dE(x,y) side by side, ordered by robust accuracy:
    stronger models concentrate dE(x) at 0 (they smooth the energy landscape)."""

    def body() -> None:
        from . import plots

        _check_figure_out(out)
        overrides = {"lens.attacks": [attack_] if attack_ else None, "lens.n": n, "attack.eps": eps,
                     "lens.steps": steps, "lens.batch_size": batch_size, "lens.device": device, "lens.seed": seed}
        configs = {}
        for path in ckpts:  # every checkpoint's config first: bad input before any slow work
            cfg = _lens_config(path, overrides, preset, set_)
            configs[path] = cfg.model_copy(update={"lens": cfg.lens.model_copy(update={"attacks": cfg.lens.attacks[:1]})})
        models, used, taken = {}, {}, set()
        for path, cfg in configs.items():
            name = cfg.lens.attacks[0]
            lens = _lens(path, cfg)
            label = path.parent.name if path.name == "model.safetensors" else path.stem
            label = label if label not in taken else str(path)
            taken.add(label)
            d = lens.attacks[name]
            models[label] = {"delta_energy": d["delta_energy"].numpy(), "delta_joint": d["delta_joint"].numpy(),
                             "robust_accuracy": lens.robust_accuracy[name]}
            used[label] = lens.config
        names = sorted({cfg.lens.attacks[0] for cfg in configs.values()})
        written = plots.compare_violins(models, out, title=f"dE under {', '.join(names)}")
        if as_json:
            _emit_json({"png": str(out), "json": str(out.with_suffix(".json")), **written, "config": used})
        else:
            typer.echo(str(out))

    _guard(body)


@energy_app.command("trades")
def energy_trades(
    ckpt: CkptArg = None,
    n: LensNOpt = None,
    eps: LensEpsOpt = None,
    steps: Annotated[Optional[int], cfg_option(_Lens, "trades_steps", "--steps")] = None,
    batch_size: LensBatchOpt = None,
    device: LensDeviceOpt = None,
    seed: LensSeedOpt = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """TRADES in energies: KL(p(.|x)||p(.|x*)) = E_{k~p(.|x)}[E(x*,k) - E(x,k)] + (E(x) - E(x*)),
    per term, checked against the directly computed KL."""

    def body() -> None:
        from .lens import trades_checkpoint

        path = _checkpoint_or_newest(ckpt)
        cfg = _lens_config(path, {"lens.n": n, "attack.eps": eps, "lens.trades_steps": steps,
                                  "lens.batch_size": batch_size, "lens.device": device, "lens.seed": seed},
                           preset, set_, flag_names={"lens.trades_steps": "--steps"})
        with ui.AttackDisplay() as display:
            result = trades_checkpoint(path, cfg, on_event=display)
        if as_json:
            _emit_json(result)
        else:
            typer.echo(f"KL(p(.|x) || p(.|x*))          {result['kl_mean']:.6f}  (mean over {result['n']} images)")
            typer.echo(f"E_k~p[E(x*,k) - E(x,k)]        {result['joint_term_mean']:.6f}")
            typer.echo(f"E(x) - E(x*)                   {result['marginal_term_mean']:.6f}")
            typer.echo(f"max |KL - sum of terms|        {result['max_abs_gap']:.3g}")

    _guard(body)


# ----------------------------------------------------------------------------- entry point


_ARGV: list[str] = []  # the command line, for `weat train --devices N` to hand to its workers


def main(argv: list[str] | None = None) -> None:
    """Console entry point: click's usage errors become one line and exit code 2 as well."""
    _ARGV[:] = list(sys.argv[1:] if argv is None else argv)
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
