from __future__ import annotations

import math
import sys

import pytest

from weatcli import config as config_mod
from weatcli.config import parse_fraction, resolve
from weatcli.errors import WeatInputError
from weatcli.models import ARCHS

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REQUIRED = {
    "digits-weat", "digits-trades", "digits-pgd-at", "digits-standard",
    *(f"cifar10-{m}" for m in ("standard", "pgd-at", "trades", "mart", "mail-trades", "weat-adv", "weat-nat")),
    "cifar100-weat-adv", "svhn-weat-adv", "tinyimagenet-weat-adv", "cifar10-dm-trades", "cifar10-dm-weat",
    *(f"{d}-{m}" for d in ("digits", "cifar10") for m in ("fgsm-rs", "n-fgsm", "fgsm-rs-der")),
    "cifar10-pgd-at-ro",
}
# A preset name may end in a variant suffix after the method: -der (with the Delta Energy
# Regulariser), -co (set up to show catastrophic overfitting), -ro (robust overfitting).
VARIANT_SUFFIXES = ("-der", "-co", "-ro")


def test_required_presets_are_shipped():
    assert REQUIRED <= set(config_mod.preset_names())


@pytest.mark.parametrize("name", config_mod.preset_names())
def test_every_preset_file_loads_and_is_consistent(name):
    cfg = config_mod.load_preset(name)
    assert cfg.model.arch in ARCHS
    assert cfg.description
    assert 0 < cfg.attack.step_size <= cfg.attack.eps
    # The name says the dataset and the method: the file must agree with it.
    prefix, _, method = name.partition("-")
    method = method.removeprefix("dm-")  # cifar10-dm-<method>: the DM-AT recipe (Wang et al. 2023)
    assert config_mod.DATASET_PRESET_PREFIX[cfg.data.dataset] == prefix
    variant = next((v for v in VARIANT_SUFFIXES if method.endswith(v) and method[: -len(v)] in config_mod.METHODS), "")
    method = method.removesuffix(variant)
    assert cfg.train.method == config_mod.METHOD_ALIASES.get(method, method)
    assert (cfg.train.der_weight > 0) == (variant == "-der")  # DER on exactly in the -der presets


def test_paper_recipe_in_cifar_presets():
    cfg = config_mod.load_preset("cifar10-weat-adv")
    assert (cfg.model.arch, cfg.train.lr, cfg.train.momentum, cfg.train.weight_decay) == ("resnet18", 0.1, 0.9, 5e-4)
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.schedule, cfg.train.pct_start) == (128, 100, "onecycle", 0.25)
    assert cfg.attack.eps == pytest.approx(8 / 255) and cfg.attack.step_size == pytest.approx(2 / 255)
    assert cfg.train.beta == 6.0 and cfg.data.crop_padding == 4 and cfg.data.flip
    assert config_mod.load_preset("tinyimagenet-weat-adv").model.arch == "resnet18-64"


@pytest.mark.parametrize("name,method", [("cifar10-dm-trades", "trades"), ("cifar10-dm-weat", "weat-adv")])
def test_dm_presets_hold_the_wang2023_recipe(name, method):
    cfg = config_mod.load_preset(name)
    t = cfg.train
    assert (cfg.model.arch, t.method, t.beta, t.label_smoothing, t.ema_decay) == ("wrn-28-10-swish", method, 5.0, 0.1, 0.995)
    assert (t.lr, t.nesterov, t.momentum, t.weight_decay, t.batch_size) == (0.2, True, 0.9, 5e-4, 512)
    assert (t.schedule, t.warmup_epochs, cfg.data.extra_fraction, cfg.data.extra_data) == ("cosine", 3, 0.7, None)
    assert cfg.attack.eps == pytest.approx(8 / 255) and cfg.attack.step_size == pytest.approx(2 / 255)
    assert cfg.attack.steps == 10
    # 400 of the reference's 98-step epochs = 39,200 steps; ours are ceil(50000 / (512 - 358)) = 325 steps each.
    assert abs(t.epochs * math.ceil(50_000 / (512 - round(0.7 * 512))) - 400 * math.ceil(50_000 / 512)) < 325


def test_ro_preset_holds_the_rice2020_setting():
    from weatcli.train import lr_at

    cfg = config_mod.load_preset("cifar10-pgd-at-ro")
    t = cfg.train
    assert (cfg.model.arch, t.method, t.select, t.epochs, t.batch_size) == ("preact-resnet18", "pgd-at", "energy", 200, 128)
    assert (t.momentum, t.weight_decay, cfg.data.crop_padding, cfg.data.flip) == (0.9, 5e-4, 4, True)
    assert cfg.attack.eps == pytest.approx(8 / 255) and cfg.attack.step_size == pytest.approx(2 / 255)
    assert cfg.attack.steps == 10
    # Stepped per batch on CIFAR-10's 391 batches: 0.1 through epoch 100, 0.01 through 150, then 0.001.
    batches = math.ceil(50_000 / t.batch_size)
    total = t.epochs * batches

    def lr(epoch: int, batch: int) -> float:  # 1-based epoch
        return lr_at((epoch - 1) * batches + batch, total, cfg)

    assert [lr(1, 0), lr(100, batches - 1)] == pytest.approx([0.1, 0.1])
    assert [lr(101, 0), lr(150, batches - 1)] == pytest.approx([0.01, 0.01])
    assert [lr(151, 0), lr(200, batches - 1)] == pytest.approx([0.001, 0.001])


