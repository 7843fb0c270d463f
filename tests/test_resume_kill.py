"""A `weat train` process killed with SIGKILL and resumed ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_config
from weatcli import checkpoint as ckpt

ARGS = ["--epochs", "3", "--batch-size", "64", "--device", "cpu", "--method", "trades",
        "--set", "attack.steps=2", "--set", "attack.eval_steps=2", "--set", "train.eval_n=64", "--set", "train.energy_n=64"]


def _train(*extra):
    return [sys.executable, "-m", "weatcli", "train", *extra]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # 2 threads crawl on a busy 2-core machine
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


# ----------------------------------------------------------------------------- SIGKILL at 20 moments

# A tiny run: 192 8x8 images, 6 batches an epoch, 8 epochs; a process is mostly its start-up.
TINY = ["--preset", "digits-weat", "--epochs", "8", "--batch-size", "32", "--lr", "0.05", "--device", "cpu",
        "--set", "attack.steps=2", "--set", "attack.eval_steps=2", "--set", "train.eval_n=32", "--set", "train.energy_n=32"]
RUN_FILES = {"config.toml", "metrics.jsonl", "last.safetensors", "model.safetensors"}
TEMP = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp")  # fileio.atomic_write_bytes' temp files
TIMING = ("seconds", "train_seconds")


def write_tiny_npz(path: Path, seed: int = 0) -> Path:
    """4 classes of 8x8 grey images whose brightness gives the class away: learnable in a few epochs."""
    rng = np.random.default_rng(seed)

    def split(n):
        y = rng.integers(0, 4, n)
        x = (rng.integers(0, 60, (n, 8, 8, 1)) + 60 * y[:, None, None, None]).astype(np.uint8)
        return x, y

    (xt, yt), (xv, yv) = split(192), split(32)
    np.savez(path, x_train=xt, y_train=yt, x_test=xv, y_test=yv)
    return path


def _rows(run: Path) -> list[dict]:
    text = (run / "metrics.jsonl").read_text() if (run / "metrics.jsonl").exists() else ""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in text.splitlines()]


def _meta(meta: dict[str, str]) -> dict[str, object]:
    """A checkpoint's metadata less the epoch's wall-clock times and the run's own directory."""
    out: dict[str, object] = dict(meta)
    out["metrics"] = {k: v for k, v in json.loads(meta["metrics"]).items() if k not in TIMING}
    config = json.loads(meta["config"])
    config["train"].pop("out")
    out["config"] = config
    return out


def check_run_dir(run: Path) -> int | None:
    """What a resume will find is sound: every *.safetensors loads, nothing but the run's own files
    (and temp files of an interrupted atomic write, which shadow nothing), metrics.jsonl covers the
    epochs last.safetensors has done. Returns the epochs last.safetensors has done (None: no file)."""
    if not run.exists():
        return None
    for path in run.rglob("*.safetensors"):
        ckpt.load(path)  # raises on a torn or foreign file
    for path in run.iterdir():
        temp = TEMP.fullmatch(path.name)
        if temp:  # a write SIGKILLed between mkstemp and rename: a hidden name no reader looks at
            assert temp["name"] in RUN_FILES and path.is_file(), path
        else:
            assert path.name in RUN_FILES | {".lock", "snapshots"}, f"unexpected {path} in the run directory"
    if not (run / "last.safetensors").exists():
        assert not (run / "model.safetensors").exists(), "model.safetensors without last.safetensors: the run can neither resume nor restart"
        return None
    _, meta = ckpt.read(run / "last.safetensors")
    done = json.loads(meta["resume"])["epoch"]
    assert (run / "config.toml").is_file() and len(_rows(run)) >= done
    return done


def _reference(tmp_path: Path, argv: list[str], monkeypatch) -> tuple[Path, float, list[float]]:
    """The uninterrupted run, in-process with one thread like the subprocesses: its directory, and
    the times (s after its "start" event) at which each epoch's checkpoints were on disk."""
    from weatcli import cli
    from weatcli import train as train_mod

    stamps: dict[str, list[float]] = {"start": [], "epoch": []}
    real_fit = train_mod.fit

    def timed_fit(*a, on_event=None, **k):
        def event(kind, payload):
            if kind in stamps:
                stamps[kind].append(time.perf_counter())
            on_event(kind, payload)

        return real_fit(*a, on_event=event, **k)

    monkeypatch.setattr(train_mod, "fit", timed_fit)
    ref = tmp_path / "ref"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(SystemExit) as e:
            cli.main(["train", *argv, "--out", str(ref)])
    finally:
        torch.set_num_threads(threads)
        monkeypatch.setattr(train_mod, "fit", real_fit)
    assert e.value.code == 0
    t0 = stamps["start"][0]
    return ref, t0, [t - t0 for t in stamps["epoch"]]


