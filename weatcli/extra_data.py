"""Extra (generated) training images, memory-mapped: `--extra-data FILE.npz --extra-fraction F`.

The DM-AT works (Gowal et al. 2021, Rebuffi et al. 2021, Wang et al. 2023) train on CIFAR plus
millions of images from a generative model, stored as one .npz with `image` (N, H, W, C) uint8 and
`label` (N,) integers: tens of GB (20M CIFAR images are 61 GB). Such a file is never read whole:

* `open_npz_memmap` maps one stored member of the zip as an `np.memmap` (numpy's own `np.load`
  ignores mmap_mode for .npz): the zip's central directory names the member and its local header
  offset, the local header's name and extra-field lengths give where the member's bytes start,
  `numpy.lib.format.read_magic` / `read_array_header_{1,2}_0` parse the .npy header there, and the
  array data that follows is mapped. A compressed member (np.savez_compressed) cannot be mapped and
  is bad input: re-save it with np.savez.

* `ExtraStream` gives, for step s of epoch e, the extra part of that step's batch: round(F * B)
  images (B the global batch) as uint8 (k, C, H, W) and int64 labels on the training device.

The epoch is a fixed number of steps, `steps_per_epoch = ceil(num_real / (B - round(F * B)))`, so
that every real image is seen once per epoch; each step holds B - round(F * B) real images and
round(F * B) extra ones. (The DM-AT code's semi-supervised sampler, wzekai99/DM-Improves-AT
core/data/semisup.py, is given num_batches = ceil(50000 / B) by get_semisup_dataloaders, so its
epoch is shorter: it sees (B - int(F * B)) / B of the real images; docs/science.md#extra-data. That
sampler takes int(F * B) extra images and draws them with replacement; here the count is rounded
and, within an epoch, no extra image repeats while the file has enough: the epoch's steps_per_epoch
* round(F * B) indices are drawn without replacement from a generator seeded by (seed, EXTRA_STREAM,
epoch); when the file is smaller than that, successive independent permutations are concatenated.)
Step s takes positions [s * k, (s + 1) * k) of the epoch's draw, sorted ascending for locality in
the file. Everything is a function of (seed, epoch, step), so a resumed run reads exactly what an
uninterrupted one reads: the step index is the whole position.

Where the images go: when the whole array fits `resident_budget` bytes (default a quarter of the
free GPU memory on CUDA, 1 GiB on the CPU) it is copied once, in chunks, onto the device as uint8
NCHW and each step is a device-side gather. Otherwise each step is gathered from the memory map (the
map is advised MADV_RANDOM: no readahead of pages nobody asked for) into pinned host memory by a
background thread one step ahead, and copied to the device with non_blocking=True, so the training
step does not wait on the disk. Double-buffered: a pinned buffer is refilled only after the copy
that read it has finished (a CUDA event).
"""

from __future__ import annotations

import math
import mmap
import struct
import threading
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import WeatInputError
from .runtime import generator_for, name_part

# The named random stream of the extra draws: (seed, EXTRA_STREAM, epoch). A crc32, far from epochs.
EXTRA_STREAM = name_part("extra-data")
RESAVE_HINT = "re-save it with np.savez(path, image=..., label=...), not np.savez_compressed"
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # zip local file header, 30 bytes
_LOCAL_SIGNATURE = b"PK\x03\x04"
CPU_RESIDENT_BUDGET = 1 << 30  # bytes


# ----------------------------------------------------------------------------- mapping .npz members


