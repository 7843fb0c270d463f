from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from weatcli.energy import energy, energy_stats, joint_energy, kl_per_example, weat_weights

LOGITS = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0], [-3.0, 4.0, 1.0]])
Y = torch.tensor([0, 2, 1])


def test_energy_is_minus_logsumexp_written_out():
    by_hand = torch.tensor([-math.log(sum(math.exp(v) for v in row)) for row in LOGITS.tolist()])
    torch.testing.assert_close(energy(LOGITS), by_hand)
    assert energy(LOGITS)[1].item() == pytest.approx(-math.log(3.0), rel=1e-6)


def test_joint_energy_and_cross_entropy_identity():
    torch.testing.assert_close(joint_energy(LOGITS, Y), torch.tensor([-2.0, 0.0, -4.0]))
    # CE(x, y) = E(x, y) - E(x)
    torch.testing.assert_close(F.cross_entropy(LOGITS, Y, reduction="none"), joint_energy(LOGITS, Y) - energy(LOGITS))


def test_weat_weights_formula_range_and_no_grad():
    logits = torch.randn(256, 10, requires_grad=True) * 5
    w = weat_weights(logits)
    by_hand = 1.0 / torch.log1p(torch.exp(energy(logits).abs()))
    torch.testing.assert_close(w, by_hand.detach())
    assert not w.requires_grad
    assert (w > 0).all() and (w <= 1 / math.log(2) + 1e-6).all()
    # Highest weight where the energy is 0 (logsumexp = 0): 1/softplus(0) = 1/ln 2 = 1.4427.
    zero_energy = torch.full((1, 4), -math.log(4.0))
    assert weat_weights(zero_energy).item() == torch.tensor(1 / math.log(2)).item()
    # Larger |E| -> smaller weight.
    assert weat_weights(torch.tensor([[10.0, 0.0]])) < weat_weights(torch.tensor([[1.0, 0.0]]))


def test_trades_kl_decomposes_into_energies():
    """docs/science.md#trades-decomposition: KL(p(.|x) || p(.|x*)) = E_{k~p(.|x)}[E(x*,k) - E(x,k)] + (E(x) - E(x*))."""
    g = torch.Generator().manual_seed(0)
    nat, adv = torch.randn(64, 10, generator=g) * 3, torch.randn(64, 10, generator=g) * 3
    p = F.softmax(nat, 1)
    kl = kl_per_example(adv, p)
    direct = (p * (p.log() - F.log_softmax(adv, 1))).sum(1)
    joint_term = (p * ((-adv) - (-nat))).sum(1)  # E_{k~p}[E(x*,k) - E(x,k)], E(x,k) = -f_k(x)
    marginal_term = energy(nat) - energy(adv)
    torch.testing.assert_close(kl, direct, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kl, joint_term + marginal_term, atol=1e-5, rtol=1e-5)


def test_energy_stats_deltas():
    adv = LOGITS.flip(1)
    s = energy_stats(LOGITS, adv, Y)
    torch.testing.assert_close(s["delta_energy"], energy(LOGITS) - energy(adv))
    torch.testing.assert_close(s["delta_joint"], joint_energy(LOGITS, Y) - joint_energy(adv, Y))
