"""Quality and variety of generated images (docs/science.md#sample-quality): FID, KID, Inception
Score; precision, recall, density, coverage and the intra-class diversity ratio (variety.py); and
the share of samples that a second classifier, the judge, recognises as their wanted class.

FID and KID are clean-fid's (Parmar et al. 2022, "clean" mode): images are resized to 299x299
with clean-fid's own PIL bicubic resizer, fed to the TorchScript Inception-v3 that clean-fid uses
(`inception-2015-12-05.pt`), and its 2048-d pool features go through clean-fid's
`frechet_distance` and `kernel_distance`. The Inception Score (Salimans et al. 2016) uses the same
network's class probabilities: softmax of its 1008-way output layer without bias, as the original
implementation, over 10 splits. The weights file is never downloaded unless asked (data.download);
point `--inception-weights` or $WEAT_INCEPTION_WEIGHTS at a local copy to work offline.

`features=CKPT` computes the same distances with a weat classifier's penultimate features and its
softmax: useful for comparing sampling settings of one model, not comparable with Inception-based
numbers (the output says so). Precision / recall / density / coverage and diversity use the same
feature space as FID. Diversity and the judge need each sample's wanted class: a `weat sample`
file carries them (`labels`), as does a dataset reference; an .npz may (`labels`, `label` or `y`).

Reference statistics (mean, covariance and features of the reference set under one feature
network) are cached as safetensors in cache_dir()/stats, keyed by the images' and the network's
content, so a second call against the same reference only extracts the samples' features.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .config import SCORE_METRICS, DataConfig, RunConfig, ScoreConfig
from .errors import WeatInputError, WeatRunError
from .fileio import file_digest
from .runtime import EventFn, eval_device, ignore_event, tensor_digest
from .sampling import cache_dir


METRICS = SCORE_METRICS
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
CLEANFID_DIR = Path("/tmp")  # where clean-fid itself downloads the weights on Linux
IS_SPLITS = 10
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # clean-fid's defaults
REF_FORMAT = "weat-reference-stats/1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
_ARRAY_KEYS = ("samples", "images", "image", "x", "arr_0")
_LABEL_KEYS = ("labels", "label", "y")


# ----------------------------------------------------------------------------- image sets


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, C, H, W) uint8
    description: str
    dataset: str | None = None  # the dataset the images come from or were generated for
    data_dir: str | None = None
    labels: torch.Tensor | None = None  # (N,) int64: the class of each image (a sample's wanted class)
    checkpoint: str | None = None  # a `weat sample` file: the checkpoint sampled from
    checkpoint_sha256: str | None = None  # ... and its sha256, when the file records it


def _labels_for(a: Any, n: int, where: str) -> torch.Tensor:
    """An (N,) integer label array that goes with N images. -> int64 tensor"""
    t = torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a
    if t.ndim != 1 or len(t) != n or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise WeatInputError(f"{where}: labels of shape {tuple(t.shape)} and dtype {t.dtype}; expected ({n},) "
                             "integer class indices, one per image")
    t = t.long()
    if n and int(t.min()) < 0:
        raise WeatInputError(f"{where}: negative labels; expected class indices >= 0")
    return t


def _to_uint8_nchw(a: Any, where: str) -> torch.Tensor:
    """uint8 or float-in-[0,1] images, (N, C, H, W) or (N, H, W, C) or (N, H, W) -> uint8 NCHW."""
    t = torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a
    expected = "images (N, C, H, W) or (N, H, W, C) with 1 or 3 channels, uint8 or float in [0, 1]"
    if t.ndim == 3:
        t = t[:, None]
    if t.ndim != 4 or t.shape[0] == 0:
        raise WeatInputError(f"{where}: shape {tuple(t.shape)}; expected {expected}")
    if t.shape[1] not in (1, 3) and t.shape[3] in (1, 3):
        t = t.permute(0, 3, 1, 2)  # NHWC -> NCHW
    if t.shape[1] not in (1, 3):
        raise WeatInputError(f"{where}: shape {tuple(t.shape)}; expected {expected}")
    if t.dtype == torch.uint8:
        return t.contiguous()
    if not t.is_floating_point():
        raise WeatInputError(f"{where}: dtype {t.dtype}; expected {expected}")
    t = t.float()
    if not bool(torch.isfinite(t).all()) or float(t.min()) < 0 or float(t.max()) > 1:
        raise WeatInputError(f"{where}: float values outside [0, 1]; expected {expected}")
    return (t * 255.0).round_().to(torch.uint8).contiguous()


def _read_folder(path: Path, where: str) -> ImageSet:
    from PIL import Image

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise WeatInputError(f"{where}: no image files in folder {path}; expected images ({', '.join(IMAGE_SUFFIXES)})")
    arrays = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert("L") if im.mode in ("L", "LA", "I;16", "I", "1") else im.convert("RGB")
                a = np.asarray(im)
        except Exception as e:
            raise WeatInputError(f"{where}: cannot read image {f} ({type(e).__name__}); expected a readable image file") from None
        arrays.append(a[..., None] if a.ndim == 2 else a)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise WeatInputError(f"{where}: images in {path} differ in size or channels ({sorted(shapes)[:3]}); expected one shape")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(x, f"{path} ({len(files)} images)")


def read_images(path: Path | str, where: str = "SAMPLES") -> ImageSet:
    """A `weat sample` safetensors file, any safetensors/npz holding an image array, or a folder of images."""
    path = Path(path).expanduser()
    if path.is_dir():
        return _read_folder(path, where)
    if not path.is_file():
        raise WeatInputError(f"{where}: {path} not found; expected a .safetensors or .npz file or a folder of images")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                key = next((k for k in _ARRAY_KEYS if k in f.keys()), None)
                if key is None:
                    raise WeatInputError(f"{where}: {path} has no image tensor (found {sorted(f.keys())[:5]}); "
                                         f"expected one named {' or '.join(_ARRAY_KEYS[:4])}")
                tensor = f.get_tensor(key)
                labels = f.get_tensor("labels") if "labels" in f.keys() else None
        except WeatInputError:
            raise
        except Exception as e:
            raise WeatInputError(f"{where}: {path} is not a readable safetensors file ({type(e).__name__}); "
                                 f"expected a 'weat sample' file or images under {' or '.join(_ARRAY_KEYS[:4])}") from None
        x = _to_uint8_nchw(tensor, f"{where}: {path} tensor {key!r}")
        y = None if labels is None else _labels_for(labels, len(x), f"{where}: {path} tensor 'labels'")
        return ImageSet(x, f"{path} ({len(x)} images)", meta.get("dataset") or None, meta.get("data_dir") or None,
                        y, meta.get("checkpoint") or None, meta.get("checkpoint_sha256") or None)
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                key = next((k for k in _ARRAY_KEYS if k in z.files), None)
                if key is None:
                    raise WeatInputError(f"{where}: {path} has no image array (found {z.files[:5]}); "
                                         f"expected one named {' or '.join(_ARRAY_KEYS)}")
                a = z[key]
                label_key = next((k for k in _LABEL_KEYS if k in z.files), None)
                labels = None if label_key is None else z[label_key]
        except WeatInputError:
            raise
        except Exception as e:
            raise WeatInputError(f"{where}: {path} is not a readable .npz ({type(e).__name__}); expected a numpy .npz "
                                 f"of plain arrays with images under {' or '.join(_ARRAY_KEYS)}") from None
        x = _to_uint8_nchw(a, f"{where}: {path} array {key!r}")
        y = None if labels is None else _labels_for(labels, len(x), f"{where}: {path} array {label_key!r}")
        return ImageSet(x, f"{path} ({len(x)} images)", labels=y)
    raise WeatInputError(f"{where}: {path}; expected a .safetensors or .npz file or a folder of images")


def read_reference(spec: str, *, data_dir: str | None = None, download: bool = False) -> ImageSet:
    """--ref: a folder, a .safetensors/.npz file, or DATASET[:split] (split train by default)."""
    from . import data as data_mod

    path = Path(spec).expanduser()
    if path.is_dir() or (path.suffix.lower() in (".safetensors", ".npz") and path.is_file()):
        return read_images(path, where="--ref")
    name, split = spec, "train"
    head, _, tail = spec.rpartition(":")
    if head and tail in ("train", "test"):
        name, split = head, tail
    if not (name in data_mod.dataset_names() or name.startswith(data_mod.NPZ_PREFIX)):
        raise WeatInputError(f"--ref: {spec!r} is neither a file, a folder nor a dataset; expected a folder, "
                             f"a .safetensors/.npz file or one of {', '.join(data_mod.dataset_names())}[:train|test]")
    ds = data_mod.load(name, data_dir, download=download, device="cpu")
    x, y = (ds.train_x, ds.train_y) if split == "train" else (ds.test_x, ds.test_y)
    return ImageSet(x, f"{name}:{split} ({len(x)} images)", name, data_dir, y.long())


# ----------------------------------------------------------------------------- feature networks


@dataclass
class FeatureNet:
    """Features (B, D) and class probabilities (B, K) of uint8 images, both float64 on the CPU."""

    name: str  # "inception" or "ckpt:<path>"
    identity: str  # content hash: part of the reference cache key
    comparable: bool  # numbers comparable with the literature's Inception-based FID / IS
    forward: Callable[[torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor | None]]


def _where_to_get() -> str:
    return f"{INCEPTION_FILE} (clean-fid's TorchScript Inception-v3, from {INCEPTION_URL})"


def find_inception_weights(path: Path | str | None = None, *, download: bool = False) -> Path:
    """--inception-weights, else $WEAT_INCEPTION_WEIGHTS, else a copy in cache_dir() or clean-fid's
    download folder; with none, download to cache_dir() only when `download`. Else WeatInputError."""
    given = path if path not in (None, "") else os.environ.get("WEAT_INCEPTION_WEIGHTS") or None
    if given is not None:
        p = Path(given).expanduser()
        flag = "--inception-weights" if path not in (None, "") else "$WEAT_INCEPTION_WEIGHTS"
        if not p.is_file():
            raise WeatInputError(f"{flag}: {p} not found; expected {_where_to_get()}")
        return p
    candidates = [cache_dir() / INCEPTION_FILE, CLEANFID_DIR / INCEPTION_FILE]
    for p in candidates:
        if p.is_file() and (p.parent != CLEANFID_DIR or _private(p)):
            return p
    if not download:
        raise WeatInputError(
            f"--inception-weights: Inception weights not found (looked for {', '.join(map(str, candidates))}); "
            f"expected {_where_to_get()}; pass --inception-weights PATH or set $WEAT_INCEPTION_WEIGHTS, "
            f"add --download to fetch it, or use --features CKPT")
    return _download_inception(candidates[0])


def _private(path: Path) -> bool:
    """A file in a shared folder (clean-fid's /tmp) is used only when it is ours and nobody else can
    write it: the weights are a TorchScript program, and anyone may drop a file into /tmp."""
    st = path.stat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _download_inception(target: Path) -> Path:
    import urllib.request

    from .fileio import atomic_write_bytes

    try:
        with urllib.request.urlopen(INCEPTION_URL, timeout=60) as response:
            payload = response.read()
    except Exception as e:
        raise WeatInputError(f"--download: could not fetch {INCEPTION_FILE} from {INCEPTION_URL} "
                             f"({type(e).__name__}: {' '.join(str(e).split())}); download it yourself and pass "
                             f"--inception-weights PATH") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, payload)
    return target


def inception_net(weights: Path, device: torch.device) -> FeatureNet:
    """clean-fid's Inception-v3 in clean mode from a local TorchScript file."""
    from cleanfid.resize import build_resizer

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; clean-fid's file is TorchScript
            base = torch.jit.load(str(weights), map_location=device).eval()
    except Exception as e:
        raise WeatInputError(f"--inception-weights: {weights} is not a TorchScript file "
                             f"({type(e).__name__}); expected {_where_to_get()}") from None
    if not hasattr(base, "layers"):
        raise WeatInputError(f"--inception-weights: {weights} has no 'layers' module; expected {_where_to_get()}")
    resize = build_resizer("clean")  # PIL bicubic on float32 channels to 299x299, values in [0, 255]

    def forward(x_u8: torch.Tensor, want_probs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        hwc = x_u8.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, C)
        if hwc.shape[3] == 1:
            hwc = np.repeat(hwc, 3, axis=3)  # grey -> RGB, as clean-fid's loaders convert
        big = np.stack([resize(im) for im in hwc])  # (B, 299, 299, 3) float32 in [0, 255]
        t = torch.from_numpy(big).permute(0, 3, 1, 2).to(device)
        with torch.no_grad():
            feats = base.layers((t - 128.0) / 128.0).reshape(len(t), -1).double()  # (B, 2048)
            probs = None
            if want_probs:
                if not hasattr(base, "output"):
                    raise WeatInputError(f"--inception-weights: {weights} has no 'output' layer for the Inception Score")
                # The original IS applies the 1008-way layer without its bias (as StyleGAN2-ADA's port).
                probs = torch.softmax(feats @ base.output.weight.double().t(), dim=1)
        return feats.cpu(), None if probs is None else probs.cpu()

    return FeatureNet("inception", "inception:" + file_digest(weights)[:32], True, forward)


def check_image_shape(checkpoint: Path, shape: tuple[int, int, int], images: torch.Tensor, what: str) -> None:
    """--features CKPT takes images of its own (C, H, W) shape only."""
    if tuple(images.shape[1:]) != shape:
        size = "x".join(map(str, shape))
        raise WeatInputError(f"--features: {checkpoint} takes {size} images; got {'x'.join(map(str, images.shape[1:]))} "
                             f"{what}; expected {size} images (or --features inception)")


def classifier_net(checkpoint: Path, device: torch.device) -> tuple[FeatureNet, Any]:
    """A weat checkpoint's penultimate features and softmax, on [0,1] images of its own shape."""
    from . import checkpoint as ckpt_mod
    from .models import penultimate

    ck = ckpt_mod.load(checkpoint, device=device)
    model = ck.model
    shape = (ck.in_channels, ck.image_size, ck.image_size)

    def forward(x_u8: torch.Tensor, want_probs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        check_image_shape(checkpoint, shape, x_u8, "images")
        x = x_u8.to(device).float() / 255.0
        with torch.no_grad():
            feats = penultimate(model, x).double()
            probs = torch.softmax(model(x).double(), dim=1) if want_probs else None
        return feats.cpu(), None if probs is None else probs.cpu()

    net = FeatureNet(f"ckpt:{checkpoint}", "ckpt:" + file_digest(checkpoint)[:32], False, forward)
    return net, ck


def extract(net: FeatureNet, images: torch.Tensor, *, batch_size: int, want_probs: bool,
            on_progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    feats, probs = [], []
    for i in range(0, len(images), batch_size):
        f, p = net.forward(images[i : i + batch_size], want_probs)
        feats.append(f)
        if p is not None:
            probs.append(p)
        if on_progress is not None:
            on_progress(min(i + batch_size, len(images)))
    return torch.cat(feats).numpy(), (torch.cat(probs).numpy() if probs else None)


# ----------------------------------------------------------------------------- metrics


def inception_score(probs: np.ndarray, splits: int = IS_SPLITS, *, seed: int | None = 0) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) per split -> (mean, std) over `splits` parts (Salimans et al. 2016).

    The rows are shuffled with `seed` first (None: kept in order), so files grouped by class, as
    `weat sample` writes them, still give every split a mix of classes.
    """
    from scipy.special import xlogy

    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or len(p) == 0:
        raise ValueError(f"probs: expected (N, K) with N >= 1, got shape {p.shape}")
    if seed is not None:
        p = p[np.random.default_rng(seed).permutation(len(p))]
    scores = []
    for part in np.array_split(p, min(splits, len(p))):
        py = part.mean(0, keepdims=True)
        kl = (xlogy(part, part) - xlogy(part, py)).sum(1).mean()
        scores.append(math.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return feats.mean(0), np.cov(feats, rowvar=False)


def fid_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """clean-fid's frechet_distance; its notes go to stderr (stdout carries results only)."""
    from cleanfid.fid import frechet_distance
    from scipy.linalg import LinAlgWarning

    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # clean-fid passes scipy's deprecated sqrtm(disp=)
        warnings.simplefilter("ignore", LinAlgWarning)  # singular covariances: the result carries a note instead
        try:
            value = frechet_distance(mu1, sigma1, mu2, sigma2)
        except ValueError as e:  # a covariance product whose square root is far from real
            raise WeatRunError(f"FID: {e}; use more samples than feature dimensions ({len(mu1)})") from None
    return max(0.0, float(value))  # rounding can leave -1e-12 for identical sets


def kid(feats1: np.ndarray, feats2: np.ndarray, *, seed: int = 0) -> float:
    """clean-fid's kernel_distance (100 subsets of up to 1000), with numpy's global RNG seeded and restored."""
    from cleanfid.fid import kernel_distance

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return float(kernel_distance(feats1, feats2, num_subsets=KID_SUBSETS, max_subset_size=KID_SUBSET_SIZE))
    finally:
        np.random.set_state(state)


# ----------------------------------------------------------------------------- reference cache


def reference_stats(net: FeatureNet, ref: ImageSet, *, batch_size: int, on_event: EventFn) -> tuple[dict[str, np.ndarray], bool]:
    """{"mu", "sigma", "features"} of the reference under `net`; cached. -> (stats, from_cache)"""
    from . import checkpoint as ckpt_mod

    images = tensor_digest([("images", ref.images)])
    key = hashlib.sha256(f"{REF_FORMAT}|{net.identity}|{images}".encode()).hexdigest()[:24]
    path = cache_dir() / "stats" / f"ref-{key}.safetensors"
    if path.is_file():
        try:
            t, meta = ckpt_mod.read(path)
            if meta.get("format") == REF_FORMAT:
                return {k: t[k].numpy() for k in ("mu", "sigma", "features")}, True
        except (WeatInputError, KeyError):
            pass  # damaged entry: recompute and overwrite
    on_event("stage", {"name": "reference", "total": len(ref.images)})
    feats, _ = extract(net, ref.images, batch_size=batch_size, want_probs=False,
                       on_progress=lambda done: on_event("progress", {"done": done}))
    mu, sigma = gaussian_stats(feats)
    stats = {"mu": mu, "sigma": sigma, "features": feats.astype(np.float32)}
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt_mod.save(path, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in stats.items()},
                  {"format": REF_FORMAT, "reference": ref.description, "features": net.name})
    return stats, False


# ----------------------------------------------------------------------------- the command

# The result keys (None when not asked): quality, then variety, then the judge.
RESULT_KEYS = ("fid", "kid", "is_mean", "is_std", "precision", "recall", "density", "coverage", "diversity",
               "diversity_per_class", "judge_accuracy")
FEATURE_METRICS = ("fid", "kid", "is", "prdc", "diversity")  # need the feature network
REFERENCE_METRICS = ("fid", "kid", "prdc", "diversity")  # need the reference set


@dataclass
class ScoreResult:
    metrics: dict[str, Any]  # RESULT_KEYS: floats (diversity_per_class a {class: ratio} dict), None when not asked
    n: int
    n_reference: int | None
    reference: str | None
    features: str
    comparable: bool
    seconds: float
    reference_cached: bool | None
    notes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)  # the resolved [data] and [score] sections, as JSON
    computed: list[str] = field(default_factory=list)  # the metric names computed (score.metrics resolved)
    judge: str | None = None  # the judge checkpoint

    def summary(self) -> dict[str, Any]:
        return {
            **self.metrics,
            "metrics": list(self.computed),
            "judge": self.judge,
            "n": self.n,
            "n_reference": self.n_reference,
            "reference": self.reference,
            "features": self.features,
            "comparable_with_inception": self.comparable,
            "reference_cached": self.reference_cached,
            "seconds": round(self.seconds, 3),
            "notes": list(self.notes),
            "config": dict(self.config),
        }