def open_npz_memmap(path: Path | str, key: str, *, flag: str = "--extra-data") -> np.memmap:
    """The array `key` of an uncompressed .npz file as a read-only np.memmap (nothing is read but headers)."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise WeatInputError(f"{flag}: {path} not found; expected a .npz file with 'image' and 'label'") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise WeatInputError(f"{flag}: {path} is not a readable .npz (zip) file ({e}); {RESAVE_HINT}") from None
    with zf:
        names = zf.namelist()
        try:
            info = zf.getinfo(f"{key}.npy")
        except KeyError:
            stored = ", ".join(n.removesuffix(".npy") for n in names) or "nothing"
            raise WeatInputError(f"{flag}: {path} has no array {key!r} (it holds {stored}); expected 'image' "
                                 "(N, H, W, C) uint8 and 'label' (N,)") from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise WeatInputError(f"{flag}: {path}: array {key!r} is compressed and cannot be memory-mapped; {RESAVE_HINT}")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        raw = f.read(_LOCAL_HEADER.size)
        if len(raw) != _LOCAL_HEADER.size or raw[:4] != _LOCAL_SIGNATURE:
            raise WeatInputError(f"{flag}: {path}: the zip entry of {key!r} is damaged (no local header at "
                                 f"offset {info.header_offset})")
        name_len, extra_len = _LOCAL_HEADER.unpack(raw)[-2:]
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len  # first byte of the .npy
        f.seek(start)
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f".npy format version {version[0]}.{version[1]} (expected 1.0 or 2.0)")
        except ValueError as e:
            raise WeatInputError(f"{flag}: {path}: array {key!r} has no readable .npy header ({e})") from None
        data_start = f.tell()
    if dtype.hasobject:
        raise WeatInputError(f"{flag}: {path}: array {key!r} holds Python objects; expected numbers")
    if fortran and len(shape) > 1:
        raise WeatInputError(f"{flag}: {path}: array {key!r} is stored in Fortran order; {RESAVE_HINT} of a "
                             "C-ordered array (np.ascontiguousarray)")
    nbytes = math.prod(shape) * dtype.itemsize
    if data_start - start + nbytes != info.file_size:
        raise WeatInputError(f"{flag}: {path}: array {key!r} has {info.file_size - (data_start - start)} bytes of "
                             f"data; its header says {shape} {dtype} ({nbytes} bytes)")
    if nbytes == 0:
        raise WeatInputError(f"{flag}: {path}: array {key!r} is empty")
    return np.memmap(path, dtype=dtype, mode="r", offset=data_start, shape=tuple(shape), order="C")


def _advise_random(arr: np.memmap) -> None:
    """No readahead for random gathers (best effort: Linux and Python >= 3.8 have madvise)."""
    mm = getattr(arr, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        try:
            mm.madvise(mmap.MADV_RANDOM)
        except OSError:
            pass


@dataclass(frozen=True, eq=False)
class ExtraData:
    """The mapped arrays of an extra-data file: images (N, H, W, C) uint8, labels (N,) integers."""

    path: Path
    images: np.memmap
    labels: np.memmap

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W), as the engine's tensors have it."""
        _, h, w, c = self.images.shape
        return int(c), int(h), int(w)

    @property
    def nbytes(self) -> int:
        return int(self.images.nbytes)


def open_extra(path: Path | str, *, num_classes: int | None = None,
               image_shape: tuple[int, int, int] | None = None, flag: str = "--extra-data") -> ExtraData:
    """Map `image` and `label` of an np.savez file and check them against the real data's
    (C, H, W) and classes. Reads the headers and, with num_classes, the labels (in chunks)."""
    path = Path(path).expanduser().resolve()
    images = open_npz_memmap(path, "image", flag=flag)
    labels = open_npz_memmap(path, "label", flag=flag)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise WeatInputError(f"{flag}: {path}: 'image' is {images.dtype} {images.shape}; expected uint8 (N, H, W, C) "
                             "or (N, H, W)")
    if images.ndim == 3:  # (N, H, W) grey images: a channel axis, still a view of the map
        images = images.reshape(*images.shape, 1)
    if images.shape[3] not in (1, 3):
        raise WeatInputError(f"{flag}: {path}: 'image' has shape {images.shape}; expected (N, H, W, C) with C = 1 or 3 "
                             "(channels last, as the DM-AT files store them)")
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(images):
        raise WeatInputError(f"{flag}: {path}: 'label' is {labels.dtype} {labels.shape}; expected integers "
                             f"({len(images)},), one per image")
    data = ExtraData(path, images, labels)
    if image_shape is not None and tuple(image_shape) != data.image_shape:
        raise WeatInputError(f"{flag}: {path}: images are (C, H, W) = {data.image_shape}; the training data's are "
                             f"{tuple(image_shape)}")
    if num_classes is not None:
        chunk = 1 << 22
        lo = min(int(labels[i:i + chunk].min()) for i in range(0, len(labels), chunk))
        hi = max(int(labels[i:i + chunk].max()) for i in range(0, len(labels), chunk))
        if lo < 0 or hi >= num_classes:
            raise WeatInputError(f"{flag}: {path}: labels span {lo}..{hi}; expected 0..{num_classes - 1}")
    return data


