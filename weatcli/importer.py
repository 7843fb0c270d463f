"""`weat import`: turn someone else's PyTorch state dict into a self-describing weat checkpoint.

Inputs: a `.pt`/`.pth` file read with `torch.load(path, map_location="cpu", weights_only=True)`
and nothing else (a file that needs arbitrary unpickling is refused, never executed), or a plain
`.safetensors` state dict. The state dict may sit under "state_dict", "model", "model_state_dict"
or "net" of a training checkpoint (other entries, e.g. the optimizer, are left alone), and its keys
may carry the "module." (DataParallel), "model." or "_orig_mod." (torch.compile) prefix of every
key; those are stripped.

Key names: weat's nets use RobustBench's names (models.py), which are also those of the common
CIFAR ResNet-18 (kuangliu style: conv1, bn1, layer1.0.conv1, ..., layer1.0.shortcut.0/1, linear)
that the paper's code uses, so such files import unchanged. Where a file names a part differently,
one whole path segment is renamed, and only when the file's key is not a key of the model and the
renamed one is:

    fc         -> linear      (the classifier of ResNet-18 / PreAct ResNet-18 / small-cnn)
    linear     -> fc          (the classifier of the WideResNets)
    downsample -> shortcut    (torchvision-style block names)

TRADES' WideResNet builds a `sub_block1` that its forward pass never calls; for the wrn archs
those tensors are dropped (and reported). Every other tensor must be used, every model key must be
present (BatchNorm's num_batches_tracked may be absent: it does not affect eval-mode outputs), and
every shape must match. A weat-exported `NormalizedModel` state dict (normalize.mean/std and
model.*) brings its own normalisation. Finally one forward pass on a random batch of the dataset's
shape must give finite logits of the right shape.

Normalisation: RobustBench's ResNets and ReLU WideResNets take [0,1] images with no normalisation
inside, so the default is none; `--mean/--std` put a Normalize layer in front of the net (recorded
in the checkpoint config). The DM-AT WideResNets (`wrn-28-10-swish`, `wrn-70-16-swish`) normalise
inside the net, as published: by default with the CIFAR statistics (CIFAR-100's for cifar100),
which the checkpoint config records; `--mean/--std` replace them. Their public state dicts
(init_conv, layer.N.block.M..., batchnorm, logits) import as they are, with no renaming.
The threat model (eps, norm) defaults to the dataset's paper recipe; `weat attack --eps` overrides.

RobustBench zoo entries (`--robustbench NAME --threat Linf|L2|corruptions`, weatcli/zoo.py): the
architecture comes from the robustbench package's own registry, the file is read exactly as above
(weights_only), every tensor must be a tensor of that model with its shape (buffers the model sets
itself, e.g. normalisation constants, may be absent, as robustbench's own loader allows), and one
forward pass must be finite. The checkpoint's arch is `robustbench:NAME` and `checkpoint.load`
rebuilds it through the zoo. The threat defaults to the leaderboard's (Linf 8/255, L2 0.5).
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import WeatInputError

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")
PREFIXES = ("module.", "model.", "_orig_mod.")
# Whole path segments the file may name differently from weat's models (file name -> model name).
SEGMENT_ALIASES = (("fc", "linear"), ("linear", "fc"), ("downsample", "shortcut"))
# Prefixes of tensors the reference model holds but never uses in forward, per arch.
UNUSED_BY_REFERENCE = {"wrn-28-10": ("sub_block1.",), "wrn-34-10": ("sub_block1.",)}
RESAVE_HINT = ("re-save it as a plain state dict where you trust it: torch.save(model.state_dict(), 'weights.pt') "
               "or safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')")
MAX_LISTED = 5


@dataclass
class ImportResult:
    checkpoint: Path
    source: Path
    source_format: str  # "pytorch" or "safetensors"
    source_sha256: str
    arch: str
    dataset: str
    num_classes: int
    in_channels: int
    image_size: int
    tensors: int  # tensors taken from the file
    parameters: int  # learnable parameters of the net
    mean: list[float] | None
    std: list[float] | None
    threat: str
    robustbench_threat: str | None = None  # --robustbench imports: the zoo's threat model (Linf, L2, ...)
    unwrapped: str | None = None  # e.g. "state_dict" when the weights sat under that key
    stripped_prefix: str | None = None  # e.g. "module."
    renamed: dict[str, int] = field(default_factory=dict)  # "fc -> linear": number of keys
    ignored: list[str] = field(default_factory=list)  # dropped keys that the reference model never uses
    filled: list[str] = field(default_factory=list)  # num_batches_tracked keys absent from the file

    def summary(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.checkpoint), "source": str(self.source), "source_format": self.source_format,
            "source_sha256": self.source_sha256, "arch": self.arch, "dataset": self.dataset,
            "num_classes": self.num_classes, "in_channels": self.in_channels, "image_size": self.image_size,
            "tensors": self.tensors, "parameters": self.parameters, "mean": self.mean, "std": self.std,
            "threat": self.threat, "robustbench_threat": self.robustbench_threat,
            "unwrapped": self.unwrapped, "stripped_prefix": self.stripped_prefix,
            "renamed": dict(self.renamed), "ignored": list(self.ignored), "filled": list(self.filled),
        }


# ----------------------------------------------------------------------------- reading the file


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def _is_safetensors(path: Path) -> bool:
    """By suffix, or by the header: 8-byte little-endian length, then a JSON object."""
    if path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise WeatInputError(f"FILE: cannot read {path}: {e.strerror}") from None
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    from .checkpoint import FORMAT

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated / foreign bytes
        raise WeatInputError(f"FILE: {path} is not a readable safetensors file ({_one_line(e)[:200]})") from None
    if meta.get("format") == FORMAT:
        raise WeatInputError(f"FILE: {path} is already a weat checkpoint (arch {meta.get('arch')!r}, dataset "
                             f"{meta.get('dataset')!r}); use it directly, e.g. weat attack {path}")
    return tensors


def _read_torch(path: Path) -> Any:
    """torch.load with weights_only=True: tensors, containers and plain values only, never code."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol / TorchScript notices: the refusal below says it all
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        why = (f"loading it needs arbitrary unpickling (it references {found.group(1)})" if found else
               "it is not a plain torch.save state dict (a raw pickle, or objects beyond tensors)")
        raise WeatInputError(
            f"FILE: {path} was refused: {why}; weat never unpickles arbitrary objects "
            f"(torch.load weights_only=True only); {RESAVE_HINT}"
        ) from None
    except RuntimeError as e:
        if "TorchScript" in str(e):
            raise WeatInputError(
                f"FILE: {path} was refused: it is a TorchScript archive (code, not weights); {RESAVE_HINT}"
            ) from None
        raise WeatInputError(f"FILE: {path} is not a readable PyTorch file ({_one_line(e)[:200]})") from None
    except Exception as e:  # truncated or foreign bytes surface as EOFError, KeyError, ValueError...
        raise WeatInputError(
            f"FILE: {path} is not a readable PyTorch or safetensors file ({type(e).__name__}: {_one_line(e)[:200]})"
        ) from None


