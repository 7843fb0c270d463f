"""Starting points that vary like the data: scaled class-wise PCA and local class-wise PCA
(docs/science.md#initialisations), and the adaptive-stopping rules (docs/science.md#adaptive-stopping)."""

from __future__ import annotations

import math

import pytest
import torch

from weatcli import config, data, inits, sampling

pytestmark = pytest.mark.usefixtures("one_thread")  # a shared machine: two threads contend, one does not


def blob_classes(n: int = 4000, d: int = 64, seed: int = 0):
    """Two classes of float 1x8x8 images: mean 0.5 + sum_i std_i z_i q_i with known orthonormal q_i.

    Class c's stds fall geometrically from 0.06 (ratio 0.8, class 1 a little wider), so the
    principal directions are well separated and clipping to [0, 1] never happens at scale <= 2.
    """
    g = torch.Generator().manual_seed(seed)
    xs, ys, truth = [], [], []
    for c in range(2):
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        std = (0.06 + 0.01 * c) * 0.8 ** torch.arange(d, dtype=torch.float64)
        z = torch.randn(n, d, generator=g, dtype=torch.float64)
        xs.append(0.5 + (z * std) @ q.T)
        ys.append(torch.full((n,), c))
        truth.append((q, std))
    x = torch.cat(xs).float().view(-1, 1, 8, 8)
    return x, torch.cat(ys), truth


@pytest.fixture(scope="module")
def blobs():
    x, y, truth = blob_classes()
    return x, y, truth, sampling.compute_class_stats(x, y, 2)


@pytest.fixture(scope="module")
def digits():
    ds = data.load("digits", None, device=torch.device("cpu"))
    return ds, sampling.compute_class_stats(ds.train_x, ds.train_y, ds.num_classes)


def mean_pairwise(x: torch.Tensor) -> float:
    return float(torch.pdist(x.reshape(len(x), -1).double()).mean())


# ----------------------------------------------------------------------------- scaled PCA


def test_scaled_pca_has_the_class_spread_along_each_kept_component(blobs):
    x, y, truth, stats = blobs
    keep = sampling.pca_keep(stats, 0.9)
    for c in range(2):
        q, std = truth[c]
        draws = inits.init_pca_scaled(torch.full((20000,), c), stats, variance=0.9, scale=1.0,
                                      generator=torch.Generator().manual_seed(c)).view(20000, -1).double()
        rel = draws - stats.mean[c].double()
        k = int(keep[c])
        assert 3 <= k < 20  # a real subspace, not everything
        spread = (rel @ q).std(0)  # along the true directions
        torch.testing.assert_close(spread[:k], std[:k], rtol=0.10, atol=0)  # the data's own spread
        assert float(spread[k + 3 :].max()) < 0.2 * float(std[k])  # nothing past the kept subspace
        comps = stats.components[c, :k].double()
        assert float((rel - rel @ comps.T @ comps).abs().max()) < 1e-5  # in the principal subspace
        torch.testing.assert_close(rel.mean(0), torch.zeros_like(rel[0]), atol=3e-3, rtol=0)