# ----------------------------------------------------------------------------- the per-step stream


def extra_per_step(batch_size: int, fraction: float) -> int:
    """Extra images in a batch of `batch_size`: round(fraction * batch_size) (Python's round)."""
    if not 0 <= fraction < 1:
        raise WeatInputError(f"--extra-fraction: {fraction}; expected 0 <= F < 1 (the extra share of each batch)")
    k = round(fraction * batch_size)
    if k >= batch_size:  # F close to 1 with a small batch: keep at least one real image per step
        raise WeatInputError(f"--extra-fraction: {fraction} leaves no real image in a batch of {batch_size}")
    return k


def steps_per_epoch(num_real: int, batch_size: int, fraction: float) -> int:
    """ceil(num_real / (batch_size - round(fraction * batch_size))): every real image once per epoch."""
    return math.ceil(num_real / (batch_size - extra_per_step(batch_size, fraction)))


def _default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    return CPU_RESIDENT_BUDGET


class ExtraStream:
    """The extra part of every training step: `batch(epoch, step)` -> (x uint8 (k, C, H, W), y int64 (k,)).

    fraction: F, the extra share of each (global) batch of `batch_size`; k = round(F * batch_size).
    num_real: real training images; fixes `steps_per_epoch`.
    seed: the run's seed; epoch e draws from (seed, EXTRA_STREAM, e).
    shard: (rank, world): this process gathers only its contiguous share (k / world positions) of each
    step's sorted indices (k must divide by world); one process is (0, 1).
    resident_budget: bytes the whole image array may take on `device` (None: see the module doc).
    With round(F * batch_size) = 0 the stream is inactive: no file is needed (data may be None),
    `batch` returns None and steps_per_epoch is ceil(num_real / batch_size).
    Use as a context manager, or call close(), to stop the prefetch thread.
    """

    def __init__(self, data: ExtraData | Path | str | None, *, fraction: float, batch_size: int, num_real: int, seed: int,
                 device: torch.device | str = "cpu", shard: tuple[int, int] = (0, 1),
                 resident_budget: int | None = None, prefetch: bool = True):
        self.per_step = extra_per_step(batch_size, fraction)
        self.fraction = fraction
        self.batch_size = batch_size
        self.real_per_step = batch_size - self.per_step
        if num_real < 1:
            raise ValueError(f"ExtraStream: num_real must be >= 1, got {num_real}")
        self.steps_per_epoch = math.ceil(num_real / self.real_per_step)
        self.seed = seed
        self.device = torch.device(device)
        rank, world = shard
        if self.per_step % world or not 0 <= rank < world:
            raise WeatInputError(f"--extra-fraction: {self.per_step} extra images per step do not split over "
                                 f"{world} ranks; choose F so that round(F * batch) divides by {world}")
        self.part = slice(rank * self.per_step // world, (rank + 1) * self.per_step // world)
        if self.per_step and data is None:
            raise WeatInputError(f"--extra-data: required with --extra-fraction {fraction}")
        self.data = None if self.per_step == 0 else (data if isinstance(data, ExtraData) else open_extra(data))
        self._lock = threading.Lock()
        self._draws: dict[int, np.ndarray] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._pending: tuple[tuple[int, int], Future] | None = None
        self.resident = False
        if self.data is None:
            return
        budget = _default_budget(self.device) if resident_budget is None else resident_budget
        if self.data.nbytes <= budget:
            self._load_resident()
        else:
            _advise_random(self.data.images)
            self._pinned = self.device.type == "cuda"
            n_part = self.part.stop - self.part.start
            c, h, w = self.data.image_shape
            if self._pinned:  # two slots: one being copied to the device while the other is filled
                self._host_x = [torch.empty((n_part, h, w, c), dtype=torch.uint8, pin_memory=True) for _ in range(2)]
                self._host_y = [torch.empty((n_part,), dtype=torch.int64, pin_memory=True) for _ in range(2)]
                self._copied = [torch.cuda.Event() for _ in range(2)]
            self._slot = 0
            if prefetch:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weat-extra-data")

    # -- indices

    def _epoch_draw(self, epoch: int) -> np.ndarray:
        """(steps_per_epoch * k,) int64: the epoch's indices in draw order (cached for two epochs)."""
        with self._lock:
            draw = self._draws.get(epoch)
            if draw is None:
                n, total = len(self.data), self.steps_per_epoch * self.per_step
                seed = generator_for("cpu", self.seed, EXTRA_STREAM, epoch).initial_seed()
                rng = np.random.Generator(np.random.PCG64(seed))
                if total <= n:
                    draw = rng.choice(n, size=total, replace=False).astype(np.int64, copy=False)
                else:  # a file smaller than an epoch's need: each image at most ceil(total / n) times
                    draw = np.concatenate([rng.permutation(n) for _ in range(-(-total // n))])[:total]
                self._draws = {e: d for e, d in self._draws.items() if e == epoch - 1}
                self._draws[epoch] = draw
            return draw

    def indices(self, epoch: int, step: int) -> np.ndarray:
        """The file rows of step `step` of epoch `epoch` (this shard's part), sorted ascending."""
        if self.per_step == 0:
            return np.empty(0, dtype=np.int64)
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside 0..{self.steps_per_epoch - 1}")
        k = self.per_step
        return np.sort(self._epoch_draw(epoch)[step * k:(step + 1) * k])[self.part]

    # -- batches

    def _load_resident(self) -> None:
        """The whole array on the device as uint8 NCHW, copied in ~64 MB chunks (host RAM stays small)."""
        imgs, labs = self.data.images, self.data.labels
        n = len(imgs)
        c, h, w = self.data.image_shape
        self._x = torch.empty((n, c, h, w), dtype=torch.uint8, device=self.device)
        chunk = max(1, (64 << 20) // (c * h * w))
        for i in range(0, n, chunk):
            part = torch.from_numpy(np.ascontiguousarray(imgs[i:i + chunk]))  # (b, H, W, C)
            self._x[i:i + chunk] = part.to(self.device).permute(0, 3, 1, 2)
        self._y = torch.from_numpy(np.asarray(labs, dtype=np.int64)).to(self.device)
        self.resident = True

    def _gather(self, epoch: int, step: int, slot: int) -> Any:
        """Read one step's rows from the map: into pinned slot `slot` (CUDA), else fresh arrays."""
        idx = self.indices(epoch, step)
        if self._pinned:
            self._copied[slot].synchronize()  # the previous copy out of this slot has finished
            # mode="clip" lets np.take write into `out` directly (mode="raise" buffers a copy); the
            # indices are in range by construction.
            np.take(self.data.images, idx, axis=0, out=self._host_x[slot].numpy(), mode="clip")
            self._host_y[slot].numpy()[:] = self.data.labels[idx]
            return slot
        return np.take(self.data.images, idx, axis=0), np.asarray(self.data.labels[idx], dtype=np.int64)

    @property
    def active(self) -> bool:
        """False for F such that round(F * batch) = 0: then there is no extra part (batch() is None)."""
        return self.per_step > 0

    def batch(self, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The extra images (k, C, H, W) uint8 and labels (k,) int64 of (epoch, step), on the device;
        None when the stream is not active (F = 0): nothing is read then."""
        if self.data is None:
            return None
        if self.resident:
            idx = torch.from_numpy(self.indices(epoch, step)).to(self.device)
            return self._x.index_select(0, idx), self._y.index_select(0, idx)
        slot = self._slot
        got = None
        if self._pending is not None:
            key, fut = self._pending
            self._pending = None
            result = fut.result()  # also when it is not the one wanted: its slot must be settled
            if key == (epoch, step):
                got = result
        if got is None:
            got = self._gather(epoch, step, slot)
        if self._pinned:
            x = self._host_x[got].to(self.device, non_blocking=True)
            y = self._host_y[got].to(self.device, non_blocking=True)
            self._copied[got].record(torch.cuda.current_stream(self.device))
            x = x.permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW on the device
        else:
            x_np, y_np = got
            x = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous().to(self.device)
            y = torch.from_numpy(y_np).to(self.device)
        self._slot = 1 - slot
        if self._executor is not None:  # one step ahead, into the other slot
            nxt = (epoch, step + 1) if step + 1 < self.steps_per_epoch else (epoch + 1, 0)
            self._pending = (nxt, self._executor.submit(self._gather, *nxt, self._slot))
        return x, y

    def close(self) -> None:
        if self._pending is not None:
            self._pending[1].cancel()
            try:
                self._pending[1].result()
            except Exception:  # a cancelled or failed prefetch nobody will use
                pass
            self._pending = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self) -> ExtraStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