def _find_state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The names -> tensors mapping in obj, looking inside WRAPPER_KEYS (nested up to 3 deep)."""
    trail: list[str] = []
    for _ in range(4):
        if not isinstance(obj, Mapping):
            where = f" under {'/'.join(trail)!r}" if trail else ""
            raise WeatInputError(f"FILE: {path} holds a {type(obj).__name__}{where}; expected a state dict "
                                 f"(parameter names -> tensors); {RESAVE_HINT}")
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj), "/".join(trail) or None
        inner = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        trail.append(inner)
        obj = obj[inner]
    where = f" under {'/'.join(trail)!r}" if trail else ""
    if not obj:
        raise WeatInputError(f"FILE: {path} holds an empty dict{where}; expected a state dict")
    bad = next(k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor)))
    what = f"is a {type(obj[bad]).__name__}, not a tensor" if isinstance(bad, str) else "has a non-string name"
    raise WeatInputError(
        f"FILE: {path}: entry {bad!r}{where} {what}; expected a state dict "
        f"(names -> tensors) or a checkpoint holding one under {', '.join(repr(k) for k in WRAPPER_KEYS)}"
    )


# ----------------------------------------------------------------------------- matching keys


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str | None]:
    """Remove a prefix every key shares ("module.", "model.", "_orig_mod.", possibly several)."""
    stripped = ""
    while sd:
        prefix = next((p for p in PREFIXES if all(k.startswith(p) for k in sd)), None)
        if prefix is None:
            return sd, stripped or None
        sd = {k[len(prefix):]: v for k, v in sd.items()}
        stripped += prefix
    return sd, None


def _rename_segments(sd: dict[str, torch.Tensor],
                     expected: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    out: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for key, value in sd.items():
        new = key
        if key not in expected:
            parts = key.split(".")
            for old, alias in SEGMENT_ALIASES:
                if old not in parts:
                    continue
                candidate = ".".join(alias if p == old else p for p in parts)
                if candidate in expected and candidate not in sd:
                    new = candidate
                    counts[f"{old} -> {alias}"] = counts.get(f"{old} -> {alias}", 0) + 1
                    break
        out[new] = value
    return out, counts


def _listed(keys: Sequence[str]) -> str:
    more = f" and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else ""
    return ", ".join(keys[:MAX_LISTED]) + more


def _match(sd: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor], *, path: Path, arch: str,
           dataset: str, fillable: frozenset[str] = frozenset(),
           flag: str = "--arch") -> tuple[dict[str, torch.Tensor], list[str]]:
    """Check names and shapes against the model; fp32 copies in the model's key order. Keys in
    `fillable` (and every num_batches_tracked) may be absent: the fresh model's values stay."""
    unused = sorted(set(sd) - set(expected))
    if unused:
        raise WeatInputError(f"FILE: {path} has {len(unused)} tensors that arch {arch!r} does not use: "
                             f"{_listed(unused)} (is {flag} right?)")
    missing = sorted(k for k in set(expected) - set(sd) if not k.endswith("num_batches_tracked") and k not in fillable)
    if missing:
        raise WeatInputError(f"FILE: {path} lacks {len(missing)} tensors of arch {arch!r}: {_listed(missing)} "
                             f"(is {flag} right?)")
    out: dict[str, torch.Tensor] = {}
    filled: list[str] = []
    for key, want in expected.items():
        if key not in sd:
            out[key] = want.detach().clone()  # an absent num_batches_tracked: the fresh model's 0
            filled.append(key)
            continue
        have = sd[key]
        if tuple(have.shape) != tuple(want.shape):
            head = key.endswith(("linear.weight", "fc.weight")) and have.ndim == 2 and have.shape[1:] == want.shape[1:]
            hint = f" (a model for {have.shape[0]} classes? check --dataset)" if head else ""
            raise WeatInputError(f"FILE: {path}: tensor {key!r} has shape {tuple(have.shape)}; arch {arch!r} for "
                                 f"{dataset} expects {tuple(want.shape)}{hint}")
        if have.is_floating_point() != want.is_floating_point() or have.is_complex():
            raise WeatInputError(f"FILE: {path}: tensor {key!r} has dtype {have.dtype}; expected {want.dtype}")
        out[key] = have.detach().to(want.dtype).contiguous().clone()  # fp16/bf16/fp64 -> the model's fp32
    return out, filled


