"""`weat attack` on a checkpoint: the command's config rules, the model and images the config
names, and sharding over ranks (docs/design.md#config-resolution, docs/design.md#distributed).

The CLI resolves a RunConfig with `resolve_config` (the checkpoint's stored config is the base, so
the checkpoint alone says which model, data and threat) and calls `evaluate_checkpoint(path, cfg)`,
which loads what cfg names, attacks this rank's whole batches with evaluate.run_evaluation and
gathers the ranks' results into the single-process result.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from . import config as config_mod
from .attack_state import AttackState
from .config import RunConfig
from .errors import WeatInputError
from .evaluate import Evaluation, attack_threat, merge_evaluations, run_evaluation, save_adversarial, zero_radius
from .fileio import check_writable
from .runtime import EventFn, eval_device, ignore_event

DEFAULT_N = 10_000  # the field's protocol: the first 10,000 test images
CONFIG_SECTIONS = ("data", "attack", "evaluate")  # what weat attack runs with, echoed in its --json


def resolve_config(*, stored: RunConfig | None = None, preset: str | None = None,
                   overrides: dict[str, Any] | None = None, sets: list[str] | None = None) -> RunConfig:
    """weat attack's RunConfig: config.resolve_command (defaults <- the checkpoint's stored config <-
    a preset's sections <- flags <- --set; a new eps keeps the stored step/eps ratio), plus the
    command's own rules:

    - eps may be 0: the ball is x itself and robust accuracy = clean accuracy ([attack] refuses 0,
      which training needs); evaluate.attack_threat validates that threat;
    - a norm other than the stored one needs an eps (the stored radius is of the other norm);
    - a dataset other than the stored one does not inherit the stored data_dir.
    """
    base = stored or RunConfig()
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    sets = list(sets or [])
    given = {**overrides, **{".".join(path): value for path, value in map(config_mod.parse_set, sets)}}
    zero_eps = "attack.eps" in given and zero_radius(given["attack.eps"])
    if zero_eps:  # resolved without it, then set below
        overrides.pop("attack.eps", None)
        sets = [s for s in sets if config_mod.parse_set(s)[0] != ["attack", "eps"]]
    cfg = config_mod.resolve_command(stored=stored, preset=preset, overrides=overrides, sets=sets)
    if cfg.attack.norm != base.attack.norm and "attack.eps" not in given and cfg.attack.eps == base.attack.eps:
        raise WeatInputError(f"--eps: required with --norm {cfg.attack.norm}: the checkpoint was trained for "
                             f"{base.attack.norm} eps {base.attack.eps:.6g}; expected a radius for {cfg.attack.norm}")
    update: dict[str, Any] = {}
    if zero_eps:
        update["attack"] = attack_threat(**{**cfg.attack.model_dump(), "eps": 0.0})
    if cfg.data.dataset != base.data.dataset and "data.data_dir" not in given:
        update["data"] = cfg.data.model_copy(update={"data_dir": None})
    return cfg.model_copy(update=update) if update else cfg


def evaluate_checkpoint(path: Path | str, cfg: RunConfig, *, save_adv: Path | str | None = None,
                        state_path: Path | str | None = None, on_event: EventFn | None = None,
                        default_n: int = DEFAULT_N) -> Evaluation:
    """Attack the images cfg names with the checkpoint's model: cfg.attack is the threat, cfg.evaluate
    the attacks and images (first cfg.evaluate.n of the split, else min(default_n, split size)),
    cfg.data the dataset. Writes `save_adv` (evaluate.save_adversarial); `state_path` makes the
    evaluation resumable (one file per rank under torchrun). The result echoes cfg's sections."""
    from . import checkpoint as ckpt_mod
    from . import distributed as dist_mod

    emit = on_event or ignore_event
    _check_files(save_adv, state_path)
    ctx, device = dist_mod.init(cfg.evaluate.device)  # under torchrun: this rank's device and shard
    dev = eval_device(device)
    ck = ckpt_mod.load(path, device=dev)
    xs, ys = _images(cfg, ck, default_n)
    n = len(xs)
    # Each rank takes whole consecutive batches, so its batches (and their random starts) are the
    # single-process run's.
    bs = cfg.evaluate.batch_size
    batches = range(math.ceil(n / bs))[ctx.shard(math.ceil(n / bs))]
    part = slice(batches.start * bs, min(batches.stop * bs, n))
    x, y = xs[part].to(dev), ys[part].to(dev)  # uint8 on the device; batches become float there
    if ctx.enabled:
        if not ctx.main:
            emit = ignore_event
        if state_path is not None:  # one state file per rank: each resumes its own shard
            state_path = Path(state_path).with_name(f"{Path(state_path).name}.rank{ctx.rank}-of-{ctx.world}")
    start = {"model": str(path), "dataset": cfg.data.dataset, "split": cfg.evaluate.split, "n": n,
             "device": str(dev), "eps": cfg.attack.eps, "norm": cfg.attack.norm, "attacks": cfg.evaluate.attacks}
    if ctx.enabled and len(x) == 0:  # fewer batches than ranks: this one has nothing to do
        result = merge_evaluations([p for p in dist_mod.gather_objects(None, ctx) if p is not None])
    else:
        result = run_evaluation(ck.model, x, y, cfg.attack, cfg.evaluate, keep_adversarial=save_adv is not None,
                                state_path=state_path, model_name=str(path), on_event=_start_first(emit, start),
                                index_offset=part.start)
        if ctx.enabled:
            result = merge_evaluations([p for p in dist_mod.gather_objects(result, ctx) if p is not None])
    if ctx.enabled:
        result.info["ranks"] = ctx.world
    result.info.update({"dataset": cfg.data.dataset, "split": cfg.evaluate.split, "arch": ck.config.model.arch,
                        "method": ck.method})  # "imported" for weat import
    result.config = {k: v for k, v in cfg.to_dict().items() if k in CONFIG_SECTIONS}
    if save_adv is not None and ctx.main:
        save_adversarial(Path(save_adv), result)
        result.info["save_adv"] = str(save_adv)
    return result


