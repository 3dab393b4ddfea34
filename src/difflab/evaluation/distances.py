"""Distances between two feature sets: the Fréchet distance and KID, one implementation for all.

Every feature extractor goes through these two functions: the reference classifier's
penultimate features (:mod:`.metrics`, ``fd``/``kid``) and the FID Inception-v3 pool features
(:mod:`.inception`, ``inception_fid``/``inception_kid``). Both are computed in float64 on the
CPU. The Fréchet distance (Heusel et al. 2017) between Gaussians fitted to the two sets is
``||mu_a - mu_b||² + tr(S_a + S_b - 2 (S_a S_b)^½)``; the trace of the square root is taken as
``sum sqrt(eig(S_a^½ S_b S_a^½))``, a symmetric matrix similar to ``S_a S_b``, so it stays real
and finite when the covariances are singular (fewer samples than dimensions). KID (Bińkowski
et al. 2018, "Demystifying MMD GANs", eq. 4) is the unbiased MMD² with the kernel
``k(x, y) = (x·y / d + 1)³``, estimated on ``subsets`` random subsets of ``subset_size``
features drawn without replacement from each set and reported as the mean and standard
deviation over the subsets (as torch-fidelity and torchmetrics do). KID has no sample-size
bias, so it suits the small sample counts of a sweep; it is close to 0 (and may be slightly
negative) for two samples of the same distribution. tests/test_kid.py checks both against
torchmetrics' ``FrechetInceptionDistance`` and ``KernelInceptionDistance``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from difflab.errors import UsageError


def as_features(x: Any, what: str) -> np.ndarray:
    """An (N, D) float64 array of finite features from a tensor or array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise UsageError(f"{what}: expected an (N, D) feature array, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise UsageError(f"{what}: features contain NaN or inf")
    return a


def _pair(feats_a: Any, feats_b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = as_features(feats_a, "feats_a"), as_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise UsageError(f"features: dimensions differ ({a.shape[1]} vs {b.shape[1]})")
    return a, b


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance (tiny negative eigenvalues read as 0)."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(feats_a: Any, feats_b: Any) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets (module doc)."""
    a, b = _pair(feats_a, feats_b)
    if min(len(a), len(b)) < 2:
        raise UsageError("features: the Fréchet distance needs at least 2 samples in each set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _psd_sqrt(s_a)
    m = root_a @ s_b @ root_a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu_a - mu_b
    fd = diff @ diff + np.trace(s_a) + np.trace(s_b) - 2.0 * tr_covmean
    return float(max(fd, 0.0))


# -- KID --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KID:
    mean: float  # mean of the unbiased MMD² over the subsets
    std: float  # its standard deviation over the subsets (0 for one subset)
    subsets: int
    subset_size: int


def polynomial_kernel(
    x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None, coef: float = 1.0
) -> np.ndarray:
    """``(gamma * x @ y.T + coef) ** degree`` with ``gamma = 1 / D`` by default: (N, M)."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (gamma * (x @ y.T) + coef) ** degree


def mmd2_unbiased(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray) -> float:
    """Unbiased MMD² from the kernel matrices of two sets of m samples each (Gretton et al.).

    ``sum_{i≠j} k(x_i, x_j) / (m(m-1)) + sum_{i≠j} k(y_i, y_j) / (m(m-1)) - 2 mean k(x_i, y_j)``
    """
    m = k_xx.shape[0]
    xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    yy = (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(xx + yy - 2.0 * k_xy.mean())


def kid_subsets(
    n_a: int, n_b: int, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (rows of a, rows of b) of each KID subset: ``min(n_a, n_b, subset_size)`` each.

    Deterministic for a given ``seed``. When the subset size is both sets' size, every subset
    would be the whole sets, and there is one.
    """
    if subsets < 1:
        raise UsageError(f"subsets {subsets}: must be at least 1")
    m = min(n_a, n_b, int(subset_size))
    if m < 2:
        raise UsageError("features: KID needs at least 2 samples in each set")
    if m == n_a == n_b:
        return [(np.arange(n_a), np.arange(n_b))]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(subsets):
        ia = rng.choice(n_a, m, replace=False) if m < n_a else np.arange(n_a)
        ib = rng.choice(n_b, m, replace=False) if m < n_b else np.arange(n_b)
        out.append((ia, ib))
    return out


def kid(
    feats_a: Any,
    feats_b: Any,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
    seed: int = 0,
) -> KID:
    """KID of two (N, D) feature sets on the subsets of :func:`kid_subsets` (module doc).

    With ``subset_size`` at least the size of both sets every subset is the whole set, and
    one subset gives the exact statistic.
    """
    a, b = _pair(feats_a, feats_b)
    picks = kid_subsets(len(a), len(b), subsets, subset_size, seed)
    values = []
    for ia, ib in picks:
        x, y = a[ia], b[ib]
        values.append(
            mmd2_unbiased(
                polynomial_kernel(x, x, degree, gamma, coef),
                polynomial_kernel(y, y, degree, gamma, coef),
                polynomial_kernel(x, y, degree, gamma, coef),
            )
        )
    v = np.asarray(values)
    return KID(float(v.mean()), float(v.std()), len(picks), len(picks[0][0]))
