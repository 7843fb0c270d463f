"""Checkpoints: safetensors with self-describing string metadata; atomic writes; no pickle.

`model.safetensors` holds the fp32 state_dict and `__metadata__` with format "weat/1", arch,
num_classes, in_channels, image_size, dataset, method, threat, epoch, config (the resolved
RunConfig as JSON) and metrics (JSON), so `load` rebuilds the model from the file alone.
`last.safetensors` adds the optimizer's tensors under `optim/` and a `resume` JSON entry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import __version__
from .config import RunConfig, validate
from .errors import WeatInputError
from .fileio import atomic_write_bytes

FORMAT = "weat/1"
OPTIM_PREFIX = "optim/"
STATE_PREFIX = "state/"


def state_dict_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as contiguous CPU copies (safetensors refuses shared storage)."""
    from .models import strip_wrappers

    return {k: v.detach().to("cpu").contiguous().clone() for k, v in strip_wrappers(model).state_dict().items()}


def model_metadata(cfg: RunConfig, *, num_classes: int, in_channels: int, image_size: int, epoch: int,
                   metrics: dict[str, Any] | None = None) -> dict[str, str]:
    return {
        "format": FORMAT,
        "weat_version": __version__,
        "arch": cfg.model.arch,
        "num_classes": str(num_classes),
        "in_channels": str(in_channels),
        "image_size": str(image_size),
        "dataset": cfg.data.dataset,
        "method": cfg.train.method,
        "threat": cfg.attack.threat,
        "epoch": str(epoch),
        "config": cfg.to_json(),
        "metrics": json.dumps(metrics or {}, sort_keys=True),
    }


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save as st_save

    atomic_write_bytes(Path(path), st_save(tensors, metadata=metadata))


