"""Run configuration: frozen pydantic sections, TOML presets, flag and `--set` overrides.

A preset is a TOML file with one table per concern ([data], [model], [attack], [train]). The
resolved RunConfig travels into the run directory (config.toml) and into every checkpoint, so a
model can be rebuilt from its checkpoint alone. This module imports no torch: `weat presets list`
and `weat --help` stay instant.
"""

from __future__ import annotations

import json
import math
import re
import sys
from datetime import datetime
from fractions import Fraction as _Fraction
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import WeatInputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

PRESET_DIR = Path(__file__).parent / "presets"
DEFAULT_PRESET = "digits-weat"

# Methods that adversarial weight perturbation supports (awp.SUPPORTED_METHODS; this module imports no torch).
AWP_METHODS = ("pgd-at", "trades", "mail-trades", "weat-adv", "weat-nat")

# Canonical training methods (losses.py holds the implementations under the same names) and the
# aliases users type: `weat` is the paper's method, `sat` is what the paper calls PGD-AT, `fgsm` and
# `rs-fgsm` are FGSM with a random start (Wong et al. 2020), `nfgsm` is N-FGSM (de Jorge et al. 2022).
METHODS = ("standard", "pgd-at", "trades", "mart", "mail-trades", "weat-adv", "weat-nat", "fgsm-rs", "n-fgsm")
METHOD_ALIASES = {"weat": "weat-adv", "sat": "pgd-at", "madry": "pgd-at", "mail": "mail-trades", "ce": "standard",
                  "fgsm": "fgsm-rs", "rs-fgsm": "fgsm-rs", "nfgsm": "n-fgsm"}
# Single-step methods: one attack step; their step is train.fgsm_alpha * eps (attack.steps and
# attack.step_size are for multi-step PGD only: the per-epoch evaluation uses them).
SINGLE_STEP_METHODS = ("fgsm-rs", "n-fgsm")
FGSM_ALPHA_DEFAULT = {"fgsm-rs": 1.25, "n-fgsm": 1.0}

# Which preset a bare `--dataset NAME` starts from: the paper's recipe for that dataset.
DATASET_PRESET_PREFIX = {
    "digits": "digits",
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "svhn": "svhn",
    "tiny-imagenet": "tinyimagenet",
}