def _seeded_subset(n_total: int, n: int, seed: int) -> np.ndarray | None:
    """Sorted indices of a fixed random subset of n of n_total (numpy default_rng(seed)); None: keep all."""
    if n >= n_total:
        return None
    return np.sort(np.random.default_rng(seed).permutation(n_total)[:n])


def sample_subset(samples: Path | str, n: int | None, seed: int) -> tuple[ImageSet, torch.Tensor, torch.Tensor | None]:
    """The samples (ImageSet) and the images to score with their labels: all, or a fixed random
    subset of n (sorted indices from numpy's default_rng(seed)). -> (set, (N, C, H, W) uint8, (N,) or None)"""
    sample_set = read_images(samples)
    x, y = sample_set.images, sample_set.labels
    if n is not None:
        if n > len(x):
            raise WeatInputError(f"--n: {n} is more than the {len(x)} images in {samples}; expected at most {len(x)}")
        idx = _seeded_subset(len(x), n, seed)
        if idx is not None:
            idx = torch.from_numpy(idx)
            x, y = x[idx], (None if y is None else y[idx])
    return sample_set, x, y


def feature_net(s: ScoreConfig, download: bool, device: torch.device) -> tuple[FeatureNet, Any]:
    """--features: clean-fid's Inception (its weights found, or downloaded with --download) or a weat
    checkpoint. -> (network, the loaded checkpoint or None)"""
    if s.features == "inception":
        return inception_net(find_inception_weights(s.inception_weights, download=download), device), None
    path = Path(s.features).expanduser()
    if not path.is_file():
        raise WeatInputError(f"--features: {s.features!r}; expected inception or the path of a weat checkpoint")
    return classifier_net(path, device)


