"""The RobustBench model zoo as a source of architectures: `weat import FILE --robustbench NAME`.

An entry's architecture is built through the `robustbench` package's own registry,
`robustbench.model_zoo.models.model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat)][NAME]['model']()`;
weat copies none of its classes. A checkpoint made this way records the entry (metadata `arch` =
`robustbench:NAME`, `robustbench_dataset`, `robustbench_threat`; config `model.arch` and
`model.robustbench_threat`), and `checkpoint.load` rebuilds it the same way, offline, for every
command. The package is an optional extra: `pip install 'weat[robustbench]'`; without it these
paths are bad input (exit 2) saying so.

Nothing is downloaded unless the user passes `--download`: building an entry runs with torch.hub's
downloader and the Hugging Face hub switched off (a few builders, e.g. timm's XCiT entries, fetch
weights themselves; those fail offline with a message that says so). `fetch_weights` (only with
`--download`) lets robustbench's own `load_model` fetch the published weights, and writes them as a
plain state dict that the importer then reads with `torch.load(weights_only=True)` like any file.

Compatibility: robustbench 1.1.1 (the current release) imports two modules at package import that
building a model never uses: `autoattack` (AutoAttack's GitHub module name; the same code is the
`pyautoattack` package on PyPI, a weat dependency) in robustbench.eval, and `pkg_resources` (removed
from setuptools 82) in robustbench.loaders. When either is missing, `_import_robustbench` stands in
for it during the import only (`autoattack` -> `pyautoattack`; a `pkg_resources` with
`resource_filename`), then takes the stand-ins out of `sys.modules` again.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import io
import os
import sys
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import WeatInputError

_find_spec = importlib.util.find_spec  # one seam, so tests can play "robustbench is not installed"

ZOO_PREFIX = "robustbench:"
INSTALL_HINT = "pip install 'weat[robustbench]'"
# weat datasets that have RobustBench entries (ImageNet is not a weat dataset).
ZOO_DATASETS = ("cifar10", "cifar100")
# --threat spellings (any case) -> robustbench.model_zoo.enums.ThreatModel values.
THREATS = {"linf": "Linf", "l2": "L2", "corruptions": "corruptions"}
# The leaderboards' threat radius for CIFAR: the weat threat a zoo checkpoint gets unless --eps/--norm.
LEADERBOARD_EPS = {"Linf": ("linf", 8 / 255), "L2": ("l2", 0.5)}


@dataclass(frozen=True)
class ZooEntry:
    name: str  # e.g. "Wang2023Better_WRN-28-10"
    dataset: str  # "cifar10" or "cifar100" (weat's and RobustBench's names agree)
    threat: str  # "Linf", "L2" or "corruptions"

    @property
    def arch(self) -> str:
        return f"{ZOO_PREFIX}{self.name}"

    def metadata(self) -> dict[str, str]:
        return {"robustbench_dataset": self.dataset, "robustbench_threat": self.threat,
                "robustbench_version": package_version() or "unknown"}


def is_zoo_arch(arch: Any) -> bool:
    return isinstance(arch, str) and arch.startswith(ZOO_PREFIX)


def zoo_name(arch: str) -> str:
    return arch[len(ZOO_PREFIX):]


def parse_threat(value: str, flag: str = "--threat") -> str:
    key = value.strip().lower() if isinstance(value, str) else ""
    if key not in THREATS:
        raise WeatInputError(f"{flag}: {value!r}; expected one of {', '.join(THREATS.values())}")
    return THREATS[key]


def package_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("robustbench")
    except metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------- importing robustbench


def _pkg_resources_stand_in() -> types.ModuleType:
    mod = types.ModuleType("pkg_resources")

    def resource_filename(package: str, resource: str) -> str:  # the one function robustbench calls
        spec = importlib.util.find_spec(package)
        base = Path(spec.origin).parent if spec is not None and spec.origin else Path(".")
        return str(base / resource)

    mod.resource_filename = resource_filename  # type: ignore[attr-defined]
    return mod


@contextlib.contextmanager
def _stand_ins() -> Iterator[None]:
    added: list[str] = []
    try:
        if importlib.util.find_spec("autoattack") is None and importlib.util.find_spec("pyautoattack") is not None:
            pyaa = importlib.import_module("pyautoattack")
            sys.modules["autoattack"] = pyaa
            sys.modules["autoattack.state"] = importlib.import_module("pyautoattack.state")
            added += ["autoattack", "autoattack.state"]
        if importlib.util.find_spec("pkg_resources") is None:
            sys.modules["pkg_resources"] = _pkg_resources_stand_in()
            added.append("pkg_resources")
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def _import_robustbench(flag: str) -> tuple[Any, Any, Any]:
    """(model_dicts, BenchmarkDataset, ThreatModel), or bad input naming `flag` and the install command."""
    if _find_spec("robustbench") is None:
        raise WeatInputError(f"{flag}: RobustBench zoo entries need the robustbench package, which is not "
                             f"installed; {INSTALL_HINT}")
    try:
        # Its import warns about timm and torch.jit deprecations the user can do nothing about.
        with _stand_ins(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models = importlib.import_module("robustbench.model_zoo.models")
            enums = importlib.import_module("robustbench.model_zoo.enums")
    except Exception as e:  # a broken or partial install: say which module failed
        why = " ".join(str(e).split()) or type(e).__name__
        raise WeatInputError(f"{flag}: the robustbench package is installed but cannot be imported ({why}); "
                             f"{INSTALL_HINT}") from None
    return models.model_dicts, enums.BenchmarkDataset, enums.ThreatModel


def available() -> bool:
    """Whether the robustbench package can be imported here (tests skip on False)."""
    try:
        _import_robustbench("robustbench")
    except WeatInputError:
        return False
    return True


def entry(name: str, dataset: str, threat: str, *, flag: str = "--robustbench", dataset_flag: str = "--dataset",
          threat_flag: str = "--threat") -> ZooEntry:
    """The zoo entry NAME for (dataset, threat), checked against the installed registry; errors name
    the option (or config key) each value came from."""
    if dataset not in ZOO_DATASETS:
        raise WeatInputError(f"{dataset_flag}: {dataset!r} has no RobustBench entries weat can use; expected one of "
                             f"{', '.join(ZOO_DATASETS)}")
    threat = parse_threat(threat, threat_flag)
    model_dicts, bench, threat_model = _import_robustbench(flag)
    try:
        entries = model_dicts[bench(dataset)][threat_model(threat)]
    except (KeyError, ValueError):
        raise WeatInputError(f"{threat_flag}: RobustBench has no {threat} leaderboard for {dataset}") from None
    if name not in entries:
        close = difflib.get_close_matches(name, list(entries), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f" ({len(entries)} entries, e.g. {', '.join(list(entries)[:3])})"
        raise WeatInputError(f"{flag}: no entry {name!r} in RobustBench's {dataset} {threat} zoo{hint}")
    return ZooEntry(name, dataset, threat)


class _DownloadRefused(Exception):
    pass


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """torch.hub's downloader refuses and the Hugging Face hub is offline for the duration."""
    import torch.hub

    def refuse(url: str, *args: Any, **kwargs: Any) -> None:
        raise _DownloadRefused(url)

    saved_download = torch.hub.download_url_to_file
    hf_constants = sys.modules.get("huggingface_hub.constants")
    saved_hf = getattr(hf_constants, "HF_HUB_OFFLINE", None)
    torch.hub.download_url_to_file = refuse
    if hf_constants is not None:
        hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        torch.hub.download_url_to_file = saved_download
        if hf_constants is not None:
            hf_constants.HF_HUB_OFFLINE = saved_hf


