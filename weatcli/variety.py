"""Variety next to quality (docs/science.md#sample-quality): metrics on feature vectors (N, D).

- `prdc`: precision, recall, density and coverage of generated samples against real ones with
  k-nearest-neighbour balls (precision and recall: Kynkaanniemi et al. 2019, "Improved precision
  and recall metric for assessing generative models"; density and coverage: Naeem et al. 2020,
  "Reliable fidelity and diversity metrics for generative models"). The definitions are those of
  the `prdc` package by Naeem et al. (same strict inequalities, the k-th neighbour not counting the
  point itself), computed in float64 torch in row blocks, so that memory stays at a block of
  distances rather than N x N, nothing is printed and no thread pool is started; the tests check
  it against that package.
- `diversity_ratio`: mean intra-class pairwise distance of the samples over the real data's, per
  class (1.0: as varied as the data; near 0: one image per class).
- `judge_accuracy`: the share of samples that a classifier other than the one sampled from assigns
  to the class they were generated for.

Features may be pixels, Inception pool features or a weat classifier's penultimate features; the
numbers are comparable only within one feature space.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

DEFAULT_K = 5  # Naeem et al. 2020's recommendation for density and coverage
BLOCK_ELEMENTS = 2**24  # distances held at once (128 MiB in float64)


def _as_features(a: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).detach()
    if t.ndim != 2:
        raise ValueError(f"{name}: expected features (N, D), got shape {tuple(t.shape)}")
    t = t.to("cpu", torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: features must be finite")
    return t


def _step(n_cols: int) -> int:
    """Rows per block of distances against n_cols columns."""
    return max(1, BLOCK_ELEMENTS // max(1, n_cols))


def kth_neighbour_distances(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row of x (N, D) to its k-th nearest other row (the row itself not counted). (N,)"""
    n = len(x)
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} points, got {k}")
    out = torch.empty(n, dtype=torch.float64)
    step = _step(n)
    for s in range(0, n, step):
        d = torch.cdist(x[s : s + step], x)
        out[s : s + len(d)] = d.topk(k + 1, dim=1, largest=False).values[:, -1]  # self is one of the k+1
    return out


def prdc(real: Any, fake: Any, *, k: int = DEFAULT_K) -> dict[str, float]:
    """Precision, recall, density and coverage of `fake` (M, D) against `real` (N, D) features.

    With R_i the distance from real i to its k-th nearest real neighbour and F_j likewise among
    the fakes, d_ij = |real_i - fake_j|:

        precision = mean_j [ exists i: d_ij < R_i ]          (fakes inside the real manifold)
        recall    = mean_i [ exists j: d_ij < F_j ]          (reals inside the fake manifold)
        density   = (1 / k) mean_j sum_i [ d_ij < R_i ]      (~1 for fakes distributed like the reals)
        coverage  = mean_i [ min_j d_ij < R_i ]              (reals with a fake in their ball)

    Needs N, M > k. Cost O((N^2 + M^2 + N M) D); the authors use 10,000 of each, so subsample a
    larger reference first (the real radii depend only on the reference and may be cached).
    """
    r, f = _as_features(real, "real"), _as_features(fake, "fake")
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"real and fake features differ in dimension: {r.shape[1]} vs {f.shape[1]}")
    radius_r = kth_neighbour_distances(r, k)  # (N,)
    radius_f = kth_neighbour_distances(f, k)  # (M,)
    inside_any = torch.zeros(len(f), dtype=torch.bool)  # fake j inside some real ball
    inside_count = torch.zeros(len(f), dtype=torch.float64)
    recalled = torch.zeros(len(r), dtype=torch.bool)
    covered = torch.zeros(len(r), dtype=torch.bool)
    step = _step(len(f))
    for s in range(0, len(r), step):
        d = torch.cdist(r[s : s + step], f)  # (n, M)
        rr = radius_r[s : s + step, None]
        inside = d < rr
        inside_any |= inside.any(0)
        inside_count += inside.sum(0)
        recalled[s : s + step] = (d < radius_f[None, :]).any(1)
        covered[s : s + step] = d.min(1).values < rr.squeeze(1)
    return {
        "precision": float(inside_any.double().mean()),
        "recall": float(recalled.double().mean()),
        "density": float(inside_count.mean() / k),
        "coverage": float(covered.double().mean()),
    }


def mean_pairwise_distance(x: Any) -> float:
    """Mean Euclidean distance over the pairs i != j of the rows of x (N, D), N >= 2."""
    t = _as_features(x, "features")
    n = len(t)
    if n < 2:
        raise ValueError(f"mean pairwise distance needs at least 2 points, got {n}")
    total = 0.0
    step = _step(n)
    for s in range(0, n, step):
        total += float(torch.cdist(t[s : s + step], t).sum())  # the diagonal adds 0
    return total / (n * (n - 1))