def _moments(rng: random.Random, ends: list[float], n: int) -> list[float | None]:
    """n kill moments on the uninterrupted run's timeline (s after its "start" event), in order:
    about 40% anywhere, 40% in the last few ms of an epoch (evaluation, metrics.jsonl, model and
    last checkpoint writes), 20% during a process's start-up (None; the first before any file exists)."""
    starts = [0.0, *ends[:-1]]
    k_any = (2 * n) // 5
    k_start = max(1, n // 5)
    moments: list[float | None] = [rng.uniform(0, ends[-1] * 1.05) for _ in range(k_any)]
    for _ in range(n - k_any - k_start):
        e = rng.randrange(len(ends))
        moments.append(ends[e] - rng.uniform(0, min(0.03, 0.3 * (ends[e] - starts[e]))))
    moments.sort()
    moments.insert(0, None)
    for _ in range(k_start - 1):
        moments.insert(rng.randrange(1, len(moments) + 1), None)
    return moments


def _kill_and_resume(run: Path, argv: list[str], moments: list[float | None], ends: list[float], rng: random.Random,
                     env: dict[str, str]) -> dict[str, object]:
    """SIGKILL `weat train` at each moment; launch the next with --resume, or with the original
    command while no last.safetensors exists; check the directory after every kill; finish the run."""
    starts = [0.0, *ends[:-1]]
    startup: list[float] = []  # launch -> "start" event, for each process that got that far
    outcomes: list[str] = []
    temps: set[str] = set()  # temp files killed writes left behind
    for moment in moments:
        done = check_run_dir(run)
        cmd = _train(*argv, "--out", str(run)) if done is None else _train("--resume", str(run))
        launched = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        if moment is None:
            time.sleep(rng.uniform(0.1, 1.0) * (sorted(startup)[len(startup) // 2] if startup else 2.0))
        else:
            if proc.stderr.readline():  # "training ..." / "resuming ...": the "start" event
                startup.append(time.perf_counter() - launched)
            time.sleep(max(0.0, moment - starts[min(done or 0, len(ends) - 1)]))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        rest = proc.stderr.read()
        proc.stderr.close()
        assert proc.returncode in (-signal.SIGKILL, 0), f"{' '.join(cmd)} -> {proc.returncode}: {rest}"
        outcomes.append("killed" if proc.returncode else "finished")
        temps |= {p.name for p in run.iterdir() if TEMP.fullmatch(p.name)} if run.exists() else set()
    check_run_dir(run)
    cmd = _train("--resume", str(run)) if (run / "last.safetensors").exists() else _train(*argv, "--out", str(run))
    final = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert final.returncode == 0, final.stderr
    return {"killed": outcomes.count("killed"), "temps": len(temps), "startup": startup}


def test_sigkill_at_20_moments_then_resume_equals_uninterrupted(tmp_path, monkeypatch, capsys):
    """20 SIGKILLs of `weat train` (two runs of 10, side by side): during start-up (before the run
    directory exists, or before its first checkpoint), mid-epoch, and in the last ms of epochs. After
    each, what is on disk loads and resumes; at the end each run's weights, checkpoint metadata and
    metrics equal an uninterrupted run's."""
    from concurrent.futures import ThreadPoolExecutor

    data = write_tiny_npz(tmp_path / "tiny.npz")
    argv = [*TINY, "--dataset", f"npz:{data}"]
    ref, _, ends = _reference(tmp_path, argv, monkeypatch)
    capsys.readouterr()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    lanes = []
    for lane in range(2):
        rng = random.Random(20240607 + lane)
        lanes.append((tmp_path / f"killed-{lane}", argv, _moments(rng, ends, 10), ends, rng, env))
    with ThreadPoolExecutor(len(lanes)) as pool:
        stats = list(pool.map(lambda a: _kill_and_resume(*a), lanes))

    epochs = len(ends)
    for run, *_ in lanes:
        assert check_run_dir(run) == epochs
        for name in ("model.safetensors", "last.safetensors"):
            a, meta_a = ckpt.read(ref / name)
            b, meta_b = ckpt.read(run / name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
            assert _meta(meta_a) == _meta(meta_b), name
        assert _rows(run) == _rows(ref) and len(_rows(ref)) == epochs
    killed = sum(s["killed"] for s in stats)
    assert killed >= 4, stats  # at least the start-up kills landed
    startup = [t for s in stats for t in s["startup"]]
    with capsys.disabled():
        print(f"\n{killed} of 20 kills landed, {sum(s['temps'] for s in stats)} left a temp file behind; start-up "
              f"{min(startup, default=0):.2f}..{max(startup, default=0):.2f} s; epochs end at "
              f"{', '.join(f'{t:.2f}' for t in ends)} s")


# ----------------------------------------------------------------------------- a kill at every write


class _Killed(BaseException):
    """Stands for SIGKILL: no `except Exception` sees it."""


def _written_epoch(path: Path, payload: bytes) -> int:
    """The epoch a write belongs to: a checkpoint's metadata epoch, the rows of metrics.jsonl, 0 for config.toml."""
    if path.suffix == ".safetensors":
        (n,) = struct.unpack("<Q", payload[:8])
        return int(json.loads(payload[8 : 8 + n])["__metadata__"]["epoch"])
    if path.name == "metrics.jsonl":
        return payload.count(b"\n")
    return 0


def _tiny_fit_config(tmp_path: Path, data: Path, **sets):
    return tiny_config(tmp_path, **{"data.dataset": f"npz:{data}", "train.epochs": 2, "train.batch_size": 32, "train.lr": 0.05,
                                    "attack.steps": 2, "attack.eval_steps": 2, "train.eval_n": 32, "train.energy_n": 32,
                                    "train.select": "last", **sets})


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny dataset and an uninterrupted 2-epoch run on it: (npz, run directory)."""
    from weatcli.train import fit

    root = tmp_path_factory.mktemp("tiny-ref")
    data = write_tiny_npz(root / "tiny.npz")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return data, fit(_tiny_fit_config(root, data)).run_dir
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("victim", [
    ("config.toml", 0), ("metrics.jsonl", 0), ("last.safetensors", 0), ("metrics.jsonl", 1), ("model.safetensors", 1),
    ("last.safetensors", 1),
    ("metrics.jsonl", 2), ("model.safetensors", 2), ("last.safetensors", 2),
], ids=lambda v: f"{v[0]}@{v[1]}")
def test_killed_at_a_write_restarts_or_resumes_to_the_same_run(tmp_path, monkeypatch, victim, tiny_reference, one_thread):
    """A kill as the process starts writing one file of the run (leaving a torn temp file of it, as
    SIGKILL would): what is on disk is consistent, and re-running the original command (no
    last.safetensors yet) or --resume ends where an uninterrupted run ends, bit for bit."""
    from weatcli import checkpoint as ckpt_mod
    from weatcli import fileio
    from weatcli.train import fit

    data, ref = tiny_reference
    cfg = _tiny_fit_config(tmp_path, data)
    run = Path(cfg.train.out)

    real_write = fileio.atomic_write_bytes
    hit = []

    def dying_write(path, payload):
        path = Path(path)
        if not hit and (path.name, _written_epoch(path, payload)) == victim:
            hit.append(path)
            (path.parent / f".{path.name}.killed00.tmp").write_bytes(payload[: len(payload) // 2])
            raise _Killed
        real_write(path, payload)

    monkeypatch.setattr(fileio, "atomic_write_bytes", dying_write)
    monkeypatch.setattr(ckpt_mod, "atomic_write_bytes", dying_write)
    try:
        fit(cfg)
    except _Killed:
        assert hit
    monkeypatch.undo()
    if not hit:
        assert victim == ("last.safetensors", 0), f"no write of {victim}"
        pytest.skip("this train.py writes no last.safetensors before the first epoch")

    done = check_run_dir(run)
    result = fit(cfg) if done is None else fit(None, resume=run)
    assert result.run_dir == run and check_run_dir(run) == 2
    for name in ("model.safetensors", "last.safetensors"):
        a, meta_a = ckpt.read(ref / name)
        b, meta_b = ckpt.read(run / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert _meta(meta_a) == _meta(meta_b), name
    assert _rows(run) == _rows(ref)


def test_temp_files_of_killed_writes_are_removed_at_the_next_start(tmp_path, tiny_reference, one_thread):
    from weatcli.train import fit

    data, _ = tiny_reference
    cfg = _tiny_fit_config(tmp_path, data, **{"train.epochs": 1})
    run = fit(cfg).run_dir
    stale = [run / f".{name}.k1ll3d_0.tmp" for name in sorted(RUN_FILES)]
    other = run / ".notes.txt.k1ll3d_0.tmp"  # not a file of the run: left alone
    for path in [*stale, other]:
        path.write_bytes(b"torn")
    fit(None, resume=run)
    assert not any(p.exists() for p in stale) and other.exists()