@pytest.mark.parametrize(
    "sets,needle",
    [
        (["train.awp_gamma=0.005", "train.method='mart'"], "not implemented for train.method mart"),
        (["train.awp_gamma=0.005", "train.method='standard'"], "not implemented for train.method standard"),
        (["train.warmup_epochs=2"], "cosine schedule only"),
        (["train.schedule='cosine'", "train.warmup_epochs=40"], "less than train.epochs"),
        (["data.extra_fraction=1.0"], "data.extra_fraction"),
        (["train.label_smoothing=1"], "train.label_smoothing"),
        (["train.ema_decay=1"], "train.ema_decay"),
    ],
)
def test_recipe_keys_are_checked(sets, needle):
    with pytest.raises(WeatInputError, match=needle):
        resolve(sets=sets)


def test_recipe_keys_are_off_by_default():
    t, d = resolve().train, resolve().data
    assert (t.ema_decay, t.label_smoothing, t.awp_gamma, t.warmup_epochs, t.tensorboard) == (None, 0.0, 0.0, 0, None)
    assert (d.extra_data, d.extra_fraction) == (None, 0.0)
    for method in config_mod.AWP_METHODS:
        assert resolve(sets=["train.awp_gamma=0.005", f"train.method='{method}'"]).train.awp_gamma == 0.005


@pytest.mark.parametrize("text,value", [("8/255", 8 / 255), (" 2 / 255 ", 2 / 255), ("0.1", 0.1), (0.5, 0.5), ("1e-2", 0.01)])
def test_parse_fraction(text, value):
    assert parse_fraction(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["abc", "8/0", "1/", "nan", "inf", True, None])
def test_parse_fraction_rejects(text):
    with pytest.raises(ValueError):
        parse_fraction(text)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"attack.eps": "abc"}, "attack.eps"),
        ({"attack.eps": "8/0"}, "attack.eps"),
        ({"attack.eps": "2"}, "attack.eps"),
        ({"attack.eps": "0"}, "attack.eps"),
        ({"train.method": "fgsm-xyz"}, "train.method"),
        ({"train.method": "standard", "train.der_weight": 0.5}, "der_weight"),
        ({"train.method": "standard", "train.der_anchor": 0.001}, "der_anchor"),
        ({"train.der_anchor": -0.1}, "der_anchor"),
        ({"train.epochs": -1}, "train.epochs"),
        ({"train.device": "tpu"}, "train.device"),
        ({"data.dataset": "imagenet"}, "data.dataset"),
    ],
)
def test_bad_values_name_the_field(overrides, needle):
    with pytest.raises(WeatInputError, match=needle) as e:
        resolve(overrides=overrides)
    assert "\n" not in str(e.value)


def test_preset_file_errors(tmp_path):
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[train]\nepochz = 3\n")
    with pytest.raises(WeatInputError, match=r"train\.epochz: unknown key"):
        resolve(preset=str(unknown))
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[train]\nepochs = "many"\n')
    with pytest.raises(WeatInputError, match=r"train\.epochs"):
        resolve(preset=str(wrong))
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\nepochs = 3\n")
    with pytest.raises(WeatInputError, match="invalid TOML"):
        resolve(preset=str(broken))
    with pytest.raises(WeatInputError, match="unknown 'nope'"):
        resolve(preset="nope")
    with pytest.raises(WeatInputError, match="not found"):
        resolve(preset=str(tmp_path / "missing.toml"))


def test_dataset_flag_without_preset_picks_that_datasets_recipe():
    cfg = resolve(overrides={"data.dataset": "svhn", "train.method": "weat"})
    assert cfg.data.dataset == "svhn" and cfg.train.method == "weat-adv" and cfg.train.lr == 0.01
    cfg = resolve(overrides={"data.dataset": "cifar10", "train.method": "trades"})
    assert cfg.train.method == "trades" and cfg.description.startswith("trades on CIFAR-10")
    cfg = resolve(overrides={"data.dataset": "cifar100", "train.method": "mart"})  # no cifar100-mart preset
    assert cfg.data.dataset == "cifar100" and cfg.train.method == "mart"
    assert resolve().data.dataset == "digits" and resolve().train.method == "weat-adv"


def test_overrides_and_set():
    cfg = resolve(preset="cifar10-trades", overrides={"attack.eps": "4/255", "train.epochs": 3},
                  sets=["train.lr=0.05", "model.arch=preact-resnet18", "data.flip=false", "train.method=sat"])
    assert cfg.attack.eps == pytest.approx(4 / 255)
    assert cfg.attack.step_size == pytest.approx(1 / 255)  # keeps its 1:4 ratio to eps
    assert (cfg.train.epochs, cfg.train.lr, cfg.model.arch, cfg.data.flip, cfg.train.method) == (3, 0.05, "preact-resnet18", False, "pgd-at")
    explicit = resolve(preset="cifar10-trades", overrides={"attack.eps": "4/255"}, sets=["attack.step_size=0.5/255"])
    assert explicit.attack.step_size == pytest.approx(0.5 / 255)
    for bad in ["train.lr", "lr=0.1", "a.b.c=1"]:
        with pytest.raises(WeatInputError, match="--set"):
            resolve(sets=[bad])


def test_config_is_frozen_and_toml_round_trips():
    cfg = resolve(preset="cifar10-weat-adv", sets=["model.mean=[0.5, 0.5, 0.5]", "model.std=[0.25, 0.25, 0.25]"])
    with pytest.raises(Exception):
        cfg.train.lr = 1.0  # type: ignore[misc]
    again = config_mod.validate(tomllib.loads(cfg.to_toml()))
    assert again == cfg
    assert config_mod.validate(__import__("json").loads(cfg.to_json())) == cfg
