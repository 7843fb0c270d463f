"""The speed paths compute what the plain engine computes: the CUDA-graph step on its static
buffers, the fused (compiled) update, fp16 loss scaling, and the training options that use them."""

from __future__ import annotations

import math

import pytest
import torch

from weatcli import attacks, losses, train
from weatcli import checkpoint as ckpt
from weatcli.attacks import _GraphedStep, attack_mode, engine_options, pgd
from weatcli.errors import WeatRunError
from weatcli.models import build
from weatcli.train import TrainingInterrupted, fit

from conftest import tiny_config
from test_train import _interrupt_at, _rows, _weights


def _model_and_batch(seed=0, n=16):
    torch.manual_seed(seed)
    model = build("small-cnn", num_classes=10, in_channels=1, image_size=16).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 16, 16, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return model, x, y


@pytest.mark.parametrize("norm,objective,targeted", [("linf", "ce", False), ("linf", "kl", False),
                                                     ("l2", "ce", False), ("linf", "ce", True)])
def test_static_buffer_step_equals_the_eager_loop(norm, objective, targeted):
    model, x, y = _model_and_batch()
    eps, step = (0.1, 0.025) if norm == "linf" else (1.0, 0.25)
    with attack_mode(model):
        p_nat = torch.softmax(model(x), 1).detach() if objective == "kl" else None
        x0 = pgd(model, x, y, eps=eps, step_size=step, steps=0, norm=norm, init="uniform",
                 generator=torch.Generator().manual_seed(1))
        ref = pgd(model, x, y, eps=eps, step_size=step, steps=7, norm=norm, objective=objective, targeted=targeted,
                  init="uniform", p_nat=p_nat, generator=torch.Generator().manual_seed(1))
        # Captured on other data (the warm-up moves the buffers), then run on ours: no state leaks.
        other = torch.rand_like(x)
        graphed = _GraphedStep(model, objective, -1.0 if targeted else 1.0, norm, eps, step, other, y.flip(0),
                               None if p_nat is None else p_nat.flip(0))
        lo, hi = ((x - eps).clamp(min=0), (x + eps).clamp(max=1)) if norm == "linf" else (None, None)
        out = graphed.run(x0, x, lo, hi, y, p_nat, 7)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert not torch.equal(out, x0)  # it moved