def _check_files(save_adv: Path | str | None, state_path: Path | str | None) -> None:
    """The output files, before any work: writable, and a --state file of weat attack's format."""
    for flag, path in (("--save-adv", save_adv), ("--state", state_path)):
        if path is not None:
            check_writable(flag, Path(path))
    if state_path is not None and Path(state_path).exists():
        AttackState.read(Path(state_path), metadata_only=True)


def _images(cfg: RunConfig, ck: Any, default_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n images (uint8, CPU) and labels of cfg's dataset split; the data must fit the model."""
    from . import data as data_mod

    name, split = cfg.data.dataset, cfg.evaluate.split
    ds = data_mod.load(name, cfg.data.data_dir, download=cfg.data.download, device="cpu")
    for what, have, want in (("channels", ds.in_channels, ck.in_channels), ("image size", ds.image_size, ck.image_size)):
        if have != want:
            raise WeatInputError(f"--dataset: {name} has {what} {have}; the checkpoint's model ({ck.config.model.arch} "
                                 f"trained on {ck.config.data.dataset}) expects {want}")
    if ds.num_classes > ck.num_classes:
        raise WeatInputError(f"--dataset: {name} has {ds.num_classes} classes; the checkpoint's model has "
                             f"{ck.num_classes}, expected at most that many")
    xs, ys = (ds.test_x, ds.test_y) if split == "test" else (ds.train_x, ds.train_y)
    n = cfg.evaluate.n if cfg.evaluate.n is not None else min(default_n, len(xs))
    if n > len(xs):
        raise WeatInputError(f"--n: {n} is more than the {len(xs)} images of the {name} {split} split; "
                             f"expected at most {len(xs)}")
    return xs[:n], ys[:n]


def _start_first(emit: EventFn, start: dict[str, Any]) -> EventFn:
    """`emit`, with the "start" event sent just before the first other event: bad input the
    evaluation finds first (a --state file of another evaluation) is then the only line printed."""

    def emit_after_start(kind: str, payload: dict[str, Any]) -> None:
        if start:
            emit("start", dict(start))
            start.clear()
        emit(kind, payload)

    return emit_after_start