# ----------------------------------------------------------------------------- options


def parse_channels(flag: str, value: str | Sequence[float] | None, in_channels: int) -> list[float] | None:
    """`0.5` or `0.4914,0.4822,0.4465` (or a sequence) -> one float per channel."""
    if value is None:
        return None
    items = [v for v in value.replace(" ", "").split(",")] if isinstance(value, str) else list(value)
    try:
        vals = [float(v) for v in items]
    except (TypeError, ValueError):
        raise WeatInputError(f"{flag}: {value!r}; expected comma-separated numbers, e.g. 0.4914,0.4822,0.4465") from None
    if len(vals) == 1:
        vals = vals * in_channels
    if len(vals) != in_channels:
        raise WeatInputError(f"{flag}: got {len(vals)} values; expected 1 or {in_channels} (one per channel)")
    if not all(v == v and abs(v) != float("inf") for v in vals):
        raise WeatInputError(f"{flag}: {value!r}; expected finite numbers")
    return vals


def _dataset_shape(dataset: str) -> tuple[int, int, int]:
    from . import data as data_mod

    if dataset.startswith(data_mod.NPZ_PREFIX):  # a user .npz has no fixed shape: read it
        ds = data_mod.load(dataset)
        return ds.num_classes, ds.in_channels, ds.image_size
    if dataset not in data_mod.SHAPES:
        raise WeatInputError(f"--dataset: unknown {dataset!r}; expected one of {', '.join(data_mod.SHAPES)} or npz:PATH")
    return data_mod.dataset_shape(dataset)


def default_out(source: Path) -> Path:
    """model.pt -> model.weat.safetensors, next to the input."""
    return Path(source).with_suffix(".weat.safetensors")


# ----------------------------------------------------------------------------- the engine


