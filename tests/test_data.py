"""weatcli.data: every loader against tiny files in the real on-disk formats, and augmentation.

No test touches the network: download paths are exercised with torchvision's classes patched.
"""

from __future__ import annotations

import io
import os
import pickle
import shlex
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from conftest import run_cli
from weatcli import data
from weatcli.errors import WeatInputError


@pytest.fixture(autouse=True)
def _fresh_cache():
    data._CACHE.clear()
    yield
    data._CACHE.clear()


def _images(rng: np.random.Generator, n: int, c: int, size: int) -> np.ndarray:
    """(n, c, size, size) uint8 whose channels differ, so an NHWC/NCHW mix-up cannot pass."""
    x = rng.integers(0, 256, size=(n, c, size, size), dtype=np.uint8)
    x[:, 0, 0, 0] = 7  # a fixed marker per channel at pixel (0, 0)
    if c > 1:
        x[:, 1, 0, 0] = 77
    if c > 2:
        x[:, 2, 0, 0] = 177
    return x


# ----------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (torchvision's python pickle batches)


def _write_cifar_batch(path: Path, x_nchw: np.ndarray, labels: list[int], label_key: bytes) -> None:
    batch = {b"batch_label": b"fake", b"data": x_nchw.reshape(len(x_nchw), -1), label_key: labels}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(batch, f)


def _make_cifar10(root: Path, per_batch: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    base = root / "cifar-10-batches-py"
    xs, ys = [], []
    for i in range(1, 6):
        x = _images(rng, per_batch, 3, 32)
        y = [(i * per_batch + j) % 10 for j in range(per_batch)]
        _write_cifar_batch(base / f"data_batch_{i}", x, y, b"labels")
        xs.append(x)
        ys += y
    test_x = _images(rng, 3, 3, 32)
    _write_cifar_batch(base / "test_batch", test_x, [9, 0, 5], b"labels")
    return np.concatenate(xs), np.array(ys), test_x, np.array([9, 0, 5])


def test_cifar10_round_trips_pixels_and_label_order(tmp_path):
    train_x, train_y, test_x, test_y = _make_cifar10(tmp_path)
    ds = data.load("cifar10", tmp_path)
    assert ds.name == "cifar10" and ds.num_classes == 10
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.train_x.dtype == torch.uint8
    assert ds.train_y.dtype == torch.int64 and ds.train_x.is_contiguous()
    assert ds.in_channels == 3 and ds.image_size == 32
    # Exact pixels in NCHW order and batches concatenated 1..5 in order.
    np.testing.assert_array_equal(ds.train_x.numpy(), train_x)
    np.testing.assert_array_equal(ds.train_y.numpy(), train_y)
    np.testing.assert_array_equal(ds.test_x.numpy(), test_x)
    np.testing.assert_array_equal(ds.test_y.numpy(), test_y)
    assert ds.train_x[:, :, 0, 0].tolist() == [[7, 77, 177]] * 20


def test_cifar100_reads_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    base = tmp_path / "cifar-100-python"
    train_x, test_x = _images(rng, 6, 3, 32), _images(rng, 2, 3, 32)
    for name, x, fine in (("train", train_x, [0, 99, 50, 3, 3, 7]), ("test", test_x, [42, 98])):
        batch = {b"data": x.reshape(len(x), -1), b"fine_labels": fine, b"coarse_labels": [0] * len(x)}
        base.mkdir(exist_ok=True)
        (base / name).write_bytes(pickle.dumps(batch))
    ds = data.load("cifar100", tmp_path)
    assert ds.num_classes == 100
    assert ds.train_y.tolist() == [0, 99, 50, 3, 3, 7] and ds.test_y.tolist() == [42, 98]
    np.testing.assert_array_equal(ds.train_x.numpy(), train_x)
    np.testing.assert_array_equal(ds.test_x.numpy(), test_x)


def test_cifar_missing_files_lists_expected_paths(tmp_path):
    with pytest.raises(WeatInputError) as e:
        data.load("cifar10", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in msg
    assert str(tmp_path / "cifar-10-batches-py" / "test_batch") in msg
    assert "--download" in msg and "--data-dir" in msg and "\n" not in msg


def test_cifar_truncated_pickle_names_the_file(tmp_path):
    _make_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(WeatInputError, match="data_batch_3"):
        data.load("cifar10", tmp_path)


def test_cifar_missing_key_and_wrong_size(tmp_path):
    _make_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}))
    with pytest.raises(WeatInputError, match=r"test_batch.*labels"):
        data.load("cifar10", tmp_path)
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(WeatInputError, match=r"test_batch.*3072"):
        data.load("cifar10", tmp_path)
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}))
    with pytest.raises(WeatInputError, match=r"test_batch.*\[0, 10\)"):
        data.load("cifar10", tmp_path)


