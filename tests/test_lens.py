"""The energy lens engine: energies of clean and adversarial points, stats, the TRADES identity."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from conftest import robust_checkpoint
from weatcli import checkpoint as ckpt
from weatcli import config as config_mod
from weatcli import data as data_mod
from weatcli.energy import ENERGY_QUANTITIES, NATURAL_QUANTITIES, describe
from weatcli.lens import energy_lens, lens_stats, trades_checkpoint, trades_decomposition
from weatcli.runtime import Stream, generator_for


@pytest.fixture(scope="module")
def robust_ckpt(tmp_path_factory):
    return robust_checkpoint(tmp_path_factory)


def lens_config(path, **lens):
    """The checkpoint's stored config with [lens] keys set, as `weat energy` resolves it."""
    return config_mod.resolve_command(stored=ckpt.stored_config(path), overrides={f"lens.{k}": v for k, v in lens.items()})


def test_energies_are_those_of_the_model_logits(robust_ckpt):
    cfg = lens_config(robust_ckpt, attacks=["pgd", "pgd-targeted"], n=48, device="cpu", steps=5)
    lens = energy_lens(robust_ckpt, cfg)
    model = ckpt.load(robust_ckpt).model
    ds = data_mod.load("digits")
    x, y = data_mod.to_float(ds.test_x[:48]), ds.test_y[:48]
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(lens.clean["energy_natural"], -torch.logsumexp(logits, 1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lens.clean["joint_natural"], -logits.gather(1, y[:, None]).squeeze(1), atol=1e-4, rtol=1e-4)
    assert set(lens.attacks) == {"pgd", "pgd-targeted"} and lens.n == 48
    for d in lens.attacks.values():
        assert tuple(d) == ENERGY_QUANTITIES
        torch.testing.assert_close(d["energy_natural"], lens.clean["energy_natural"])
        torch.testing.assert_close(d["delta_energy"], lens.clean["energy_natural"] - d["energy_adversarial"])
        torch.testing.assert_close(d["delta_joint"], lens.clean["joint_natural"] - d["joint_adversarial"])
    # The attack raises the joint energy of the true class (it lowers f_y): dE(x,y) < 0 on average.
    assert lens.attacks["pgd"]["delta_joint"].mean() < 0
    assert lens.config == {k: cfg.to_dict()[k] for k in ("data", "attack", "lens")}


def test_stats_per_class_cover_every_example(robust_ckpt):
    lens = energy_lens(robust_ckpt, lens_config(robust_ckpt, attacks=["pgd"], n=60, device="cpu", steps=3))
    stats = lens_stats(lens, per_class=True)
    assert stats["energies"]["clean"]["energy_natural"]["n"] == 60
    assert sum(c["clean"]["energy_natural"]["n"] for c in stats["per_class"].values()) == 60
    e = stats["energies"]["pgd"]["delta_energy"]
    assert e["q05"] <= e["q25"] <= e["q50"] <= e["q75"] <= e["q95"]
    assert e["mean"] == pytest.approx(float(lens.attacks["pgd"]["delta_energy"].double().mean()))


def test_stats_use_the_one_energy_schema(robust_ckpt):
    """Clean points: the natural quantities; each attack: all six, each energy.describe of its values."""
    lens = energy_lens(robust_ckpt, lens_config(robust_ckpt, attacks=["pgd"], n=20, device="cpu", steps=2))
    energies = lens_stats(lens)["energies"]
    assert tuple(energies["clean"]) == NATURAL_QUANTITIES and tuple(energies["pgd"]) == ENERGY_QUANTITIES
    for q in ENERGY_QUANTITIES:
        assert energies["pgd"][q] == describe(lens.attacks["pgd"][q])
    assert energies["clean"]["joint_natural"] == energies["pgd"]["joint_natural"]


def test_lens_attack_names():
    assert config_mod.LensConfig().attacks == ["pgd", "pgd-targeted"]
    assert config_mod.LensConfig(attacks=["cw-targeted", "APGD-CE", "cw-targeted"]).attacks == ["cw-targeted", "apgd-ce"]
    for bad in ["fgsm", "apgd-ce-targeted"]:
        with pytest.raises(ValidationError, match=bad):
            config_mod.LensConfig(attacks=[bad])
    with pytest.raises(ValidationError, match="no attack"):
        config_mod.LensConfig(attacks=[])


def test_trades_decomposition_holds_on_real_adversarial_points(robust_ckpt):
    model = ckpt.load(robust_ckpt).model
    ds = data_mod.load("digits")
    out = trades_decomposition(model, data_mod.to_float(ds.test_x[:64]), ds.test_y[:64], eps=0.1, step_size=0.025,
                               steps=5, generator=torch.Generator().manual_seed(0))
    assert out["max_abs_gap"] < 1e-9
    assert out["kl_mean"] == pytest.approx(out["joint_term_mean"] + out["marginal_term_mean"], abs=1e-9)
    assert out["kl_mean"] > 0  # the KL attack found a divergence


def test_trades_checkpoint_is_the_decomposition_on_the_configured_images(robust_ckpt):
    """The engine loads the model and the first lens.n test images, takes the [attack] threat and
    lens.trades_steps, and draws the attack's start from Stream.TRADES_LENS."""
    cfg = config_mod.resolve_command(stored=ckpt.stored_config(robust_ckpt), overrides={
        "lens.n": 40, "lens.trades_steps": 3, "lens.seed": 5, "lens.device": "cpu", "attack.eps": 0.05})
    events = []
    result = trades_checkpoint(robust_ckpt, cfg, on_event=lambda kind, p: events.append((kind, p)))
    ds = data_mod.load("digits")
    expected = trades_decomposition(ckpt.load(robust_ckpt).model, data_mod.to_float(ds.test_x[:40]), ds.test_y[:40],
                                    eps=0.05, step_size=cfg.attack.step_size, steps=3,
                                    generator=generator_for("cpu", 5, Stream.TRADES_LENS))
    assert {k: result[k] for k in expected} == expected
    assert result["n"] == 40 and result["steps"] == 3 and result["eps"] == 0.05
    assert result["model"] == str(robust_ckpt) and result["config"]["lens"]["trades_steps"] == 3
    assert [k for k, _ in events] == ["start"] and events[0][1]["n"] == 40
    with pytest.raises(config_mod.WeatInputError, match="--n"):
        trades_checkpoint(robust_ckpt, config_mod.resolve_command(stored=cfg, overrides={"lens.n": 10_000}))