def parse_fraction(value: Any) -> float:
    """`8/255`, `0.031`, `1e-2` or a number -> float. Rejects non-finite values and division by 0."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number or a fraction like 8/255, got {value!r}")
    if isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            if "/" in text:
                num, den = text.split("/", 1)
                if float(den) == 0:
                    raise ValueError
                out = float(_Fraction(num.strip()) / _Fraction(den.strip()))
            else:
                out = float(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"expected a number or a fraction like 8/255, got {value!r}") from None
    else:
        raise ValueError(f"expected a number or a fraction like 8/255, got {value!r}")
    if not math.isfinite(out):
        raise ValueError(f"expected a finite number, got {value!r}")
    return out


def _canonical_method(value: Any) -> Any:
    if isinstance(value, str):
        key = value.strip().lower().replace("_", "-")
        return METHOD_ALIASES.get(key, key)
    return value


Frac = Annotated[float, BeforeValidator(parse_fraction)]
Method = Annotated[Literal[METHODS], BeforeValidator(_canonical_method)]  # type: ignore[valid-type]


DEVICE_FIELD_HELP = "auto, cpu, cuda or cuda:N"
# `weat attack` names: our engine's PGD and CW, and the official AutoAttack (standard) or one of its parts.
EVAL_ATTACKS = ("pgd", "cw", "autoattack", "apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
EVAL_TARGETED_ATTACKS = ("pgd", "cw")  # what --targeted applies to; AutoAttack's parts pick their own targets
SAMPLE_INITS = ("uniform", "informative", "pca", "pca-scaled", "local-pca", "noise")
SCORE_METRICS = ("fid", "is", "kid", "prdc", "diversity", "judge")
SCORE_DEFAULT_METRICS = ("fid", "is", "kid", "prdc")  # plus diversity for labelled samples, judge with --judge
ADAPTIVE_RULES = ("below", "squared")  # inits.stop_reached


def _check_device(v: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
        raise ValueError(f"expected {DEVICE_FIELD_HELP}, got {v!r}")
    return v


Device = Annotated[str, AfterValidator(_check_device)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataConfig(_Section):
    dataset: str = Field("digits", description="digits, cifar10, cifar100, svhn, tiny-imagenet or npz:PATH")
    data_dir: str | None = Field(None, description="dataset root; else $WEAT_DATA_DIR, else ~/.cache/weat/data")
    download: bool = Field(False, description="allow torchvision's downloaders to fetch a missing dataset")
    crop_padding: int = Field(4, ge=0, le=64, description="zero padding (pixels) of the random crop; 0 disables")
    flip: bool = Field(True, description="random horizontal flip (turn off for digits: mirrored digits are other glyphs)")
    train_per_class: int | None = Field(None, ge=1, description="train on at most this many training images of each "
                                        "class, the first in file order (a small-data study; the test split is whole)")
    label_noise: float = Field(0.0, ge=0, lt=1, description="replace this fraction of the training labels by a "
                               "different class drawn uniformly, the same images and labels whatever train.seed "
                               "(symmetric label noise, a robust-overfitting study; the test split is clean)")
    # Generated training data (docs/science.md#extra-data), read by weatcli/extra_data.py.
    extra_data: str | None = Field(None, description="generated training images: an uncompressed np.savez .npz with "
                                   "image (N, H, W, C) uint8 and label (N,), memory-mapped (e.g. the DM-AT 1M EDM file)")
    extra_fraction: float = Field(0.0, ge=0, lt=1, description="share F of every batch drawn from --extra-data; with it "
                                  "an epoch is a fixed ceil(N_real / (B - round(F * B))) steps (every real image once)")


class ModelConfig(_Section):
    arch: str = Field("small-cnn", description="small-cnn, small-cnn-wide, mlp, resnet18, resnet18-64, preact-resnet18, wrn-28-10, wrn-34-10")
    mean: list[float] | None = Field(None, description="per-channel mean of the Normalize layer inside the model")
    std: list[float] | None = Field(None, description="per-channel std of the Normalize layer inside the model")
    robustbench_threat: str | None = Field(None, description="arch robustbench:NAME only: the zoo's threat model (Linf, L2, corruptions) of the entry")

    @model_validator(mode="after")
    def _mean_std_together(self) -> ModelConfig:
        if (self.mean is None) != (self.std is None):
            raise ValueError("model.mean and model.std must be given together")
        if self.mean is not None and (len(self.mean) != len(self.std) or any(s <= 0 for s in self.std)):
            raise ValueError("model.mean and model.std need the same length and std > 0")
        return self


class AttackConfig(_Section):
    """The threat model: used by the training attack and by the per-epoch robust evaluation."""

    norm: Literal["linf", "l2"] = "linf"
    eps: Frac = Field(8 / 255, description="radius of the threat ball in [0,1] pixel units, e.g. 8/255")
    step_size: Frac = Field(2 / 255, description="attack step in [0,1] pixel units")
    steps: int = Field(10, ge=1, le=10_000, description="attack steps of the training attack")
    eval_steps: int = Field(20, ge=1, le=10_000, description="PGD steps of the per-epoch robust evaluation")

    @field_validator("eps")
    @classmethod
    def _eps_range(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"eps must be > 0, got {v:g}")
        return v

    @field_validator("step_size")
    @classmethod
    def _step_positive(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"step_size must be > 0, got {v:g}")
        return v

    @model_validator(mode="after")
    def _linf_eps_at_most_one(self) -> AttackConfig:
        # Images live in [0,1]: an Linf radius above 1 is meaningless (every image is reachable).
        if self.norm == "linf" and self.eps > 1:
            raise ValueError(f"attack.eps must be in (0, 1] for linf (pixels are in [0,1]), got {self.eps:g}")
        return self

    @property
    def threat(self) -> str:
        return f"{self.norm}:{self.eps:.6g}"


class TrainConfig(_Section):
    method: Method = Field("weat-adv", description="standard, pgd-at, trades, mart, mail-trades, weat-adv, weat-nat, "
                           "fgsm-rs, n-fgsm")
    epochs: int = Field(100, ge=1, le=100_000)
    batch_size: int = Field(128, ge=1, le=1_000_000)
    lr: float = Field(0.1, gt=0, le=100)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    nesterov: bool = False
    schedule: Literal["onecycle", "cosine", "multistep", "constant"] = "onecycle"
    warmup_epochs: int = Field(0, ge=0, description="cosine only: epochs of linear learning-rate warm-up to train.lr "
                               "before the cosine decay (DM-AT warms up for 2.5% of training)")
    pct_start: float = Field(0.25, gt=0, lt=1, description="onecycle: fraction of steps spent warming up")
    milestones: list[float] = Field([0.5, 0.75], description="multistep: fractions of training where lr *= gamma")
    gamma: float = Field(0.1, gt=0, le=1, description="multistep: lr factor at each milestone")
    beta: float = Field(6.0, ge=0, description="weight of the KL term (trades, mart, mail-trades, weat-*)")
    # MAIL (Liu et al. 2021): w = sigmoid(slope * (PM + bias)) with PM = p_2nd(x*) - p_y(x*), normalised
    # to mean 1; plain TRADES (w = 1) during the burn-in. Defaults from the MAIL authors' code (?).
    mail_bias: float = Field(-1.5, description="mail-trades: bias of the probabilistic-margin sigmoid")
    mail_slope: float = Field(1.0, gt=0, description="mail-trades: slope of the probabilistic-margin sigmoid")
    mail_burn_in: float = Field(0.6, ge=0, lt=1, description="mail-trades: fraction of epochs of plain TRADES first")
    # Single-step AT (docs/science.md#single-step-at): one signed-gradient step from a uniform start.
    fgsm_alpha: float | None = Field(None, gt=0, description="fgsm-rs, n-fgsm: the attack step as a multiple of "
                                     "attack.eps (default: 1.25 for fgsm-rs, 1.0 for n-fgsm)")
    nfgsm_k: float = Field(2.0, ge=0, description="n-fgsm: the start is uniform in [-k eps, k eps], and x* is not "
                           "projected back to the eps ball")
    # DER (docs/science.md#der), our reading of the journal's Delta Energy Regulariser:
    # lambda * mean_i max(0, ||(dE(x_i), dE(x_i, y_i))||_2 - gamma), x* the method's own training attack.
    der_weight: float = Field(0.0, ge=0, description="DER lambda (0 = off): adds lambda * mean_i max(0, "
                              "||(dE(x_i), dE(x_i,y_i))||_2 - der_margin) to the loss (our reading of the journal)")
    der_margin: float = Field(0.0, ge=0, description="DER gamma, energy units: delta-energy norms up to it are "
                              "not penalised (0: every gap is)")
    der_grad: Literal["both", "adversarial"] = Field(
        "both", description="DER's gradient: through both energies of each pair (the default reading), or "
        "through the adversarial point's only, the natural energies a fixed target (ours: it kept fgsm-rs "
        "from collapsing on digits, but the energies' scale runs away)")
    der_anchor: float = Field(0.0, ge=0, description="energy anchor mu (0 = off): adds mu * (mean_i E(x_i)^2 + "
                              "mean_i E(x*_i)^2), gradient through both, so that DER through x* alone cannot run "
                              "the energies' scale away (the energy-magnitude term of Du & Mordatch 2019)")
    # The RobustBench leaders' recipe (docs/science.md#beyond-the-paper); every one off by default.
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of every cross-entropy term of the "
                                   "training loss (not of KL terms, not of attacks); DM-AT uses 0.1")
    ema_decay: float | None = Field(None, ge=0, lt=1, description="keep an exponential moving average of the weights "
                                    "with this decay (DM-AT: 0.995): evaluation, selection and model.safetensors use "
                                    "it; unset or 0: off")
    ema_warmup: float = Field(0.025, ge=0, le=1, description="EMA: fraction of all training steps during which the "
                              "average just copies the weights")
    awp_gamma: float = Field(0.0, ge=0, le=1, description="adversarial weight perturbation of relative size gamma "
                             "(the AWP authors use 5e-3; 0: off); pgd-at, trades, mail-trades, weat-adv, weat-nat")
    awp_warmup: int = Field(0, ge=0, description="AWP: epochs trained without it first")
    tensorboard: str | None = Field(None, description="also write every metrics.jsonl scalar, per epoch, as "
                                    "TensorBoard events in this directory (pip install 'weat[tensorboard]')")
    seed: int = Field(0, ge=0)
    device: Device = Field("auto", description=DEVICE_FIELD_HELP)
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="training (attack and update) under autocast: bf16, or fp16 with a gradient "
        "scaler; weights, optimizer and BatchNorm stay fp32, per-epoch evaluation always runs in fp32",
    )
    tf32: bool = Field(False, description="allow TF32 matmuls/convolutions on CUDA (fp32 paths, evaluation included)")
    compile: bool = Field(False, description="torch.compile the model, and fuse the PGD sign step and projection")
    cuda_graphs: bool = Field(False, description="capture each PGD inner-loop step as a CUDA graph (CUDA only; "
                              "elsewhere the same step runs eagerly)")
    sync_bn: bool = Field(False, description="several ranks: batch-norm statistics over the global batch (then "
                          "N ranks compute what one process does with the same batch size)")
    nan_policy: Literal["stop", "skip-batch"] = Field(
        "stop", description="non-finite loss: stop (exit 1, the last good checkpoint is kept) or skip-batch "
        "(no update from that batch; counted in metrics as skipped_batches; one host sync per batch)",
    )
    select: Literal["best", "last", "energy"] = Field(
        "best",
        description="best: highest held-out robust accuracy (clean accuracy for method standard); "
        "energy: the epoch just before phase 3 (robust overfitting), read from dE(x) alone",
    )
    select_after: int = Field(0, ge=0, description="epochs before this one are not candidates for --select best")
    eval_n: int = Field(1000, ge=1, description="held-out test images for the per-epoch clean/PGD evaluation")
    energy_n: int = Field(512, ge=1, description="fixed training images whose energies are tracked per epoch")
    eval_batch_size: int = Field(500, ge=1)
    out: str | None = Field(None, description="run directory; default runs/<dataset>-<method>-<time>")

    @field_validator("milestones")
    @classmethod
    def _milestones_fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < m < 1 for m in v) or v != sorted(v):
            raise ValueError("milestones must be increasing fractions in (0, 1)")
        return v

    @model_validator(mode="after")
    def _der_needs_adversarial_points(self) -> TrainConfig:
        for key in ("der_weight", "der_anchor"):
            if getattr(self, key) > 0 and self.method == "standard":
                raise ValueError(f"{key} > 0 needs adversarial training points; method standard trains on clean "
                                 f"images only (use another method, or {key} = 0)")
        return self

    @property
    def single_step_alpha(self) -> float | None:
        """fgsm-rs / n-fgsm: the attack step as a multiple of eps (None for multi-step methods)."""
        if self.method not in SINGLE_STEP_METHODS:
            return None
        return FGSM_ALPHA_DEFAULT[self.method] if self.fgsm_alpha is None else self.fgsm_alpha

    @model_validator(mode="after")
    def _recipe_fits(self) -> TrainConfig:
        if self.warmup_epochs and self.schedule != "cosine":
            raise ValueError(f"train.warmup_epochs {self.warmup_epochs} applies to the cosine schedule only; "
                             f"train.schedule is {self.schedule}")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"train.warmup_epochs {self.warmup_epochs} must be less than train.epochs {self.epochs}")
        if self.awp_gamma > 0 and self.method not in AWP_METHODS:
            raise ValueError(f"train.awp_gamma {self.awp_gamma:g} (AWP) is not implemented for train.method "
                             f"{self.method}; expected one of {', '.join(AWP_METHODS)}")
        return self


# ----------------------------------------------------------------------------- command sections
# Each command other than train reads its own section below (plus data/model/attack from the
# checkpoint). Defaults live here and only here: the CLI shows them in --help and reads nothing else.


class EvaluateConfig(_Section):
    """`weat attack`: which attacks, how strong, on which images. The threat (eps, norm, step size)
    is the [attack] section, taken from the checkpoint unless overridden."""

    attacks: list[str] = Field(["pgd"], description="attacks, run on the same images: pgd, cw, autoattack (standard: "
                               "apgd-ce, apgd-t, fab-t, square) or one part: apgd-ce, apgd-dlr, apgd-t, fab, fab-t, "
                               "square; repeatable")
    steps: int = Field(20, ge=0, le=100_000, description="PGD / CW steps")
    restarts: int = Field(1, ge=1, le=1000, description="PGD / CW random restarts (the worst case per image is kept)")
    targeted: bool = Field(False, description="targeted PGD / CW (AutoAttack parts pick their own targets)")
    target_class: str = Field("random", description="target of a targeted attack: a class index, random (a wrong "
                              "class per image) or least-likely; giving it as a flag implies targeted")
    n: int | None = Field(None, ge=1, description="attack the first N images (default 10000, or the whole split)")
    split: Literal["test", "train"] = Field("test", description="the split the images come from: test or train")
    batch_size: int = Field(500, ge=1, description="images per batch (AutoAttack too)")
    seed: int = Field(0, ge=0, description="random seed (PGD starts, random targets, AutoAttack)")
    device: Device = Field("auto", description=DEVICE_FIELD_HELP)

    @field_validator("attacks", mode="before")
    @classmethod
    def _known_attacks(cls, v: Any) -> Any:
        # Lower-cased and de-duplicated (order kept): `-a PGD -a pgd` runs pgd once.
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, (list, tuple)):
            return v  # the list type reports it
        out: list[str] = []
        for raw in v:
            name = str(raw).strip().lower()
            if name not in EVAL_ATTACKS:
                raise ValueError(f"unknown {raw!r}; expected one of {', '.join(EVAL_ATTACKS)}")
            if name not in out:
                out.append(name)
        if not out:
            raise ValueError(f"no attack given; expected one or more of {', '.join(EVAL_ATTACKS)}")
        return out

    @field_validator("targeted")
    @classmethod
    def _targeted_needs_pgd_or_cw(cls, v: bool, info: Any) -> bool:  # info: pydantic ValidationInfo
        attacks = info.data.get("attacks")
        if v and attacks is not None and not any(a in EVAL_TARGETED_ATTACKS for a in attacks):
            raise ValueError(f"applies to {' and '.join(EVAL_TARGETED_ATTACKS)}; the AutoAttack parts choose their "
                             "own targets (apgd-t, fab-t)")
        return v

    @field_validator("target_class", mode="before")
    @classmethod
    def _target_mode_or_index(cls, v: Any) -> Any:
        # A class index (int or its text), random or least-likely; the index is checked against the
        # model's classes once the model is loaded.
        if isinstance(v, int) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str):
            return v  # the str type reports it
        text = v.strip().lower().replace("_", "-")
        if text in ("random", "least-likely") or (text.isdigit() and text.isascii()):
            return str(int(text)) if text.isdigit() else text
        raise ValueError(f"expected a class index, 'random' or 'least-likely', got {v!r}")

    @property
    def target(self) -> int | str:
        """target_class as the attacks take it: a class index (int) or a mode name."""
        return int(self.target_class) if self.target_class.isdigit() else self.target_class


LENS_DEFAULT_N = 1000  # lens.n unset: the first min(1000, split size) test images


class LensConfig(_Section):
    """`weat energy`: the energy lens on a checkpoint's test images (docs/science.md#findings). The
    threat (eps, norm, step size) is the [attack] section, the images the [data] section, both taken
    from the checkpoint unless overridden."""

    attacks: list[str] = Field(["pgd", "pgd-targeted"], description="attack names as in weat attack, with a "
                               "'-targeted' suffix for pgd / cw (a random wrong class per image); repeatable")
    n: int | None = Field(None, ge=1, description=f"test images: the first N (default {LENS_DEFAULT_N}, or the "
                          "whole split if smaller)")
    steps: int = Field(20, ge=0, le=100_000, description="PGD / CW steps")
    trades_steps: int = Field(10, ge=0, le=100_000, description="energy trades: steps of the TRADES KL attack")
    per_class: bool = Field(False, description="energy stats: also per true class")
    batch_size: int = Field(500, ge=1, description="images per batch")
    seed: int = Field(0, ge=0, description="random seed")
    device: Device = Field("auto", description=DEVICE_FIELD_HELP)

    @field_validator("attacks")
    @classmethod
    def _known_attacks(cls, v: list[str]) -> list[str]:
        """Lower-cased, de-duplicated (order kept) names of EVAL_ATTACKS, "-targeted" only on the
        attacks that take a target (pgd, cw; the AutoAttack parts pick their own)."""
        targetable = ("pgd", "cw")
        out: list[str] = []
        for raw in v:
            name = str(raw).strip().lower()
            base = name.removesuffix("-targeted")
            if base not in EVAL_ATTACKS:
                raise ValueError(f"unknown {raw!r}; expected one of {', '.join(EVAL_ATTACKS)} "
                                 f"(pgd and cw also as pgd-targeted, cw-targeted)")
            if base != name and base not in targetable:
                raise ValueError(f"{raw!r}: only {', '.join(targetable)} take a -targeted suffix; expected "
                                 f"{base} or one of {', '.join(t + '-targeted' for t in targetable)}")
            if name not in out:
                out.append(name)
        if not out:
            raise ValueError(f"no attack given; expected one or more of {', '.join(EVAL_ATTACKS)}")
        return out


# `weat sample` without n or n_per_class: this many samples of each wanted class.
SAMPLE_N_PER_CLASS = 10
# The cached class statistics keep the leading principal components that hold this fraction of a
# class's variance (sampling.SVD_KEEP), so the pca init can keep at most that fraction.
PCA_VARIANCE_MAX = 0.9999


def _adaptive_off(value: Any) -> Any:
    """`off` / `none` (any case): no adaptive stopping (TOML and flags have no null)."""
    if isinstance(value, str) and value.strip().lower() in ("off", "none"):
        return None
    return value


def _sample_init(value: Any) -> Any:
    """` PCA ` -> `pca`; an unknown name is refused here with the names allowed."""
    if isinstance(value, str):
        value = value.strip().lower()
        if value not in SAMPLE_INITS:
            raise ValueError(f"unknown starting point; expected one of {', '.join(SAMPLE_INITS)}")
    return value


def _metric_list(value: Any) -> Any:
    """`fid, IS` (the --metrics comma list) or a list -> ["fid", "is"]: lower case, each name once."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        return value  # pydantic names the wrong type
    names = [str(m).strip().lower() for m in items if str(m).strip()]
    bad = [m for m in names if m not in SCORE_METRICS]
    if bad:
        raise ValueError(f"unknown metric {bad[0]!r}; expected a comma list of {', '.join(SCORE_METRICS)}")
    if not names:
        raise ValueError(f"no metric; expected a comma list of {', '.join(SCORE_METRICS)}")
    return list(dict.fromkeys(names))


