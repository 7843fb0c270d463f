"""Datasets as device-resident uint8 tensors, and batched on-device augmentation.

Every loader reads a real on-disk format (torchvision's CIFAR pickles, SVHN .mat files, Tiny
ImageNet as .npz or as the original JPEG folder, a user .npz) into numpy uint8 NHWC arrays;
`load` turns them into contiguous NCHW uint8 tensors on the requested device. Nothing is
downloaded unless `download=True`, and then only through torchvision's own downloader classes.
Bad or missing files raise `WeatInputError` with one line naming the file and what was expected.
Nothing read runs code: CIFAR pickles go through `safe_pickle` (plain data and numpy arrays only),
.npz files are read with allow_pickle=False.

Images stay uint8 on the device (4x less memory than float32); `augment` / `to_float` produce the
float [0, 1] NCHW batches the engine works with.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from weatcli import safe_pickle
from weatcli.errors import WeatInputError, WeatRunError

# (train_x NHWC uint8, train_y int64, test_x NHWC uint8, test_y int64, num_classes)
Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]
Loader = Callable[[Path, bool], Arrays]

NPZ_PREFIX = "npz:"
NPZ_TEST_FRACTION = 0.1  # held-out share of an image/label-only .npz
SPLIT_SEED = 0  # fixed so every command (train, attack, energy) sees the same split


@dataclass(frozen=True, eq=False, repr=False)  # eq=False: field-wise `==` on tensors is ambiguous
class Dataset:
    """A whole dataset resident on one device; images uint8 NCHW, labels int64."""

    name: str  # registry key ("cifar10", ...) or "npz:/abs/path"
    train_x: torch.Tensor  # (N, C, H, W) uint8
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor  # (M, C, H, W) uint8
    test_y: torch.Tensor  # (M,) int64
    num_classes: int

    def __post_init__(self) -> None:
        # Programming errors, not user input: loaders validate files before building a Dataset.
        for split, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            if x.dtype != torch.uint8 or x.ndim != 4:
                raise ValueError(f"Dataset.{split}_x: expected uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise ValueError(f"Dataset.{split}_y: expected int64 ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}")
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise ValueError(
                f"Dataset: train images {tuple(self.train_x.shape[1:])} != test images {tuple(self.test_x.shape[1:])}"
            )

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[2])  # H; every dataset is square

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={len(self.train_y)}, test={len(self.test_y)}, "
            f"shape=({self.in_channels}, {self.image_size}, {self.image_size}), "
            f"num_classes={self.num_classes}, device={self.train_x.device})"
        )


# ----------------------------------------------------------------------------------------------
# validation helpers: every message is one line naming the file and what was expected


def _one_line(e: BaseException) -> str:
    """An exception as a single line (library messages may span lines)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _check_images(x: object, where: str, *, channels: int | None = None, size: int | None = None) -> np.ndarray:
    """Validate uint8 NHWC (or NHW = one channel) images; returns NHWC."""
    if not isinstance(x, np.ndarray):
        raise WeatInputError(f"{where}: expected a uint8 image array, got {type(x).__name__}")
    if x.dtype != np.uint8:
        raise WeatInputError(f"{where}: expected dtype uint8 (pixel values 0..255), got {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]  # NHW -> NHW1
    if x.ndim != 4:
        raise WeatInputError(f"{where}: expected images of shape (N, H, W, C) or (N, H, W), got {x.shape}")
    n, h, w, c = x.shape
    if h != w:
        hint = " (this looks like NCHW; transpose to NHWC)" if x.shape[2] == x.shape[3] else ""
        raise WeatInputError(f"{where}: expected square images (N, H, W, C) with H == W, got {x.shape}{hint}")
    if channels is not None and c != channels:
        raise WeatInputError(f"{where}: expected {channels} channels in (N, H, W, C), got {x.shape}")
    if size is not None and h != size:
        raise WeatInputError(f"{where}: expected {size}x{size} images, got {x.shape}")
    return x


def _check_labels(y: object, n: int, where: str, num_classes: int | None = None) -> np.ndarray:
    """Validate integer class labels of length n; returns int64."""
    y = np.asarray(y)
    if y.ndim == 2 and 1 in y.shape:
        y = y.reshape(-1)  # MATLAB-style column vectors (N, 1)
    if y.ndim != 1 or y.shape[0] != n:
        raise WeatInputError(f"{where}: expected 1-D labels of length {n} (one per image), got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise WeatInputError(f"{where}: expected integer class labels, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if n and y.min() < 0:
        raise WeatInputError(f"{where}: expected class labels >= 0, got {int(y.min())}")
    if num_classes is not None and n and y.max() >= num_classes:
        raise WeatInputError(f"{where}: expected class labels in [0, {num_classes}), got {int(y.max())}")
    return y


def _require_files(name: str, paths: list[Path], root: Path, *, hint: str = "") -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise WeatInputError(
            f"dataset {name}: missing {', '.join(str(p) for p in missing)}; "
            f"expected {hint or 'its files'} under {root}"
            f" (pass --download to fetch them, or --data-dir to point at an existing copy)"
        )


def _torchvision_datasets():
    import torchvision.datasets

    return torchvision.datasets


def _download(name: str, fetch: Callable[[], None], root: Path) -> None:
    """Run a torchvision downloader; its progress prints go to stderr, stdout carries results only."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            fetch()
    except Exception as e:  # network, disk or checksum failure: not bad input, a failed run
        raise WeatRunError(f"dataset {name}: download to {root} failed ({_one_line(e)})") from e


def _load_npz_file(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an .npz, read eagerly; pickled objects are refused."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:
        raise WeatInputError(f"{path}: not a readable .npz ({_one_line(e)}); expected a numpy .npz of plain arrays "
                             f"(numpy.savez, no pickled objects)") from e


def _npz_key(arrays: dict[str, np.ndarray], key: str, path: Path, expected: str) -> np.ndarray:
    if key not in arrays:
        raise WeatInputError(f"{path}: missing key {key!r} (found {sorted(arrays)}); expected {expected}")
    return arrays[key]


# ----------------------------------------------------------------------------------------------
# loaders: (root, download) -> NHWC uint8 arrays


def _digits(root: Path, download: bool) -> Arrays:
    """scikit-learn's bundled 8x8 digits, upsampled to 16x16; offline, root unused."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8), values 0..16 -> 0..255
    labels = bunch.target.astype(np.int64)
    # Upsample the uint8 images (not the 0..16 ones) so the result is what a user would get by
    # resizing the stored images; bilinear + align_corners=False is a convex blend, so no clamp loss.
    up = F.interpolate(torch.from_numpy(images).float()[:, None], size=(16, 16), mode="bilinear", align_corners=False)
    x = up.round().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (1797, 16, 16, 1)
    train_x, test_x, train_y, test_y = train_test_split(
        x, labels, test_size=0.2, stratify=labels, random_state=SPLIT_SEED
    )  # 1437 / 360
    return train_x, train_y, test_x, test_y, 10


def _cifar_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One torchvision CIFAR pickle: {b"data": (N, 3072) uint8 rows R|G|B, label_key: [N ints]}."""
    expected = f"a CIFAR python batch (dict with b'data' (N, 3072) uint8 and {label_key!r})"
    try:
        with open(path, "rb") as f:
            # The standard Python-2 pickles (the ones torchvision reads); encoding="bytes" keeps their
            # keys as bytes. Only plain data and numpy arrays are admitted: a pickle naming anything
            # else (os.system, eval, ...) is refused before it is called.
            batch = safe_pickle.load(f, encoding="bytes")
    except safe_pickle.UnsafePickleError as e:
        raise WeatInputError(
            f"{path}: the pickle refers to {e.what}, which a CIFAR batch never holds; refusing to load it "
            f"(weat never runs code from data files); expected {expected}"
        ) from None
    except Exception as e:
        raise WeatInputError(
            f"{path}: unreadable ({_one_line(e)}); expected {expected}; delete it and re-run with --download"
        ) from e
    if not isinstance(batch, dict):
        raise WeatInputError(f"{path}: expected {expected}, got {type(batch).__name__}")
    # Accept str keys too: files re-pickled by Python 3 tools (or loaded with latin1) use them.
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(label_key, batch.get(label_key.decode()))
    if data is None or labels is None:
        missing = [k for k, v in ((b"data", data), (label_key, labels)) if v is None]
        raise WeatInputError(f"{path}: missing key {', '.join(map(repr, missing))}; expected {expected}")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise WeatInputError(f"{path}: expected b'data' of shape (N, 3072) uint8, got {data.dtype} {data.shape}")
    # Each row is three 32x32 planes (R, G, B), row-major: (N, 3, 32, 32) -> NHWC.
    x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return x, _check_labels(labels, len(x), f"{path} {label_key!r}", num_classes)


def _cifar(name: str, folder: str, train_files: list[str], test_file: str, label_key: bytes,
           num_classes: int, torchvision_cls: Callable[[], type]) -> Loader:
    def loader(root: Path, download: bool) -> Arrays:
        base = root / folder
        paths = [base / f for f in train_files] + [base / test_file]
        if download and not all(p.is_file() for p in paths):
            cls = torchvision_cls()  # imported lazily: torchvision.datasets is slow to import
            _download(name, lambda: cls(str(root), train=True, download=True), root)  # fetches both splits
        _require_files(name, paths, root, hint=f"torchvision's {folder}/ python batches")
        train = [_cifar_batch(p, label_key, num_classes) for p in paths[:-1]]
        test_x, test_y = _cifar_batch(paths[-1], label_key, num_classes)
        train_x = np.concatenate([x for x, _ in train])  # batches in file order, as torchvision does
        train_y = np.concatenate([y for _, y in train])
        return train_x, train_y, test_x, test_y, num_classes

    return loader


def _svhn_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An SVHN cropped-digits .mat: X (32, 32, 3, N) uint8, y (N, 1) with digit 0 stored as 10."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:
        raise WeatInputError(
            f"{path}: unreadable ({_one_line(e)}); expected an SVHN cropped-digits .mat file (MATLAB v5 with X and y); "
            f"delete it and re-run with --download"
        ) from e
    for key in ("X", "y"):
        if key not in mat:
            raise WeatInputError(f"{path}: missing key {key!r}; expected X (32, 32, 3, N) uint8 and y (N, 1)")
    x = mat["X"]
    if x.dtype != np.uint8 or x.shape[:3] != (32, 32, 3) or x.ndim != 4:
        raise WeatInputError(f"{path}: expected X of shape (32, 32, 3, N) uint8, got {x.dtype} {x.shape}")
    x = x.transpose(3, 0, 1, 2)  # (H, W, C, N) -> (N, H, W, C)
    y = _check_labels(mat["y"], len(x), f"{path} 'y'")
    y[y == 10] = 0
    return x, _check_labels(y, len(y), f"{path} 'y'", 10)


def _svhn(root: Path, download: bool) -> Arrays:
    paths = {split: root / f"{split}_32x32.mat" for split in ("train", "test")}
    if download:
        svhn_cls = _torchvision_datasets().SVHN
        for split, p in paths.items():
            if not p.is_file():
                _download("svhn", lambda s=split: svhn_cls(str(root), split=s, download=True), root)
    _require_files("svhn", list(paths.values()), root, hint="train_32x32.mat and test_32x32.mat")
    train_x, train_y = _svhn_split(paths["train"])
    test_x, test_y = _svhn_split(paths["test"])
    return train_x, train_y, test_x, test_y, 10


TINY_CLASSES = 200
TINY_SIZE = 64


def _tiny_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    arrays = _load_npz_file(path)
    expected = f"keys image ({TINY_SIZE}x{TINY_SIZE} RGB uint8) and label"
    x = _check_images(_npz_key(arrays, "image", path, expected), f"{path} 'image'", channels=3, size=TINY_SIZE)
    y = _check_labels(_npz_key(arrays, "label", path, expected), len(x), f"{path} 'label'", TINY_CLASSES)
    return x, y


def _read_rgb(path: Path) -> np.ndarray:
    """One JPEG as (H, W, 3) uint8; grayscale files (Tiny ImageNet has some) become RGB."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates its decoders
            img = decode_image(str(path), mode=ImageReadMode.RGB)  # (3, H, W) uint8
    except Exception as e:
        raise WeatInputError(f"{path}: could not decode the image ({_one_line(e)})") from e
    if img.shape != (3, TINY_SIZE, TINY_SIZE):
        raise WeatInputError(f"{path}: expected a {TINY_SIZE}x{TINY_SIZE} image, got {tuple(img.shape[1:])}")
    return img.permute(1, 2, 0).numpy()


def _stack(images: list[np.ndarray]) -> np.ndarray:
    return np.stack(images) if images else np.zeros((0, TINY_SIZE, TINY_SIZE, 3), np.uint8)


def _tiny_folder(base: Path) -> Arrays:
    """The original tiny-imagenet-200/ layout (train/<wnid>/images/*.JPEG, val/images + annotations)."""
    wnids_file = base / "wnids.txt"
    if wnids_file.is_file():
        wnids = [w for w in wnids_file.read_text().split() if w]
    else:  # no class list: the sorted train folder names, as torchvision's ImageFolder would order them
        wnids = sorted(p.name for p in (base / "train").iterdir() if p.is_dir())
    if len(wnids) != TINY_CLASSES:
        raise WeatInputError(f"{wnids_file if wnids_file.is_file() else base / 'train'}: "
                             f"expected {TINY_CLASSES} classes (wnids), found {len(wnids)}")
    index = {w: i for i, w in enumerate(wnids)}

    train_x, train_y = [], []
    for label, wnid in enumerate(wnids):
        files = sorted((base / "train" / wnid / "images").glob("*.JPEG"))
        if not files:
            raise WeatInputError(f"{base / 'train' / wnid / 'images'}: expected *.JPEG images of class {wnid}")
        train_x += [_read_rgb(p) for p in files]
        train_y += [label] * len(files)

    annotations = base / "val" / "val_annotations.txt"
    val_x, val_y = [], []
    for lineno, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise WeatInputError(f"{annotations}:{lineno}: expected 'filename<TAB>wnid...' with a wnid "
                                 f"from wnids.txt, got {line.strip()!r}")
        val_x.append(_read_rgb(base / "val" / "images" / fields[0]))
        val_y.append(index[fields[1]])
    return (_stack(train_x), np.array(train_y, np.int64), _stack(val_x), np.array(val_y, np.int64), TINY_CLASSES)


def _tiny_imagenet(root: Path, download: bool) -> Arrays:
    # Preferred: pre-packed .npz (decoding 110k JPEGs takes a while); else the original folder.
    for base in (root / "tiny-imagenet", root):
        train, val = base / "train.npz", base / "val.npz"
        if train.is_file() and val.is_file():
            train_x, train_y = _tiny_npz(train)
            val_x, val_y = _tiny_npz(val)
            return train_x, train_y, val_x, val_y, TINY_CLASSES
    folder = root / "tiny-imagenet-200"
    if (folder / "train").is_dir() and (folder / "val" / "val_annotations.txt").is_file():
        return _tiny_folder(folder)
    layout = (
        f"{root / 'tiny-imagenet' / 'train.npz'} and val.npz (keys image (N, 64, 64, 3) uint8, label), "
        f"or {root}/train.npz and val.npz, or the original {folder}/ "
        f"(wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt)"
    )
    if download:
        raise WeatInputError(f"dataset tiny-imagenet: automatic download is not supported; expected {layout}")
    raise WeatInputError(f"dataset tiny-imagenet: files not found; expected {layout} (or --data-dir to point at them)")


DATASETS: dict[str, Loader] = {
    "digits": _digits,
    "cifar10": _cifar("cifar10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                      "test_batch", b"labels", 10, lambda: _torchvision_datasets().CIFAR10),
    "cifar100": _cifar("cifar100", "cifar-100-python", ["train"], "test", b"fine_labels", 100,
                       lambda: _torchvision_datasets().CIFAR100),
    "svhn": _svhn,
    "tiny-imagenet": _tiny_imagenet,
}


def dataset_names() -> list[str]:
    return list(DATASETS)


# (num_classes, in_channels, image_size) of each registry dataset, known without reading its files,
# so a model can be built for a dataset that is not on this machine (`weat import`).
SHAPES: dict[str, tuple[int, int, int]] = {
    "digits": (10, 1, 16),
    "cifar10": (10, 3, 32),
    "cifar100": (100, 3, 32),
    "svhn": (10, 3, 32),
    "tiny-imagenet": (TINY_CLASSES, 3, TINY_SIZE),
}


def dataset_shape(name: str) -> tuple[int, int, int]:
    """(num_classes, in_channels, image_size) of a registry dataset, from SHAPES (no file is read)."""
    if name not in SHAPES:
        raise WeatInputError(f"dataset: unknown {name!r}; expected one of {', '.join(SHAPES)}")
    return SHAPES[name]


def _load_npz_dataset(path: Path) -> Arrays:
    """A user .npz: x_train/y_train/x_test/y_test, or image/label with a seeded stratified 10% test split."""
    expected = "an .npz with image/label or x_train/y_train/x_test/y_test arrays"
    if path.is_dir():
        raise WeatInputError(f"dataset npz: {path} is a directory; expected {expected}")
    if not path.is_file():
        raise WeatInputError(f"dataset npz: file {path} not found; expected {expected}")
    arrays = _load_npz_file(path)
    split_keys = ("x_train", "y_train", "x_test", "y_test")
    if any(k in arrays for k in split_keys):
        for k in split_keys:
            _npz_key(arrays, k, path, "all of x_train/y_train/x_test/y_test")  # a partial split is a mistake
        train_x = _check_images(arrays["x_train"], f"{path} 'x_train'")
        test_x = _check_images(arrays["x_test"], f"{path} 'x_test'")
        if train_x.shape[1:] != test_x.shape[1:]:
            raise WeatInputError(f"{path}: expected x_train and x_test images of one shape, "
                                 f"got {train_x.shape[1:]} and {test_x.shape[1:]}")
        train_y = _check_labels(arrays["y_train"], len(train_x), f"{path} 'y_train'")
        test_y = _check_labels(arrays["y_test"], len(test_x), f"{path} 'y_test'")
    elif "image" in arrays or "label" in arrays:
        x = _check_images(_npz_key(arrays, "image", path, "both image and label"), f"{path} 'image'")
        y = _check_labels(_npz_key(arrays, "label", path, "both image and label"), len(x), f"{path} 'label'")
        if len(x) < 2:
            raise WeatInputError(f"{path}: expected at least 2 images to split off a test set, got {len(x)}")
        train_x, train_y, test_x, test_y = _split(x, y)
    else:
        raise WeatInputError(f"{path}: expected keys image/label or x_train/y_train/x_test/y_test, found {sorted(arrays)}")
    if len(train_x) == 0:
        raise WeatInputError(f"{path}: expected at least one training image, got 0")
    num_classes = int(max(train_y.max(initial=0), test_y.max(initial=0))) + 1
    return train_x, train_y, test_x, test_y, num_classes


def _split(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    try:
        tx, vx, ty, vy = train_test_split(x, y, test_size=NPZ_TEST_FRACTION, stratify=y, random_state=SPLIT_SEED)
    except ValueError:
        # Stratifying is impossible when a class has one image or the test set is smaller than
        # the number of classes; a seeded plain split is the best that can be done then.
        tx, vx, ty, vy = train_test_split(x, y, test_size=NPZ_TEST_FRACTION, random_state=SPLIT_SEED)
    return tx, ty, vx, vy


# ----------------------------------------------------------------------------------------------
# public entry points


def resolve_root(data_dir: str | Path | None) -> Path:
    """--data-dir, else $WEAT_DATA_DIR, else ~/.cache/weat/data."""
    raw = data_dir if data_dir not in (None, "") else os.environ.get("WEAT_DATA_DIR") or "~/.cache/weat/data"
    return Path(raw).expanduser().resolve()


# Host (CPU) copies keyed by (name, root) so that a second load in one process skips parsing.
# Entries are shared: callers must not write into the returned tensors in place.
_CACHE: dict[tuple, Dataset] = {}


def load(
    name: str,
    data_dir: str | Path | None = None,
    *,
    download: bool = False,
    device: torch.device | str = "cpu",
) -> Dataset:
    """Load a dataset by registry name or "npz:PATH" as uint8 NCHW tensors on `device`.

    `data_dir` is the root the registry datasets live under (see `resolve_root`); an npz PATH is
    taken as given (relative to the working directory), and the Dataset is named by its absolute path.
    A second call with the same name and root reuses the parsed arrays (in-process cache).
    """
    root = resolve_root(data_dir)
    if name.startswith(NPZ_PREFIX):
        path = Path(name[len(NPZ_PREFIX):]).expanduser().resolve()
        name = f"{NPZ_PREFIX}{path}"
        # The file's size and mtime join the key so an overwritten .npz is re-read.
        stat = path.stat() if path.is_file() else None
        key: tuple = (name, root, stat and (stat.st_size, stat.st_mtime_ns))
        read = lambda: _load_npz_dataset(path)  # noqa: E731
    elif name in DATASETS:
        key = (name, root)
        read = lambda: DATASETS[name](root, download)  # noqa: E731
    else:
        raise WeatInputError(f"dataset: unknown {name!r}; expected one of {', '.join(DATASETS)} or npz:PATH")

    host = _CACHE.get(key)
    if host is None:
        train_x, train_y, test_x, test_y, num_classes = read()

        def images(a: np.ndarray) -> torch.Tensor:  # NHWC numpy -> (N, C, H, W) contiguous uint8
            return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))

        def labels(a: np.ndarray) -> torch.Tensor:  # (N,) int64
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))

        host = Dataset(name, images(train_x), labels(train_y), images(test_x), labels(test_y), int(num_classes))
        _CACHE[key] = host

    device = torch.device(device)
    if device.type == "cpu":
        return host
    return Dataset(
        host.name,
        host.train_x.to(device),
        host.train_y.to(device),
        host.test_x.to(device),
        host.test_y.to(device),
        host.num_classes,
    )


