"""The one Fréchet distance and KID, checked against direct computations and torchmetrics."""

import itertools

import numpy as np
import pytest
import torch

from difflab.errors import UsageError
from difflab.evaluation.distances import frechet_distance, kid, kid_subsets


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


# -- one implementation, checked against the others' numbers ----------------------------------
def test_fd_matches_the_sqrtm_formula():
    """Our trace of (S_a S_b)^½ by a symmetric eigenproblem against scipy's sqrtm (pytorch-fid)."""
    import scipy.linalg

    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12))
    y = rng.normal(0.3, 1.0, size=(400, 12)) @ rng.normal(size=(12, 12))
    s_x, s_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_x @ s_y).real
    diff = x.mean(0) - y.mean(0)
    expected = diff @ diff + np.trace(s_x) + np.trace(s_y) - 2 * np.trace(covmean)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-6)


class _Identity(torch.nn.Module):
    """A "feature extractor" for torchmetrics that hands features through unchanged."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.slow  # importing torchmetrics' image metrics takes seconds
@pytest.mark.parametrize("n, d", [(200, 16), (30, 64)])  # the second: singular covariances
def test_fd_matches_torchmetrics_frechet_inception_distance(n, d):
    fid_mod = pytest.importorskip("torchmetrics.image.fid")
    rng = np.random.default_rng(5)
    x = rng.normal(size=(n, d))
    y = rng.normal(0.2, 1.3, size=(n + 7, d))
    metric = fid_mod.FrechetInceptionDistance(feature=_Identity(d))
    metric.update(torch.from_numpy(y), real=True)
    metric.update(torch.from_numpy(x), real=False)
    assert frechet_distance(x, y) == pytest.approx(float(metric.compute()), rel=1e-6)


@pytest.mark.slow  # importing torchmetrics' image metrics takes seconds
def test_kid_matches_torchmetrics_on_the_same_subsets():
    kid_mod = pytest.importorskip("torchmetrics.image.kid")
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(120, 10)), rng.normal(0.3, 1.0, size=(150, 10))
    ours = kid(a, b, subsets=30, subset_size=50, seed=2)
    theirs = torch.stack([
        kid_mod.poly_mmd(torch.from_numpy(a[ia]), torch.from_numpy(b[ib]))
        for ia, ib in kid_subsets(len(a), len(b), subsets=30, subset_size=50, seed=2)
    ])  # fmt: skip
    assert ours.subsets == 30 and ours.subset_size == 50
    assert ours.mean == pytest.approx(float(theirs.mean()), rel=1e-9)
    assert ours.std == pytest.approx(float(theirs.std(unbiased=False)), rel=1e-9)
    # torchmetrics' own metric: with subsets as large as the sets, every subset is exact
    metric = kid_mod.KernelInceptionDistance(feature=_Identity(10), subsets=3, subset_size=120)
    metric.update(torch.from_numpy(b[:120]), real=True)
    metric.update(torch.from_numpy(a), real=False)
    mean, std = metric.compute()
    exact = kid(a, b[:120])
    assert exact.subsets == 1 and exact.mean == pytest.approx(float(mean), rel=1e-9)
    assert float(std) == pytest.approx(0.0, abs=1e-12)