def test_cuda_graph_option_is_the_eager_loop_off_cuda():
    model, x, y = _model_and_batch()
    kw = dict(eps=0.1, step_size=0.02, steps=5, init="uniform")
    with attack_mode(model):
        ref = pgd(model, x, y, generator=torch.Generator().manual_seed(3), **kw)
        with engine_options(cuda_graphs=True):
            out = pgd(model, x, y, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(out, ref)
    assert model not in attacks._GRAPHS  # nothing is captured on a CPU


def test_fused_update_matches_and_respects_the_ball():
    model, x, y = _model_and_batch(n=8)
    kw = dict(eps=0.1, step_size=0.03, steps=4, init="uniform")
    with attack_mode(model):
        ref = pgd(model, x, y, generator=torch.Generator().manual_seed(5), **kw)
        with engine_options(fused_update=True):
            out = pgd(model, x, y, generator=torch.Generator().manual_seed(5), **kw)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert (out - x).abs().max() <= 0.1 + 1e-6 and out.min() >= 0 and out.max() <= 1


def test_fp16_attack_scales_the_loss_so_small_gradients_still_move_the_point():
    model, x, y = _model_and_batch(n=8)
    with attack_mode(model), torch.autocast("cpu", dtype=torch.float16):
        assert attacks._grad_scale() == 1024.0
        x_adv = pgd(model, x, y, eps=0.1, step_size=0.02, steps=3, init="none")
    assert attacks._grad_scale() == 1.0
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    assert (x_adv != x).float().mean() > 0.5  # most pixels took a sign step


def test_fp16_training_runs_and_resumes_exactly(tmp_path):
    # fp16 is emulated (slowly) on a CPU: one epoch, interrupted in its middle.
    sets = {"train.epochs": 1, "train.batch_size": 64, "train.precision": "fp16", "train.method": "trades"}
    reference = fit(tiny_config(tmp_path / "a", **sets))
    assert math.isfinite(reference.history[-1]["train_loss"])
    assert all(v.dtype == torch.float32 for v in _weights(reference.checkpoint).values() if v.is_floating_point())
    flag, on_event = _interrupt_at(lambda kind, p: kind == "batch" and p["epoch"] == 1 and p["batch"] == 10)
    with pytest.raises(TrainingInterrupted):
        fit(tiny_config(tmp_path / "b", **sets), on_event=on_event, interrupt=flag)
    resumed = fit(None, resume=tmp_path / "b" / "run")  # the gradient scaler's state comes back too
    a, b = _weights(reference.run_dir / "last.safetensors"), _weights(resumed.run_dir / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _rows(reference.run_dir) == _rows(resumed.run_dir)


def _poison(monkeypatch, bad_calls):
    real = losses.LOSSES["standard"]
    calls = {"n": 0}

    def poisoned(model, x, y, c, **kw):
        loss, stats = real(model, x, y, c, **kw)
        calls["n"] += 1
        return (loss * math.nan if calls["n"] in bad_calls else loss), stats

    monkeypatch.setitem(losses.LOSSES, "standard", poisoned)
    monkeypatch.setattr(train, "LOSSES", losses.LOSSES)


def test_nan_policy_skip_batch_skips_only_the_bad_batches(tmp_path, monkeypatch):
    _poison(monkeypatch, {3, 14})  # batch 3 of epoch 1, batch 3 of epoch 2 (11 batches an epoch)
    result = fit(tiny_config(tmp_path, **{"train.method": "standard", "train.nan_policy": "skip-batch"}))
    rows = result.history
    assert [r.get("skipped_batches") for r in rows] == [1, 1]
    assert all(math.isfinite(r["train_loss"]) for r in rows)
    weights = ckpt.load(result.run_dir / "last.safetensors").model.state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_nan_policy_skip_batch_still_stops_when_a_whole_epoch_is_bad(tmp_path, monkeypatch):
    _poison(monkeypatch, set(range(12, 23)))  # every batch of epoch 2
    with pytest.raises(WeatRunError, match="every batch of epoch 2"):
        fit(tiny_config(tmp_path, **{"train.method": "standard", "train.nan_policy": "skip-batch"}))
    assert ckpt.load(tmp_path / "run" / "last.safetensors").epoch == 1


def test_nan_policy_stop_names_epoch_and_batch(tmp_path, monkeypatch):
    _poison(monkeypatch, {5})
    with pytest.raises(WeatRunError, match=r"non-finite loss at epoch 1 batch 5 "):
        fit(tiny_config(tmp_path, **{"train.method": "standard"}))


def test_compiled_training_computes_what_eager_training_computes(tmp_path):
    """--compile (inductor on the CPU): the same run up to float rounding, which the PGD sign steps
    turn into slightly different adversarial points; checkpoints hold the plain model's keys."""
    sets = {"train.epochs": 1, "train.batch_size": 64, "train.method": "trades"}
    eager = fit(tiny_config(tmp_path / "eager", **sets)).history[-1]
    compiled = fit(tiny_config(tmp_path / "compiled", **sets, **{"train.compile": True}))
    row = compiled.history[-1]
    assert row["train_loss"] == pytest.approx(eager["train_loss"], rel=0.01)
    for key in ("train_accuracy", "clean_accuracy", "robust_accuracy"):
        assert abs(row[key] - eager[key]) <= 0.1, key
    assert _weights(compiled.checkpoint).keys() == _weights(tmp_path / "eager" / "run" / "model.safetensors").keys()


@pytest.mark.parametrize("arch", ["small-cnn", "resnet18", "wrn-28-10"])
def test_mixed_precision_keeps_the_stem_and_the_classifier_in_fp32(arch):
    from weatcli.models import keep_ends_in_fp32, unwrap

    torch.manual_seed(0)
    model = build(arch, num_classes=10, in_channels=3, image_size=32, mean=(0.5,), std=(0.25,)).eval()
    x = torch.rand(2, 3, 32, 32)
    keys = list(model.state_dict())
    with torch.no_grad():
        before = model(x)
        keep_ends_in_fp32(model)
        assert list(model.state_dict()) == keys  # same checkpoint format
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)  # outside autocast: nothing changes
        seen = {}
        stem = next(m for m in unwrap(model).modules() if isinstance(m, torch.nn.Conv2d))
        stem.register_forward_hook(lambda m, i, o: seen.update(stem=o.dtype))  # returns None: output kept
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
    assert seen["stem"] == torch.float32 and logits.dtype == torch.float32
