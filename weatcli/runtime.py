"""What every engine command shares at run time: the device, random streams, the event protocol,
content digests.

Randomness flows from the configured seed through explicit generators: `generator_for(device, seed,
*parts)` hashes (seed, parts) into one 63-bit seed, and every caller names its purpose with a
`Stream` member as the first part, so no result hangs on the order of a dict or a magic number.
"""

from __future__ import annotations

import hashlib
import zlib
from enum import IntEnum
from typing import Any, Iterable, Protocol

import torch

from .errors import WeatInputError

DEVICE_HELP = "auto, cpu, cuda or cuda:N"


class EventFn(Protocol):
    """Engines report progress through one callback: `on_event(kind, payload)`; only the CLI renders."""

    def __call__(self, kind: str, payload: dict[str, Any]) -> None: ...


def ignore_event(kind: str, payload: dict[str, Any]) -> None:
    """The do-nothing event handler (library use, and every rank but rank 0)."""


class Stream(IntEnum):
    """Named random streams: the first part passed to `generator_for` after the seed.

    Training draws epoch e's shuffling, crops and attack starts from the stream numbered e itself
    (1, 2, ...), so the values below stay clear of small numbers where they could meet an epoch.
    The numbers are part of the results' reproducibility: never renumber one.
    """

    SAMPLE_INIT = 0  # weat sample: starting points (kept at 0 since samples were first seeded)
    SGLD_NOISE = 1  # weat sample: SGLD noise, one generator per batch
    TRADES_LENS = 7  # weat energy trades: the KL attack's start
    EVAL_ATTACK = 1_000_003  # weat train: the per-epoch robust evaluation (the same starts every epoch)
    ATTACK_TARGETS = 1_000_033  # weat attack: random target classes
    ATTACK = 1_000_037  # weat attack: random starts, with the attack's name and the batch as further parts


def name_part(name: str) -> int:
    """A stable integer for a name (crc32): stream parts from names, never from positions."""
    return zlib.crc32(name.encode())


def _seed(seed: int, *parts: int) -> int:
    """Deterministic 63-bit seed for a (seed, stream, ...) tuple."""
    h = seed & 0xFFFFFFFF
    for p in parts:
        h = (h * 6364136223846793005 + int(p) + 1442695040888963407) & 0x7FFFFFFFFFFFFFFF
    return h


def generator_for(device: torch.device | str, seed: int, *parts: int) -> torch.Generator:
    """A generator on `device` seeded by (seed, *parts); parts start with a `Stream` (or an epoch)."""
    g = torch.Generator(device=device)
    g.manual_seed(_seed(seed, *parts))
    return g


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """`auto` (CUDA when available), `cpu`, `cuda` or `cuda:N` -> a torch.device; bad input names `flag`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise WeatInputError(f"{flag}: {name!r}; expected {DEVICE_HELP}") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise WeatInputError(f"{flag}: {name!r}; expected {DEVICE_HELP}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WeatInputError(f"{flag}: {name!r} requested but no CUDA device is available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise WeatInputError(f"{flag}: {name!r}; this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def configure_backends(device: torch.device, tf32: bool) -> None:
    """cuDNN autotuning for the fixed shapes; TF32 only when asked (fp32 stays IEEE fp32)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def eval_device(name: str, flag: str = "--device") -> torch.device:
    """The device of an evaluating command (attack, energy, sample, score): fp32 stays IEEE fp32."""
    device = resolve_device(name, flag)
    configure_backends(device, tf32=False)
    return device


def tensor_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over named tensors' names, dtypes, shapes and bytes: a content fingerprint."""
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
