"""Every bad input gets exit code 2 and one clear line (issue #7).

A corpus of broken files and bad options across every command. Each case runs `weat` in-process
inside its own directory (which also holds a valid checkpoint) and asserts the CLI contract:
exit code 2, stderr exactly one non-empty line naming the offending input and what was expected,
no traceback anywhere, nothing on stdout, no pre-existing file touched (mtime and sha256 of
every file in the directory, the bad inputs and the valid checkpoint included) and nothing left behind.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from conftest import run_cli, tiny_config, write_cifar10
from weatcli import scoring
from weatcli import train as train_mod


@pytest.fixture(scope="session")
def valid_checkpoint(tmp_path_factory) -> Path:
    """An untrained small-cnn digits checkpoint in the real format: valid input, made in milliseconds."""
    from weatcli import checkpoint as ckpt
    from weatcli.models import build

    cfg = tiny_config()
    model = build(cfg.model.arch, num_classes=10, in_channels=1, image_size=16, mean=cfg.model.mean, std=cfg.model.std)
    path = tmp_path_factory.mktemp("valid") / "model.safetensors"
    ckpt.save(path, ckpt.state_dict_of(model),
              ckpt.model_metadata(cfg, num_classes=10, in_channels=1, image_size=16, epoch=1))
    return path


# ----------------------------------------------------------------------------- bad files


def _read_st(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _write_st(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    return path


def _edited_checkpoint(d: Path, ckpt: Path, name: str, *, meta: Callable[[dict], None] | None = None,
                       config: Callable[[dict], None] | None = None,
                       tensors: Callable[[dict], None] | None = None) -> str:
    """A copy of the valid checkpoint with its metadata, stored config or tensors edited."""
    t, m = _read_st(ckpt)
    if config is not None:
        cfg = json.loads(m["config"])
        config(cfg)
        m["config"] = json.dumps(cfg)
    if meta is not None:
        meta(m)
    if tensors is not None:
        tensors(t)
    return str(_write_st(d / name, t, m))


def _truncated(d: Path, ckpt: Path) -> str:
    data = ckpt.read_bytes()
    (d / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    return str(d / "truncated.safetensors")


def _random_bytes(d: Path, name: str = "random.safetensors", size: int = 4096) -> str:
    (d / name).write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    return str(d / name)


def _empty(d: Path, name: str) -> str:
    (d / name).write_bytes(b"")
    return str(d / name)


def _preset(d: Path, text: str, name: str = "bad.toml") -> str:
    (d / name).write_text(text)
    return str(d / name)


def _cifar_with(d: Path, corrupt: Callable[[Path], None]) -> str:
    """A cifar-10-batches-py tree (tiny) whose data_batch_2 is then corrupted."""
    root = write_cifar10(d / "cifar", per_batch=4, test=4)
    corrupt(root / "cifar-10-batches-py" / "data_batch_2")
    return str(root)


def _truncate_file(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _pickle_to(obj: object) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        with open(path, "wb") as f:
            pickle.dump(obj, f)

    return write


class _OpensAFile:
    """A pickle payload: unpickling it would create `marker` (open(marker, "w"))."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _svhn_missing_y(d: Path) -> str:
    import scipy.io

    root = d / "svhn"
    root.mkdir()
    x = np.zeros((32, 32, 3, 4), np.uint8)
    for split in ("train", "test"):
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x})
    return str(root)


def _svhn_garbage(d: Path) -> str:
    root = d / "svhn"
    root.mkdir()
    for split in ("train", "test"):
        _random_bytes(root, f"{split}_32x32.mat", 512)
    return str(root)


def _npz(d: Path, name: str = "data.npz", **arrays: np.ndarray) -> str:
    np.savez(d / name, **arrays)
    return str(d / name)


def _images(shape: tuple[int, ...], dtype=np.uint8) -> np.ndarray:
    return np.zeros(shape, dtype)


def _labels(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64) % 2


def _not_a_run(d: Path) -> str:
    (d / "notarun").mkdir()
    (d / "notarun" / "notes.txt").write_text("hello\n")
    return str(d / "notarun")


def _state_of_another_evaluation(d: Path, ckpt: str) -> str:
    """A --state file written by a real (tiny) `weat attack` at eps 0.1."""
    from weatcli import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["attack", ckpt, "--n", "8", "--steps", "1", "--eps", "0.1", "--state", str(d / "state.safetensors"),
                  "--json"])
    assert e.value.code == 0
    return str(d / "state.safetensors")


