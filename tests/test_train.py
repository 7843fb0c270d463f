from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_config
from weatcli import checkpoint as ckpt
from weatcli import losses, train
from weatcli.config import resolve
from weatcli.errors import WeatInputError, WeatRunError
from weatcli.phases import EnergySelection
from weatcli.train import Interrupt, TrainingInterrupted, fit, lr_at

ROW_KEYS = {"epoch", "lr", "train_loss", "clean_accuracy", "robust_accuracy", "energy_natural", "energy_adversarial",
            "delta_energy", "joint_natural", "joint_adversarial", "delta_joint", "seconds"}


def _weights(path):
    tensors, _ = ckpt.read(path)
    return tensors


def _rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


@pytest.mark.parametrize("steps", [10, 97, 400])
def test_onecycle_matches_torch(steps):
    cfg = resolve(preset="cifar10-weat-adv")
    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([param], lr=cfg.train.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.train.lr, total_steps=steps, pct_start=0.25,
                                                anneal_strategy="cos", cycle_momentum=False)
    ours = []
    for s in range(steps):
        ours.append(lr_at(s, steps, cfg))
        assert ours[-1] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
        opt.step()
        sched.step()
    assert 0.098 < max(ours) <= 0.1 + 1e-12  # the peak lands on a step only when pct_start * steps is whole


def test_other_schedules():
    cosine = resolve(sets=["train.schedule='cosine'"])
    assert lr_at(0, 100, cosine) == cosine.train.lr and lr_at(50, 100, cosine) == pytest.approx(cosine.train.lr / 2)
    multi = resolve(sets=["train.schedule='multistep'", "train.milestones=[0.5, 0.75]", "train.gamma=0.1"])
    lr = multi.train.lr
    assert [lr_at(s, 100, multi) for s in (0, 49, 50, 75)] == pytest.approx([lr, lr, lr / 10, lr / 100])


