"""The command-line contract: exit codes, one-line errors, stdout carries results only.

Most tests call `weat`'s entry point in-process and patch the engine, asserting on the config it
received (fastapi-cli style); one runs the real program in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from weatcli import __version__, cli
from weatcli import display as ui
from weatcli import train as train_mod




@pytest.fixture
def captured(monkeypatch, tmp_path):
    """Replace fit() with a recorder that returns a plausible result."""
    seen = {}

    def fake_fit(cfg, *, resume=None, on_event=None, interrupt=None):
        seen["cfg"], seen["resume"] = cfg, resume
        run_dir = tmp_path / "fake-run"
        return train_mod.FitResult(checkpoint=run_dir / "model.safetensors", run_dir=run_dir, clean_accuracy=0.9,
                                   robust_accuracy=0.7, epochs=cfg.train.epochs if cfg else 1, best_epoch=1, seconds=1.0)

    monkeypatch.setattr(train_mod, "fit", fake_fit)
    return seen


def test_help_lists_every_command(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for command in ("train", "attack", "energy", "sample", "score", "presets"):
        assert command in out


def test_version(capsys):
    assert run_cli(["--version"], capsys)[:2] == (0, f"weat {__version__}\n")


def test_presets_list_and_show(capsys):
    code, out, _ = run_cli(["presets", "list", "--json"], capsys)
    listing = json.loads(out)
    assert code == 0 and "digits-weat" in listing and "cifar10-mail-trades" in listing
    code, out, _ = run_cli(["presets", "show", "svhn-weat-adv"], capsys)
    assert code == 0 and 'dataset = "svhn"' in out and "lr = 0.01" in out
    assert run_cli(["presets", "show", "nope"], capsys)[0] == 2


def test_train_without_arguments_is_weat_on_digits(captured, capsys):
    code, out, err = run_cli(["train"], capsys)
    cfg = captured["cfg"]
    assert code == 0 and (cfg.data.dataset, cfg.train.method, cfg.model.arch) == ("digits", "weat-adv", "small-cnn")
    assert out.strip().splitlines()[-1].endswith("model.safetensors")
    assert "selected epoch" in err and "selected epoch" not in out


def test_train_flags_reach_the_engine(captured, capsys):
    code, out, _ = run_cli(["train", "--dataset", "svhn", "--method", "weat", "--epochs", "3", "--eps", "4/255", "--lr", "0.02",
                        "--batch-size", "64", "--seed", "7", "--device", "cpu", "--arch", "preact-resnet18", "--data-dir", "/d",
                        "--out", "/o", "--download", "--set", "train.beta=3", "--json"], capsys)
    cfg = captured["cfg"]
    assert code == 0
    assert (cfg.data.dataset, cfg.train.method, cfg.train.epochs, cfg.train.lr, cfg.train.batch_size) == ("svhn", "weat-adv", 3, 0.02, 64)
    assert cfg.attack.eps == pytest.approx(4 / 255) and cfg.train.seed == 7 and cfg.model.arch == "preact-resnet18"
    assert (cfg.data.data_dir, cfg.train.out, cfg.data.download, cfg.train.beta) == ("/d", "/o", True, 3.0)
    summary = json.loads(out)
    assert set(summary) >= {"checkpoint", "run_dir", "clean_accuracy", "robust_accuracy", "epochs", "seconds"}
    assert summary["catastrophic_overfitting_epoch"] is None and summary["phase3_epoch"] is None  # null: none seen


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["train", "--eps", "abc"], "attack.eps"),
        (["train", "--eps", "8/0"], "attack.eps"),
        (["train", "--eps", "2"], "attack.eps"),
        (["train", "--eps", "-0.1"], "attack.eps"),
        (["train", "--epochs", "-3"], "train.epochs"),
        (["train", "--dataset", "mnist"], "data.dataset"),
        (["train", "--method", "fgsm-xyz"], "train.method"),
        (["train", "--preset", "nope"], "preset"),
        (["train", "--set", "train.nope=1"], "train.nope"),
        (["train", "--set", "oops"], "--set"),
        (["train", "--epochs", "many"], "epochs"),
        (["train", "--no-such-flag"], "no-such-flag"),
        (["attack", "model.safetensors"], "checkpoint: model.safetensors not found"),
        (["sample", "model.safetensors", "--init", "gan"], "checkpoint: model.safetensors not found"),  # its config first
        (["score", "nope.npz"], "SAMPLES: nope.npz not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, needle, captured, capsys):
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and out == ""
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_engine_errors_map_to_exit_codes(monkeypatch, capsys):
    from weatcli.errors import WeatInputError, WeatRunError

    for exc, code in ((WeatInputError("data.dataset: files missing"), 2), (WeatRunError("non-finite loss"), 1)):
        def boom(*a, _exc=exc, **k):
            raise _exc
        monkeypatch.setattr(train_mod, "fit", boom)
        got, out, err = run_cli(["train"], capsys)
        assert got == code and out == "" and str(exc) in err and len(err.strip().splitlines()) == 1


def test_real_bad_inputs_end_to_end(tmp_path, capsys):
    # Missing dataset files: the exact expected files are named.
    code, _, err = run_cli(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "data_batch_1" in err and len(err.strip().splitlines()) == 1
    # Corrupt checkpoint for --resume.
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "last.safetensors").write_bytes(b"garbage")
    code, _, err = run_cli(["train", "--resume", str(tmp_path / "bad")], capsys)
    assert code == 2 and "last.safetensors" in err
    assert (tmp_path / "bad" / "last.safetensors").read_bytes() == b"garbage"


def test_weat_train_subprocess_prints_the_checkpoint_last(tmp_path):
    out_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "weatcli", "train", "--epochs", "1", "--device", "cpu", "--out", str(out_dir),
         "--set", "attack.steps=1", "--set", "attack.eval_steps=1", "--set", "train.eval_n=32", "--set", "train.energy_n=32"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == [str(out_dir / "model.safetensors")]  # stdout: results only
    assert "epoch   1/1" in proc.stderr
    assert Path(proc.stdout.strip()).is_file()
    # A second run into the same directory is refused and changes nothing.
    before = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    again = subprocess.run([sys.executable, "-m", "weatcli", "train", "--epochs", "1", "--out", str(out_dir)],
                           capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()} == before


def _feed_display(method: str, rows: list[dict]) -> None:
    """A TrainDisplay shown `rows` as a run's epochs (the warnings go to stderr)."""
    display = ui.TrainDisplay()
    with display:
        display("start", {"epochs": len(rows), "start_epoch": 0, "method": method, "dataset": "digits",
                          "device": "cpu", "run_dir": "r", "history": []})
        for row in rows:
            display("epoch", {"row": row, "epochs": len(rows), "best_epoch": 1})