def _samples_st(d: Path, tensor: torch.Tensor) -> str:
    return str(_write_st(d / "samples.safetensors", {"samples": tensor}, {"format": "weat-samples/1"}))


# ----------------------------------------------------------------------------- the corpus

# Each case: (d, ckpt) -> (argv, needles). `d` is the test's own directory (also the working
# directory); `ckpt` the valid checkpoint copied into it. Every needle must appear in the one
# error line: the offending input (path or option) and what was expected.
Case = Callable[[Path, str], tuple[list[str], list[str]]]


def _case(case_id: str, make: Case, *marks) -> object:
    return pytest.param(make, id=case_id, marks=marks)




CASES = [
    # --- checkpoints
    _case("attack-truncated-safetensors",
          lambda d, c: (["attack", p := _truncated(d, Path(c))], [p, "safetensors"])),
    _case("energy-stats-random-bytes-safetensors",
          lambda d, c: (["energy", "stats", p := _random_bytes(d)], [p, "safetensors"])),
    _case("sample-safetensors-without-weat-metadata",
          lambda d, c: (["sample", p := str(_write_st(d / "plain.safetensors", {"w": torch.zeros(3)}, None)),
                         "--device", "cpu"], [p, "weat/1"])),
    _case("energy-trades-unknown-architecture",
          lambda d, c: (["energy", "trades", p := _edited_checkpoint(
              d, Path(c), "arch.safetensors", meta=lambda m: m.update(arch="resnet99"),
              config=lambda cfg: cfg["model"].update(arch="resnet99")), "--device", "cpu"], [p, "resnet99", "small-cnn"])),
    _case("attack-tensor-of-wrong-shape",
          lambda d, c: (["attack", p := _edited_checkpoint(
              d, Path(c), "shape.safetensors",
              tensors=lambda t: t.update({min(k for k in t if k.endswith("weight")): torch.zeros(3, 3)})),
              "--device", "cpu"], [p, "shape", "expects"])),
    _case("attack-missing-tensors",
          lambda d, c: (["attack", p := _edited_checkpoint(
              d, Path(c), "missing.safetensors", tensors=lambda t: t.pop(sorted(t)[0])), "--device", "cpu"], [p, "missing"])),
    _case("score-features-stored-config-invalid",
          lambda d, c: (["score", _npz(d, images=_images((4, 16, 16, 1))), "--features", p := _edited_checkpoint(
              d, Path(c), "cfg.safetensors", config=lambda cfg: cfg["attack"].update(eps=5.0)), "--device", "cpu",
              "--metrics", "is"], [p, "attack.eps"])),
    _case("attack-config-not-json",
          lambda d, c: (["attack", p := _edited_checkpoint(
              d, Path(c), "json.safetensors", meta=lambda m: m.update(config="{not json")), "--device", "cpu"], [p, "config"])),
    _case("sample-num-classes-not-a-number",
          lambda d, c: (["sample", p := _edited_checkpoint(
              d, Path(c), "classes.safetensors", meta=lambda m: m.update(num_classes="ten")), "--device", "cpu"],
              [p, "num_classes"])),
    _case("attack-missing-checkpoint",
          lambda d, c: (["attack", p := str(d / "nope.safetensors")], [p, "not found"])),
    _case("energy-stats-directory-as-checkpoint",
          lambda d, c: (["energy", "stats", str(d)], [str(d), "directory"])),
    _case("sample-empty-checkpoint-file",
          lambda d, c: (["sample", p := _empty(d, "empty.safetensors"), "--device", "cpu"], [p, "safetensors"])),
    _case("score-features-random-bytes",
          lambda d, c: (["score", _npz(d, images=_images((4, 16, 16, 1))), "--features", p := _random_bytes(d),
                         "--device", "cpu", "--metrics", "is"], [p, "safetensors"])),
    # --- presets
    _case("presets-show-wrong-type",
          lambda d, c: (["presets", "show", p := _preset(d, "[train]\nepochs = \"many\"\n")], [p, "train.epochs"])),
    _case("presets-show-unknown-key",
          lambda d, c: (["presets", "show", p := _preset(d, "[train]\nepohcs = 3\n")], [p, "train.epohcs"])),
    _case("presets-show-toml-syntax-error",
          lambda d, c: (["presets", "show", p := _preset(d, "[train\nepochs = 3\n")], [p, "TOML"])),
    _case("train-preset-unknown-section",
          lambda d, c: (["train", "--preset", p := _preset(d, "[optimizer]\nlr = 0.1\n")], [p, "optimizer"])),
    _case("presets-show-directory",
          lambda d, c: (["presets", "show", str(d)], [str(d), "directory"])),
    _case("presets-show-binary-file",
          lambda d, c: (["presets", "show", p := _random_bytes(d, "binary.toml")], [p, "TOML"])),
    # --- options
    _case("train-eps-not-a-number", lambda d, c: (["train", "--eps", "abc"], ["attack.eps", "abc"])),
    _case("train-eps-division-by-zero", lambda d, c: (["train", "--eps", "8/0"], ["attack.eps", "8/0"])),
    _case("train-eps-above-one", lambda d, c: (["train", "--eps", "2"], ["attack.eps", "(0, 1]"])),
    _case("train-negative-attack-steps",
          lambda d, c: (["train", "--set", "attack.steps=-2"], ["attack.steps", "-2"])),
    _case("train-negative-epochs", lambda d, c: (["train", "--epochs", "-3"], ["train.epochs", "-3"])),
    _case("train-unknown-method", lambda d, c: (["train", "--method", "fgsm-xyz"], ["train.method", "fgsm-xyz"])),
    _case("train-unknown-dataset", lambda d, c: (["train", "--dataset", "mnist"], ["data.dataset", "mnist"])),
    _case("attack-unknown-attack", lambda d, c: (["attack", c, "--attack", "deepfool"], ["--attack", "deepfool"])),
    _case("attack-negative-steps", lambda d, c: (["attack", c, "--steps", "-5"], ["--steps", "-5"])),
    _case("attack-eps-not-a-number", lambda d, c: (["attack", c, "--eps", "abc"], ["--eps", "abc"])),
    _case("attack-unknown-dataset", lambda d, c: (["attack", c, "--dataset", "imagenet"], ["dataset", "imagenet"])),
    _case("energy-stats-negative-n", lambda d, c: (["energy", "stats", c, "--n", "-5"], ["--n", "-5"])),
    _case("energy-compare-unknown-attack",
          lambda d, c: (["energy", "compare", c, "--out", str(d / "cmp.png"), "--attack", "nope"], ["--attack", "nope"])),
    _case("energy-trades-eps-division-by-zero",
          lambda d, c: (["energy", "trades", c, "--eps", "8/0", "--device", "cpu"], ["--eps", "8/0"])),
    _case("energy-plot-unknown-figure-format",
          lambda d, c: (["energy", "plot", c, "--out", p := str(d / "plot.txt"), "--n", "8"], [p, ".png"])),
    _case("energy-plot-run-dir-that-is-not-a-run",
          lambda d, c: (["energy", "plot", p := _not_a_run(d), "--out", str(d / "dyn.png")], [p, "metrics.jsonl"])),
    _case("sample-classes-out-of-range",
          lambda d, c: (["sample", c, "--classes", "3,12", "--device", "cpu"], ["--classes", "12"])),
    _case("sample-negative-n", lambda d, c: (["sample", c, "--n", "-4", "--device", "cpu"], ["--n", "-4"])),
    _case("sample-out-is-a-directory",
          lambda d, c: (["sample", c, "--out", str(d), "--device", "cpu"], ["--out", str(d)])),
    _case("attack-save-adv-is-a-directory",
          lambda d, c: (["attack", c, "--save-adv", str(d)], ["--save-adv", str(d)])),
    _case("attack-state-file-random-bytes",
          lambda d, c: (["attack", c, "--n", "8", "--state", p := _random_bytes(d, "state.safetensors")], [p, "safetensors"])),
    _case("attack-state-file-of-another-evaluation",
          lambda d, c: (["attack", c, "--n", "8", "--steps", "1", "--eps", "0.2",
                         "--state", p := _state_of_another_evaluation(d, c)], ["--state", p, "eps"])),
    _case("energy-trades-unknown-device",
          lambda d, c: (["energy", "trades", c, "--n", "8", "--device", "gpu"], ["--device", "gpu"])),
    _case("energy-trades-zero-batch-size",
          lambda d, c: (["energy", "trades", c, "--n", "8", "--batch-size", "0"], ["--batch-size", "0"])),
    _case("energy-compare-out-is-a-directory",
          lambda d, c: (["energy", "compare", c, "--out", str(d), "--n", "8"], ["--out", str(d)])),
    _case("score-negative-n",
          lambda d, c: (["score", _npz(d, images=_images((4, 16, 16, 1))), "--n", "-1"], ["--n", "-1"])),
    _case("score-unknown-metric",
          lambda d, c: (["score", _npz(d, images=_images((4, 16, 16, 1))), "--metrics", "fid,lpips"], ["--metrics", "lpips"])),
    _case("score-unknown-reference-dataset",
          lambda d, c: (["score", _npz(d, images=_images((4, 16, 16, 1))), "--features", c, "--ref", "celeba",
                         "--device", "cpu"], ["--ref", "celeba"])),
    # --- datasets
    _case("train-corrupted-cifar-pickle",
          lambda d, c: (["train", "--dataset", "cifar10", "--data-dir", _cifar_with(d, _truncate_file),
                         "--out", str(d / "run")], ["data_batch_2", "CIFAR"])),
    _case("attack-cifar-pickle-of-wrong-content",
          lambda d, c: (["attack", c, "--dataset", "cifar10", "--data-dir", _cifar_with(d, _pickle_to([1, 2, 3]))],
                        ["data_batch_2", "CIFAR"])),
    _case("train-cifar-pickle-data-of-wrong-shape",
          lambda d, c: (["train", "--dataset", "cifar10", "--out", str(d / "run"), "--data-dir", _cifar_with(
              d, _pickle_to({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}))],
              ["data_batch_2", "(N, 3072)"])),
    _case("train-cifar-pickle-that-would-run-code",  # the marker it would create is caught as a file left behind
          lambda d, c: (["train", "--dataset", "cifar10", "--out", str(d / "run"), "--data-dir", _cifar_with(
              d, _pickle_to({b"data": _OpensAFile(d / "pwned"), b"labels": [0, 1, 2, 3]}))],
              ["data_batch_2", "refers to io.open", "never runs code"])),
    _case("train-svhn-mat-missing-keys",
          lambda d, c: (["train", "--dataset", "svhn", "--data-dir", _svhn_missing_y(d), "--out", str(d / "run")],
                        ["train_32x32.mat", "'y'"])),
    _case("train-svhn-mat-garbage",
          lambda d, c: (["train", "--dataset", "svhn", "--data-dir", _svhn_garbage(d), "--out", str(d / "run")],
                        ["train_32x32.mat", "SVHN"])),
    _case("attack-npz-wrong-dtype",
          lambda d, c: (["attack", c, "--dataset", "npz:" + (p := _npz(d, image=_images((8, 16, 16, 1), np.float32),
                                                                       label=_labels(8)))], [p, "uint8"])),
    _case("train-npz-wrong-shape",
          lambda d, c: (["train", "--dataset", "npz:" + (p := _npz(d, image=_images((8, 3, 16, 16)), label=_labels(8))),
                         "--out", str(d / "run")], [p, "(N, H, W, C)"])),
    _case("train-npz-missing-keys",
          lambda d, c: (["train", "--dataset", "npz:" + (p := _npz(d, x_train=_images((8, 16, 16, 1)), y_train=_labels(8))),
                         "--out", str(d / "run")], [p, "x_test"])),
    _case("attack-npz-is-a-directory",
          lambda d, c: (["attack", c, "--dataset", f"npz:{d}"], [str(d), "directory"])),
    _case("train-npz-empty-file",
          lambda d, c: (["train", "--dataset", "npz:" + (p := _empty(d, "empty.npz")), "--out", str(d / "run")], [p, ".npz"])),
    # --- samples for `weat score`
    _case("score-samples-wrong-shape",
          lambda d, c: (["score", p := _samples_st(d, torch.zeros(4, 16, dtype=torch.uint8)), "--features", c,
                         "--device", "cpu"], [p, "(N, C, H, W)"])),
    _case("score-samples-wrong-channels",
          lambda d, c: (["score", p := _npz(d, samples=_images((4, 5, 8, 8))), "--features", c, "--device", "cpu"],
                        [p, "channels"])),
    _case("score-samples-random-bytes",
          lambda d, c: (["score", p := _random_bytes(d, "samples.safetensors"), "--device", "cpu"], [p, "safetensors"])),
    _case("score-samples-empty-npz",
          lambda d, c: (["score", p := _empty(d, "samples.npz"), "--device", "cpu"], [p, ".npz"])),
    _case("score-samples-folder-without-images",
          lambda d, c: (["score", _not_a_run(d), "--device", "cpu"], ["notarun", "image"])),
    _case("score-samples-shape-mismatch-with-features",
          lambda d, c: (["score", p := _npz(d, samples=_images((4, 32, 32, 3))), "--features", c, "--device", "cpu",
                         "--metrics", "is"], ["--features", "1x16x16", "3x32x32", p])),
    # --- resume
    _case("train-resume-directory-that-is-not-a-run",
          lambda d, c: (["train", "--resume", p := _not_a_run(d)], ["--resume", p, "last.safetensors"])),
    _case("train-resume-model-without-resume-state",
          lambda d, c: (["train", "--resume", c], ["--resume", c, "resume state"])),
]