def reference_set(s: ScoreConfig, data: DataConfig, sample_set: ImageSet, ck: Any, samples: Path | str) -> ImageSet:
    """--ref, else the training split of the samples' dataset (named in a `weat sample` file), else of
    the --features checkpoint's dataset. A dataset's root is --data-dir (data.data_dir), else the
    one the samples (or that checkpoint) were made with; data.download allows fetching it."""
    if s.ref is not None:
        ref_set = read_reference(s.ref, data_dir=data.data_dir, download=data.download)
    else:
        dataset = sample_set.dataset or (ck.config.data.dataset if ck is not None else None)
        if dataset is None:
            raise WeatInputError(f"--ref: required: {samples} does not say which dataset it imitates; expected "
                                 "--ref DATASET[:split], a folder or a .safetensors / .npz file")
        root = data.data_dir if data.data_dir is not None else (
            sample_set.data_dir if sample_set.dataset else (ck.config.data.data_dir if ck is not None else None))
        ref_set = read_reference(f"{dataset}:train", data_dir=root, download=data.download)
    if len(ref_set.images) < 2:
        raise WeatInputError(f"--ref: {ref_set.description}; FID, KID, prdc and diversity need at least 2 images")
    return ref_set


def check_labels(names: list[str], sample_set: ImageSet, samples: Path | str) -> None:
    """diversity and judge need each sample's wanted class."""
    needing = [m for m in names if m in ("diversity", "judge")]
    if needing and sample_set.labels is None:
        raise WeatInputError(f"SAMPLES: {samples} does not say which class each image was generated for; "
                             f"{' and '.join(needing)} need it: expected a 'weat sample' file or an .npz with "
                             f"{' / '.join(_LABEL_KEYS)} (or leave {' and '.join(needing)} out of --metrics)")


