"""Starting points for SGLD that vary like the data (docs/science.md#initialisations), and the
adaptive-stopping rules (docs/science.md#adaptive-stopping).

The paper's class-wise PCA init (`sampling.init_pca`) scales the singular values s_i of a class's
centred data matrix by a fixed sigma_pca (0.005). Since s_i = sqrt(n_c - 1) * std_i grows with the
class size, on a small set such as the bundled digits (n_c ~ 145, so sigma_pca * s_i ~ 0.06 std_i)
every chain starts at the class mean and SGLD returns one image per class. Two inits here start
from the data's own spread instead:

- `init_pca_scaled`: mu_c + sum_{i<k_c} scale * std_i * z_i * U_i, std_i = s_i / sqrt(n_c - 1):
  the class's Gaussian restricted to its leading principal subspace (scale 1: the data's spread).
- `local_class_pca`: the journal's local class-wise PCA (arXiv 2505.22486): a Gaussian fitted to
  the `neighbours` training images of the class nearest to a random anchor image of that class.

Both are clipped to [0, 1] and draw every random number from the caller's generator, for the whole
batch up front, so a draw does not depend on how the batch is grouped by class.
"""

from __future__ import annotations

import math

import torch

from .config import ADAPTIVE_RULES, SampleConfig
from .sampling import ClassStats, pca_keep

# The defaults are config.SampleConfig's (sample.pca_variance, sample.pca_scale, sample.local_neighbours).
_DEFAULT = SampleConfig.model_fields
DEFAULT_PCA_VARIANCE: float = _DEFAULT["pca_variance"].default
DEFAULT_PCA_SCALE: float = _DEFAULT["pca_scale"].default  # multiplies the class's own per-component std: 1 = the data's spread
# Local PCA neighbourhood size (ours: the journal gives none we could read). Enough points to
# estimate a neighbourhood's leading directions (its covariance has rank <= neighbours - 1, and
# estimates of the intrinsic dimension of MNIST- and CIFAR-like images are in the tens or below,
# Pope et al. 2021), yet local: 1% of a CIFAR-10 class (5,000), about a third of a digits class (~145).
DEFAULT_LOCAL_NEIGHBOURS: int = _DEFAULT["local_neighbours"].default
LOCAL_ANCHOR_BATCH = 256  # anchors per distance block: (256, n_c) distances, never n_c x n_c
STOP_RULES = ADAPTIVE_RULES


def init_pca_scaled(y: torch.Tensor, stats: ClassStats, *, variance: float = DEFAULT_PCA_VARIANCE,
                    scale: float = DEFAULT_PCA_SCALE, generator: torch.Generator | None = None) -> torch.Tensor:
    """Class-wise PCA init at the data's own spread. -> (B, C, H, W) in [0, 1]

        x_0 = clip_[0,1]( mu_c + sum_{i < k_c} scale * s_i / sqrt(n_c - 1) * z_i * U_i ),  z_i ~ N(0, 1)

    U_i, s_i: principal directions and singular values of class c's centred data matrix
    (`stats`, from sampling.compute_class_stats), k_c the fewest leading components holding a
    fraction `variance` of the class's variance (sampling.pca_keep). It is sampling.init_pca with
    sigma_pca = scale / sqrt(n_c - 1) chosen per class. One (B, R) normal draw from `generator`.
    """
    if not (0.0 < variance <= 1.0):
        raise ValueError(f"variance must be in (0, 1], got {variance}")
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"scale must be a finite number >= 0, got {scale}")
    dev = stats.mean.device
    y = y.to(dev)
    b, r = len(y), stats.components.shape[1]
    z = torch.randn(b, r, generator=generator, device=dev)
    keep = pca_keep(stats, variance)[y]  # (B,)
    mask = torch.arange(r, device=dev)[None, :] < keep[:, None]
    std = stats.singular[y] / (stats.count[y].clamp_min(2) - 1).float().sqrt()[:, None]  # (B, R)
    coef = std * z * (scale * mask)
    x = stats.mean[y].clone()
    # One (n, R) x (R, D) product per class present: never a (B, R, D) gather of the components.
    for c in torch.unique(y).tolist():
        rows = (y == c).nonzero().squeeze(1)
        x[rows] += coef[rows] @ stats.components[c]
    return x.clamp_(0.0, 1.0).view(b, *stats.shape)