def test_train_display_warns_once_when_phase_3_starts(capsys):
    rows = []
    for e in range(1, 61):
        delta = min(e, 5) * 0.1 if e <= 40 else 0.5 - (e - 40) * 0.1  # plateau at 0.5, then a collapse
        rows.append({"epoch": e, "train_loss": 1.0, "clean_accuracy": 0.9, "robust_accuracy": 0.5, "energy_natural": -3.0,
                     "energy_adversarial": -3.0 - delta, "delta_energy": delta, "seconds": 1.0})
    _feed_display("pgd-at", rows)
    err = capsys.readouterr().err
    assert err.count("phase 3") == 1 and "left its plateau at epoch 41:" in err


def test_train_display_warns_once_on_catastrophic_overfitting(capsys):
    rows = []
    for e in range(1, 21):
        delta = -0.1 * min(e, 8) if e < 13 else 2.0 + 0.01 * (e % 3)  # single-step AT breaks at epoch 13
        rows.append({"epoch": e, "train_loss": 1.0, "clean_accuracy": 0.9, "robust_accuracy": 0.5 if e < 13 else 0.0,
                     "energy_natural": -3.0, "energy_adversarial": -3.0 - delta, "delta_energy": delta,
                     "train_attack_accuracy": 0.4 if e < 13 else 0.95, "seconds": 1.0})
    _feed_display("fgsm-rs", rows)
    err = capsys.readouterr().err
    assert err.count("catastrophic overfitting") == 1
    assert "catastrophic overfitting at epoch 13: dE(x) jumped -0.800 -> +2.010" in err
    assert "accuracy under the training attack 40% -> 95%" in err and "--select energy keeps the epoch before it" in err


def test_train_display_says_once_when_training_recovers_from_catastrophic_overfitting(capsys):
    rows = []
    for e in range(1, 31):
        delta = -0.1 * min(e, 8) if e < 13 else 2.0 + 0.01 * (e % 3) if e < 18 else -1.0 - 0.01 * (e % 2)
        joint = -1.0 if e < 13 else 0.5 if e < 18 else -2.0  # the attack fails during CO, works again from 18
        rows.append({"epoch": e, "train_loss": 1.0, "clean_accuracy": 0.9, "robust_accuracy": 0.5, "energy_natural": -3.0,
                     "energy_adversarial": -3.0 - delta, "delta_energy": delta, "delta_joint": joint, "seconds": 1.0})
    _feed_display("fgsm-rs", rows)
    err = capsys.readouterr().err
    assert err.count("catastrophic overfitting at epoch 13") == 1
    assert err.count("recovered") == 1 and "recovered from catastrophic overfitting by epoch 22" in err
