"""A `weat train` process killed with SIGKILL and resumed ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import torch

from weatcli import checkpoint as ckpt

ARGS = ["--epochs", "3", "--batch-size", "64", "--device", "cpu", "--method", "trades",
        "--set", "attack.steps=2", "--set", "attack.eval_steps=2", "--set", "train.eval_n=64", "--set", "train.energy_n=64"]


def _train(*extra):
    return [sys.executable, "-m", "weatcli", "train", *extra]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    ref = subprocess.run(_train(*ARGS, "--out", str(tmp_path / "ref")), capture_output=True, text=True, env=env, timeout=300)
    assert ref.returncode == 0, ref.stderr

    run = tmp_path / "killed"
    proc = subprocess.Popen(_train(*ARGS, "--out", str(run)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while not (run / "last.safetensors").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random(0).uniform(0.0, 1.5))  # somewhere in epoch 2 or 3
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for name in ("last.safetensors", "model.safetensors"):  # whatever is on disk loads
        if (run / name).exists():
            ckpt.load(run / name)

    resumed = subprocess.run(_train("--resume", str(run)), capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    for name in ("model.safetensors", "last.safetensors"):
        a, _ = ckpt.read(tmp_path / "ref" / name)
        b, _ = ckpt.read(run / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert killed  # the kill landed while the run was still going
