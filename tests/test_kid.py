"""KID: the unbiased polynomial-kernel MMD², checked against a direct computation."""

import itertools

import numpy as np
import pytest
import torch

from difflab.errors import UsageError
from difflab.evaluation.kid import kid


def direct_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Bińkowski et al. eq. 4 term by term, with k(a, b) = (a·b / d + 1)^3."""
    m, d = len(x), x.shape[1]

    def k(a, b):
        return (float(np.dot(a, b)) / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_matches_direct_computation():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 5)), rng.normal(0.3, 1.2, size=(12, 5))
    r = kid(x, y, subsets=5, subset_size=100)
    assert r.subsets == 1 and r.subset_size == 12 and r.std == 0  # whole sets: one exact value
    assert r.mean == pytest.approx(direct_mmd2(x, y), rel=1e-10)


@pytest.mark.slow  # importing torchmetrics takes seconds
def test_matches_torchmetrics_poly_mmd():
    poly_mmd = pytest.importorskip("torchmetrics.image.kid").poly_mmd
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 16)), rng.normal(0.5, 1.0, size=(40, 16))
    expected = float(poly_mmd(torch.from_numpy(x), torch.from_numpy(y)))
    assert kid(x, y).mean == pytest.approx(expected, rel=1e-9)


def test_zero_for_same_distribution_positive_for_shifted():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    same = kid(a, b, subsets=20, subset_size=200)
    shifted = [kid(a, b + s, subsets=20, subset_size=200).mean for s in (0.5, 1.0, 2.0)]
    # identical sets: the unbiased estimate is O(1/m) (slightly negative), not exactly 0
    assert abs(kid(a, a).mean) < 0.05 * shifted[0]
    assert abs(same.mean) < 0.05 * shifted[0]
    assert 0 < shifted[0] < shifted[1] < shifted[2]  # grows with the shift


def test_subsets_are_seeded_and_average_to_the_full_value():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(300, 6)), rng.normal(0.4, 1.0, size=(300, 6))
    one, again = (
        kid(a, b, subsets=50, subset_size=100, seed=7),
        kid(a, b, subsets=50, subset_size=100, seed=7),
    )
    assert one == again and one.std > 0 and one.subset_size == 100
    assert kid(a, b, subsets=50, subset_size=100, seed=8).mean != one.mean
    assert one.mean == pytest.approx(kid(a, b).mean, rel=0.1)  # unbiased: subsets agree


def test_bad_input():
    with pytest.raises(UsageError, match="dimensions differ"):
        kid(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(UsageError, match="at least 2 samples"):
        kid(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(UsageError, match="NaN or inf"):
        kid(np.full((5, 3), np.nan), np.zeros((5, 3)))