def load_judge(s: ScoreConfig, sample_set: ImageSet, x: torch.Tensor, labels: torch.Tensor, samples: Path | str,
               device: torch.device) -> tuple[Any, list[str]]:
    """--judge CKPT: its model (eval mode, on `device`), refused when it is the checkpoint the samples
    came from (same file content), cannot take the images or lacks a wanted class. -> (model, notes)"""
    from . import checkpoint as ckpt_mod

    path = Path(s.judge).expanduser()
    if not path.is_file():
        raise WeatInputError(f"--judge: {s.judge} not found; expected a weat checkpoint other than the one sampled from")
    notes = []
    sampled = sample_set.checkpoint_sha256
    if sampled is None and sample_set.checkpoint and Path(sample_set.checkpoint).is_file():
        sampled = file_digest(Path(sample_set.checkpoint))
    if sampled is None:
        notes.append(f"{samples} does not name the checkpoint it was sampled from: the judge {path} is taken to be "
                     "another classifier")
    elif file_digest(path) == sampled:
        raise WeatInputError(f"--judge: {path} is the checkpoint {samples} was sampled from "
                             f"({sample_set.checkpoint or 'the same file content'}); expected another classifier "
                             "(the sampled model rates its own samples highly by construction), e.g. a separately "
                             "trained standard model")
    ck = ckpt_mod.load(path, device=device)
    shape = (ck.in_channels, ck.image_size, ck.image_size)
    if tuple(x.shape[1:]) != shape:
        size = "x".join(map(str, shape))
        raise WeatInputError(f"--judge: {path} takes {size} images; got {'x'.join(map(str, x.shape[1:]))} in "
                             f"{samples}; expected a judge trained on the samples' dataset")
    if len(labels) and int(labels.max()) >= ck.num_classes:
        raise WeatInputError(f"--judge: {path} has {ck.num_classes} classes; {samples} asks for class "
                             f"{int(labels.max())}; expected a judge trained on the samples' dataset")
    return ck.model, notes


