"""Disk full or unwritable output: exit 1 with one line naming the path, earlier checkpoints intact,
no temp files left (issue #7, "Never lose a run")."""

from __future__ import annotations

import errno
import hashlib
import os
import re
from pathlib import Path

import pytest

from conftest import run_cli
from test_resume_kill import TEMP, _rows, write_tiny_npz
from weatcli import checkpoint as ckpt
from weatcli import fileio
from weatcli.errors import WeatRunError

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
TINY = ["train", "--preset", "digits-weat", "--epochs", "3", "--batch-size", "32", "--lr", "0.05", "--device", "cpu",
        "--set", "attack.steps=2", "--set", "attack.eval_steps=2", "--set", "train.eval_n=32", "--set", "train.energy_n=32"]


def _permissions_enforced() -> bool:
    """False for root (or any process with CAP_DAC_OVERRIDE): it writes into a 0o500 directory."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o500)
        try:
            open(os.path.join(d, "probe"), "w").close()
        except PermissionError:
            return True
        finally:
            os.chmod(d, 0o700)
    return False


needs_permissions = pytest.mark.skipif(not _permissions_enforced(), reason="running as root: directory permissions are not enforced")


@pytest.fixture
def tiny_argv(tmp_path):
    return [*TINY, "--dataset", f"npz:{write_tiny_npz(tmp_path / 'tiny.npz')}"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("weat: error:")]


def _fill_disk_on(monkeypatch, matches, from_write: int) -> dict:
    """From the `from_write`-th atomic write of a file whose name `matches` on, fsync of its temp
    file fails with ENOSPC (as on a full disk: the data went to the page cache, the blocks do not
    exist). Returns what happened: {"writes": [names], "failed": path, "before": {path: digest}}."""
    seen: dict = {"writes": [], "failed": None, "before": {}}
    real_fsync = os.fsync

    def fsync(fd):
        try:
            name = Path(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            name = None
        temp = TEMP.fullmatch(name.name) if name is not None else None
        if temp and matches(temp["name"]):
            seen["writes"].append(temp["name"])
            if len(seen["writes"]) >= from_write:
                if seen["failed"] is None:
                    seen["failed"] = name.parent / temp["name"]
                    seen["before"] = {p: _digest(p) for p in name.parent.rglob("*.safetensors")}
                raise ENOSPC
        return real_fsync(fd)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    return seen


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell which file an fsync is for")
@pytest.mark.parametrize("target,from_write", [("checkpoint", 3), ("metrics", 3)])
def test_disk_full_exits_1_naming_the_file_and_keeps_the_earlier_checkpoints(tmp_path, monkeypatch, capsys, one_thread,
                                                                              tiny_argv, target, from_write):
    run = tmp_path / "run"
    matches = (lambda n: n.endswith(".safetensors")) if target == "checkpoint" else (lambda n: n == "metrics.jsonl")
    seen = _fill_disk_on(monkeypatch, matches, from_write)
    code, out, err = run_cli([*tiny_argv, "--out", str(run)], capsys)
    monkeypatch.undo()

    failed = seen["failed"]
    assert failed is not None, seen
    assert code == 1 and out == ""
    lines = _error_lines(err)
    assert len(lines) == 1 and f"cannot write {failed}: No space left on device" in lines[0], err
    assert seen["before"], "no checkpoint was written before the disk filled up"
    for path, digest in seen["before"].items():  # what was there before is there, unchanged, and loads
        assert _digest(path) == digest, path
        ckpt.load(path)
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]

    # Space freed: the run resumes from what was kept and completes.
    code, out, err = run_cli(["train", "--resume", str(run)], capsys)
    assert code == 0, err
    assert out.strip() == str(run / "model.safetensors")
    assert [r["epoch"] for r in _rows(run)] == [1, 2, 3]


@needs_permissions
def test_unwritable_parent_of_out_exits_1_naming_the_directory(tmp_path, capsys, tiny_argv):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        code, out, err = run_cli([*tiny_argv, "--out", str(parent / "run")], capsys)
    finally:
        parent.chmod(0o700)
    lines = _error_lines(err)
    assert code == 1 and out == "" and len(lines) == 1 and str(parent / "run") in lines[0], err
    assert "Permission denied" in lines[0]


@needs_permissions
@pytest.mark.parametrize("how", ["out", "resume"])
def test_unwritable_run_directory_exits_1_naming_it(tmp_path, capsys, one_thread, tiny_argv, how):
    """--out: an existing empty directory; --resume: a finished run's directory (its .lock file
    still there, so the first write that fails is config.toml's)."""
    run = tmp_path / "run"
    if how == "resume":
        assert run_cli([*tiny_argv, "--epochs", "1", "--out", str(run)], capsys)[0] == 0
    else:
        run.mkdir()
    before = {p: _digest(p) for p in run.glob("*.safetensors")}
    run.chmod(0o500)
    try:
        code, out, err = run_cli(["train", "--resume", str(run)] if how == "resume" else [*tiny_argv, "--out", str(run)], capsys)
    finally:
        run.chmod(0o700)
    lines = _error_lines(err)
    assert code == 1 and out == "" and len(lines) == 1 and str(run) in lines[0], err
    assert "Permission denied" in lines[0]
    assert {p: _digest(p) for p in run.glob("*.safetensors")} == before