# ----------------------------------------------------------------------------- the contract

# How a line says what was expected: ours ("...; expected X"), and pydantic's and the config
# validators' ("Input should be ...", "eps must be ...").
EXPECTATIONS = ("expected", "expects", "should be", "must be")


def _snapshot(root: Path) -> dict[str, tuple[int, str] | str]:
    """Everything under root (hidden entries too): a file's relative path -> (mtime_ns, sha256),
    a directory's -> "dir"."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            if p.is_file() else "dir" for p in sorted(root.rglob("*"))}


@pytest.fixture
def workdir(tmp_path, valid_checkpoint, monkeypatch) -> Path:
    """The test's own directory as the working directory, with the valid checkpoint in it and every
    default location (data, cache, Inception weights) pointed inside it."""
    shutil.copy2(valid_checkpoint, tmp_path / "model.safetensors")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WEAT_DATA_DIR", str(tmp_path / "no-data"))
    monkeypatch.setenv("WEAT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("WEAT_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.delenv("WEAT_DEBUG", raising=False)
    monkeypatch.setattr(scoring, "CLEANFID_DIR", tmp_path / "no-cleanfid")

    def no_training(*args, **kwargs):  # a bad input that slips through must not start a real run
        raise AssertionError("weat train started training despite the bad input")

    monkeypatch.setattr(train_mod, "_fit_locked", no_training, raising=False)
    return tmp_path


@pytest.mark.parametrize("make", CASES)
def test_bad_input_exits_2_with_one_clear_line(make, workdir, capsys):
    argv, needles = make(workdir, str(workdir / "model.safetensors"))
    capsys.readouterr()  # whatever making the bad input printed
    before = _snapshot(workdir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = run_cli(argv, capsys)
    after = _snapshot(workdir)

    lines = err.strip().splitlines()
    assert "Traceback" not in out + err
    assert code == 2, f"exit {code}: {err}"
    assert out == ""
    assert len(lines) == 1 and lines[0].strip(), f"expected one line on stderr, got {lines}"
    line = lines[0]
    assert line.startswith("weat: error: ")
    for needle in needles:
        assert needle in line, f"{needle!r} missing from {line!r}"
    assert any(w in line.lower() for w in EXPECTATIONS), f"no 'expected ...' in {line!r}"
    # Warnings would be more stderr lines in a real run.
    assert not [str(w.message) for w in caught]
    changed = sorted(k for k, v in before.items() if after.get(k) != v)
    assert not changed, f"pre-existing files modified or removed: {changed}"
    created = sorted(set(after) - set(before))
    assert not created, f"bad input left files or directories behind: {created}"


def test_one_line_in_a_real_process_even_for_a_long_path(tmp_path):
    """Outside pytest's capture: no rich wrapping at 80 columns, no Python warnings on stderr."""
    import os
    import subprocess
    import sys

    deep = tmp_path / ("a-rather-long-directory-name-" * 3) / "and-another-one-to-pass-eighty-columns"
    deep.mkdir(parents=True)
    bad = _random_bytes(deep, "model.safetensors")
    env = {k: v for k, v in os.environ.items() if k not in ("WEAT_DEBUG", "COLUMNS")}
    proc = subprocess.run([sys.executable, "-m", "weatcli", "energy", "stats", bad], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and bad in lines[0] and "expected" in lines[0] and len(lines[0]) > 120, proc.stderr