def test_scaled_pca_scales_linearly_and_zero_gives_the_class_mean(blobs):
    _, _, truth, stats = blobs
    want = torch.tensor([0, 1] * 500)
    mu = stats.mean[want].view(len(want), 1, 8, 8)
    one = inits.init_pca_scaled(want, stats, scale=1.0, generator=torch.Generator().manual_seed(3)) - mu
    for s in (0.5, 2.0):
        scaled = inits.init_pca_scaled(want, stats, scale=s, generator=torch.Generator().manual_seed(3)) - mu
        torch.testing.assert_close(scaled, s * one, atol=1e-5, rtol=0)  # same draw, s times the offset
    zero = inits.init_pca_scaled(want, stats, scale=0.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(zero, mu, atol=0, rtol=0)


def test_scaled_pca_stays_in_the_unit_interval(blobs):
    _, _, _, stats = blobs
    wide = inits.init_pca_scaled(torch.tensor([0, 1] * 200), stats, scale=50.0, generator=torch.Generator().manual_seed(0))
    assert wide.min() == 0 and wide.max() == 1  # clipping engaged, and nothing outside


def test_scaled_pca_is_the_papers_pca_with_sigma_one_over_sqrt_n_minus_one(blobs):
    _, _, _, stats = blobs
    want = torch.zeros(300, dtype=torch.long)
    n = int(stats.count[0])
    ours = inits.init_pca_scaled(want, stats, variance=0.9, scale=1.0, generator=torch.Generator().manual_seed(4))
    paper = sampling.init_pca(want, stats, variance=0.9, sigma=1.0 / math.sqrt(n - 1), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(ours, paper, atol=1e-5, rtol=0)


def test_the_papers_pca_init_collapses_on_digits_and_the_scaled_one_does_not(digits):
    """The bug being fixed: sigma_pca 0.005 times the singular values of a ~145-image class puts
    every start within a few percent of the data's spread of the class mean."""
    ds, stats = digits
    per = 60
    ratios = {"pca": [], "pca-scaled": [], "local-pca": []}
    for c in range(ds.num_classes):
        want = torch.full((per,), c)
        real = mean_pairwise(ds.train_x[ds.train_y == c].float() / 255)
        g = lambda: torch.Generator().manual_seed(c)  # noqa: E731
        draws = {
            "pca": sampling.init_pca(want, stats, variance=inits.DEFAULT_PCA_VARIANCE,
                                     sigma=config.SampleConfig().pca_sigma, generator=g()),
            "pca-scaled": inits.init_pca_scaled(want, stats, generator=g()),
            "local-pca": inits.local_class_pca(want, ds.train_x, ds.train_y, generator=g()),
        }
        for name, d in draws.items():
            ratios[name].append(mean_pairwise(d) / real)
    mean = {k: sum(v) / len(v) for k, v in ratios.items()}
    assert mean["pca"] < 0.1  # collapse: ~0.06 of the data's intra-class distance
    assert mean["pca-scaled"] > 0.8
    assert mean["local-pca"] > 0.7


# ----------------------------------------------------------------------------- local PCA


def two_cluster_class(per_cluster: int = 100, d: int = 64, seed: int = 0):
    """Class 0: two far-apart clusters A and B, each a 4-d anisotropic Gaussian plus faint noise.
    Class 1: one more cluster. Float 1x8x8 images."""
    g = torch.Generator().manual_seed(seed)
    stds = torch.tensor([0.05, 0.04, 0.03, 0.02], dtype=torch.float64)
    centres = [torch.full((d,), 0.3, dtype=torch.float64), torch.full((d,), 0.7, dtype=torch.float64),
               torch.full((d,), 0.5, dtype=torch.float64)]
    xs, bases = [], []
    for centre in centres:
        q, _ = torch.linalg.qr(torch.randn(d, 4, generator=g, dtype=torch.float64))
        z = torch.randn(per_cluster, 4, generator=g, dtype=torch.float64)
        noise = 0.002 * torch.randn(per_cluster, d, generator=g, dtype=torch.float64)
        xs.append(centre + (z * stds) @ q.T + noise)
        bases.append(q)
    x = torch.cat(xs).float().view(-1, 1, 8, 8)
    y = torch.tensor([0] * (2 * per_cluster) + [1] * per_cluster)
    cluster = torch.tensor([0] * per_cluster + [1] * per_cluster + [2] * per_cluster)
    return x, y, cluster, torch.stack(centres).float(), bases, stds


def test_local_pca_stays_in_its_anchors_neighbourhood():
    x, y, cluster, centres, _, _ = two_cluster_class()
    want = torch.zeros(400, dtype=torch.long)
    draws, anchors = inits.local_class_pca(want, x, y, neighbours=30, generator=torch.Generator().manual_seed(0),
                                           return_anchors=True)
    flat, train = draws.view(400, -1), x.view(len(x), -1)
    assert bool((y[anchors] == 0).all())
    assert set(cluster[anchors].tolist()) == {0, 1}  # anchors from both clusters of the class
    nearest = torch.cdist(flat, centres[:2]).argmin(1)
    assert bool((nearest == cluster[anchors]).all())  # never between the clusters, as a class-wide Gaussian would be
    to_anchor = (flat - train[anchors]).norm(dim=1).mean()
    others = train[torch.randint(0, 200, (400,), generator=torch.Generator().manual_seed(1))]
    to_random = (flat - others).norm(dim=1).mean()
    assert to_anchor < 0.5 * to_random


def test_local_pca_has_the_neighbourhoods_spread():
    """With the neighbourhood a whole cluster (the 100 nearest of a 100-image cluster far from the
    other), the draws have that cluster's spread along its directions and between pairs."""
    x, y, cluster, _, bases, stds = two_cluster_class()
    want = torch.zeros(1500, dtype=torch.long)
    draws, anchors = inits.local_class_pca(want, x, y, neighbours=100, variance=0.999,
                                           generator=torch.Generator().manual_seed(2), return_anchors=True)
    flat = draws.view(len(want), -1).double()
    for k in (0, 1):
        mine = flat[cluster[anchors] == k]
        real = x.view(len(x), -1).double()[cluster == k]
        spread = ((mine - mine.mean(0)) @ bases[k]).std(0)
        torch.testing.assert_close(spread, ((real - real.mean(0)) @ bases[k]).std(0), rtol=0.10, atol=0)
        ratio = mean_pairwise(mine) / mean_pairwise(real)
        assert 0.9 < ratio < 1.1
    # A default-sized neighbourhood: the draws differ from each other, by about the local spread.
    small, anchors = inits.local_class_pca(torch.zeros(300, dtype=torch.long), x, y, return_anchors=True,
                                           generator=torch.Generator().manual_seed(3))
    assert float(torch.pdist(small.view(300, -1).double()).min()) > 0
    for k in (0, 1):
        ratio = mean_pairwise(small[cluster[anchors] == k]) / mean_pairwise(x[cluster == k])
        assert 0.5 < ratio < 1.1  # a 50-image neighbourhood of a 100-image cluster: a bit tighter than it


def test_local_pca_of_a_whole_class_at_scale_zero_is_the_class_mean():
    x, y, *_ = two_cluster_class(per_cluster=20)
    draws = inits.local_class_pca(torch.tensor([0, 1, 0]), x, y, neighbours=1000, scale=0.0,
                                  generator=torch.Generator().manual_seed(0))
    for i, c in enumerate([0, 1, 0]):
        torch.testing.assert_close(draws[i], x[y == c].mean(0), atol=1e-6, rtol=0)


def test_local_pca_is_a_function_of_its_generator_and_not_of_the_blocking(monkeypatch):
    ds = data.load("digits", None, device=torch.device("cpu"))
    want = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5] * 3)
    run = lambda seed, **kw: inits.local_class_pca(want, ds.train_x, ds.train_y,  # noqa: E731
                                                   generator=torch.Generator().manual_seed(seed), **kw)
    a, b = run(7), run(7)
    assert torch.equal(a, b) and not torch.equal(a, run(8))
    assert a.shape == (len(want), 1, 16, 16) and a.dtype == torch.float32 and a.min() >= 0 and a.max() <= 1
    shapes = []
    cdist = torch.cdist
    monkeypatch.setattr(torch, "cdist", lambda p, q, *args, **kw: shapes.append((p.shape[0], q.shape[0])) or cdist(p, q, *args, **kw))
    blocked = run(7, anchor_batch=2)
    torch.testing.assert_close(blocked, a, atol=1e-5, rtol=0)
    counts = set(torch.bincount(ds.train_y).tolist())
    assert shapes and all(rows <= 2 and cols in counts for rows, cols in shapes)  # (anchors, n_c) blocks only


def test_local_pca_checks_its_arguments():
    x, y, *_ = two_cluster_class(per_cluster=10)
    with pytest.raises(ValueError, match="neighbours"):
        inits.local_class_pca(torch.tensor([0]), x, y, neighbours=1)
    with pytest.raises(ValueError, match="class 5"):
        inits.local_class_pca(torch.tensor([5]), x, y)
    with pytest.raises(ValueError, match="variance"):
        inits.local_class_pca(torch.tensor([0]), x, y, variance=0.0)


# ----------------------------------------------------------------------------- stopping rules


def test_stop_rules():
    e = torch.tensor([-12.0, -10.5, -10.0, -9.0, -8.0])
    m = torch.full((5,), -10.0)
    # ours: at or below m + T (one-sided, energy units)
    assert inits.stop_reached(e, m, 1.0, rule="below").tolist() == [True, True, True, True, False]
    # the authors': (E - m)^2 < T (two-sided, squared units): overshooting below stops nothing
    assert inits.stop_reached(e, m, 1.0, rule="squared").tolist() == [False, True, True, False, False]
    with pytest.raises(ValueError, match="rule"):
        inits.stop_reached(e, m, 1.0, rule="slope")
