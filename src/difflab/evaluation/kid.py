"""Kernel distance (KID) between two feature sets: the unbiased polynomial-kernel MMD².

KID (Bińkowski et al. 2018, "Demystifying MMD GANs", eq. 4) is the squared maximum mean
discrepancy with the kernel ``k(x, y) = (x·y / d + 1)³``, estimated without bias on
``subsets`` random subsets of ``subset_size`` features drawn without replacement from each set
(as torch-fidelity and torchmetrics do), and reported as the mean and standard deviation over
the subsets. Unlike the Fréchet distance it has no sample-size bias, so it is the better
number for the small sample counts of a sweep; it is close to 0 (and may be slightly
negative) for two samples of the same distribution. Computed here on the reference
classifier's features, it is NOT comparable with published Inception KID.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from difflab.errors import UsageError
from difflab.evaluation.metrics import as_features


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
    """KID of two (N, D) feature sets; ``subset_size`` is capped at the smaller set's size.

    Deterministic for a given ``seed``. With ``subset_size`` at least the size of both sets
    every subset is the whole set, and one subset gives the exact statistic.
    """
    a, b = as_features(feats_a, "feats_a"), as_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise UsageError(f"features: dimensions differ ({a.shape[1]} vs {b.shape[1]})")
    if subsets < 1:
        raise UsageError(f"subsets {subsets}: must be at least 1")
    m = min(len(a), len(b), int(subset_size))
    if m < 2:
        raise UsageError("features: KID needs at least 2 samples in each set")
    if m == len(a) == len(b):  # every subset would be both whole sets
        subsets = 1
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)] if m < len(a) else a
        y = b[rng.choice(len(b), m, replace=False)] if m < len(b) else b
        values.append(
            mmd2_unbiased(
                polynomial_kernel(x, x, degree, gamma, coef),
                polynomial_kernel(y, y, degree, gamma, coef),
                polynomial_kernel(x, y, degree, gamma, coef),
            )
        )
    v = np.asarray(values)
    return KID(float(v.mean()), float(v.std()), subsets, m)
