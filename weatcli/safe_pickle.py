"""Unpickling that never runs code: only plain data and numpy arrays come out of a pickle.

A pickle may name any importable callable (`os.system`, `builtins.eval`, ...) and call it while
it loads. `load` reads with an unpickler whose `find_class` admits only the globals that the
CIFAR python batches (torchvision's format) and their re-pickled variants need, and refuses every
other name with `UnsafePickleError` before anything is called:

- builtin dict, list, tuple, str, bytes, int, float, bool and None are pickle opcodes, no globals;
- numpy arrays: `_reconstruct`, `ndarray` and `dtype` (every protocol up to 4; the original CIFAR
  files are Python 2 protocol-2 pickles naming `numpy.core.multiarray._reconstruct`), `_frombuffer`
  (protocol 5) and numpy scalars (`scalar`); both module layouts, `numpy.core` (numpy 1.x) and
  `numpy._core` (numpy 2.x), map to this numpy's own functions;
- what Python 3 writes for bytes under protocols 0-2: `_codecs.encode(text, "latin1")` (admitted
  for the latin1 codec only) and `bytes()` for b"".
"""

from __future__ import annotations

import pickle
from typing import IO, Any

import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside the allowlist; `what` is that name, printable on one line."""

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(f"refused global {what}")


def _shown(text: str, limit: int = 80) -> str:
    """A name from the file as one short printable token (a STACK_GLOBAL name may hold anything)."""
    return text if text.isprintable() and len(text) <= limit else ascii(text[:limit])


def _latin1_encode(text: Any, encoding: Any = None) -> bytes:
    """`_codecs.encode` as Python 3 pickles bytes under protocols 0-2: latin1 only, no other codec."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"_codecs.encode with codec {_shown(repr(encoding))} (only latin1 is read)")
    return text.encode("latin1")


def _allowed() -> dict[tuple[str, str], Any]:
    # This numpy's own functions, found through its own pickles rather than by module path
    # (numpy.core.* warns on numpy 2; numpy._core does not exist before numpy 1.26).
    reconstruct = np.empty(0).__reduce__()[0]
    frombuffer = np.empty(0).__reduce_ex__(5)[0]
    scalar = np.float64(0).__reduce__()[0]
    table: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("builtins", "bytes"): bytes,
        ("__builtin__", "bytes"): bytes,  # what Python 3 writes for b"" under protocols 0-2
    }
    for core in ("numpy.core", "numpy._core"):
        table[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        table[(f"{core}.multiarray", "scalar")] = scalar
        table[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return table


ALLOWED = _allowed()


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves only the allowlisted globals (module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(_shown(f"{module}.{name}")) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("a persistent id")


def load(f: IO[bytes], *, encoding: str = "bytes") -> Any:
    """`pickle.load(f, encoding=...)` with only plain data and numpy arrays admitted; any other global
    raises `UnsafePickleError` (a `pickle.UnpicklingError`) before it is called."""
    return RestrictedUnpickler(f, encoding=encoding).load()