def read(path: Path | str, *, flag: str = "checkpoint", what: str = "a weat .safetensors checkpoint",
         metadata_only: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (none with `metadata_only`) and metadata of a safetensors file; any unreadable file is a
    WeatInputError naming `flag` (the option or argument it came from) and `what` was expected there."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        raise WeatInputError(f"{flag}: {path} is a directory; expected {what} (e.g. {path / 'model.safetensors'})")
    if not path.is_file():
        raise WeatInputError(f"{flag}: {path} not found; expected {what}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {} if metadata_only else {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated / foreign bytes
        reason = " ".join(str(e).split()) or type(e).__name__
        raise WeatInputError(f"{flag}: {path} is not a readable safetensors file ({reason}); expected {what}") from None
    return tensors, metadata


@dataclass
class Checkpoint:
    path: Path
    model: nn.Module
    config: RunConfig
    metadata: dict[str, str]
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # optim/ and state/ tensors of last.safetensors

    @property
    def num_classes(self) -> int:
        return int(self.metadata["num_classes"])

    @property
    def in_channels(self) -> int:
        return int(self.metadata["in_channels"])

    @property
    def image_size(self) -> int:
        return int(self.metadata["image_size"])

    @property
    def epoch(self) -> int:
        return int(self.metadata["epoch"])

    @property
    def method(self) -> str:
        """How the weights were made, for display: the metadata's method ("imported" for `weat import`,
        whose config carries its dataset recipe's train.method), else the config's."""
        return self.metadata.get("method") or self.config.train.method


REQUIRED_METADATA = ("config", "num_classes", "in_channels", "image_size")


def _json_metadata(path: Path, meta: dict[str, str], key: str) -> Any:
    try:
        value = json.loads(meta.get(key) or "{}")
    except ValueError as e:
        raise WeatInputError(f"checkpoint: {path}: metadata {key!r} is not valid JSON ({e}); expected a JSON object") from None
    if not isinstance(value, dict):
        raise WeatInputError(f"checkpoint: {path}: metadata {key!r} is a JSON {type(value).__name__}; expected a JSON object")
    return value


def _int_metadata(path: Path, meta: dict[str, str], key: str) -> int:
    try:
        value = int(meta[key])
    except ValueError:
        value = 0
    if value < 1:
        raise WeatInputError(f"checkpoint: {path}: metadata {key!r} is {meta[key]!r}; expected a positive integer")
    return value


def _rebuild(cfg: RunConfig, meta: dict[str, str], *, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """The untrained model the metadata describes: a weat arch, or a RobustBench zoo entry
    (arch `robustbench:NAME`, rebuilt offline through the robustbench package's registry)."""
    from . import zoo
    from .models import build

    if zoo.is_zoo_arch(cfg.model.arch):
        threat = cfg.model.robustbench_threat or meta.get("robustbench_threat") or "Linf"
        dataset = meta.get("robustbench_dataset") or cfg.data.dataset
        entry = zoo.entry(zoo.zoo_name(cfg.model.arch), dataset, threat, flag="model.arch",
                          dataset_flag="data.dataset", threat_flag="model.robustbench_threat")
        return zoo.build(entry, flag="model.arch")
    return build(cfg.model.arch, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                 mean=cfg.model.mean, std=cfg.model.std)


def load(path: Path | str, device: torch.device | str = "cpu") -> Checkpoint:
    """Rebuild the model of a weat checkpoint from its metadata alone (eval mode, on `device`)."""
    path = Path(path)
    tensors, meta = read(path)
    cfg = _stored_config(path, meta)
    metrics = _json_metadata(path, meta, "metrics")
    num_classes, in_channels, image_size = (_int_metadata(path, meta, k) for k in ("num_classes", "in_channels", "image_size"))
    try:
        model = _rebuild(cfg, meta, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    except WeatInputError as e:  # e.g. an arch this version does not know: name the file too
        raise WeatInputError(f"checkpoint: {path}: {e}") from None
    weights = {k: v for k, v in tensors.items() if not k.startswith((OPTIM_PREFIX, STATE_PREFIX))}
    extra = {k: v for k, v in tensors.items() if k.startswith((OPTIM_PREFIX, STATE_PREFIX))}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise WeatInputError(f"checkpoint: {path} does not match arch {cfg.model.arch!r}: {what} tensors; "
                             f"expected exactly the {len(expected)} tensors of its state_dict")
    for k, v in weights.items():
        if v.shape != expected[k].shape:
            raise WeatInputError(
                f"checkpoint: {path}: tensor {k!r} has shape {tuple(v.shape)}, arch {cfg.model.arch!r} expects {tuple(expected[k].shape)}"
            )
    model.load_state_dict(weights, strict=True)
    model.to(device).eval()
    return Checkpoint(path=path, model=model, config=cfg, metadata=meta, metrics=metrics, extra=extra)


def _stored_config(path: Path, meta: dict[str, str]) -> RunConfig:
    """The RunConfig in a weat checkpoint's metadata; a foreign or broken file is bad input naming it."""
    if meta.get("format") != FORMAT:
        raise WeatInputError(f"checkpoint: {path} is not a weat checkpoint (metadata format {meta.get('format')!r}, expected {FORMAT!r})")
    missing_keys = [k for k in REQUIRED_METADATA if k not in meta]
    if missing_keys:
        raise WeatInputError(f"checkpoint: {path} has incomplete weat metadata (no {', '.join(map(repr, missing_keys))}); "
                             f"expected the keys {', '.join(REQUIRED_METADATA)}")
    return validate(_json_metadata(path, meta, "config"), source=f"checkpoint: {path} config")


def stored_config(path: Path | str) -> RunConfig:
    """A checkpoint's stored RunConfig, read from its metadata alone (no tensors, no model): what a
    command resolves its own config from before any slow work."""
    path = Path(path)
    return _stored_config(path, read(path, metadata_only=True)[1])


def newest_checkpoint(root: Path | str = "runs") -> Path | None:
    """The most recently modified runs/*/model.safetensors (relative to the working directory)."""
    found = [p for p in Path(root).glob("*/model.safetensors") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None
