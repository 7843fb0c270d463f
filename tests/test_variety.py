"""Variety metrics on cases with known answers (docs/science.md#sample-quality)."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
import torch.nn as nn

from weatcli import variety

pytestmark = pytest.mark.usefixtures("one_thread")


def gaussian(n: int, d: int = 16, seed: int = 0, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


def test_identical_sets_are_perfect():
    x = gaussian(400)
    m = variety.prdc(x, x.copy())
    assert m["precision"] == 1.0 and m["recall"] == 1.0 and m["coverage"] == 1.0
    # Each real ball holds itself and its k - 1 nearest others (strict <, no ties): density exactly 1.
    assert m["density"] == pytest.approx(1.0, abs=1e-12)


def test_far_apart_sets_score_zero():
    m = variety.prdc(gaussian(300), gaussian(200, seed=1, shift=100.0))
    assert m == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_a_mode_collapsed_sample_set():
    """All samples within a hair of one real point: faithful (precision 1) but covering nothing."""
    real = gaussian(500)
    labels = np.zeros(500, dtype=int)
    fake = real[7] + 1e-3 * gaussian(200, seed=2)
    m = variety.prdc(real, fake)
    assert m["precision"] == 1.0
    assert m["recall"] <= 0.01 and m["coverage"] <= 0.02  # the few real points next to the mode
    assert m["density"] > 0.1  # inside one ball (or a few): 1/k of them or more
    div = variety.diversity_ratio(fake, np.zeros(200, dtype=int), real, labels)
    assert div["ratio"] < 0.01 and div["per_class"][0] == div["ratio"]


def test_same_distribution_is_as_varied_as_the_data():
    real, fake = gaussian(2000, d=32), gaussian(600, d=32, seed=3)
    yr, yf = np.arange(2000) % 4, np.arange(600) % 4
    # Class c spread by (1 + c / 4) on both sides: per-class ratios ~1 although the classes differ.
    real *= 1 + yr[:, None] / 4
    fake *= 1 + yf[:, None] / 4
    div = variety.diversity_ratio(fake, yf, real, yr)
    assert div["ratio"] == pytest.approx(1.0, abs=0.03)
    assert all(r == pytest.approx(1.0, abs=0.05) for r in div["per_class"].values())
    assert div["real_mean"][3] > 1.5 * div["real_mean"][0]
    # Pooling the classes would not do: a class's samples compared with its own real images only.
    half = variety.diversity_ratio(fake / 2, yf, real, yr)
    assert half["ratio"] == pytest.approx(0.5, abs=0.02)


def test_prdc_of_two_draws_of_one_distribution():
    m = variety.prdc(gaussian(1000), gaussian(1000, seed=3))
    assert m["precision"] > 0.85 and m["recall"] > 0.85
    assert m["density"] == pytest.approx(1.0, abs=0.15)
    assert m["coverage"] > 0.9  # ~1 - 2^-k for equal sizes (Naeem et al. 2020)


def test_diversity_skips_classes_without_pairs_and_caps_the_class_size():
    real, yr = gaussian(300), np.repeat([0, 1, 2], 100)
    fake, yf = gaussian(21, seed=4), np.array([0] * 10 + [1] * 10 + [2])
    div = variety.diversity_ratio(fake, yf, real, yr, max_per_class=50)
    assert div["skipped"] == [2] and sorted(div["per_class"]) == [0, 1]
    assert div == variety.diversity_ratio(fake, yf, real, yr, max_per_class=50)  # seeded subset
    with pytest.raises(ValueError, match="labels"):
        variety.diversity_ratio(fake, yf[:5], real, yr)


def test_mean_pairwise_distance_counts_each_ordered_pair_once():
    x = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    assert variety.mean_pairwise_distance(x) == pytest.approx((5 + 0 + 5) / 3)
    with pytest.raises(ValueError):
        variety.mean_pairwise_distance(x[:1])


def test_prdc_matches_the_prdc_package_and_does_not_print(capsys, monkeypatch):
    prdc_pkg = pytest.importorskip("prdc")
    real, fake = gaussian(300, d=8), 1.3 * gaussian(250, d=8, seed=5) + 0.4
    monkeypatch.setattr(variety, "BLOCK_ELEMENTS", 1000)  # several row blocks
    ours = variety.prdc(real, fake, k=5)
    assert capsys.readouterr().out == ""
    with contextlib.redirect_stdout(io.StringIO()):
        theirs = prdc_pkg.compute_prdc(real, fake, nearest_k=5)
    assert ours == pytest.approx({k: float(v) for k, v in theirs.items()}, abs=1e-12)


def test_prdc_checks_its_inputs():
    with pytest.raises(ValueError, match="k must be"):
        variety.prdc(gaussian(5), gaussian(50), k=5)
    with pytest.raises(ValueError, match="dimension"):
        variety.prdc(gaussian(50, d=3), gaussian(50, d=4))
    with pytest.raises(ValueError, match="finite"):
        variety.prdc(np.full((10, 2), np.nan), gaussian(10, d=2))


def test_judge_accuracy_from_logits():
    logits = torch.tensor([[2.0, 0.1, 0.0], [0.0, 1.0, 3.0], [0.0, 5.0, 1.0], [1.0, 0.0, 0.5]])
    assert variety.judge_accuracy(logits, None, [0, 2, 0, 0]) == pytest.approx(0.75)
    assert variety.judge_accuracy(logits.numpy(), None, np.array([1, 1, 1, 1])) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="logits"):
        variety.judge_accuracy(logits, None, [0, 1])


def test_judge_accuracy_from_a_model_in_eval_mode():
    class Brightness(nn.Module):
        """Class 0 for dark images, 1 for bright; dropout that eval mode must switch off."""

        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(p=0.99)

        def forward(self, x):
            m = self.drop(x.mean((1, 2, 3)))
            return torch.stack([0.5 - m, m - 0.5], 1)

    judge = Brightness().train()
    x = torch.cat([torch.full((6, 1, 4, 4), 20, dtype=torch.uint8), torch.full((4, 1, 4, 4), 230, dtype=torch.uint8)])
    y = torch.tensor([0] * 6 + [1] * 3 + [0])
    assert variety.judge_accuracy(judge, x, y, batch_size=3) == pytest.approx(0.9)
    assert variety.judge_accuracy(judge, x.float() / 255, y) == pytest.approx(0.9)  # float images in [0, 1]
    assert judge.training  # mode restored