def _py2_int(v: int) -> bytes:  # BININT1 / BININT2 / BININT
    if 0 <= v < 256:
        return b"K" + bytes([v])
    return b"M" + struct.pack("<H", v) if 0 <= v < 65536 else b"J" + struct.pack("<i", v)


def _py2_str(s: bytes) -> bytes:  # a Python 2 str: SHORT_BINSTRING / BINSTRING
    return b"U" + bytes([len(s)]) + s if len(s) < 256 else b"T" + struct.pack("<I", len(s)) + s


def _py2_pickle(batch: dict[bytes, object]) -> bytes:
    """What Python 2's cPickle.dump(batch, f, 2) writes for a CIFAR batch (the original files' format):
    str keys and values, int lists, and a uint8 array as numpy 1.x pickles it, naming
    numpy.core.multiarray._reconstruct, numpy.ndarray and numpy.dtype."""
    out = [b"\x80\x02}("]  # PROTO 2, EMPTY_DICT, MARK
    for key, value in batch.items():
        out.append(_py2_str(key))
        if isinstance(value, np.ndarray):
            assert value.dtype == np.uint8
            out += [b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85", _py2_str(b"b"), b"\x87R(K\x01",
                    *map(_py2_int, value.shape), b"\x86" if value.ndim == 2 else b"\x85",
                    b"cnumpy\ndtype\n", _py2_str(b"u1"), b"K\x00K\x01\x87R(K\x03", _py2_str(b"|"),
                    b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89", _py2_str(value.tobytes()), b"tb"]
        elif isinstance(value, list):
            out += [b"](", *map(_py2_int, value), b"e"]
        else:
            out.append(_py2_str(value))
    out.append(b"u.")  # SETITEMS, STOP
    return b"".join(out)


@pytest.mark.parametrize("fmt", ["python2", "protocol-2", "default-protocol", "highest-protocol"])
def test_cifar_pickles_of_every_protocol_load(tmp_path, fmt):
    """The original Python 2 files, and re-pickled ones (protocol 2: bytes as _codecs.encode;
    protocol 5: numpy's _frombuffer), all load through the restricted unpickler."""
    train_x, train_y, test_x, test_y = _make_cifar10(tmp_path)
    base = tmp_path / "cifar-10-batches-py"
    for path in sorted(base.iterdir()):
        with open(path, "rb") as f:
            batch = pickle.load(f)
        if fmt == "python2":
            blob = _py2_pickle(batch)
            assert b"cnumpy.core.multiarray\n_reconstruct\n" in blob
        else:
            blob = pickle.dumps(batch, protocol={"protocol-2": 2, "default-protocol": pickle.DEFAULT_PROTOCOL,
                                                 "highest-protocol": pickle.HIGHEST_PROTOCOL}[fmt])
        assert pickle.loads(blob, encoding="bytes")[b"labels"] == batch[b"labels"]
        path.write_bytes(blob)
    ds = data.load("cifar10", tmp_path)
    np.testing.assert_array_equal(ds.train_x.numpy(), train_x)
    np.testing.assert_array_equal(ds.train_y.numpy(), train_y)
    np.testing.assert_array_equal(ds.test_x.numpy(), test_x)
    np.testing.assert_array_equal(ds.test_y.numpy(), test_y)


class _OpensAFile:
    """A pickle payload: unpickling it would create `marker` (open(marker, "w"))."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


class _RunsAShellCommand:
    """A pickle payload: unpickling it would run `touch marker` (os.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


@pytest.mark.parametrize("dataset,file,label_key", [
    ("cifar10", "cifar-10-batches-py/data_batch_1", b"labels"),
    ("cifar100", "cifar-100-python/train", b"fine_labels"),
])
@pytest.mark.parametrize("payload,refers_to", [(_OpensAFile, "io.open"), (_RunsAShellCommand, "posix.system")])
@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_cifar_pickle_with_code_is_refused_and_never_runs(tmp_path, capsys, dataset, file, label_key, payload,
                                                          refers_to, protocol):
    if dataset == "cifar10":
        _make_cifar10(tmp_path / "data")
    else:
        for name in ("train", "test"):
            _write_cifar_batch(tmp_path / "data" / "cifar-100-python" / name, np.zeros((2, 3, 32, 32), np.uint8),
                               [0, 1], b"fine_labels")
    marker = tmp_path / "pwned"
    planted = tmp_path / "data" / file
    planted.write_bytes(pickle.dumps({b"batch_label": b"training batch 1 of 5", b"data": payload(marker),
                                      label_key: [0, 1]}, protocol=protocol))
    if refers_to == "posix.system" and os.name != "posix":
        refers_to = "nt.system"

    code, out, err = run_cli(["train", "--dataset", dataset, "--data-dir", str(tmp_path / "data"), "--epochs", "1",
                              "--device", "cpu", "--out", str(tmp_path / "run")], capsys)
    assert not marker.exists(), "the pickle's payload ran"
    assert code == 2, err
    assert out == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("weat: error: ")
    assert str(planted) in lines[0] and f"refers to {refers_to}" in lines[0]
    assert "never runs code" in lines[0] and "expected" in lines[0]
    assert not (tmp_path / "run").exists()


def test_safe_pickle_refuses_other_codecs_and_odd_names():
    from weatcli import safe_pickle

    # _codecs.encode is admitted for what Python 3 writes for bytes (latin1) only.
    blob = pickle.dumps(b"\x00\xffok", protocol=2)
    assert b"_codecs" in blob and safe_pickle.load(io.BytesIO(blob)) == b"\x00\xffok"
    rot13 = b"\x80\x02c_codecs\nencode\nX\x02\x00\x00\x00abX\x05\x00\x00\x00rot13\x86R."
    assert pickle.loads(rot13) == "no"  # plain pickle calls it
    with pytest.raises(safe_pickle.UnsafePickleError, match="rot13"):
        safe_pickle.load(io.BytesIO(rot13))
    # A STACK_GLOBAL name may hold a newline: the refusal still names it on one line.
    odd = b"\x80\x04\x8c\x02os\x94\x8c\x07sys\ntem\x94\x93\x94."
    with pytest.raises(safe_pickle.UnsafePickleError) as e:
        safe_pickle.load(io.BytesIO(odd))
    assert "\n" not in e.value.what and "os.sys" in e.value.what


def test_download_uses_torchvision_class_and_stdout_stays_clean(tmp_path, monkeypatch, capsys):
    calls = []

    class FakeCIFAR10:  # stands in for torchvision.datasets.CIFAR10: "downloads" by writing files
        def __init__(self, root, train=True, download=False):
            calls.append((root, train, download))
            print("Downloading https://example.invalid/cifar-10-python.tar.gz")
            _make_cifar10(Path(root))

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    ds = data.load("cifar10", tmp_path, download=True)
    assert calls == [(str(tmp_path), True, True)] and len(ds.train_y) == 20
    out = capsys.readouterr()
    assert out.out == "" and "Downloading" in out.err
    data._CACHE.clear()
    data.load("cifar10", tmp_path, download=True)  # files present: nothing fetched again
    assert len(calls) == 1


# ----------------------------------------------------------------------------------------------
# SVHN (.mat files)


def _write_svhn(path: Path, x_nchw: np.ndarray, y: np.ndarray) -> None:
    # The real layout: X (H, W, C, N) uint8, y (N, 1) with the digit 0 stored as 10.
    scipy.io.savemat(path, {"X": x_nchw.transpose(2, 3, 1, 0), "y": y.reshape(-1, 1).astype(np.uint8)})


def test_svhn_layout_and_label_10_means_0(tmp_path):
    rng = np.random.default_rng(2)
    train_x, test_x = _images(rng, 5, 3, 32), _images(rng, 3, 3, 32)
    _write_svhn(tmp_path / "train_32x32.mat", train_x, np.array([10, 1, 2, 10, 9]))
    _write_svhn(tmp_path / "test_32x32.mat", test_x, np.array([3, 10, 4]))
    ds = data.load("svhn", tmp_path)
    assert ds.train_y.tolist() == [0, 1, 2, 0, 9] and ds.test_y.tolist() == [3, 0, 4]
    np.testing.assert_array_equal(ds.train_x.numpy(), train_x)
    np.testing.assert_array_equal(ds.test_x.numpy(), test_x)
    assert ds.num_classes == 10 and ds.image_size == 32


def test_svhn_missing_key_and_missing_file(tmp_path):
    with pytest.raises(WeatInputError, match="train_32x32.mat"):
        data.load("svhn", tmp_path)
    rng = np.random.default_rng(3)
    _write_svhn(tmp_path / "train_32x32.mat", _images(rng, 2, 3, 32), np.array([1, 2]))
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 1), np.uint8)})
    with pytest.raises(WeatInputError) as e:
        data.load("svhn", tmp_path)
    assert "test_32x32.mat" in str(e.value) and "'y'" in str(e.value)


