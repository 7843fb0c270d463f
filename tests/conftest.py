"""Shared fixtures: tiny configs and datasets written in their real on-disk formats."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from weatcli import config as config_mod

torch.set_num_threads(2)


def write_cifar10(root: Path, per_batch: int = 20, test: int = 20, seed: int = 0) -> Path:
    """torchvision's CIFAR-10 python-pickle layout: root/cifar-10-batches-py/{data_batch_1..5,test_batch}."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        labels = [int(v) for v in rng.integers(0, 10, n)]
        # Class-dependent brightness so a model can learn something in an epoch.
        x = rng.integers(0, 80, (n, 3, 32, 32)).astype(np.uint8) + (np.array(labels) * 17).astype(np.uint8)[:, None, None, None]
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": x.reshape(n, 3072), b"labels": labels, b"batch_label": name.encode()}, f)
    return root


@pytest.fixture
def cifar10_root(tmp_path) -> Path:
    return write_cifar10(tmp_path / "data")


def tiny_config(tmp_path: Path | None = None, **sets) -> config_mod.RunConfig:
    """The digits preset shrunk to seconds: few epochs, a 2-step attack, small evaluation sets."""
    overrides = {
        "train.epochs": 2, "train.batch_size": 128, "train.eval_n": 64, "train.energy_n": 64,
        "attack.steps": 2, "attack.eval_steps": 3, "train.device": "cpu",
    }
    if tmp_path is not None:
        overrides["train.out"] = str(tmp_path / "run")
    overrides.update(sets)
    return config_mod.resolve(preset="digits-weat", overrides=overrides)


@pytest.fixture
def one_thread():
    """In-process training on one thread: quick on a busy machine, and what the subprocesses use."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_TRAINED: dict[tuple[str, int], object] = {}


def trained_run(tmp_path_factory, method: str, epochs: int = 3):
    """A small-cnn digits run (FitResult) trained once per test session and shared by every module."""
    from weatcli.train import fit

    key = (method, epochs)
    if key not in _TRAINED:
        root = tmp_path_factory.mktemp(f"trained-{method}-{epochs}")
        _TRAINED[key] = fit(tiny_config(root, **{"train.method": method, "train.epochs": epochs, "train.batch_size": 64}))
    return _TRAINED[key]


def trained_checkpoint(tmp_path_factory) -> Path:
    """PGD-AT, 3 epochs: the attack tests' model."""
    return trained_run(tmp_path_factory, "pgd-at").checkpoint


def robust_checkpoint(tmp_path_factory) -> Path:
    """TRADES, 3 epochs: the sampling, scoring and energy tests' model."""
    return trained_run(tmp_path_factory, "trades").checkpoint


def run_cli(argv, capsys):
    """`weat ARGV` in-process: (exit code, stdout, stderr)."""
    from weatcli import cli

    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err