def diversity_ratio(fake: Any, fake_labels: Any, real: Any, real_labels: Any, *,
                    max_per_class: int | None = 2000, seed: int = 0) -> dict[str, Any]:
    """Intra-class variety of the samples relative to the data's, in one feature space.

        ratio_c = mean_{i != j in class c} |fake_i - fake_j| / mean_{i != j in class c} |real_i - real_j|
        ratio   = mean of ratio_c over the classes with >= 2 samples and >= 2 real images

    1.0: the samples of a class are as spread as its real images; near 0: one image per class
    (mode collapse); above 1: more spread than the data (e.g. noise). Classes with fewer than
    2 points on either side are left out (listed under "skipped"). At most `max_per_class` points
    of each side enter a class's mean (a seeded random subset; None: all).
    -> {"ratio", "per_class": {c: ratio_c}, "fake_mean": {c: ...}, "real_mean": {c: ...}, "skipped": [...]}
    """
    f, r = _as_features(fake, "fake"), _as_features(real, "real")
    yf = torch.as_tensor(np.asarray(fake_labels)).long().reshape(-1)
    yr = torch.as_tensor(np.asarray(real_labels)).long().reshape(-1)
    if len(yf) != len(f) or len(yr) != len(r):
        raise ValueError(f"labels: {len(yf)} fake and {len(yr)} real labels for {len(f)} and {len(r)} feature rows")
    if f.shape[1] != r.shape[1]:
        raise ValueError(f"real and fake features differ in dimension: {r.shape[1]} vs {f.shape[1]}")
    rng = np.random.default_rng(seed)

    def subset(x: torch.Tensor) -> torch.Tensor:
        if max_per_class is None or len(x) <= max_per_class:
            return x
        return x[torch.from_numpy(np.sort(rng.permutation(len(x))[:max_per_class]))]

    per_class, fake_mean, real_mean, skipped = {}, {}, {}, []
    for c in torch.unique(yf).tolist():
        fc, rc = f[yf == c], r[yr == c]
        if len(fc) < 2 or len(rc) < 2:
            skipped.append(int(c))
            continue
        fm, rm = mean_pairwise_distance(subset(fc)), mean_pairwise_distance(subset(rc))
        fake_mean[int(c)], real_mean[int(c)] = fm, rm
        per_class[int(c)] = fm / rm if rm > 0 else float("inf") if fm > 0 else 1.0
    ratio = float(np.mean(list(per_class.values()))) if per_class else float("nan")
    return {"ratio": ratio, "per_class": per_class, "fake_mean": fake_mean, "real_mean": real_mean, "skipped": skipped}


@torch.no_grad()
def judge_accuracy(judge: Any, samples: Any, labels: Any, *, batch_size: int = 256) -> float:
    """Share of samples that a judge classifier assigns to the class they were generated for.

    judge: logits or probabilities (N, K) already computed (then `samples` is not used and may be
    None), or a model / callable mapping a float batch in [0, 1] (B, C, H, W) to logits (B, K).
    samples: uint8 images (divided by 255) or float images in [0, 1]. A model is run in eval mode
    and its mode restored afterwards. The judge should not be the model sampled from (that one
    scores its own samples by construction).
    """
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).long().reshape(-1).cpu()
    if isinstance(judge, (torch.Tensor, np.ndarray)):
        logits = torch.as_tensor(judge).detach().cpu()
        if logits.ndim != 2 or len(logits) != len(y):
            raise ValueError(f"judge logits: expected ({len(y)}, K), got shape {tuple(logits.shape)}")
        return float((logits.argmax(1) == y).double().mean()) if len(y) else float("nan")
    if not callable(judge):
        raise TypeError(f"judge: expected logits (N, K) or a model, got {type(judge).__name__}")
    x = torch.as_tensor(samples) if not isinstance(samples, torch.Tensor) else samples
    if len(x) != len(y):
        raise ValueError(f"samples and labels differ in length: {len(x)} vs {len(y)}")
    if len(y) == 0:
        return float("nan")
    module = judge if isinstance(judge, torch.nn.Module) else None
    was_training = module.training if module is not None else False
    params = list(module.parameters()) if module is not None else []
    dev = params[0].device if params else torch.device("cpu")
    if module is not None:
        module.eval()
    try:
        preds = []
        for s in range(0, len(x), batch_size):
            xb = x[s : s + batch_size].to(dev)
            xb = xb.float() / 255.0 if xb.dtype == torch.uint8 else xb.float()
            preds.append(judge(xb).argmax(1).cpu())
    finally:
        if module is not None:
            module.train(was_training)
    return float((torch.cat(preds) == y).double().mean())

