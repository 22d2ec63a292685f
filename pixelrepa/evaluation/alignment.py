"""Representation similarity between two feature matrices of the same n inputs: linear CKA,
CKNNA and mutual kNN.

Every function takes x (n, d1) and y (n, d2), row i of both describing input i, computes in
float64 and returns a float. Memory is O(n^2) (the Gram matrices), fine for n up to a few
thousand.

* `linear_cka` (Kornblith et al., ICML 2019, eq. 3 with the linear kernel): with K = x x^T,
  L = y y^T and the centring matrix H = I - 11^T / n, CKA = <HKH, HLH>_F / (||HKH||_F ||HLH||_F),
  the biased-HSIC form HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)). Invariant to orthogonal
  transforms and isotropic scaling of either set; 1 for identical sets.
* `cknna` (Huh et al., ICML 2024, "The Platonic Representation Hypothesis", appendix; the
  metric REPA, Yu et al. ICLR 2025, reports with k = 10): CKA restricted to neighbour pairs.
  With the centred kernels Kc = HKH, Lc = HLH and the mask
  alpha(i, j) = [i != j, j in knn_x(i; k) and j in knn_y(i; k)],
  Align(K, L) = sum_ij alpha(i, j) Kc_ij Lc_ij and
  CKNNA = Align(K, L) / sqrt(Align(K, K) Align(L, L)),
  where Align(K, K) takes its mask in x's space alone (alpha_xx(i, j) = [i != j, j in knn_x(i)]),
  as in the paper and the authors' code. By Cauchy-Schwarz |CKNNA| <= 1; 1 for identical sets.
  The authors' code estimates Align with the unbiased HSIC of the masked kernels (Song et al.
  2012) instead of masking HKH, so its numbers differ slightly from these.
* `mutual_knn` (Huh et al. 2024, sec. 2): the mean over i of |knn_x(i; k) ∩ knn_y(i; k)| / k.

Neighbours knn_x(i; k) are the k inputs j != i of highest cosine similarity to i in x's space
(rows L2-normalised: the kernel of normalised features, as Huh et al. normalise before every
metric); ties are broken by `torch.topk`. A set whose centred Gram matrix is zero (all rows
equal) has no defined CKA or CKNNA: those return NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of x (n, d1) and y (n, d2): <HKH, HLH>_F / (||HKH|| ||HLH||)."""
    x, y = _pair(x, y, k=None)
    kc, lc = centred_gram(x), centred_gram(y)
    return _ratio((kc * lc).sum(), kc.pow(2).sum() * lc.pow(2).sum())


def cknna(x: Tensor, y: Tensor, k: int = 10) -> float:
    """CKNNA (Huh et al. 2024) of x (n, d1) and y (n, d2): centred linear kernels summed over the
    pairs (i, j), i != j, that are k-nearest neighbours in both spaces, normalised by each space's
    own k-nearest-neighbour sum (see the module docstring)."""
    x, y = _pair(x, y, k)
    kc, lc = centred_gram(x), centred_gram(y)
    in_x, in_y = knn_mask(x, k), knn_mask(y, k)
    aligned = (kc * lc)[in_x & in_y].sum()
    return _ratio(aligned, kc.pow(2)[in_x].sum() * lc.pow(2)[in_y].sum())


def mutual_knn(x: Tensor, y: Tensor, k: int = 10) -> float:
    """Mutual kNN (Huh et al. 2024): the mean fraction of each input's k nearest neighbours (cosine
    similarity, itself excluded) shared by x's and y's spaces, in [0, 1]."""
    x, y = _pair(x, y, k)
    shared = (knn_mask(x, k) & knn_mask(y, k)).sum(dim=1)
    return float(shared.double().mean() / k)


def centred_gram(x: Tensor) -> Tensor:
    """HKH for the linear kernel K = x x^T, H = I - 11^T / n: the Gram matrix of the column-centred x."""
    x = x - x.mean(dim=0, keepdim=True)
    return x @ x.T


def knn_mask(x: Tensor, k: int) -> Tensor:
    """(n, n) bool: row i is True at the k rows j != i of highest cosine similarity to row i."""
    unit = F.normalize(x, dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-math.inf)
    nearest = similarity.topk(k, dim=1).indices
    return torch.zeros_like(similarity, dtype=torch.bool).scatter_(1, nearest, True)


def _pair(x: Tensor, y: Tensor, k: int | None) -> tuple[Tensor, Tensor]:
    """x and y as float64 after checking shapes (and 1 <= k <= n - 1 when k is given)."""
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"features must be (n, d) matrices, got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"the two feature sets describe {n} and {y.shape[0]} inputs; they must be the same inputs")
    if n < 2:
        raise ValueError(f"{n} input(s): similarity needs at least 2")
    if k is not None and not 1 <= k <= n - 1:
        raise ValueError(f"k = {k} nearest neighbours needs 1 <= k <= n - 1 = {n - 1}")
    return x.detach().to(torch.float64), y.detach().to(device=x.device, dtype=torch.float64)


def _ratio(numerator: Tensor, squared_norms: Tensor) -> float:
    """numerator / sqrt(squared_norms); NaN when the denominator is zero (a constant set)."""
    denominator = math.sqrt(float(squared_norms))
    return float(numerator) / denominator if denominator > 0 else math.nan
