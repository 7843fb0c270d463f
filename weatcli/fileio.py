"""Small file helpers shared by every writer: atomic writes, content digests, output checks."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from .errors import WeatInputError, WeatRunError

TEMP_SUFFIX = ".tmp"  # atomic_write_bytes' temp files: ".<name>.<random>.tmp" beside <name>


class WriteError(WeatRunError, OSError):
    """An output file could not be written (disk full, no permission...): exit 1, naming the file.

    Also an OSError (errno, strerror, filename), so callers that catch OSError keep working."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


def _write_error(path: Path, e: OSError) -> WriteError:
    return WriteError(e.errno, e.strerror or type(e).__name__, str(path))


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Temp file in the same directory + fsync + rename + directory fsync: a crash leaves the old
    file or the new one, never a torn one. On failure the temp file is removed and a WriteError
    (an OSError) naming `path` is raised; a killed process may leave its temp file behind, which
    `remove_stale_temps` deletes."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as e:
        raise _write_error(path, e) from e
    try:
        try:
            f = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            raise
        with f:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(f.fileno(), 0o666 & ~umask)  # mkstemp creates 0600; results should be as readable as any file
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise _write_error(path, e) from e
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


def stale_temps(path: Path) -> list[Path]:
    """Temp files that atomic_write_bytes(path, ...) calls killed mid-write left beside `path`.
    The name part of `path` may be a glob pattern ("snapshots/epoch-*.safetensors")."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*{TEMP_SUFFIX}"))


def remove_stale_temps(*paths: Path) -> list[Path]:
    """Delete the stale temp files of `paths` (see stale_temps); returns those removed. Call it
    only while no other process can be writing these paths (e.g. under the run directory's lock)."""
    removed = []
    for path in paths:
        for tmp in stale_temps(path):
            try:
                tmp.unlink()
                removed.append(tmp)
            except FileNotFoundError:
                pass
    return removed


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