def compute_metrics(names: list[str], feats: np.ndarray, probs: np.ndarray | None,
                    ref_stats: dict[str, np.ndarray] | None, seed: int) -> tuple[dict[str, float | None], list[str]]:
    """FID / KID of the (N, D) features against the reference's, and the IS of the (N, K)
    probabilities; notes where a number needs care. -> ({fid, kid, is_mean, is_std}, notes)"""
    notes = []
    out: dict[str, float | None] = {"fid": None, "kid": None, "is_mean": None, "is_std": None}
    if "fid" in names:
        if len(feats) <= feats.shape[1]:
            notes.append(f"FID from {len(feats)} samples of {feats.shape[1]}-d features: the covariance is "
                         "rank-deficient and FID is biased upwards; use more samples for comparable numbers")
        out["fid"] = fid_from_stats(*gaussian_stats(feats), ref_stats["mu"], ref_stats["sigma"])
    if "kid" in names:
        out["kid"] = kid(feats, ref_stats["features"].astype(np.float64), seed=seed)
    if "is" in names:
        out["is_mean"], out["is_std"] = inception_score(probs, IS_SPLITS, seed=seed)
    return out, notes


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def variety_metrics(names: list[str], feats: np.ndarray, labels: torch.Tensor | None, ref_feats: np.ndarray,
                    ref_labels: torch.Tensor | None, s: ScoreConfig) -> tuple[dict[str, Any], list[str]]:
    """Precision / recall / density / coverage (variety.prdc, k = score.prdc_k, at most score.prdc_max
    of each side) and the intra-class diversity ratio (variety.diversity_ratio) of the sample
    features against the reference's, in one feature space. -> (result keys, notes)"""
    from . import variety

    out: dict[str, Any] = {}
    notes = []
    if "prdc" in names:
        fake_idx = _seeded_subset(len(feats), s.prdc_max, s.seed)
        real_idx = _seeded_subset(len(ref_feats), s.prdc_max, s.seed + 1)
        fake = feats if fake_idx is None else feats[fake_idx]
        real = ref_feats if real_idx is None else ref_feats[real_idx]
        if fake_idx is not None or real_idx is not None:
            notes.append(f"precision/recall/density/coverage on {len(fake)} samples and {len(real)} reference images "
                         f"(seeded random subsets, score.prdc_max {s.prdc_max})")
        out.update(variety.prdc(real, fake, k=s.prdc_k))
    if "diversity" in names:
        d = variety.diversity_ratio(feats, labels, ref_feats, ref_labels, max_per_class=s.diversity_max_per_class,
                                    seed=s.seed)
        out["diversity"] = _finite_or_none(d["ratio"])
        out["diversity_per_class"] = {str(c): _finite_or_none(v) for c, v in d["per_class"].items()}
        if d["skipped"]:
            notes.append(f"diversity leaves out class{'es' if len(d['skipped']) > 1 else ''} "
                         f"{', '.join(map(str, d['skipped']))}: fewer than 2 samples or reference images")
    return out, notes