def first_per_class(ds: Dataset, n: int | None) -> Dataset:
    """`ds` with at most `n` training images of each class, the first of each in file order (None: all)."""
    if n is None:
        return ds
    keep = torch.zeros(len(ds.train_y), dtype=torch.bool, device=ds.train_y.device)
    for c in range(ds.num_classes):
        keep[torch.nonzero(ds.train_y == c).flatten()[:n]] = True
    return replace(ds, train_x=ds.train_x[keep], train_y=ds.train_y[keep])


LABEL_NOISE_SEED = 1  # fixed: every run with the same data settings gets the same noisy labels


def noisy_labels(ds: Dataset, fraction: float) -> Dataset:
    """`ds` with round(fraction * N) of its training labels replaced by a different class drawn
    uniformly (symmetric label noise; Dong et al. 2022 tie robust overfitting to memorising such
    labels). Which images and which wrong classes come from LABEL_NOISE_SEED alone, so every run on
    the same data sees the same labels. The test split is untouched; 0 returns `ds` itself."""
    if fraction == 0:
        return ds
    if not 0 < fraction < 1:
        raise ValueError(f"label noise fraction must be in [0, 1), got {fraction}")
    g = torch.Generator().manual_seed(LABEL_NOISE_SEED)  # on the CPU: the same draws on every device
    n = len(ds.train_y)
    flip = torch.randperm(n, generator=g)[: round(fraction * n)].to(ds.train_y.device)
    # A shift of 1 .. K-1 classes: uniform over the K-1 wrong classes, never the true one.
    shift = torch.randint(1, ds.num_classes, (len(flip),), generator=g).to(ds.train_y.device)
    y = ds.train_y.clone()
    y[flip] = (y[flip] + shift) % ds.num_classes
    return replace(ds, train_y=y)


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1], same shape and device."""
    return x_uint8.float().div_(255)


def augment(
    x: torch.Tensor, *, generator: torch.Generator | None, padding: int = 4, flip: bool = True
) -> torch.Tensor:
    """Random crop (zero padding) and horizontal flip of a uint8 batch, batched on its device.

    x: (B, C, H, W) uint8 on any device. Returns float32 in [0, 1], same shape. Each image gets its
    own offset (dy, dx) in [0, 2 * padding]^2 into the zero-padded image and a flip with p = 0.5.
    All randomness comes from `generator` (which must live on x.device), so a seed fixes the result.
    """
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(f"augment: expected uint8 (B, C, H, W), got {x.dtype} {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"augment: padding must be >= 0, got {padding}")
    if padding == 0 and not flip:
        return to_float(x)

    b, c, h, w = x.shape
    dev = x.device
    # Crop and flip are one gather each along H and W, done on uint8 (4x less traffic than float):
    # output pixel (i, j) reads padded pixel (dy + i, dx + j), or (dy + i, dx + W - 1 - j) if flipped.
    padded = F.pad(x, (padding, padding, padding, padding)) if padding else x  # (B, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=dev)  # (B,)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=dev)  # (B,)
    cols = torch.arange(w, device=dev).expand(b, w)  # (B, W)
    if flip:
        mirror = torch.rand(b, generator=generator, device=dev) < 0.5  # (B,)
        cols = torch.where(mirror[:, None], w - 1 - cols, cols)
    rows = dy[:, None] + torch.arange(h, device=dev)  # (B, H)
    cols = dx[:, None] + cols  # (B, W)

    out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, padded.shape[3]))  # (B, C, H, W+2p)
    out = out.gather(3, cols[:, None, None, :].expand(b, c, h, w))  # (B, C, H, W)
    return to_float(out)
