"""Small file helpers shared by every writer: atomic writes, content digests, output checks."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from .errors import WeatInputError


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Temp file in the same directory + fsync + rename: a crash leaves the old file or the new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; results should be as readable as any file
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # persist the rename itself
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_writable(flag: str, path: Path) -> None:
    """An output file name whose directory exists and which is not itself a directory."""
    parent = Path(path).expanduser().resolve().parent
    if not parent.is_dir():
        raise WeatInputError(f"{flag}: directory {parent} does not exist")
    if Path(path).is_dir():
        raise WeatInputError(f"{flag}: {path} is a directory; expected a file name")