def local_class_pca(y: torch.Tensor, x_train: torch.Tensor, y_train: torch.Tensor, *,
                    neighbours: int = DEFAULT_LOCAL_NEIGHBOURS, variance: float = DEFAULT_PCA_VARIANCE,
                    scale: float = DEFAULT_PCA_SCALE, generator: torch.Generator | None = None,
                    anchor_batch: int = LOCAL_ANCHOR_BATCH, return_anchors: bool = False):
    """Local class-wise PCA init. -> (B, C, H, W) in [0, 1] (and the anchors' indices into x_train)

    For sample b of class c: an anchor a drawn uniformly from the training images of class c; its
    m = min(neighbours, n_c) nearest training images of class c (Euclidean in pixel space, the
    anchor itself included), with mean mu and centred rows X (m, D) = U S V^T; then

        x_0 = clip_[0,1]( mu + sum_{i < k} scale * S_i / sqrt(m - 1) * z_i * V_i ),   z_i ~ N(0, 1)

    with k the fewest leading local components holding a fraction `variance` of the
    neighbourhood's variance. Since V_i = X^T U_i / S_i, the draw is mu + scale / sqrt(m - 1) *
    X^T (U[:, :k] z): a random combination of the centred neighbours, computed from the m x m Gram
    matrix X X^T (eigh, float64) and no D x D matrix. Distances: torch.cdist of at most `anchor_batch`
    anchors at a time against the class's images, never n_c x n_c.

    x_train: (N, C, H, W) uint8 or float in [0, 1]; y_train: (N,). Randomness: one uniform per
    sample (the anchor) and one (B, neighbours) normal draw, from `generator`, up front.
    """
    if neighbours < 2:
        raise ValueError(f"neighbours must be >= 2, got {neighbours}")
    if not (0.0 < variance <= 1.0):
        raise ValueError(f"variance must be in (0, 1], got {variance}")
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"scale must be a finite number >= 0, got {scale}")
    if anchor_batch < 1:
        raise ValueError(f"anchor_batch must be >= 1, got {anchor_batch}")
    dev = x_train.device
    y, y_train = y.to(dev), y_train.to(dev)
    shape = tuple(x_train.shape[1:])
    d = math.prod(shape)
    b = len(y)
    u = torch.rand(b, generator=generator, device=dev, dtype=torch.float64)
    z = torch.randn(b, neighbours, generator=generator, device=dev, dtype=torch.float64)
    scale_u8 = 255.0 if x_train.dtype == torch.uint8 else 1.0
    out = torch.empty(b, d, device=dev, dtype=torch.float32)
    anchors = torch.empty(b, dtype=torch.int64, device=dev)
    for c in torch.unique(y).tolist():
        members = (y_train == c).nonzero().squeeze(1)  # indices of class c in x_train
        n_c = len(members)
        if n_c == 0:
            raise ValueError(f"class {c} has no training images")
        xc = x_train[members].reshape(n_c, d).float() / scale_u8  # (n_c, D)
        m = min(neighbours, n_c)
        rows = (y == c).nonzero().squeeze(1)
        pick = (u[rows] * n_c).long().clamp_max(n_c - 1)  # anchor position within the class
        anchors[rows] = members[pick]
        block = max(1, min(anchor_batch, 2**25 // (m * max(m, d))))  # (A, m, D) and (A, m, m) stay small
        for s in range(0, len(rows), block):
            r_blk, p_blk = rows[s : s + block], pick[s : s + block]
            dist = torch.cdist(xc[p_blk], xc)  # (A, n_c)
            dist[torch.arange(len(p_blk), device=dev), p_blk] = -1.0  # the anchor first, whatever the rounding
            nb = xc[dist.topk(m, dim=1, largest=False).indices]  # (A, m, D)
            mu = nb.mean(1)
            cen = nb - mu[:, None, :]
            out[r_blk] = mu + _local_offsets(cen, z[r_blk, : m], variance, scale)
    x = out.clamp_(0.0, 1.0).view(b, *shape)
    return (x, anchors) if return_anchors else x


def _local_offsets(cen: torch.Tensor, z: torch.Tensor, variance: float, scale: float) -> torch.Tensor:
    """sum_{i<k} scale * S_i / sqrt(m - 1) * z_i * V_i for centred neighbourhoods cen (A, m, D). -> (A, D)"""
    a, m, _ = cen.shape
    if m < 2:
        return torch.zeros(a, cen.shape[2], device=cen.device, dtype=cen.dtype)
    c64 = cen.double()
    gram = c64 @ c64.transpose(1, 2)  # (A, m, m) = U S^2 U^T
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    evals, evecs = evals.flip(-1).clamp_min(0.0), evecs.flip(-1)  # S_i^2 descending, U_i as columns
    total = evals.sum(1, keepdim=True)
    share = evals.cumsum(1) / total.clamp_min(1e-300)
    keep = (share < variance - 1e-12).sum(1) + 1  # (A,)
    rank = (evals > evals[:, :1] * 1e-10).sum(1)  # directions with variance, relative to the largest
    keep = torch.minimum(keep, rank) * (total.squeeze(1) > 0)
    mask = torch.arange(m, device=cen.device)[None, :] < keep[:, None]  # (A, m)
    w = (evecs @ (z * mask)[:, :, None]).squeeze(2) * (scale / math.sqrt(m - 1))  # (A, m): U[:, :k] z
    return (w[:, None, :] @ c64).squeeze(1).to(cen.dtype)  # X^T w


def stop_reached(energy: torch.Tensor, class_mean: torch.Tensor, threshold: float, *,
                 rule: str = "below") -> torch.Tensor:
    """Adaptive stopping: which samples have reached the class's energy (a per-step mask). -> (B,) bool

    energy: E(x_n, y) of each sample; class_mean: m_y, the mean E(x, y) of training images of the
    sample's class (sampling.class_energy_means()[y]). The caller stops a sample for good at the
    first step where the mask is true (sampling.sgld ORs it into its `done` mask).

    - "below" (**ours**, sampling.sgld's default, sample.adaptive_rule): E <= m_y + T, T in
      energy units; a sample that has gone below the class mean stops too.
    - "squared" (the authors' rule as docs/science.md#adaptive-stopping records it):
      (E - m_y)^2 < T, T in squared energy units; two-sided, so a sample that overshoots below
      m_y - sqrt(T) keeps moving.
    """
    if rule == "below":
        return energy <= class_mean + threshold
    if rule == "squared":
        return (energy - class_mean).square() < threshold
    raise ValueError(f"rule: unknown {rule!r}; expected one of {', '.join(STOP_RULES)}")