def build(zoo: ZooEntry, *, flag: str = "--robustbench"):
    """The entry's architecture, as `model_dicts[...][NAME]['model']()` builds it, with no download."""
    model_dicts, bench, threat_model = _import_robustbench(flag)
    make = model_dicts[bench(zoo.dataset)][threat_model(zoo.threat)][zoo.name]["model"]
    try:
        with _offline():
            model = make()
    except _DownloadRefused as e:
        raise WeatInputError(f"{flag}: building {zoo.name!r} downloads weights ({e}); nothing is downloaded "
                             "without --download") from None
    except Exception as e:  # the builder's own failure (a GPU-only entry, an unknown timm name...)
        why = " ".join(str(e).split())[:200] or type(e).__name__
        if "offline" in why.lower() or "HF_HUB_OFFLINE" in why:
            why += "; nothing is downloaded without --download"
        raise WeatInputError(f"{flag}: RobustBench cannot build {zoo.name!r} here ({why})") from None
    return model


def default_cache_dir() -> Path:
    """Where --download lets robustbench keep what it fetches: $WEAT_CACHE_DIR/robustbench."""
    return Path(os.environ.get("WEAT_CACHE_DIR") or "~/.cache/weat").expanduser() / "robustbench"


def fetch_weights(zoo: ZooEntry, dest: Path, *, cache_dir: Path | None = None) -> Path:
    """--download only: robustbench's own `load_model` fetches and loads the published weights (into
    `cache_dir`), and their state dict is written to `dest` (torch.save of tensors only, atomically)."""
    import torch

    from .fileio import atomic_write_bytes

    _import_robustbench("--download")
    with _stand_ins():
        utils = importlib.import_module("robustbench.utils")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    try:
        model = utils.load_model(zoo.name, model_dir=str(cache), dataset=zoo.dataset, threat_model=zoo.threat)
    except Exception as e:
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise WeatInputError(f"--download: robustbench could not fetch {zoo.name!r} ({why})") from None
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, buf)
    atomic_write_bytes(Path(dest), buf.getvalue())
    return Path(dest)