class SampleConfig(_Section):
    """`weat sample`: SGLD with momentum on the joint energy E(x, y) (docs/science.md#sgld).

    Step size, noise and energies are in [0, 1] pixel units and energy units (E = -logit)."""

    steps: int = Field(200, ge=0, le=1_000_000, description="SGLD steps per sample")
    n_per_class: int | None = Field(None, ge=1, description=f"samples per class (default {SAMPLE_N_PER_CLASS})")
    n: int | None = Field(None, ge=1, description="samples in all, split evenly over the classes (instead of n_per_class)")
    classes: str | None = Field(None, description="wanted classes, e.g. 0,3,7 (default all)")
    init: Annotated[Literal[SAMPLE_INITS], BeforeValidator(_sample_init)] = Field(  # type: ignore[valid-type]
        "pca-scaled", description="starting points: uniform (U(0,1)), informative (class Gaussian N(mu_c, Sigma_c + "
        "1e-4 I)), pca (the paper's class-wise PCA), pca-scaled (class-wise PCA at the data's own spread), local-pca "
        "(the journal's PCA of an anchor image's same-class neighbours) or noise (a training image plus Gaussian noise)")
    step_size: Frac = Field(0.1, gt=0, description="the SGLD step eta; fractions allowed")
    momentum: float = Field(0.0, ge=0, lt=1, description="the momentum zeta; 0 is plain SGLD (the paper also uses 0.8)")
    noise: float = Field(0.001, ge=0, allow_inf_nan=False, description="the std sigma of the SGLD noise")
    alpha: float | None = Field(None, ge=0, allow_inf_nan=False,
                                description="scale of the noise term (default sqrt(2 * eta))")
    pca_variance: float = Field(0.9, gt=0, le=PCA_VARIANCE_MAX,
                                description="fraction r of the variance kept by the pca and pca-scaled (a class's) "
                                "and local-pca (a neighbourhood's) inits")
    pca_sigma: float = Field(0.005, ge=0, allow_inf_nan=False,
                             description="sigma_pca of the pca init, the scale of the singular values (the "
                             "paper's 0.005 leaves digits chains at the class mean)")
    pca_scale: float = Field(1.0, ge=0, allow_inf_nan=False,
                             description="std along each kept component in the pca-scaled and local-pca inits, "
                             "as a multiple of the data's own (1: the data's spread)")
    local_neighbours: int = Field(50, ge=2, le=1_000_000,
                                  description="same-class training images around the anchor in the local-pca init")
    init_noise: float = Field(0.1, ge=0, allow_inf_nan=False,
                              description="noise init: std of the noise added to the real image")
    adaptive: Annotated[float | None, BeforeValidator(_adaptive_off)] = Field(
        0.0, allow_inf_nan=False, description="stop a sample once its E(x,y) has reached its class's mean E(x,y) on the "
        "training data, by adaptive_rule with this threshold T; off runs every step (docs/science.md#adaptive-stopping)")
    adaptive_rule: Literal[ADAPTIVE_RULES] = Field(  # type: ignore[valid-type]
        "below", description="adaptive stopping rule: below, E <= m_y + T (weat's, T in energy units); or squared, (E - m_y)^2 < T (the "
        "authors', T > 0 in squared units)")
    batch_size: int = Field(500, ge=1, description="samples per SGLD batch")
    seed: int = Field(0, ge=0, description="random seed (starting points and SGLD noise)")
    device: Device = Field("auto", description=DEVICE_FIELD_HELP)

    @model_validator(mode="after")
    def _one_count(self) -> SampleConfig:
        if self.n is not None and self.n_per_class is not None:
            # The CLI turns " sample.n " into " --n (sample.n) " when the flag set it.
            raise ValueError("sample.n and sample.n_per_class are both set; expected one of them")
        if self.adaptive_rule == "squared" and self.adaptive is not None and self.adaptive <= 0:
            raise ValueError(f"sample.adaptive {self.adaptive:g} with sample.adaptive_rule squared never stops; "
                             "expected a threshold > 0 (squared energy units; the default 0 is rule below's), "
                             "or sample.adaptive off")
        return self


