"""Extra training data: .npz members memory-mapped (never read whole), and the per-step extra part of
the batch as a pure function of (seed, epoch, step)."""

from __future__ import annotations

import warnings

import json
import math
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from weatcli.errors import WeatInputError
from weatcli.extra_data import ExtraStream, open_extra, open_npz_memmap, steps_per_epoch

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, n: int = 300, size: int = 8, channels: int = 3, classes: int = 10, seed: int = 0,
           label_dtype=np.int64, compressed: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    label = rng.integers(0, classes, n).astype(label_dtype)
    (np.savez_compressed if compressed else np.savez)(path, image=image, label=label)
    return path


def _write_big(path: Path, n: int, size: int = 32) -> Path:
    """An np.savez-layout file of n images without holding it in memory: row i is filled with i % 251."""
    row = size * size * 3
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("image.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (n, size, size, 3)})
            for i in range(0, n, 4096):
                rows = np.arange(i, min(n, i + 4096)) % 251
                f.write(np.repeat(rows.astype(np.uint8), row).tobytes())
        with zf.open("label.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, (np.arange(n) % 10).astype(np.int64))
    return path


@pytest.mark.parametrize("label_dtype", [np.int64, np.uint8, np.int32])
def test_memmap_values_equal_np_load(tmp_path, label_dtype):
    path = _write(tmp_path / "extra.npz", label_dtype=label_dtype)
    np.savez(tmp_path / "more.npz", a=np.arange(24, dtype=np.float32).reshape(2, 3, 4), b=np.array([1.5]))
    with np.load(path) as ref:
        for key in ("image", "label"):
            mm = open_npz_memmap(path, key)
            assert isinstance(mm, np.memmap) and mm.dtype == ref[key].dtype
            np.testing.assert_array_equal(mm, ref[key])
    with np.load(tmp_path / "more.npz") as ref:
        for key in ("a", "b"):
            np.testing.assert_array_equal(open_npz_memmap(tmp_path / "more.npz", key), ref[key])


def test_compressed_member_is_refused_in_one_line(tmp_path):
    path = _write(tmp_path / "extra.npz", compressed=True)
    with pytest.raises(WeatInputError) as e:
        open_extra(path)
    msg = str(e.value)
    assert "compressed" in msg and "np.savez" in msg and "\n" not in msg


@pytest.mark.parametrize(("make", "needle"), [
    (lambda p: np.savez(p, image=np.zeros((4, 8, 8, 3), np.uint8)), "no array 'label'"),
    (lambda p: np.savez(p, image=np.zeros((4, 8, 8, 3), np.float32), label=np.zeros(4, np.int64)), "expected uint8"),
    (lambda p: np.savez(p, image=np.zeros((4, 8, 8, 3), np.uint8), label=np.zeros(3, np.int64)), "one per image"),
    (lambda p: np.savez(p, image=np.zeros((4, 8, 8, 3), np.uint8), label=np.full(4, 10, np.int64)), "0..9"),
    (lambda p: np.savez(p, image=np.zeros((4, 16, 16, 3), np.uint8), label=np.zeros(4, np.int64)), "(3, 8, 8)"),
    (lambda p: p.write_bytes(b"not a zip"), "not a readable .npz"),
])
def test_bad_files_are_named(tmp_path, make, needle):
    path = tmp_path / "bad.npz"
    make(path)
    with pytest.raises(WeatInputError) as e:
        open_extra(path, num_classes=10, image_shape=(3, 8, 8))
    assert needle in str(e.value) and str(path) in str(e.value)


def test_batches_are_the_files_rows(tmp_path):
    path = _write(tmp_path / "extra.npz", n=300)
    with np.load(path) as ref:
        image, label = ref["image"], ref["label"]
    for budget in (None, 0):  # resident on the device, and streamed from the map by the prefetch thread
        with warnings.catch_warnings():  # the read-only map is copied, not wrapped (torch warns on that)
            warnings.simplefilter("error")
            s = ExtraStream(path, fraction=0.3, batch_size=20, num_real=100, seed=3, resident_budget=budget)
        with s:
            assert s.resident == (budget is None)
            for step in range(4):
                idx = s.indices(1, step)
                x, y = s.batch(1, step)
                assert x.dtype == torch.uint8 and x.shape == (6, 3, 8, 8) and x.is_contiguous()
                assert y.dtype == torch.int64 and y.shape == (6,)
                np.testing.assert_array_equal(x.numpy(), image[idx].transpose(0, 3, 1, 2))
                np.testing.assert_array_equal(y.numpy(), label[idx])


def test_same_seed_epoch_step_same_indices_and_no_repeats_within_an_epoch(tmp_path):
    path = _write(tmp_path / "extra.npz", n=1000)
    a = ExtraStream(path, fraction=0.5, batch_size=16, num_real=100, seed=7, prefetch=False)
    b = ExtraStream(path, fraction=0.5, batch_size=16, num_real=100, seed=7, prefetch=False)
    assert a.per_step == 8 and a.steps_per_epoch == math.ceil(100 / 8) == 13
    epoch = [a.indices(2, s) for s in range(a.steps_per_epoch)]
    for s, idx in enumerate(epoch):
        np.testing.assert_array_equal(idx, b.indices(2, s))
        assert np.all(np.diff(idx) > 0)  # sorted for locality, and distinct
    flat = np.concatenate(epoch)
    assert len(np.unique(flat)) == len(flat)  # without replacement within the epoch
    assert not np.array_equal(flat, np.concatenate([a.indices(3, s) for s in range(a.steps_per_epoch)]))
    c = ExtraStream(path, fraction=0.5, batch_size=16, num_real=100, seed=8, prefetch=False)
    assert not np.array_equal(a.indices(2, 0), c.indices(2, 0))


def test_a_file_smaller_than_an_epoch_repeats_images_evenly(tmp_path):
    path = _write(tmp_path / "extra.npz", n=30)
    s = ExtraStream(path, fraction=0.5, batch_size=20, num_real=100, seed=0, prefetch=False)  # 10 steps x 10
    counts = np.bincount(np.concatenate([s.indices(0, i) for i in range(s.steps_per_epoch)]), minlength=30)
    assert counts.sum() == 100 and counts.max() <= math.ceil(100 / 30)


@pytest.mark.parametrize("budget", [None, 0])
def test_resume_from_a_middle_step_equals_the_uninterrupted_sequence(tmp_path, budget):
    path = _write(tmp_path / "extra.npz", n=500)
    kw = dict(fraction=0.25, batch_size=16, num_real=60, seed=11, resident_budget=budget)
    with ExtraStream(path, **kw) as full:
        steps = [(e, s) for e in range(3) for s in range(full.steps_per_epoch)]
        want = [full.batch(e, s) for e, s in steps]
    start = steps.index((1, 2))
    with ExtraStream(path, **kw) as resumed:  # a fresh process picking up at epoch 1, step 2
        got = [resumed.batch(e, s) for e, s in steps[start:]]
    for (wx, wy), (gx, gy) in zip(want[start:], got):
        assert torch.equal(wx, gx) and torch.equal(wy, gy)
    # Asking out of order (a skip, a retry) is still the pure function of (seed, epoch, step).
    with ExtraStream(path, **kw) as jumpy:
        for i in (5, 1, 1, 7, 0):
            x, y = jumpy.batch(*steps[i])
            assert torch.equal(x, want[i][0]) and torch.equal(y, want[i][1])


def test_fraction_zero_reads_nothing(tmp_path):
    s = ExtraStream(None, fraction=0.0, batch_size=128, num_real=1000, seed=0)
    assert not s.active and s.batch(0, 0) is None and s._executor is None
    assert s.steps_per_epoch == math.ceil(1000 / 128) == steps_per_epoch(1000, 128, 0.0)
    assert len(s.indices(0, 0)) == 0


def test_epoch_length_and_split_of_the_batch():
    assert steps_per_epoch(50_000, 1024, 0.7) == math.ceil(50_000 / (1024 - 717))  # round(716.8) = 717
    assert steps_per_epoch(50_000, 512, 0.0) == math.ceil(50_000 / 512)
    for bad in (-0.1, 1.0, 0.999):
        with pytest.raises(WeatInputError):
            steps_per_epoch(100, 128, bad)


def test_shards_split_each_step(tmp_path):
    path = _write(tmp_path / "extra.npz", n=400)
    kw = dict(fraction=0.5, batch_size=24, num_real=100, seed=1, prefetch=False)
    whole = ExtraStream(path, **kw)
    parts = [ExtraStream(path, shard=(r, 3), **kw) for r in range(3)]
    for step in range(3):
        np.testing.assert_array_equal(np.concatenate([p.indices(0, step) for p in parts]), whole.indices(0, step))
        x = torch.cat([p.batch(0, step)[0] for p in parts])
        assert torch.equal(x, whole.batch(0, step)[0])
    with pytest.raises(WeatInputError):
        ExtraStream(path, shard=(0, 5), **kw)  # 12 extra images do not split over 5 ranks


def test_a_big_file_is_never_read_whole(tmp_path):
    """200 MB on disk; 10 streamed batches of 64 images (2 MB) must not grow the process's private
    memory (RssAnon) by anything like the file. The file-backed part of the resident set (RssFile) is
    page cache mapped into the process, shared and reclaimable; on kernels with large page-cache
    folios (ext4, Linux 6.x) a fault on a cached file maps the whole folio around the row read, so
    RssFile may grow by more than the 2 MB asked for, which is not a copy of the data."""
    n = 200 * (1 << 20) // 3072
    path = _write_big(tmp_path / "big.npz", n)
    assert path.stat().st_size > 200_000_000
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np, torch
        from weatcli.extra_data import ExtraStream, open_extra

        def rss_kb():  # private (anonymous) resident memory
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("RssAnon:"))

        data = open_extra({str(path)!r}, num_classes=10, image_shape=(3, 32, 32))
        assert isinstance(data.images, np.memmap) and isinstance(data.labels, np.memmap)
        before = rss_kb()
        with ExtraStream(data, fraction=0.5, batch_size=128, num_real=50_000, seed=0, resident_budget=0) as s:
            assert not s.resident
            for step in range(10):
                x, y = s.batch(0, step)
                idx = s.indices(0, step)
                assert torch.equal(x[:, 0, 0, 0], torch.from_numpy((idx % 251).astype(np.uint8)))
                assert torch.equal(y, torch.from_numpy(idx % 10))
        print(json.dumps({{"grew_kb": rss_kb() - before}}))
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    grew_mb = json.loads(proc.stdout.strip().splitlines()[-1])["grew_kb"] / 1024
    assert grew_mb < 20, f"private memory grew by {grew_mb:.1f} MB reading 2 MB of a 200 MB file"