def score_samples(samples: Path | str, cfg: RunConfig, *, on_event: EventFn | None = None) -> ScoreResult:
    """`weat score`: quality and variety of samples (docs/science.md#sample-quality).

    FID / KID against a reference set and the Inception Score; precision / recall / density /
    coverage and the intra-class diversity ratio against the reference, in the same feature space;
    the judge's recognition (--judge CKPT: a classifier other than the one sampled from).
    cfg.score holds the settings (metrics, reference, features, judge, subsets, seed); cfg.data the
    reference dataset's root and whether the Inception weights or that dataset may be downloaded.
    Bad input (files, shapes, labels, a missing reference, the sampled model as judge) is refused
    before any feature is extracted.
    """
    s, emit = cfg.score, on_event or ignore_event
    dev = eval_device(s.device)
    t0 = time.perf_counter()
    sample_set, x, y = sample_subset(samples, s.n, s.seed)
    names = s.metrics_for(labelled=y is not None, n=len(x))
    check_labels(names, sample_set, samples)
    notes: list[str] = []
    if s.metrics is None and "prdc" not in names:
        notes.append(f"precision/recall/density/coverage left out: {len(x)} samples, they need more than "
                     f"score.prdc_k = {s.prdc_k}")
    distances = [m for m in names if m in ("fid", "kid")]
    if distances and len(x) < 2:
        raise WeatInputError(f"SAMPLES: {len(x)} image; FID and KID need at least 2")
    if "prdc" in names and len(x) <= s.prdc_k:
        raise WeatInputError(f"SAMPLES: {len(x)} images; precision/recall/density/coverage need more than "
                             f"score.prdc_k = {s.prdc_k}")
    judge_model = None
    if "judge" in names:
        judge_model, judge_notes = load_judge(s, sample_set, x, y, samples, dev)
        notes += judge_notes
    net, ck = feature_net(s, cfg.data.download, dev) if any(m in FEATURE_METRICS for m in names) else (None, None)
    ref_set = reference_set(s, cfg.data, sample_set, ck, samples) if any(m in REFERENCE_METRICS for m in names) else None
    if ref_set is not None:
        if "diversity" in names and ref_set.labels is None:
            raise WeatInputError(f"--ref: {ref_set.description} does not give each image's class; diversity needs it: "
                                 "expected DATASET[:split] or an .npz with labels (or leave diversity out of --metrics)")
        if "prdc" in names and len(ref_set.images) <= s.prdc_k:
            raise WeatInputError(f"--ref: {ref_set.description}; precision/recall/density/coverage need more than "
                                 f"score.prdc_k = {s.prdc_k} images")
    if ck is not None:  # a shape mismatch is bad input: refuse it before any work
        shape = (ck.in_channels, ck.image_size, ck.image_size)
        check_image_shape(Path(s.features), shape, x, f"in {samples}")
        if ref_set is not None:
            check_image_shape(Path(s.features), shape, ref_set.images, f"in the reference {ref_set.description}")
    emit("start", {"samples": sample_set.description, "n": len(x), "reference": ref_set.description if ref_set else None,
                   "features": net.name if net else None, "metrics": names, "device": str(dev)})
    out: dict[str, Any] = dict.fromkeys(RESULT_KEYS)
    ref_stats, cached = None, None
    if ref_set is not None:
        ref_stats, cached = reference_stats(net, ref_set, batch_size=s.batch_size, on_event=emit)
    if net is not None:
        emit("stage", {"name": "samples", "total": len(x)})
        feats, probs = extract(net, x, batch_size=s.batch_size, want_probs="is" in names,
                               on_progress=lambda done: emit("progress", {"done": done}))
        quality, quality_notes = compute_metrics(names, feats, probs, ref_stats, s.seed)
        out.update(quality)
        notes += quality_notes
        if ref_stats is not None:
            var, var_notes = variety_metrics(names, feats, y, ref_stats["features"], ref_set.labels, s)
            out.update(var)
            notes += var_notes
        if not net.comparable:
            notes.insert(0, f"features from the weat classifier {s.features} (penultimate layer and softmax): "
                         "not comparable with Inception-based FID / KID / IS / prdc / diversity")
    if judge_model is not None:
        from .variety import judge_accuracy

        emit("stage", {"name": "judge", "total": len(x)})
        out["judge_accuracy"] = judge_accuracy(judge_model, x, y, batch_size=s.batch_size)
    return ScoreResult(
        metrics=out, n=len(x), n_reference=None if ref_set is None else len(ref_set.images),
        reference=None if ref_set is None else ref_set.description, features=net.name if net else "none",
        comparable=bool(net and net.comparable), seconds=time.perf_counter() - t0, reference_cached=cached, notes=notes,
        config=cfg.model_dump(mode="json", include={"data", "score"}), computed=names,
        judge=None if s.judge is None else str(s.judge),
    )
