"""The RobustBench leaders' training ingredients, as hooks of the training loop (docs/science.md#beyond-the-paper).

Each one is a config key and a `weat train` flag, off by default; with all of them off the loop
runs exactly the code it ran before they existed (bit-identical checkpoints):

| key | flag | what it changes in train.py |
|---|---|---|
| data.extra_data, data.extra_fraction | --extra-data, --extra-fraction | `_set_up`: an epoch is `ExtraStream.steps_per_epoch` steps; `_batch`: `Recipe.global_batch` |
| train.ema_decay, train.ema_warmup | --ema | `_train_step`: `Recipe.after_step`; `_epoch_row` / `_select_and_save`: `Recipe.eval_model`; `_save_last` / `_restore`: `Recipe.state_tensors` / `load_state` |
| train.awp_gamma, train.awp_warmup | --awp-gamma | `_train_step`: `Recipe.perturb_weights` before the loss, `Recipe.restore_weights` before the optimizer step |
| train.label_smoothing | --label-smoothing | nothing here: `losses.ce` |
| train.warmup_epochs | --set train.warmup_epochs=N | `lr_at`: `warm_cosine` |
| train.tensorboard | --tensorboard | the epoch loop: `Recipe.log_epoch` |

The engine modules hold the techniques themselves (`ema.py`, `awp.py`, `extra_data.py`); this
module only decides when they run. `check` is called before anything slow or irreversible, so bad
input (a missing or malformed extra-data file, tensorboard not installed) exits 2 before a run
directory exists.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import awp
from .config import RunConfig
from .ema import EMA_PREFIX, WeightEMA
from .errors import WeatInputError
from .extra_data import ExtraStream, extra_per_step, open_extra
from .losses import method_attack


# ----------------------------------------------------------------------------- checks


def check_config(cfg: RunConfig) -> None:
    """What a config alone can get wrong for these techniques; the flags are named (exit 2)."""
    d, t = cfg.data, cfg.train
    if d.extra_fraction > 0 and not d.extra_data:
        raise WeatInputError(
            f"--extra-data: required: this config draws data.extra_fraction = {d.extra_fraction:g} of every batch "
            "from generated images; give --extra-data FILE.npz (an np.savez file with image (N, H, W, C) uint8 and "
            "label (N,)), or --extra-fraction 0 to train on the real data alone")
    if d.extra_data and d.extra_fraction == 0:
        raise WeatInputError(f"--extra-fraction: 0 with --extra-data {d.extra_data}; expected 0 < F < 1, the share of "
                             "every batch drawn from it")
    if t.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise WeatInputError("--tensorboard: the tensorboard package is not installed; "
                             "pip install 'weat[tensorboard]' (or pip install tensorboard)")


def check_extra(cfg: RunConfig, dataset) -> None:
    """The extra-data file against the training data: readable, uncompressed, the same (C, H, W) and
    labels within the classes (its labels are read in chunks), and a fraction that leaves real images."""
    d = cfg.data
    if not d.extra_data:
        return
    extra_per_step(cfg.train.batch_size, d.extra_fraction)  # F leaves at least one real image per batch
    open_extra(d.extra_data, num_classes=dataset.num_classes, image_shape=_image_shape(dataset))


def _image_shape(dataset) -> tuple[int, int, int]:
    return dataset.in_channels, dataset.image_size, dataset.image_size


# ----------------------------------------------------------------------------- the learning rate


def warm_cosine(step: int, total: int, cfg: RunConfig) -> float:
    """The cosine schedule with a linear warm-up over the first warmup_epochs epochs (W steps):
    lr * (step + 1) / W for step < W, then lr * (1 + cos(pi * (step - W) / (total - W))) / 2."""
    t = cfg.train
    warm = round(total * t.warmup_epochs / t.epochs)  # total is a whole number of epochs
    if step < warm:
        return t.lr * (step + 1) / warm
    return t.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))


# ----------------------------------------------------------------------------- the hooks


class Recipe:
    """What one run uses of EMA, AWP, extra data and TensorBoard; inert when they are all off.

    model: the live weights (no DDP / compile wrapper); ctx: the distributed context."""

    def __init__(self, cfg: RunConfig, *, model: nn.Module, dataset, device: torch.device, ctx) -> None:
        d, t = cfg.data, cfg.train
        self.cfg = cfg
        self.main = ctx.main
        self.stream: ExtraStream | None = None
        if d.extra_data and extra_per_step(t.batch_size, d.extra_fraction):
            data = open_extra(d.extra_data, num_classes=dataset.num_classes, image_shape=_image_shape(dataset))
            self.stream = ExtraStream(data, fraction=d.extra_fraction, batch_size=t.batch_size,
                                      num_real=len(dataset.train_y), seed=t.seed, device=device,
                                      shard=(ctx.rank, ctx.world))
            self._positions(device)
        steps = self.steps_per_epoch or len(dataset.train_y) // min(t.batch_size, len(dataset.train_y))
        self.ema = None
        if t.ema_decay:
            # DM-AT: warm-up = ema_warmup of all the run's optimizer steps (watrain.py: 0.025 * epochs * steps).
            self.ema = WeightEMA(model, t.ema_decay, warmup_steps=round(t.ema_warmup * t.epochs * steps))
        self.proxy = awp.make_proxy(model) if t.awp_gamma > 0 else None
        self.writer = None

    # -- extra data: what an epoch and a batch are

    @property
    def steps_per_epoch(self) -> int | None:
        """With extra data: the fixed ceil(N_real / (B - round(F * B))) steps; else None (the plain loop's)."""
        return self.stream.steps_per_epoch if self.stream is not None else None

    def _positions(self, device: torch.device) -> None:
        """Where real and extra images sit in a global batch of B = r + k (r real, k extra): c = gcd(r, k)
        chunks of r/c real then k/c extra images. Each rank's equal contiguous slice of that batch then
        holds exactly its slice of the real part and its shard of the extra part (the world size divides
        both r and k), so N ranks train on what one process trains on, crops and attack starts included."""
        s = self.stream
        r, k = s.real_per_step, s.per_step
        c = math.gcd(r, k)
        a, e = r // c, k // c
        i = torch.arange(r, device=device)
        m = torch.arange(s.part.start, s.part.stop, device=device)  # this rank's extra images
        self._real_pos = (i // a) * (a + e) + i % a
        self._extra_pos = (m // e) * (a + e) + a + m % e

    def global_batch(self, dataset, *, perm: torch.Tensor, epoch: int,
                     step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step `step` of epoch `epoch`: uint8 (B, C, H, W) images and (B,) labels of the global batch,
        before augmentation. Real images: positions step * r ... of the epoch's permutation, wrapping
        around to fill the last step; extra images: the stream's (this rank's shard; other ranks' extra
        positions hold zeros, augmented and then dropped with the rest of their slices)."""
        s = self.stream
        r = s.real_per_step
        n = len(perm)
        real = perm[(step * r + torch.arange(r, device=perm.device)) % n]
        extra_x, extra_y = s.batch(epoch, step)
        x = torch.zeros((r + s.per_step, *dataset.train_x.shape[1:]), dtype=torch.uint8, device=perm.device)
        y = torch.zeros(r + s.per_step, dtype=dataset.train_y.dtype, device=perm.device)
        x[self._real_pos], y[self._real_pos] = dataset.train_x[real], dataset.train_y[real]
        x[self._extra_pos], y[self._extra_pos] = extra_x, extra_y.to(y.dtype)
        return x, y

    # -- AWP

    def perturb_weights(self, model: nn.Module, train_net: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                        generator: torch.Generator, epoch: int) -> tuple[torch.Tensor | None, Any]:
        """AWP, from epoch awp_warmup on: the method's training attack x* (the same call the loss would
        make, drawing the same starts), then the weights move to w + v. Returns (x*, the perturbation)
        for the loss and `restore_weights`; (None, None) when AWP is off (the loss attacks itself)."""
        t = self.cfg.train
        if self.proxy is None or epoch < t.awp_warmup:
            return None, None
        x_adv = method_attack(train_net, x, y, self.cfg, generator=generator)
        objective = awp.objective_for(t.method, x, x_adv, y, beta=t.beta)
        diff = awp.perturb(model, objective, t.awp_gamma, proxy=self.proxy)
        awp.add(model, diff)
        return x_adv, diff

    @staticmethod
    def restore_weights(model: nn.Module, diff: Any) -> None:
        """Back to exactly w (after backward, before the optimizer step); nothing when AWP was off."""
        if diff is not None:
            awp.restore(model, diff)

    # -- EMA

    def after_step(self, model: nn.Module) -> None:
        """After every optimizer step (not after a skipped batch): one EMA update."""
        if self.ema is not None:
            self.ema.update(model)

    def eval_model(self, net: nn.Module) -> nn.Module:
        """The model evaluated, selected and saved as model.safetensors: the EMA weights, or `net`."""
        return self.ema.ema_model if self.ema is not None else net

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """For last.safetensors: the average (state/ema/...) next to the live weights."""
        if self.ema is None:
            return {}
        return {k: v.detach().cpu().contiguous() for k, v in self.ema.state_dict().items()}

    def load_state(self, extra: dict[str, torch.Tensor], path: Path | str) -> None:
        if self.ema is None:
            return
        if f"{EMA_PREFIX}num_updates" not in extra:
            raise WeatInputError(f"--resume: {path} holds no weight average (state/ema/) although its config has "
                                 f"train.ema_decay {self.cfg.train.ema_decay:g}")
        self.ema.load_state_dict(extra)

    # -- TensorBoard

    def log_epoch(self, run_dir: Path, row: dict[str, Any]) -> None:
        """Rank 0: every numeric scalar of the metrics row at step = epoch. The first write of a
        (resumed) process purges the events at or after its epoch, so a resumed run's curves hold
        each epoch once."""
        tb = self.cfg.train.tensorboard
        if not tb or not self.main:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(tb).expanduser()), purge_step=row["epoch"])
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, row["epoch"])
        self.writer.flush()  # a killed run keeps its curves up to the last epoch

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.stream is not None:
            self.stream.close()
