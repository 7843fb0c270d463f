"""The resumable `weat attack --state` file (docs/design.md#never-lose-a-run).

An evaluation's progress, saved as safetensors (atomically) at most every STATE_EVERY seconds,
after each attack stage and when interrupted; a rerun with the same inputs continues after the
last saved batch. pyautoattack 0.2.0's own state file cannot be resumed (the attack set is compared
as a list against a set, and a restored run returns no adversarial points for the examples fooled
before the restore), so weat keeps its own, for every attack.

Format "weat-attack-state/1": tensors `<attack>/robust`, `<attack>/energy_adversarial`,
`<attack>/joint_adversarial` (n,), `<attack>/hit` (targeted) and `<attack>/x_adv` (with
--save-adv); metadata `fingerprint` (JSON: what the evaluation depends on, see `fingerprint`) and
`progress` (JSON: per attack {stage, pos, seconds, stages}: the stage index, the next example
index, seconds so far, robust accuracy after each finished AutoAttack part).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from .errors import WeatInputError
from .fileio import atomic_write_bytes
from .runtime import tensor_digest

STATE_FORMAT = "weat-attack-state/1"
STATE_EVERY = 60.0  # seconds between state saves (it also saves after every stage and on interrupt)


def fingerprint(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: Sequence[str], keep_adversarial: bool,
                settings: dict[str, Any]) -> dict[str, Any]:
    """What an evaluation's results depend on: the weights, the images x (n, C, H, W) and labels y
    (n,), the attack names, whether x* is kept, and the settings (threat, steps, seed, batch size, ...)."""
    return {"model": tensor_digest(sorted(model.state_dict().items())), "images": tensor_digest([("x", x), ("y", y)]),
            "attacks": list(attacks), "save_adv": keep_adversarial, **settings}


class AttackState:
    """The resumable progress of an evaluation: `progress` per attack (JSON-able) and `tensors`
    (per-example, any device; saved on the CPU). Without a path it only holds them in memory."""

    def __init__(self, path: Path | None, fingerprint: dict[str, Any]):
        self.path = path
        self.fingerprint = fingerprint
        self.progress: dict[str, dict[str, Any]] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        self.last_save = time.monotonic()

    @staticmethod
    def read(path: Path, metadata_only: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """An existing state file's tensors and metadata; anything else is bad input naming --state."""
        from . import checkpoint

        tensors, meta = checkpoint.read(path, flag="--state", metadata_only=metadata_only,
                                        what="a weat attack state file; pass a new file name to start over")
        if meta.get("format") != STATE_FORMAT:
            raise WeatInputError(f"--state: {path} is not a weat attack state file (format {meta.get('format')!r}, "
                                 f"expected {STATE_FORMAT!r}); pass a new file name to start over")
        return tensors, meta

    def load(self) -> bool:
        """Take over the saved progress, if the file exists; one of another evaluation is bad input."""
        if self.path is None or not self.path.exists():
            return False
        tensors, meta = self.read(self.path)
        saved = json.loads(meta.get("fingerprint", "{}"))
        changed = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
        if changed:
            raise WeatInputError(f"--state: {self.path} belongs to another evaluation ({', '.join(changed)} differ); "
                                 "expected the options it was saved with: rerun with them or pass a new file name")
        self.progress = json.loads(meta["progress"])
        self.tensors = tensors
        return True

    def save(self, force: bool = False) -> None:
        """Write the file (atomically) if STATE_EVERY seconds have passed since the last save, or `force`."""
        from safetensors.torch import save as st_save

        if self.path is None or not (force or time.monotonic() - self.last_save >= STATE_EVERY):
            return
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        meta = {"format": STATE_FORMAT, "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
                "progress": json.dumps(self.progress, sort_keys=True)}
        atomic_write_bytes(self.path, st_save(tensors, metadata=meta))
        self.last_save = time.monotonic()
