"""The RobustBench leaders' ingredients wired into `weat train` (weatcli/recipe.py): label smoothing
in every method's CE, the cosine warm-up, extra data mixed into batches (and split over ranks),
AWP's exact restore inside a real step, EMA evaluation/saving, TensorBoard, bad input, exact resume."""

from __future__ import annotations

import importlib.util

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import run_cli, tiny_config
from weatcli import awp, losses
from weatcli import checkpoint as ckpt
from weatcli import recipe as recipe_mod
from weatcli.config import resolve
from weatcli.distributed import Context, local_batch
from weatcli.ema import EMA_PREFIX
from weatcli.errors import WeatInputError
from weatcli.train import Interrupt, TrainingInterrupted, fit, lr_at

# ----------------------------------------------------------------------------- label smoothing

K, B, S, BETA = 5, 6, 0.2, 3.0


def _log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def _smoothed_ce(z, y, s):
    """(1 - s) * -log p_y + s * mean_k -log p_k, per example (float64)."""
    lp = _log_softmax(z)
    return -(1 - s) * lp[np.arange(len(y)), y] - s * lp.mean(1)


def _kl(z_nat, z_adv):
    p = np.exp(_log_softmax(z_nat))
    return (p * (np.log(p) - _log_softmax(z_adv))).sum(1)


def _fixed():
    """A linear model (fixed logits for fixed inputs), a natural and an adversarial batch."""
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, K))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(K, 4, generator=g) * 2)
        model[1].bias.copy_(torch.randn(K, generator=g))
    x = torch.rand(B, 1, 2, 2, generator=g)
    x_adv = (x + 0.3 * torch.randn(B, 1, 2, 2, generator=g)).clamp(0, 1)
    y = torch.randint(0, K, (B,), generator=g)
    with torch.no_grad():
        z_nat, z_adv = model(x).double().numpy(), model(x_adv).double().numpy()
    return model, x, x_adv, y, z_nat, z_adv


def _expected(method, z_nat, z_adv, y, s):
    yn = y.numpy()
    kl = _kl(z_nat, z_adv)
    if method == "standard":
        return _smoothed_ce(z_nat, yn, s).mean()
    if method in ("pgd-at", "fgsm-rs", "n-fgsm"):  # CE on the given x*
        return _smoothed_ce(z_adv, yn, s).mean()
    if method in ("trades", "mail-trades"):  # mail-trades in its burn-in: w = 1
        return _smoothed_ce(z_nat, yn, s).mean() + BETA * kl.mean()
    if method == "mart":  # the smoothed CE plus MART's margin term, untouched
        p_adv, p_nat = np.exp(_log_softmax(z_adv)), np.exp(_log_softmax(z_nat))
        order = np.argsort(-p_adv, 1)
        wrong = np.where(order[:, 0] == yn, order[:, 1], order[:, 0])
        boosted = _smoothed_ce(z_adv, yn, s) - np.log(1.0001 - p_adv[np.arange(B), wrong] + 1e-12)
        kl_mart = (p_nat * (np.log(p_nat) - np.log(p_adv + 1e-12))).sum(1)
        return boosted.mean() + BETA * (kl_mart * (1.0000001 - p_nat[np.arange(B), yn])).mean()
    m = z_nat.max(1)
    energy = -(m + np.log(np.exp(z_nat - m[:, None]).sum(1)))
    w = 1 / np.log1p(np.exp(np.abs(energy)))
    z_ce = z_adv if method == "weat-adv" else z_nat
    return (w * _smoothed_ce(z_ce, yn, s)).mean() + BETA * (w * kl).mean()


@pytest.mark.parametrize("method", list(losses.LOSSES))
def test_label_smoothing_enters_every_methods_ce_and_nothing_else(method):
    model, x, x_adv, y, z_nat, z_adv = _fixed()
    for s in (S, 0.0):
        cfg = resolve(sets=[f"train.method='{method}'", f"train.label_smoothing={s}", f"train.beta={BETA}"])
        loss, _ = losses.LOSSES[method](model, x, y, cfg, x_adv=x_adv, progress=0.0)
        assert float(loss.detach()) == pytest.approx(_expected(method, z_nat, z_adv, y, s), rel=1e-5, abs=1e-6), (method, s)


def test_label_smoothing_zero_is_plain_cross_entropy_bit_for_bit():
    _, _, _, y, z_nat, _ = _fixed()
    logits = torch.from_numpy(z_nat).float()
    cfg = resolve()
    assert torch.equal(losses.ce(logits, y, cfg), torch.nn.functional.cross_entropy(logits, y))
    assert torch.equal(losses.ce(logits, y, cfg, reduction="none"),
                       torch.nn.functional.cross_entropy(logits, y, reduction="none"))