# ----------------------------------------------------------------------------------------------
# Tiny ImageNet (.npz, or the original JPEG folder)


def _write_tiny_npz(path: Path, x_nhwc: np.ndarray, y: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, image=x_nhwc, label=y)


@pytest.mark.parametrize("sub", ["tiny-imagenet", ""])
def test_tiny_imagenet_npz(tmp_path, sub):
    rng = np.random.default_rng(4)
    train_x = _images(rng, 4, 3, 64).transpose(0, 2, 3, 1)  # NHWC on disk
    val_x = _images(rng, 2, 3, 64).transpose(0, 2, 3, 1)
    _write_tiny_npz(tmp_path / sub / "train.npz", train_x, np.array([0, 199, 5, 5]))
    _write_tiny_npz(tmp_path / sub / "val.npz", val_x, np.array([1, 2]))
    ds = data.load("tiny-imagenet", tmp_path)
    assert ds.num_classes == 200 and ds.train_x.shape == (4, 3, 64, 64)
    np.testing.assert_array_equal(ds.train_x.numpy(), train_x.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(ds.test_x.numpy(), val_x.transpose(0, 3, 1, 2))
    assert ds.train_y.tolist() == [0, 199, 5, 5] and ds.test_y.tolist() == [1, 2]


def test_tiny_imagenet_npz_wrong_dtype(tmp_path):
    _write_tiny_npz(tmp_path / "train.npz", np.zeros((2, 64, 64, 3), np.float32), np.array([0, 1]))
    _write_tiny_npz(tmp_path / "val.npz", np.zeros((2, 64, 64, 3), np.uint8), np.array([0, 1]))
    with pytest.raises(WeatInputError, match=r"train\.npz.*uint8"):
        data.load("tiny-imagenet", tmp_path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision 0.29 deprecates its JPEG codec
def test_tiny_imagenet_jpeg_folder(tmp_path):
    from torchvision.io import encode_jpeg, write_file

    base = tmp_path / "tiny-imagenet-200"
    # wnids.txt deliberately not sorted: it, not the folder order, defines the labels.
    wnids = [f"n{i:08d}" for i in range(200)][::-1]
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")

    def solid(rgb, gray=False):  # flat colours survive JPEG almost exactly
        img = torch.tensor(rgb, dtype=torch.uint8)[:, None, None].expand(3, 64, 64).contiguous()
        return encode_jpeg(img[:1] if gray else img, quality=95)

    for label, wnid in enumerate(wnids):
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True)
        write_file(str(folder / f"{wnid}_0.JPEG"), solid((200, 30, 90) if label == 0 else (label, label, label)))
    write_file(str(base / "train" / wnids[1] / "images" / f"{wnids[1]}_1.JPEG"), solid((60, 60, 60), gray=True))
    write_file(str(base / "val" / "images" / "val_0.JPEG"), solid((10, 220, 40)))
    write_file(str(base / "val" / "images" / "val_1.JPEG"), solid((120, 120, 120), gray=True))
    (base / "val" / "val_annotations.txt").write_text(
        f"val_0.JPEG\t{wnids[7]}\t0\t0\t63\t63\nval_1.JPEG\t{wnids[0]}\t1\t2\t60\t61\n"
    )

    ds = data.load("tiny-imagenet", tmp_path)
    assert ds.num_classes == 200 and ds.train_x.shape == (201, 3, 64, 64) and ds.test_x.shape == (2, 3, 64, 64)
    assert ds.train_y[:3].tolist() == [0, 1, 1] and ds.train_y[-1].item() == 199
    assert ds.test_y.tolist() == [7, 0]
    mean = lambda t: t.float().mean(dim=(1, 2))  # noqa: E731  per-channel mean of (3, H, W)
    assert torch.allclose(mean(ds.train_x[0]), torch.tensor([200.0, 30.0, 90.0]), atol=4)  # R, G, B order
    assert torch.allclose(mean(ds.train_x[2]), torch.tensor([60.0] * 3), atol=2)  # grayscale -> RGB
    assert torch.allclose(mean(ds.test_x[0]), torch.tensor([10.0, 220.0, 40.0]), atol=4)


def test_tiny_imagenet_missing_and_no_download(tmp_path):
    with pytest.raises(WeatInputError, match="tiny-imagenet-200"):
        data.load("tiny-imagenet", tmp_path)
    with pytest.raises(WeatInputError, match="not supported"):
        data.load("tiny-imagenet", tmp_path, download=True)


# ----------------------------------------------------------------------------------------------
# digits (scikit-learn, bundled)


def test_digits_split_and_shape():
    ds = data.load("digits")
    assert (len(ds.train_y), len(ds.test_y)) == (1437, 360)
    assert ds.train_x.shape == (1437, 1, 16, 16) and ds.train_x.dtype == torch.uint8
    assert ds.in_channels == 1 and ds.image_size == 16 and ds.num_classes == 10
    assert ds.train_x.max() > 200 and ds.train_x.min() == 0
    # Stratified: every class has ~20% of its images in the test split.
    total = torch.bincount(torch.cat([ds.train_y, ds.test_y]), minlength=10).float()
    test = torch.bincount(ds.test_y, minlength=10).float()
    assert ((test - 0.2 * total).abs() <= 1).all()
    # Fixed split: a fresh parse gives identical tensors.
    data._CACHE.clear()
    again = data.load("digits")
    assert torch.equal(again.train_x, ds.train_x) and torch.equal(again.test_y, ds.test_y)


def test_digits_are_the_rescaled_bilinear_upsampled_sklearn_images():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    src = torch.from_numpy(np.rint(bunch.images * 255 / 16))[:, None].float()  # (1797, 1, 8, 8), 0..255
    want = torch.nn.functional.interpolate(src, size=(16, 16), mode="bilinear", align_corners=False)
    want = want.round().to(torch.uint8)
    ds = data.load("digits")
    got = torch.cat([ds.train_x, ds.test_x])
    got_y = torch.cat([ds.train_y, ds.test_y])

    # The split is a partition of the 1797 images, each with its own label.
    def key(imgs, labels):
        return sorted((bytes(i.flatten().tolist()), int(y)) for i, y in zip(imgs, labels))

    assert key(got, got_y) == key(want, torch.from_numpy(bunch.target))


# ----------------------------------------------------------------------------------------------
# npz:PATH


def test_npz_explicit_split_and_nhw(tmp_path):
    rng = np.random.default_rng(5)
    path = tmp_path / "mine.npz"
    x_train = rng.integers(0, 256, (6, 12, 12), dtype=np.uint8)  # NHW -> one channel
    x_test = rng.integers(0, 256, (2, 12, 12), dtype=np.uint8)
    np.savez(path, x_train=x_train, y_train=np.array([0, 1, 2, 0, 1, 4]), x_test=x_test, y_test=np.array([3, 1]))
    ds = data.load(f"npz:{path}")
    assert ds.name == f"npz:{path.resolve()}"
    assert ds.train_x.shape == (6, 1, 12, 12) and ds.num_classes == 5
    np.testing.assert_array_equal(ds.train_x[:, 0].numpy(), x_train)
    np.testing.assert_array_equal(ds.test_x[:, 0].numpy(), x_test)
    assert ds.test_y.tolist() == [3, 1]


def test_npz_image_label_gets_stratified_seeded_split(tmp_path):
    rng = np.random.default_rng(6)
    x = _images(rng, 100, 3, 8).transpose(0, 2, 3, 1)
    x[:, 0, 0, 0] = np.arange(100)  # a per-image id, to check the split is a partition
    y = np.repeat(np.arange(5), 20)
    path = tmp_path / "pool.npz"
    np.savez(path, image=x, label=y)
    ds = data.load(f"npz:{path}")
    assert (len(ds.train_y), len(ds.test_y)) == (90, 10)
    assert torch.bincount(ds.test_y, minlength=5).tolist() == [2] * 5
    ids = torch.cat([ds.train_x, ds.test_x])[:, 0, 0, 0].sort().values
    assert ids.tolist() == list(range(100))
    # Each image keeps its own label and pixels (channel order included).
    for xs, ys in ((ds.train_x, ds.train_y), (ds.test_x, ds.test_y)):
        idx = xs[:, 0, 0, 0].long().numpy()
        np.testing.assert_array_equal(ys.numpy(), y[idx])
        np.testing.assert_array_equal(xs.numpy(), x[idx].transpose(0, 3, 1, 2))
    data._CACHE.clear()
    again = data.load(f"npz:{path}")
    assert torch.equal(again.test_x, ds.test_x)


@pytest.mark.parametrize(
    "arrays, pattern",
    [
        ({"image": np.zeros((4, 8, 8, 3), np.float32), "label": np.arange(4)}, "uint8"),
        ({"image": np.zeros((4, 8, 9, 3), np.uint8), "label": np.arange(4)}, "square"),
        ({"image": np.zeros((4, 3, 8, 8), np.uint8), "label": np.arange(4)}, "NCHW"),
        ({"image": np.zeros((4, 8, 8, 3), np.uint8), "label": np.arange(3)}, "length 4"),
        ({"image": np.zeros((4, 8, 8, 3), np.uint8), "label": np.ones(4)}, "integer"),
        ({"image": np.zeros((4, 8, 8, 3), np.uint8), "label": -np.arange(4)}, ">= 0"),
        ({"x_train": np.zeros((4, 8, 8, 3), np.uint8), "y_train": np.arange(4)}, "x_test"),
        ({"pixels": np.zeros((4, 8, 8, 3), np.uint8)}, "image/label"),
    ],
)
def test_npz_bad_contents_name_the_file(tmp_path, arrays, pattern):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(WeatInputError) as e:
        data.load(f"npz:{path}")
    assert str(path) in str(e.value) and pattern in str(e.value)


def test_npz_missing_or_corrupt_file(tmp_path):
    with pytest.raises(WeatInputError, match="nope.npz"):
        data.load(f"npz:{tmp_path / 'nope.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(WeatInputError, match="junk.npz"):
        data.load(f"npz:{tmp_path / 'junk.npz'}")


# ----------------------------------------------------------------------------------------------
# registry, roots, cache


def test_registry_and_unknown_name():
    assert data.dataset_names() == ["digits", "cifar10", "cifar100", "svhn", "tiny-imagenet"]
    assert set(data.DATASETS) == set(data.dataset_names())
    with pytest.raises(WeatInputError) as e:
        data.load("foo")
    assert str(e.value) == (
        "dataset: unknown 'foo'; expected one of digits, cifar10, cifar100, svhn, tiny-imagenet or npz:PATH"
    )


def test_resolve_root(tmp_path, monkeypatch):
    monkeypatch.setenv("WEAT_DATA_DIR", str(tmp_path / "env"))
    assert data.resolve_root(tmp_path / "flag") == (tmp_path / "flag").resolve()
    assert data.resolve_root(None) == (tmp_path / "env").resolve()
    monkeypatch.delenv("WEAT_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.resolve_root(None) == (tmp_path / ".cache" / "weat" / "data").resolve()


def test_load_caches_by_name_and_root(tmp_path, monkeypatch):
    _make_cifar10(tmp_path)
    calls = []
    real = data.DATASETS["cifar10"]
    monkeypatch.setitem(data.DATASETS, "cifar10", lambda root, dl: calls.append(root) or real(root, dl))
    a = data.load("cifar10", tmp_path)
    b = data.load("cifar10", str(tmp_path))
    assert len(calls) == 1 and b.train_x is a.train_x
    monkeypatch.setenv("WEAT_DATA_DIR", str(tmp_path))
    data.load("cifar10")  # same root reached through the environment
    assert len(calls) == 1


def test_npz_cache_sees_a_rewritten_file(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.array([0, 1]),
             x_test=np.zeros((1, 4, 4), np.uint8), y_test=np.array([1]))
    assert data.load(f"npz:{path}").num_classes == 2
    np.savez(path, x_train=np.zeros((3, 4, 4), np.uint8), y_train=np.array([0, 1, 2]),
             x_test=np.zeros((1, 4, 4), np.uint8), y_test=np.array([1]))
    assert data.load(f"npz:{path}").num_classes == 3


# ----------------------------------------------------------------------------------------------
# augment / to_float


def _batch(b=64, c=3, h=8, w=8, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (b, c, h, w), generator=g, dtype=torch.uint8)  # no zeros: padding shows


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_first_per_class_keeps_the_first_images_of_each_class_in_file_order():
    ds = data.load("digits")
    sub = data.first_per_class(ds, 7)
    assert torch.equal(sub.train_y.bincount(), torch.full((10,), 7))
    for c in range(10):  # the first 7 of class c, in the order the file has them
        assert torch.equal(sub.train_x[sub.train_y == c], ds.train_x[ds.train_y == c][:7])
    assert sub.test_x is ds.test_x and sub.num_classes == ds.num_classes  # the test split is whole
    assert data.first_per_class(ds, None) is ds
    assert len(data.first_per_class(ds, 10_000).train_y) == len(ds.train_y)  # more than a class has: all of it


def test_train_per_class_reaches_the_training_loop(tmp_path):
    from weatcli.config import resolve
    from weatcli.train import fit

    events = []
    cfg = resolve(preset="digits-standard", overrides={
        "data.train_per_class": 3, "train.epochs": 1, "train.batch_size": 10, "train.eval_n": 20,
        "train.energy_n": 20, "train.device": "cpu", "train.out": str(tmp_path / "run")})
    fit(cfg, on_event=lambda kind, payload: events.append((kind, payload)))
    start = dict(events)["start"]
    assert start["batches"] == 3  # 10 classes x 3 images, batches of 10


def test_label_noise_changes_the_asked_fraction_of_training_labels_to_other_classes():
    ds = data.load("digits")
    noisy = data.noisy_labels(ds, 0.2)
    changed = noisy.train_y != ds.train_y
    assert int(changed.sum()) == round(0.2 * len(ds.train_y))  # exactly that many, each to a wrong class
    assert torch.equal(noisy.train_x, ds.train_x) and noisy.test_y is ds.test_y  # images and the test split: as they were
    # The wrong classes are spread over all the others (symmetric noise), not one fixed shift.
    shifts = ((noisy.train_y - ds.train_y) % 10)[changed]
    assert set(shifts.tolist()) == set(range(1, 10))
    assert torch.equal(data.noisy_labels(ds, 0.2).train_y, noisy.train_y)  # the same labels every time
    assert data.noisy_labels(ds, 0.0) is ds
    with pytest.raises(ValueError, match="label noise"):
        data.noisy_labels(ds, 1.0)


def test_label_noise_reaches_the_training_loop_and_is_validated(tmp_path, monkeypatch):
    from weatcli.config import resolve
    from weatcli.errors import WeatInputError
    from weatcli.train import fit

    with pytest.raises(WeatInputError, match="label_noise"):
        resolve(preset="digits-standard", overrides={"data.label_noise": 1.5})
    seen = []

    def spy(ds, fraction):
        out = real(ds, fraction)
        seen.append((len(ds.train_y), fraction, int((out.train_y != ds.train_y).sum())))
        return out

    real = data.noisy_labels
    monkeypatch.setattr(data, "noisy_labels", spy)
    cfg = resolve(preset="digits-standard", overrides={
        "data.train_per_class": 3, "data.label_noise": 0.5, "train.epochs": 1, "train.batch_size": 10,
        "train.eval_n": 20, "train.energy_n": 20, "train.device": "cpu", "train.out": str(tmp_path / "run")})
    fit(cfg)
    assert seen == [(30, 0.5, 15)]  # applied to the 30 images of the per-class subset


def test_to_float():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8)
    assert torch.equal(data.to_float(x), torch.tensor([0.0, 0.2, 1.0]))


def test_augment_identity_without_padding_or_flip():
    x = _batch()
    out = data.augment(x, generator=_gen(0), padding=0, flip=False)
    assert out.dtype == torch.float32 and torch.equal(out, x.float() / 255)


def test_augment_range_shape_and_seeding():
    x = _batch()
    a = data.augment(x, generator=_gen(1))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1 and (a == 0).any()  # zero padding came in
    assert torch.equal(a, data.augment(x, generator=_gen(1)))
    assert not torch.equal(a, data.augment(x, generator=_gen(2)))


def test_augment_flip_only_mirrors():
    x = _batch()
    out = data.augment(x, generator=_gen(3), padding=0, flip=True)
    xf = x.float() / 255
    same = (out == xf).flatten(1).all(1)
    mirrored = (out == xf.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all()
    assert same.any() and mirrored.any()


@pytest.mark.parametrize("flip", [False, True])
def test_augment_is_a_window_of_the_padded_image(flip):
    p, x = 2, _batch(b=64, h=7, w=7)
    out = data.augment(x, generator=_gen(4), padding=p, flip=flip)
    padded = torch.nn.functional.pad(x, (p, p, p, p)).float() / 255  # (B, C, 11, 11)
    windows = padded.unfold(2, 7, 1).unfold(3, 7, 1)  # (B, C, 5, 5, 7, 7): every (dy, dx) crop
    windows = windows.permute(0, 2, 3, 1, 4, 5).flatten(1, 2)  # (B, 25, C, 7, 7)
    candidates = torch.cat([windows, windows.flip(-1)], 1) if flip else windows
    match = (candidates == out[:, None]).flatten(2).all(2)  # (B, 25 or 50)
    assert match.any(1).all()
    # Offsets vary from image to image, and with flip both orientations occur.
    hits = match.float().argmax(1)
    assert len(hits.unique()) > 5
    if flip:
        assert (hits >= 25).any() and (hits < 25).any()


def test_augment_rejects_float_input():
    with pytest.raises(ValueError, match="uint8"):
        data.augment(torch.zeros(2, 3, 4, 4), generator=None)