def _arch_key(arch: str | None, robustbench: str | None, *, threat: str | None, download: bool,
              mean: Any, std: Any) -> str:
    """The checkpoint's arch: a weat arch (--arch) or `robustbench:NAME` (--robustbench); the
    options that go only with one of them are bad input with the other."""
    from . import zoo as zoo_mod
    from .models import ARCHS

    if robustbench is not None and arch is not None:
        raise WeatInputError("--arch/--robustbench: give one (--robustbench NAME builds the zoo entry's own architecture)")
    if robustbench is not None:
        if mean is not None or std is not None:
            raise WeatInputError("--mean/--std: not with --robustbench (a zoo model carries its own normalisation)")
        return zoo_mod.ZOO_PREFIX + robustbench
    if arch is None:
        raise WeatInputError(f"--arch: required (one of {', '.join(ARCHS)}), or --robustbench NAME for a RobustBench zoo entry")
    for flag, given in (("--threat", threat is not None), ("--download", download)):
        if given:
            raise WeatInputError(f"{flag}: only with --robustbench NAME")
    key = arch.strip().lower()
    if key not in ARCHS:
        raise WeatInputError(f"--arch: unknown {arch!r}; expected one of {', '.join(ARCHS)}")
    return key


def _check_forward(model: torch.nn.Module, weights: Mapping[str, torch.Tensor], *, source: Path,
                   shape: tuple[int, int, int], num_classes: int) -> None:
    """One forward pass on a (2, C, S, S) random [0,1] batch must give finite (2, K) logits."""
    with torch.no_grad():
        x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
        logits = model(x)
    size = "x".join(map(str, shape))
    if not isinstance(logits, torch.Tensor) or logits.shape != (2, num_classes):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise WeatInputError(f"FILE: {source}: the model gives logits of shape {got} on a "
                             f"{size} batch; expected (2, {num_classes})")
    if not torch.isfinite(logits).all():
        bad = next((k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
        where = f" (tensor {bad!r} has NaN/inf values)" if bad else ""
        raise WeatInputError(f"FILE: {source}: the imported model gives non-finite logits on a random batch{where}")


def import_checkpoint(
    source: Path | str,
    *,
    arch: str | None = None,
    dataset: str,
    out: Path | str | None = None,
    mean: str | Sequence[float] | None = None,
    std: str | Sequence[float] | None = None,
    eps: float | str | None = None,
    norm: str | None = None,
    force: bool = False,
    robustbench: str | None = None,
    threat: str | None = None,
    download: bool = False,
) -> ImportResult:
    """Check a foreign state dict against `arch` (or the RobustBench zoo entry `robustbench` for
    `threat`) for `dataset` and write it as a weat checkpoint. `download` (zoo entries only) lets
    robustbench fetch the published weights into `source` first when that file does not exist."""
    from . import checkpoint as ckpt_mod
    from . import config as config_mod
    from . import zoo as zoo_mod
    from .fileio import check_writable, file_digest
    from .models import NORMALIZES_INSIDE, build, dm_default_normalization, unwrap

    source = Path(source)
    robustbench = robustbench.strip() if robustbench is not None else None
    arch_key = _arch_key(arch, robustbench, threat=threat, download=download, mean=mean, std=std)
    dataset = dataset.strip()
    if dataset.startswith("npz:"):  # stored absolute, as data.load names it, so later commands find it
        dataset = f"npz:{Path(dataset[4:]).expanduser().resolve()}"
    else:
        dataset = dataset.lower()
    zoo = zoo_mod.entry(robustbench, dataset, threat or "Linf") if robustbench is not None else None
    num_classes, in_channels, image_size = _dataset_shape(dataset)
    mean_c, std_c = parse_channels("--mean", mean, in_channels), parse_channels("--std", std, in_channels)
    if (mean_c is None) != (std_c is None):
        raise WeatInputError("--mean/--std: give both or neither (default: no normalisation, as in RobustBench)")
    if std_c is not None and not all(s > 0 for s in std_c):
        raise WeatInputError(f"--std: {std_c}; expected every value > 0")
    norm = norm.strip().lower() if norm is not None else None
    if norm is not None and eps is None:
        raise WeatInputError(f"--eps: required with --norm {norm} (the threat radius the model was trained for)")
    if zoo is not None and eps is None and zoo.threat in zoo_mod.LEADERBOARD_EPS:
        norm, eps = zoo_mod.LEADERBOARD_EPS[zoo.threat]

    out = Path(out) if out is not None else default_out(source)
    if out.suffix != ".safetensors":
        raise WeatInputError(f"--out: {out}; expected a file name ending in .safetensors")
    check_writable("--out", out)
    if out.exists() and not force:
        raise WeatInputError(f"--out: {out} already exists; pass --force to overwrite it")
    if zoo is not None and download and not source.exists():
        check_writable("FILE", source)
        zoo_mod.fetch_weights(zoo, source)
    if not source.is_file():
        hint = "; pass --download to let robustbench fetch the published weights there" if zoo is not None else ""
        raise WeatInputError(f"FILE: {source} not found" + (" (it is a directory)" if source.is_dir() else hint))

    if _is_safetensors(source):
        fmt, sd, unwrapped = "safetensors", _read_safetensors(source), None
    else:
        fmt = "pytorch"
        sd, unwrapped = _find_state_dict(_read_torch(source), source)

    # A weat-exported NormalizedModel: its normalisation travels with it.
    if zoo is None and "normalize.mean" in sd and "normalize.std" in sd:
        file_mean = sd.pop("normalize.mean").flatten().tolist()
        file_std = sd.pop("normalize.std").flatten().tolist()
        if mean_c is None:
            mean_c, std_c = file_mean, file_std
        elif not (len(mean_c) == len(file_mean) and len(std_c) == len(file_std)
                  and torch.allclose(torch.tensor(mean_c), torch.tensor(file_mean))
                  and torch.allclose(torch.tensor(std_c), torch.tensor(file_std))):
            raise WeatInputError(f"--mean/--std: {mean_c}/{std_c} differ from the file's normalize.mean/std "
                                 f"{file_mean}/{file_std}; drop the options to use the file's")
    if arch_key in NORMALIZES_INSIDE and mean_c is None:  # recorded, so the config says what the net does
        mean_c, std_c = (list(v) for v in dm_default_normalization(num_classes, in_channels))

    if zoo is not None:
        model = zoo_mod.build(zoo)
        net = model
        expected = model.state_dict()
        if not set(sd) <= set(expected):  # "module." etc. only where the names do not match as they are
            sd, stripped = _strip_prefixes(sd)
        else:
            stripped = None
        ignored, renamed = [], {}
        # Buffers the model sets itself (normalisation constants such as mu/sigma or mean/std) may be
        # absent, as robustbench's own loader allows; every parameter and every batch-norm statistic
        # (which changes eval-mode outputs) must be in the file.
        buffers = frozenset(name for name, _ in model.named_buffers()
                            if name in expected and not name.endswith(("running_mean", "running_var")))
        weights, filled = _match(sd, expected, path=source, arch=arch_key, dataset=dataset, fillable=buffers,
                                 flag="--robustbench")
        overrides = {"data.dataset": dataset, "model.arch": arch_key, "model.robustbench_threat": zoo.threat,
                     "attack.eps": eps, "attack.norm": norm}
    else:
        sd, stripped = _strip_prefixes(sd)
        ignored = sorted(k for k in sd if k.startswith(UNUSED_BY_REFERENCE.get(arch_key, ())))
        for k in ignored:
            del sd[k]
        model = build(arch_key, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                      mean=mean_c, std=std_c)
        net = unwrap(model)
        expected = net.state_dict()
        sd, renamed = _rename_segments(sd, expected)
        weights, filled = _match(sd, expected, path=source, arch=arch_key, dataset=dataset)
        overrides = {"data.dataset": dataset, "model.arch": arch_key, "model.mean": mean_c, "model.std": std_c,
                     "attack.eps": eps, "attack.norm": norm}
    cfg = config_mod.resolve(overrides=overrides)
    net.load_state_dict(weights, strict=True)
    model.eval()

    _check_forward(model, weights, source=source, shape=(in_channels, image_size, image_size), num_classes=num_classes)

    digest = file_digest(source)
    meta = ckpt_mod.model_metadata(cfg, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                                   epoch=0)
    meta.update({"method": "imported", "imported_from": source.name, "source_sha256": digest})
    if zoo is not None:
        meta.update(zoo.metadata())
    ckpt_mod.save(out, ckpt_mod.state_dict_of(model), meta)

    return ImportResult(
        checkpoint=out, source=source, source_format=fmt, source_sha256=digest, arch=arch_key, dataset=dataset,
        num_classes=num_classes, in_channels=in_channels, image_size=image_size,
        tensors=len(weights) - len(filled), parameters=sum(p.numel() for p in net.parameters()),
        mean=mean_c, std=std_c, threat=cfg.attack.threat, robustbench_threat=zoo.threat if zoo else None,
        unwrapped=unwrapped, stripped_prefix=stripped, renamed=renamed, ignored=ignored, filled=filled,
    )
