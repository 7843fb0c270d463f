"""The energy lens engine: energies of clean and adversarial points, stats, the TRADES identity."""

from __future__ import annotations

import pytest
import torch

from conftest import robust_checkpoint
from weatcli import checkpoint as ckpt
from weatcli import data as data_mod
from weatcli.errors import WeatInputError
from weatcli.lens import check_lens_attacks, energy_lens, lens_stats, trades_decomposition


@pytest.fixture(scope="module")
def robust_ckpt(tmp_path_factory):
    return robust_checkpoint(tmp_path_factory)


def test_energies_are_those_of_the_model_logits(robust_ckpt):
    lens = energy_lens(checkpoint=robust_ckpt, attacks=["pgd", "pgd-targeted"], n=48, device="cpu", steps=5)
    model = ckpt.load(robust_ckpt).model
    ds = data_mod.load("digits")
    x, y = data_mod.to_float(ds.test_x[:48]), ds.test_y[:48]
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(lens.clean["energy"], -torch.logsumexp(logits, 1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lens.clean["joint"], -logits.gather(1, y[:, None]).squeeze(1), atol=1e-4, rtol=1e-4)
    assert set(lens.attacks) == {"pgd", "pgd-targeted"} and lens.n == 48
    for d in lens.attacks.values():
        torch.testing.assert_close(d["delta_energy"], lens.clean["energy"] - d["energy"])
        torch.testing.assert_close(d["delta_joint"], lens.clean["joint"] - d["joint"])
    # The attack raises the joint energy of the true class (it lowers f_y): dE(x,y) < 0 on average.
    assert lens.attacks["pgd"]["delta_joint"].mean() < 0


def test_stats_per_class_cover_every_example(robust_ckpt):
    lens = energy_lens(checkpoint=robust_ckpt, attacks=["pgd"], n=60, device="cpu", steps=3)
    stats = lens_stats(lens, per_class=True)
    assert stats["energies"]["clean"]["energy"]["n"] == 60
    assert sum(c["clean"]["energy"]["n"] for c in stats["per_class"].values()) == 60
    e = stats["energies"]["pgd"]["delta_energy"]
    assert e["q05"] <= e["q25"] <= e["q50"] <= e["q75"] <= e["q95"]
    assert e["mean"] == pytest.approx(float(lens.attacks["pgd"]["delta_energy"].double().mean()))


def test_lens_attack_names():
    assert check_lens_attacks([]) == ["pgd", "pgd-targeted"]
    assert check_lens_attacks(["cw-targeted", "apgd-ce", "cw-targeted"]) == ["cw-targeted", "apgd-ce"]
    for bad in ["fgsm", "apgd-ce-targeted"]:
        with pytest.raises(WeatInputError):
            check_lens_attacks([bad])


def test_trades_decomposition_holds_on_real_adversarial_points(robust_ckpt):
    model = ckpt.load(robust_ckpt).model
    ds = data_mod.load("digits")
    out = trades_decomposition(model, data_mod.to_float(ds.test_x[:64]), ds.test_y[:64], eps=0.1, step_size=0.025,
                               steps=5, generator=torch.Generator().manual_seed(0))
    assert out["max_abs_gap"] < 1e-9
    assert out["kl_mean"] == pytest.approx(out["joint_term_mean"] + out["marginal_term_mean"], abs=1e-9)
    assert out["kl_mean"] > 0  # the KL attack found a divergence