# ----------------------------------------------------------------------------- fileio


@pytest.mark.parametrize("stage", ["mkstemp", "fsync", "replace"])
def test_a_failed_atomic_write_names_the_file_keeps_the_old_one_and_leaves_no_temp(tmp_path, monkeypatch, stage):
    target = tmp_path / "last.safetensors"
    fileio.atomic_write_bytes(target, b"old")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if stage == "mkstemp":
        monkeypatch.setattr(fileio.tempfile, "mkstemp", full)
    else:
        monkeypatch.setattr(fileio.os, stage, full)
    with pytest.raises(OSError) as e:
        fileio.atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert isinstance(e.value, WeatRunError) and e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    assert str(e.value) == f"cannot write {target}: No space left on device"
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_a_write_into_a_missing_directory_names_the_file(tmp_path):
    target = tmp_path / "gone" / "metrics.jsonl"
    with pytest.raises(WeatRunError, match=re.escape(f"cannot write {target}: No such file or directory")):
        fileio.atomic_write_text(target, "{}\n")


def test_atomic_write_is_readable_like_any_file_and_fsyncs_file_then_directory(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if Path("/proc/self/fd").is_dir() else fd)
        return real_fsync(fd)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    umask = os.umask(0o022)
    try:
        fileio.atomic_write_text(tmp_path / "config.toml", "x = 1\n")
    finally:
        os.umask(umask)
    monkeypatch.undo()
    assert (tmp_path / "config.toml").stat().st_mode & 0o777 == 0o644
    assert len(synced) == 2
    if Path("/proc/self/fd").is_dir():  # the temp file's data, then the directory holding the rename
        assert TEMP.fullmatch(Path(synced[0]).name) and Path(synced[1]) == tmp_path


def test_stale_temps_are_those_of_the_given_files_only(tmp_path):
    mine = [tmp_path / ".last.safetensors.abc123_x.tmp", tmp_path / ".metrics.jsonl.zz9.tmp"]
    snaps = tmp_path / "snapshots"
    snaps.mkdir()
    mine.append(snaps / ".epoch-0003.safetensors.q1w2e3.tmp")
    others = [tmp_path / ".notes.txt.abc123.tmp", tmp_path / "last.safetensors", tmp_path / ".last.safetensors.partial"]
    for p in mine + others:
        p.write_bytes(b"x")
    assert fileio.stale_temps(tmp_path / "last.safetensors") == [mine[0]]
    removed = fileio.remove_stale_temps(tmp_path / "last.safetensors", tmp_path / "metrics.jsonl",
                                        snaps / "epoch-*.safetensors", tmp_path / "model.safetensors")
    assert sorted(removed) == sorted(mine)
    assert not any(p.exists() for p in mine) and all(p.exists() for p in others)