class ScoreConfig(_Section):
    """`weat score`: FID / KID / IS of samples against a reference set (the reference's dataset root
    and whether it may be downloaded are [data] data_dir and download)."""

    ref: str | None = Field(None, description="reference set: DATASET[:split] (default: the training split of the "
                            "samples' dataset), a folder of images or a .safetensors / .npz file")
    metrics: Annotated[list[Literal[SCORE_METRICS]] | None, BeforeValidator(_metric_list)] = Field(  # type: ignore[valid-type]
        None, description=f"comma list of {', '.join(SCORE_METRICS)} (default {','.join(SCORE_DEFAULT_METRICS)}, plus "
        "diversity when the samples carry their classes and judge with --judge)")
    n: int | None = Field(None, ge=1, description="score a fixed random subset of N samples (default all)")
    features: str = Field("inception", description="inception (clean-fid's Inception-v3, clean mode) or a weat "
                          "checkpoint: its penultimate features and softmax (not comparable with Inception numbers); "
                          "FID, KID, IS, prdc and diversity are all computed in this space")
    judge: str | None = Field(None, description="a weat checkpoint other than the one sampled from: the share of "
                              "samples it classifies as their wanted class (adds the judge metric)")
    prdc_k: int = Field(5, ge=1, le=1000, description="precision/recall/density/coverage: the k of the k-NN balls")
    prdc_max: int = Field(10_000, ge=2, le=10_000_000, description="precision/recall/density/coverage: at most this "
                          "many samples and reference images (a seeded random subset of each)")
    diversity_max_per_class: int = Field(2000, ge=2, le=10_000_000, description="diversity: at most this many "
                                         "samples and reference images per class (a seeded random subset)")
    inception_weights: str | None = Field(None, description="local inception-2015-12-05.pt (default "
                                          "$WEAT_INCEPTION_WEIGHTS); nothing is downloaded then")
    batch_size: int = Field(100, ge=1, description="images per feature batch")
    seed: int = Field(0, ge=0, description="seed of the n subset, the IS split shuffle, the KID subsets and the "
                      "prdc / diversity subsets")
    device: Device = Field("auto", description=DEVICE_FIELD_HELP)

    @model_validator(mode="after")
    def _judge_named(self) -> ScoreConfig:
        if self.metrics is not None and "judge" in self.metrics and self.judge is None:
            raise ValueError("score.metrics: judge needs score.judge; expected --judge CKPT (a classifier other than "
                             "the one sampled from)")
        if self.prdc_max <= self.prdc_k:
            raise ValueError(f"score.prdc_max {self.prdc_max} must exceed score.prdc_k {self.prdc_k}: a k-NN ball "
                             "needs k other points")
        return self

    def metrics_for(self, labelled: bool, n: int | None = None) -> list[str]:
        """The metrics to compute: the given list (plus judge when a judge is named), else the default
        list (without prdc for n <= prdc_k samples), plus diversity when the samples carry their
        classes, plus judge with a judge."""
        if self.metrics is not None:
            names = list(self.metrics)
        else:
            names = [m for m in SCORE_DEFAULT_METRICS if m != "prdc" or n is None or n > self.prdc_k]
            names += ["diversity"] if labelled else []
        if self.judge is not None and "judge" not in names:
            names.append("judge")
        return names