def test_fit_writes_a_complete_run_directory(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.epochs": 2})
    events = []
    result = fit(cfg, on_event=lambda kind, p: events.append(kind))
    run = tmp_path / "run"
    assert result.run_dir == run and result.checkpoint == run / "model.safetensors"
    assert {p.name for p in run.iterdir()} >= {"model.safetensors", "last.safetensors", "metrics.jsonl", "config.toml"}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and ROW_KEYS <= set(rows[0])
    for r in rows:
        assert r["delta_energy"] == pytest.approx(r["energy_natural"] - r["energy_adversarial"], abs=1e-5)
        assert 0 <= r["robust_accuracy"] <= r["clean_accuracy"] + 1e-9 <= 1 + 1e-9
    loaded = ckpt.load(result.checkpoint)
    assert loaded.config == cfg and loaded.epoch == result.best_epoch
    assert loaded.metrics["robust_accuracy"] == result.robust_accuracy == max(r["robust_accuracy"] for r in rows)
    assert (run / "config.toml").read_text() == cfg.to_toml()
    assert events[0] == "start" and events.count("epoch") == 2 and "batch" in events


def test_standard_training_learns_digits(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.method": "standard", "train.epochs": 3, "train.batch_size": 64, "train.eval_n": 360})
    result = fit(cfg)
    assert result.clean_accuracy > 0.85


def test_select_last_saves_the_final_epoch(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.select": "last", "train.epochs": 2})
    fit(cfg)
    assert ckpt.load(tmp_path / "run" / "model.safetensors").epoch == 2


def _interrupt_at(when):
    flag = Interrupt()

    def on_event(kind, p):
        if when(kind, p):
            flag.requested = True

    return flag, on_event


@pytest.mark.parametrize(
    "when",
    [
        lambda kind, p: kind == "batch" and p["epoch"] == 2 and p["batch"] == 10,  # mid-epoch
        lambda kind, p: kind == "epoch" and p["row"]["epoch"] == 1,  # right after an epoch ends
    ],
    ids=["mid-epoch", "epoch-boundary"],
)
def test_interrupted_and_resumed_run_equals_uninterrupted_bit_for_bit(tmp_path, when):
    sets = {"train.epochs": 3, "train.batch_size": 64, "train.method": "trades"}
    reference = fit(tiny_config(tmp_path / "a", **sets))

    flag, on_event = _interrupt_at(when)
    with pytest.raises(TrainingInterrupted):
        fit(tiny_config(tmp_path / "b", **sets), on_event=on_event, interrupt=flag)
    resumed = fit(None, resume=tmp_path / "b" / "run")  # config comes from the run directory

    for name in ("model.safetensors", "last.safetensors"):
        a, b = _weights(reference.run_dir / name), _weights(resumed.run_dir / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    assert _rows(reference.run_dir) == _rows(resumed.run_dir)
    assert resumed.best_epoch == reference.best_epoch


def test_existing_run_is_never_overwritten(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.epochs": 1})
    fit(cfg)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    with pytest.raises(WeatInputError, match="already holds a run"):
        fit(cfg)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


def test_resume_errors(tmp_path):
    with pytest.raises(WeatInputError, match="not found"):
        fit(None, resume=tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "last.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(WeatInputError, match="not a readable safetensors"):
        fit(None, resume=tmp_path / "bad")


def test_second_process_on_the_same_run_directory_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with train._RunLock(run):
        with pytest.raises(WeatInputError, match="in use"):
            with train._RunLock(run):
                pass


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, **{"train.epochs": 2, "train.method": "standard"})
    real = losses.LOSSES["standard"]
    calls = {"n": 0}

    def poisoned(model, x, y, c, **kw):
        loss, stats = real(model, x, y, c, **kw)
        calls["n"] += 1
        return (loss * math.nan if calls["n"] > 11 else loss), stats  # epoch 2 goes bad

    monkeypatch.setitem(losses.LOSSES, "standard", poisoned)
    monkeypatch.setattr(train, "LOSSES", losses.LOSSES)
    with pytest.raises(WeatRunError, match="non-finite loss at epoch 2"):
        fit(cfg)
    kept = ckpt.load(tmp_path / "run" / "last.safetensors")
    assert kept.epoch == 1 and all(torch.isfinite(v).all() for v in kept.model.state_dict().values() if v.is_floating_point())


def test_bf16_autocast_path_runs_on_cpu(tmp_path):
    result = fit(tiny_config(tmp_path, **{"train.epochs": 1, "train.precision": "bf16"}))
    assert 0 <= result.robust_accuracy <= 1
    assert all(v.dtype == torch.float32 for k, v in _weights(result.checkpoint).items() if v.is_floating_point())


def test_cifar10_format_directory_trains(tmp_path, cifar10_root):
    cfg = resolve(overrides={"data.dataset": "cifar10", "train.method": "weat-adv", "data.data_dir": str(cifar10_root),
                             "model.arch": "small-cnn", "train.epochs": 1, "train.batch_size": 25,
                             "train.out": str(tmp_path / "run"), "train.device": "cpu"},
                  sets=["attack.steps=1", "attack.eval_steps=1", "train.eval_n=20", "train.energy_n=20"])
    result = fit(cfg)
    loaded = ckpt.load(result.checkpoint)
    assert (loaded.in_channels, loaded.image_size, loaded.num_classes) == (3, 32, 10)
    assert loaded.metadata["dataset"] == "cifar10" and loaded.metadata["method"] == "weat-adv"


def test_missing_dataset_is_bad_input(tmp_path):
    cfg = resolve(overrides={"data.dataset": "cifar10", "data.data_dir": str(tmp_path), "train.out": str(tmp_path / "run")})
    with pytest.raises(WeatInputError, match="cifar-10-batches-py"):
        fit(cfg)
    assert not (tmp_path / "run").exists()


def test_select_energy_holds_the_epoch_before_phase_3(tmp_path, monkeypatch):
    # Phase 3 "detected" once 3 epochs exist, starting at epoch 3: the model must be epoch 2's.
    monkeypatch.setattr(train, "energy_selection",
                        lambda rows: EnergySelection(2, "phase3") if len(rows) >= 3 else EnergySelection(None, None))
    monkeypatch.setattr(train, "SNAPSHOTS", 2)
    result = fit(tiny_config(tmp_path, **{"train.epochs": 4, "train.select": "energy"}))
    run = tmp_path / "run"
    assert result.best_epoch == 2 and ckpt.load(run / "model.safetensors").epoch == 2
    snap = _weights(run / "model.safetensors")
    # The held checkpoint is epoch 2's weights, not a later epoch's.
    assert not all(torch.equal(snap[k], v) for k, v in _weights(run / "last.safetensors").items() if k in snap)
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == ["epoch-0003.safetensors", "epoch-0004.safetensors"]


def test_select_energy_without_phase_3_keeps_the_latest_epoch(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "energy_selection", lambda rows: EnergySelection(None, None))
    result = fit(tiny_config(tmp_path, **{"train.epochs": 2, "train.select": "energy"}))
    assert result.best_epoch == 2 and ckpt.load(result.checkpoint).epoch == 2


def test_select_energy_holds_through_catastrophic_overfitting_and_follows_a_recovery(tmp_path, monkeypatch):
    """CO "flagged" at epoch 3 (hold epoch 2) and recovered from at epoch 5: epoch 2's weights are
    held while the selection says so, longer than the snapshot ring, then the latest epoch again."""
    seen: dict[int, int] = {}

    def selection(rows):
        return EnergySelection(2, "co") if 3 <= len(rows) < 5 else EnergySelection(None, None)

    def spy(run, progress, *, row):
        real_select(run, progress, row=row)
        seen[row["epoch"]] = ckpt.load(run.run_dir / "model.safetensors").epoch

    real_select = train._select_and_save
    monkeypatch.setattr(train, "energy_selection", selection)
    monkeypatch.setattr(train, "SNAPSHOTS", 2)  # at epoch 4 the ring (3, 4) no longer has epoch 2
    monkeypatch.setattr(train, "_select_and_save", spy)
    result = fit(tiny_config(tmp_path, **{"train.epochs": 6, "train.select": "energy"}))
    assert seen == {1: 1, 2: 2, 3: 2, 4: 2, 5: 5, 6: 6}
    assert result.best_epoch == 6


def test_restored_momentum_takes_its_weights_memory_layout():
    """Resume with channels_last weights and fused SGD (the CUDA default): the momentum buffers
    come back in the weights' layout, so the resumed step equals the uninterrupted one."""
    from weatcli import train as train_mod

    def model_and_opt():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3),
                                torch.nn.Flatten(), torch.nn.LazyLinear(2))
        m(torch.zeros(1, 3, 8, 8))
        m = m.to(memory_format=torch.channels_last)
        return m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, fused=True)

    x = torch.rand(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 0, 1])

    def step(m, opt):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()

    ref, ref_opt = model_and_opt()
    for _ in range(3):
        step(ref, ref_opt)
    resumed, opt = model_and_opt()
    for _ in range(2):
        step(resumed, opt)
    saved = train_mod._optimizer_tensors(opt)
    weights = {k: v.clone() for k, v in resumed.state_dict().items()}
    resumed, opt = model_and_opt()
    resumed.load_state_dict(weights)
    train_mod._restore_optimizer(opt, saved, "cpu")
    step(resumed, opt)
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
def test_metrics_carry_training_attack_accuracy_and_der(tmp_path):
    """metrics.jsonl: accuracy under the training attack on the energy subset (every method), and
    the mean DER term when train.der_weight > 0 and the mean energy anchor term when train.der_anchor
    > 0; the summary names phase 3 and CO (None here)."""
    result = fit(tiny_config(tmp_path, **{"train.epochs": 1, "train.method": "fgsm-rs", "train.der_weight": 1.0,
                                          "train.der_anchor": 0.001}))
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 <= row["train_attack_accuracy"] <= 1 and row["der"] > 0 and math.isfinite(row["der"])
    # mean E(x)^2 + mean E(x*)^2 over the epoch's batches: positive (E is near -log(10) for a fresh 10-class net)
    assert row["energy_anchor"] > 0 and math.isfinite(row["energy_anchor"])
    summary = result.summary()
    assert summary["catastrophic_overfitting_epoch"] is None and summary["phase3_epoch"] is None
    plain = fit(tiny_config(tmp_path / "plain", **{"train.epochs": 1, "train.method": "fgsm-rs"}))
    assert "der" not in plain.history[0] and "energy_anchor" not in plain.history[0]
    assert "train_attack_accuracy" in plain.history[0]


def test_summary_reports_catastrophic_overfitting_from_the_history(tmp_path):
    delta = [-0.1 * min(e, 8) for e in range(1, 13)] + [2.0, 2.1, 2.0]  # a plateau, then a break at epoch 13
    history = [{"epoch": e, "delta_energy": d, "robust_accuracy": 0.5} for e, d in enumerate(delta, 1)]
    result = train.FitResult(checkpoint=tmp_path / "m", run_dir=tmp_path, clean_accuracy=0.9, robust_accuracy=0.5,
                             epochs=15, best_epoch=1, seconds=1.0, history=history)
    assert result.summary()["catastrophic_overfitting_epoch"] == 13


def test_select_energy_holds_its_stand_in_when_detection_lagged_beyond_the_snapshots(tmp_path, monkeypatch):
    """CO "flagged" late: the epoch to hold (1) has left the ring, so the oldest snapshot kept (3)
    stands in, and it stays held - it does not move along with the ring."""
    seen: dict[int, int] = {}

    def spy(run, progress, *, row):
        real_select(run, progress, row=row)
        seen[row["epoch"]] = ckpt.load(run.run_dir / "model.safetensors").epoch

    real_select = train._select_and_save
    monkeypatch.setattr(train, "energy_selection",
                        lambda rows: EnergySelection(1, "co") if len(rows) >= 4 else EnergySelection(None, None))
    monkeypatch.setattr(train, "SNAPSHOTS", 2)
    monkeypatch.setattr(train, "_select_and_save", spy)
    fit(tiny_config(tmp_path, **{"train.epochs": 5, "train.select": "energy"}))
    assert seen == {1: 1, 2: 2, 3: 3, 4: 3, 5: 3}