def test_a_precomputed_x_adv_gives_the_loss_the_loss_computes_itself():
    cfg = tiny_config(None, **{"train.method": "trades", "attack.steps": 2})
    torch.manual_seed(0)
    from weatcli.models import build

    model = build("small-cnn", num_classes=10, in_channels=1, image_size=16)
    x, y = torch.rand(8, 1, 16, 16), torch.arange(8)
    for name in ("pgd-at", "trades", "mart", "weat-adv"):
        c = cfg.model_copy(update={"train": cfg.train.model_copy(update={"method": name})})
        a, b = copy.deepcopy(model), copy.deepcopy(model)  # train mode: each forward moves batch-norm statistics
        own, _ = losses.LOSSES[name](a, x, y, c, generator=torch.Generator().manual_seed(1))
        x_adv = losses.method_attack(b, x, y, c, generator=torch.Generator().manual_seed(1))
        given, _ = losses.LOSSES[name](b, x, y, c, generator=None, x_adv=x_adv)
        assert torch.equal(own, given), name


# ----------------------------------------------------------------------------- the schedule


def test_cosine_with_linear_warm_up_follows_its_formula():
    cfg = resolve(sets=["train.schedule='cosine'", "train.warmup_epochs=2", "train.epochs=10", "train.lr=0.2"])
    total, warm = 10 * 7, 2 * 7
    for step in range(total):
        if step < warm:
            want = 0.2 * (step + 1) / warm
        else:
            want = 0.2 * 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
        assert lr_at(step, total, cfg) == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert lr_at(warm - 1, total, cfg) == pytest.approx(0.2) and lr_at(warm, total, cfg) == pytest.approx(0.2)
    plain = resolve(sets=["train.schedule='cosine'", "train.epochs=10", "train.lr=0.2"])
    assert [lr_at(s, total, plain) for s in range(total)] == [0.2 * 0.5 * (1 + math.cos(math.pi * (s / total)))
                                                               for s in range(total)]


# ----------------------------------------------------------------------------- extra data