class RunConfig(_Section):
    description: str = ""
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    attack: AttackConfig = AttackConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    lens: LensConfig = LensConfig()
    sample: SampleConfig = SampleConfig()
    score: ScoreConfig = ScoreConfig()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())

    def default_run_dir(self, now: datetime | None = None) -> Path:
        stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
        name = self.data.dataset.split(":", 1)[0] if self.data.dataset.startswith("npz:") else self.data.dataset
        return Path("runs") / f"{name}-{self.train.method}-{stamp}"


# ----------------------------------------------------------------------------- presets


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def preset_path(name_or_path: str) -> Path:
    """A preset name (file in the bundled presets/) or a path to a TOML file."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".toml" or path.exists() or "/" in name_or_path:
        if path.is_dir():
            raise WeatInputError(f"preset: {str(path)!r} is a directory; expected a .toml file")
        if not path.is_file():
            raise WeatInputError(f"preset: file {str(path)!r} not found; expected a .toml file or a bundled preset name")
        return path
    bundled = PRESET_DIR / f"{name_or_path}.toml"
    if not bundled.is_file():
        raise WeatInputError(
            f"preset: unknown {name_or_path!r}; expected a .toml path or one of {', '.join(preset_names())}"
        )
    return bundled


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise WeatInputError(f"preset: {path}: invalid TOML ({e}); expected a TOML preset file") from None
    except UnicodeDecodeError:
        raise WeatInputError(f"preset: {path}: not UTF-8 text; expected a TOML preset file") from None
    except IsADirectoryError:
        raise WeatInputError(f"preset: {path} is a directory; expected a .toml file") from None
    except OSError as e:
        raise WeatInputError(f"preset: cannot read {path}: {e.strerror}") from None


def load_preset(name_or_path: str) -> RunConfig:
    path = preset_path(name_or_path)
    return validate(read_toml(path), source=str(path))


def recipe_for(dataset: str, method: str | None) -> str:
    """The bundled preset a bare `--dataset [--method]` starts from (the paper's recipe)."""
    if dataset.startswith("npz:"):
        prefix = "cifar10"  # CIFAR-style recipe; the model adapts to the file's channels and size
    else:
        if dataset not in DATASET_PRESET_PREFIX:
            raise WeatInputError(
                f"data.dataset: unknown {dataset!r}; expected one of {', '.join(DATASET_PRESET_PREFIX)} or npz:PATH"
            )
        prefix = DATASET_PRESET_PREFIX[dataset]
    names = set(preset_names())
    canonical = _canonical_method(method) if method else None
    for candidate in (f"{prefix}-{canonical}", f"{prefix}-weat-adv", f"{prefix}-weat"):
        if candidate in names:
            return candidate
    raise WeatInputError(f"data.dataset: no bundled recipe for {dataset!r}")  # pragma: no cover


# ----------------------------------------------------------------------------- validation


def _section_keys(loc: tuple) -> list[str]:
    """The keys valid where an unknown key `loc` (e.g. ("train", "epohcs")) was found."""
    model: Any = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            break
        model = field.annotation
    return list(model.model_fields)


def _format_validation_error(err: ValidationError, source: str | None) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown key; expected one of {', '.join(_section_keys(e['loc']))}"
        elif "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], dict):
            msg = f"{msg} (got {e['input']!r})"
        parts.append(f"{loc}: {msg}" if loc else msg)
    prefix = f"{source}: " if source else ""
    return prefix + "; ".join(parts)


def validate(data: dict[str, Any], source: str | None = None) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise WeatInputError(_format_validation_error(e, source)) from None


def parse_set(item: str) -> tuple[list[str], Any]:
    """`train.lr=0.05` -> (["train", "lr"], 0.05). Values are read as TOML, else taken as strings."""
    if "=" not in item:
        raise WeatInputError(f"--set: expected section.key=value, got {item!r}")
    key, raw = item.split("=", 1)
    path = [p.strip() for p in key.strip().split(".")]
    if len(path) != 2 or not all(path):
        raise WeatInputError(f"--set: expected section.key=value (e.g. train.lr=0.05), got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def _deep_merge(base: dict[str, Any], path: list[str], value: Any) -> None:
    node = base
    for p in path[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise WeatInputError(f"--set: {'.'.join(path)}: {p!r} is not a section")
        node = child
    node[path[-1]] = value


def resolve_command(
    *,
    stored: RunConfig | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
) -> RunConfig:
    """The config of a command other than train: the defaults above <- the checkpoint's stored
    config (`stored`) <- the sections a preset gives <- flag overrides <- `--set section.key=value`.

    A stored config never allows a download: each command asks for that itself (--download).
    """
    data = (stored or RunConfig()).to_dict()
    data["data"]["download"] = False
    if preset is not None:
        path = preset_path(preset)
        for section, table in read_toml(path).items():
            if isinstance(table, dict) and isinstance(data.get(section), dict):
                data[section].update(table)
            else:
                data[section] = table  # validation names anything that is not a section
    base = validate(data, source=str(preset_path(preset)) if preset is not None else "config")
    return resolve(base=base, overrides=overrides, sets=sets)


def resolve(
    *,
    preset: str | None = None,
    base: RunConfig | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
) -> RunConfig:
    """Preset (or `base`) <- flag overrides {"section.key": value} <- `--set section.key=value`.

    With no preset but a dataset flag, the dataset's paper recipe is the starting point. When eps
    is overridden and the step size is not, the step size keeps its ratio to eps (2/255 per 8/255).
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    set_pairs = [parse_set(s) for s in sets or []]
    set_keys = {".".join(p) for p, _ in set_pairs}

    if base is not None:
        start = base
    elif preset is not None:
        start = load_preset(preset)
    elif "data.dataset" in overrides:
        start = load_preset(recipe_for(str(overrides["data.dataset"]), overrides.get("train.method")))
    else:
        start = load_preset(DEFAULT_PRESET)

    data = start.to_dict()
    for key, value in overrides.items():
        _deep_merge(data, key.split("."), value)
    for path, value in set_pairs:
        _deep_merge(data, path, value)

    if ("attack.eps" in overrides or "attack.eps" in set_keys) and not (
        "attack.step_size" in overrides or "attack.step_size" in set_keys
    ):
        try:
            ratio = start.attack.step_size / start.attack.eps
            data["attack"]["step_size"] = parse_fraction(data["attack"]["eps"]) * ratio
        except ValueError:
            pass  # validation below reports the bad eps with its field name
    return validate(data, source="config")


# ----------------------------------------------------------------------------- TOML writing


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dumps_toml(data: dict[str, Any]) -> str:
    """Flat tables of scalars and lists (what RunConfig holds); None values are left out."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict) and v is not None]
    for section, table in data.items():
        if isinstance(table, dict):
            lines.append(f"\n[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines).lstrip("\n") + "\n"