def _extra_npz(path: Path, n: int = 300, size: int = 16, seed: int = 1) -> Path:
    """Digits-shaped generated images (N, 16, 16) uint8 with labels 0..9 (np.savez: mappable)."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 10, n).astype(np.int64)
    image = (rng.integers(0, 60, (n, size, size)) + label[:, None, None] * 19).astype(np.uint8)
    np.savez(path, image=image, label=label)
    return path


class _Dataset:
    def __init__(self, n=50):
        g = torch.Generator().manual_seed(0)
        self.train_x = torch.randint(0, 255, (n, 1, 16, 16), generator=g, dtype=torch.uint8)
        self.train_y = torch.randint(0, 10, (n,), generator=g)
        self.num_classes, self.in_channels, self.image_size = 10, 1, 16


@pytest.mark.parametrize("fraction,batch", [(0.5, 16), (0.25, 16), (0.75, 8)])
def test_each_rank_trains_on_its_slice_of_the_one_process_batch(tmp_path, fraction, batch):
    """The global batch interleaves real and extra images so that every rank's contiguous slice
    holds its slice of the real part and its shard of the stream: N ranks see what one process sees."""
    path = _extra_npz(tmp_path / "extra.npz")
    cfg = resolve(overrides={"data.extra_data": str(path), "data.extra_fraction": fraction,
                             "train.batch_size": batch, "train.device": "cpu"})
    ds = _Dataset()
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(5))

    def batches(rank, world):
        r = recipe_mod.Recipe(cfg, model=nn.Linear(1, 1), dataset=ds, device=torch.device("cpu"),
                              ctx=Context(rank, world))
        out = [r.global_batch(ds, perm=perm, epoch=1, step=s) for s in range(r.steps_per_epoch)]
        r.close()
        return r, out

    one, single = batches(0, 1)
    k = round(fraction * batch)
    assert one.steps_per_epoch == math.ceil(50 / (batch - k))
    for x, y in single:  # every step: the stream's extra images and (wrapping) real ones, nothing blank
        assert len(x) == batch and (y == 0).sum() < batch
    for world in (2,):
        for rank in range(world):
            _, part = batches(rank, world)
            for (x1, y1), (xw, yw) in zip(single, part):
                ctx = Context(rank, world)
                assert torch.equal(local_batch(xw, ctx), local_batch(x1, ctx))
                assert torch.equal(local_batch(yw, ctx), local_batch(y1, ctx))
    # Real images: the epoch's permutation in order, wrapping round to fill the last step.
    r = batch - k
    c = math.gcd(r, k)
    real_pos = [j * (r // c + k // c) + i for j in range(c) for i in range(r // c)]
    seen = torch.cat([y[real_pos] for _, y in single])
    want = ds.train_y[perm[torch.arange(len(single) * r) % 50]]
    assert torch.equal(seen, want)


def test_bad_extra_data_exits_2_naming_the_flag_before_any_training(tmp_path, capsys):
    base = ["train", "--epochs", "1", "--device", "cpu", "--set", "train.eval_n=8", "--set", "train.energy_n=8"]
    cases = {
        "missing": (["--extra-data", str(tmp_path / "nope.npz"), "--extra-fraction", "0.5"], "--extra-data"),
        "classes": (["--extra-data", str(tmp_path / "classes.npz"), "--extra-fraction", "0.5"], "0..9"),
        "shape": (["--extra-data", str(tmp_path / "shape.npz"), "--extra-fraction", "0.5"], "(1, 16, 16)"),
        "compressed": (["--extra-data", str(tmp_path / "zip.npz"), "--extra-fraction", "0.5"], "compressed"),
        "no fraction": (["--extra-data", str(tmp_path / "ok.npz")], "--extra-fraction"),
        "fraction 1": (["--extra-data", str(tmp_path / "ok.npz"), "--extra-fraction", "1"], "--extra-fraction"),
        "dm preset": (["--preset", "cifar10-dm-trades", "--data-dir", str(tmp_path), "--set", "train.epochs=5"], "--extra-data: required"),
        "awp on mart": (["--method", "mart", "--awp-gamma", "0.005"], "--awp-gamma (train.awp_gamma)"),
    }
    _extra_npz(tmp_path / "ok.npz")
    np.savez(tmp_path / "classes.npz", image=np.zeros((4, 16, 16), np.uint8), label=np.array([0, 1, 2, 12]))
    np.savez(tmp_path / "shape.npz", image=np.zeros((4, 8, 8, 3), np.uint8), label=np.zeros(4, np.int64))
    np.savez_compressed(tmp_path / "zip.npz", image=np.zeros((4, 16, 16), np.uint8), label=np.zeros(4, np.int64))
    for name, (args, needle) in cases.items():
        out = tmp_path / f"run-{name.replace(' ', '-')}"
        code, stdout, stderr = run_cli([*base, *args, "--out", str(out)], capsys)
        assert code == 2, (name, stderr)
        assert needle in stderr and len(stderr.strip().splitlines()) == 1, (name, stderr)
        assert not (out / "last.safetensors").exists(), name


def test_tensorboard_missing_is_bad_input(tmp_path, capsys, monkeypatch):
    real = recipe_mod.importlib.util.find_spec
    monkeypatch.setattr(recipe_mod.importlib.util, "find_spec", lambda n: None if n == "tensorboard" else real(n))
    code, _, stderr = run_cli(["train", "--epochs", "1", "--device", "cpu", "--tensorboard", str(tmp_path / "tb"),
                               "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "--tensorboard" in stderr and "weat[tensorboard]" in stderr


# ----------------------------------------------------------------------------- a real run with everything on


def _all_on(root: Path, extra: Path, **sets):
    """The tiny digits run with EMA, AWP (from epoch 2), extra data, label smoothing, the cosine
    warm-up and TensorBoard: 2 epochs of ceil(1437 / 64) = 23 steps of 64 real + 64 extra images."""
    return tiny_config(root, **{
        "train.method": "trades", "train.epochs": 2, "train.ema_decay": 0.9, "train.ema_warmup": 0.1,
        "train.awp_gamma": 0.01, "train.awp_warmup": 1, "train.label_smoothing": 0.1,
        "train.schedule": "cosine", "train.warmup_epochs": 1, "data.extra_data": str(extra),
        "data.extra_fraction": 0.5, **_tensorboard(root), **sets})


def _tensorboard(root: Path) -> dict:
    """TensorBoard is an optional extra (CI does not install it): log only where it is installed."""
    return {"train.tensorboard": str(root / "tb")} if importlib.util.find_spec("tensorboard") else {}


@pytest.fixture(scope="module")
def all_on_run(tmp_path_factory):
    """One uninterrupted run, with AWP's add/restore watched: the weights before each perturbation,
    during the step (perturbed) and after the restore."""
    root = tmp_path_factory.mktemp("all-on")
    extra = _extra_npz(root / "extra.npz", n=1000)
    seen = {"adds": 0, "exact": 0, "moved": 0}
    add, restore = awp.add, awp.restore
    before: dict[str, torch.Tensor] = {}

    def watched_add(model, diff):  # the parameters (batch-norm statistics move with the forward passes)
        before.clear()
        before.update({k: v.detach().clone() for k, v in model.named_parameters()})
        add(model, diff)
        seen["adds"] += 1
        seen["moved"] += any(not torch.equal(before[k], v) for k, v in model.named_parameters())

    def watched_restore(model, diff):
        restore(model, diff)
        seen["exact"] += all(torch.equal(before[k], v) for k, v in model.named_parameters())

    awp.add, awp.restore = watched_add, watched_restore
    try:
        result = fit(_all_on(root, extra))
    finally:
        awp.add, awp.restore = add, restore
    return root, extra, result, seen


def test_awp_restores_the_weights_bit_for_bit_inside_real_steps(all_on_run):
    _, _, result, seen = all_on_run
    steps = math.ceil(1437 / 64)
    assert seen["adds"] == steps  # epoch 1 is AWP's warm-up; every step of epoch 2 perturbs
    assert seen["moved"] == steps and seen["exact"] == steps


def test_ema_weights_are_evaluated_selected_and_saved(all_on_run):
    root, _, result, _ = all_on_run
    run = root / "run"
    last, _ = ckpt.read(run / "last.safetensors")
    ema = {k[len(EMA_PREFIX) + len("weights/"):]: v for k, v in last.items() if k.startswith(EMA_PREFIX + "weights/")}
    live = {k: v for k, v in last.items() if not k.startswith(("optim/", "state/"))}
    assert ema.keys() == live.keys() and int(last[EMA_PREFIX + "num_updates"]) == 2 * 23
    assert any(not torch.equal(ema[k], live[k]) for k in live)  # an average, not the live weights
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    model = ckpt.load(run / "model.safetensors")
    assert model.epoch == result.best_epoch
    if model.epoch == 2:  # the selected epoch is the last one: its weights are the average's
        saved, _ = ckpt.read(run / "model.safetensors")
        assert all(torch.equal(saved[k], ema[k]) for k in saved)
    # The per-epoch evaluation is the average's: re-evaluating the saved average reproduces the row.
    from weatcli.data import load
    from weatcli.runtime import Stream, generator_for
    from weatcli.train import evaluate

    cfg = model.config
    ds = load(cfg.data.dataset, None)
    got = evaluate(model.model, ds.test_x[: cfg.train.eval_n], ds.test_y[: cfg.train.eval_n], cfg,
                   generator=generator_for("cpu", cfg.train.seed, Stream.EVAL_ATTACK))
    row = rows[model.epoch - 1]
    assert got == {"clean_accuracy": row["clean_accuracy"], "robust_accuracy": row["robust_accuracy"]}


def test_tensorboard_holds_every_metric_of_every_epoch(all_on_run):
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    root, _, _, _ = all_on_run
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    acc = ea_mod.EventAccumulator(str(root / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {k for k in rows[0] if k != "epoch"} <= tags and "delta_energy" in tags
    for key in ("robust_accuracy", "delta_energy", "energy_natural", "lr", "train_loss"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [1, 2]
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6)


def test_interrupted_and_resumed_run_with_ema_awp_extra_data_equals_uninterrupted(all_on_run, tmp_path):
    root, extra, reference, _ = all_on_run
    flag = Interrupt()

    def on_event(kind, p):  # mid-epoch 2, where AWP is on and the average is past its warm-up
        if kind == "batch" and p["epoch"] == 2 and p["batch"] == 10:
            flag.requested = True

    with pytest.raises(TrainingInterrupted):
        fit(_all_on(tmp_path, extra), on_event=on_event, interrupt=flag)
    stopped, _ = ckpt.read(tmp_path / "run" / "last.safetensors")
    assert EMA_PREFIX + "num_updates" in stopped and int(stopped[EMA_PREFIX + "num_updates"]) == 23 + 10
    resumed = fit(None, resume=tmp_path / "run")
    for name in ("model.safetensors", "last.safetensors"):
        a, _ = ckpt.read(reference.run_dir / name)
        b, _ = ckpt.read(resumed.run_dir / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)

    def rows(run):
        return [{k: v for k, v in json.loads(line).items() if "seconds" not in k}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert rows(reference.run_dir) == rows(resumed.run_dir)
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea_mod.EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("robust_accuracy")] == [1, 2]  # epoch 2 once, after the resume
