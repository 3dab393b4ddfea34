"""How sure a measurement is: bootstrap intervals, paired comparisons and sample sizes.

A metric measured on N samples is one draw of a random quantity; its 95 % confidence
interval is the percentile bootstrap (Efron & Tibshirani 1993, ch. 13): the samples are
resampled with replacement ``resamples`` times (within each class, so every resample keeps
the evaluation's classes balanced; seeded, so the interval is deterministic), the metric is
recomputed on each resample, and the 2.5th and 97.5th percentiles of the recomputed values
are the interval (:func:`resample_indices`, :func:`percentile_interval`,
:func:`sample_intervals` for accuracy, FD, KID and diversity at once). Across seeds, where
each seed gives one value, the interval is Student's t over the seed values
(:func:`seed_interval`). Two cells of a sweep start from the same noise, so their samples
come in pairs: :func:`compare_paired` measures the difference of their accuracies with a
paired bootstrap and McNemar's exact test (a binomial test on the samples where exactly one
of the two cells is right), and :func:`samples_needed` says how many samples per cell would
show the observed difference at 5 % significance with 80 % power (the normal approximation
``n = ((z_0.975 + z_0.8) · sd_d / d)²`` for a paired mean difference ``d`` with per-sample
standard deviation ``sd_d``). :func:`compare_paired_distances` does the same for the FD and
KID of two cells: a paired bootstrap that resamples the same sample indices in both cells,
and a sample size from the bootstrap's standard error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as sps
from scipy.spatial.distance import cdist

from difflab.evaluation.distances import as_features, polynomial_kernel

RESAMPLES = 1000  # for accuracy and diversity (cheap)
FD_RESAMPLES = 200  # the Fréchet distance needs one eigen-decomposition per resample
KID_REFERENCE = 2000  # at most this many real features in KID's bootstrap (fixed seed)
LEVEL = 0.95
ALPHA = 0.05
POWER = 0.8


def resample_indices(labels: Any, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, N) row indices drawn with replacement within each class of ``labels``."""
    y = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, len(y)), dtype=np.int64)
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        out[:, rows] = rows[rng.integers(0, len(rows), size=(resamples, len(rows)))]
    return out


def percentile_interval(
    values: Sequence[float], level: float = LEVEL, centre: float | None = None
) -> list[float]:
    """[low, high]: the central ``level`` share of bootstrap ``values``.

    With ``centre`` (the value measured on the samples themselves) the interval is shifted
    by the bootstrap's bias ``centre - mean(values)``: resampling with replacement repeats
    samples, which lowers the diversity and raises the FD and KID of every resample.
    """
    v = np.asarray(values, dtype=np.float64)
    lo, hi = np.percentile(v, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    shift = 0.0 if centre is None else centre - float(v.mean())
    return [float(lo + shift), float(hi + shift)]


def bootstrap_interval(
    values: Any, statistic: Callable[[np.ndarray], float] = np.mean,
    resamples: int = RESAMPLES, seed: int = 0, labels: Any = None,
) -> list[float]:  # fmt: skip
    """Percentile bootstrap interval of ``statistic`` of per-sample ``values``."""
    v = np.asarray(values, dtype=np.float64)
    idx = resample_indices(np.zeros(len(v)) if labels is None else labels, resamples, seed)
    return percentile_interval([statistic(v[i]) for i in idx])


def seed_interval(values: Sequence[float], level: float = LEVEL) -> list[float] | None:
    """Student's t interval of the mean of per-seed values; None for fewer than two."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if len(v) < 2:
        return None
    sem = float(v.std(ddof=1)) / math.sqrt(len(v))
    if sem == 0:
        return [float(v.mean())] * 2
    lo, hi = sps.t.interval(level, len(v) - 1, loc=float(v.mean()), scale=sem)
    return [float(lo), float(hi)]


# -- the sample metrics -----------------------------------------------------------------------
def gaussian(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """The mean (D,) and covariance (D, D) of (N, D) features, in float64: all the Fréchet
    distance needs of a fixed reference set."""
    f = as_features(features, "reference")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def _fd_resampled(
    a: np.ndarray, ref: np.ndarray | tuple[np.ndarray, np.ndarray], counts: np.ndarray,
    chunk: int = 25,
) -> list[float]:  # fmt: skip
    """The Fréchet distance against ``ref`` (fixed: features, or their :func:`gaussian`) of
    each resample of ``a``, given by its row counts ``w`` (a row of ``counts``), ``chunk``
    resamples at a time.

    A resample's covariance is ``S = YᵀY / (n − 1)`` with rows ``Y_i = √w_i (a_i − μ)``, ``μ
    = wᵀa / n``. The trace of ``(S_r^½ S S_r^½)^½`` needs the eigenvalues of that D × D
    matrix, or, when there are fewer samples than dimensions, those of the N × N matrix
    ``Y S_r Yᵀ / (n − 1)``, which has the same non-zero eigenvalues (and is much cheaper).
    """
    mu_r, s_r = ref if isinstance(ref, tuple) else gaussian(ref)
    w, v = np.linalg.eigh(s_r)
    root_r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S_r^½, once
    n, dim = a.shape
    out = []
    for start in range(0, len(counts), chunk):
        wt = counts[start : start + chunk]  # (B, N)
        mu = wt @ a / n  # (B, D)
        y = np.sqrt(wt)[:, :, None] * (a[None] - mu[:, None, :])  # (B, N, D)
        if n < dim:
            m = (y @ s_r) @ np.swapaxes(y, 1, 2) / (n - 1)  # (B, N, N)
            tr_s = (y * y).sum((1, 2)) / (n - 1)
        else:
            s = np.swapaxes(y, 1, 2) @ y / (n - 1)  # (B, D, D)
            m = root_r @ s @ root_r
            tr_s = np.trace(s, axis1=1, axis2=2)
        m = (m + np.swapaxes(m, 1, 2)) / 2
        tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(m), 0, None)).sum(1)
        d = mu - mu_r
        fd = (d * d).sum(1) + tr_s + np.trace(s_r) - 2 * tr_covmean
        out += np.maximum(fd, 0.0).tolist()
    return out


def _weighted_pairs(k: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per resample (a row of counts ``w``, (B, N)), the sum of ``k[i_a, i_b]`` over ordered
    pairs of distinct positions a ≠ b: ``wᵀ K w − w · diag K``, shape (B,)."""
    return np.einsum("bi,bi->b", w @ k, w) - w @ np.diag(k)


def _kid_resampled(a: np.ndarray, ref: np.ndarray, counts: np.ndarray) -> list[float]:
    """Unbiased MMD² (KID's kernel) of each resample, rows weighted by ``counts``, against
    ``ref``; the reference's term is computed once."""
    m = len(ref)
    k_rr = polynomial_kernel(ref, ref)
    rr = (k_rr.sum() - np.trace(k_rr)) / (m * (m - 1))
    k_aa, k_ar = polynomial_kernel(a, a), polynomial_kernel(a, ref).mean(1)  # (N, N), (N,)
    n = len(a)
    return list(_weighted_pairs(k_aa, counts) / (n * (n - 1)) + rr - 2 * (counts @ k_ar) / n)


def _diversity_resampled(f: np.ndarray, y: np.ndarray, counts: np.ndarray) -> list[float]:
    """Mean within-class pairwise distance (:func:`~.metrics.diversity`) of each resample."""
    per_class = []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        if len(rows) < 2:
            continue
        d = cdist(f[rows], f[rows])  # (m, m) Euclidean
        m = len(rows)
        per_class.append(_weighted_pairs(d, counts[:, rows]) / (m * (m - 1)))
    return list(np.mean(per_class, axis=0)) if per_class else []


def sample_intervals(
    correct: Any, features: Any, labels: Any, reference: Any, measured: dict[str, float],
    seed: int = 0, resamples: int = RESAMPLES, fd_resamples: int = FD_RESAMPLES,
) -> dict[str, list[float]]:  # fmt: skip
    """95 % intervals of ``accuracy``, ``fd``, ``kid`` and ``diversity`` of one set of samples.

    ``correct`` (N,) says whether the judge recognised each sample, ``features`` (N, D) are
    its judge features, ``reference`` (M, D) the real features the distances are taken to,
    ``measured`` the values measured on the samples (``fd``, ``kid``, ``diversity``): the
    intervals of these three are bias-corrected around them (:func:`percentile_interval`).
    Every metric is recomputed on the same stratified resamples (the FD on the first
    ``fd_resamples`` of them); the real features are held fixed.
    """
    y = np.asarray(labels).reshape(-1)
    ok = np.asarray(correct, dtype=np.float64).reshape(-1)
    f, ref = as_features(features, "features"), as_features(reference, "reference")
    ref_kid = reference_for_kid(ref, seed)
    idx = resample_indices(y, max(resamples, fd_resamples), seed)
    counts = np.stack([np.bincount(i, minlength=len(y)) for i in idx]).astype(np.float64)
    out = {"accuracy": percentile_interval(ok[idx].mean(1))}
    if len(f) >= 2:
        fd = percentile_interval(
            _fd_resampled(f, ref, counts[:fd_resamples]), centre=measured["fd"]
        )
        out["fd"] = [max(fd[0], 0.0), max(fd[1], 0.0)]
        out["kid"] = percentile_interval(_kid_resampled(f, ref_kid, counts), centre=measured["kid"])
    div = _diversity_resampled(f, y, counts)
    if div:
        low, high = percentile_interval(div, centre=measured["diversity"])
        out["diversity"] = [max(low, 0.0), high]
    return out


# -- paired comparisons -----------------------------------------------------------------------
@dataclass(frozen=True)
class Paired:
    """Accuracy of cell b minus cell a on the same samples (shares in 0..1)."""

    n: int  # pairs
    difference: float  # mean(b) - mean(a)
    interval: list[float]  # paired bootstrap 95 % interval of the difference
    p_value: float  # McNemar's exact test (two-sided)
    only_a: int  # samples right in a only
    only_b: int  # samples right in b only
    needed: int | None  # samples per cell to show this difference (None: no difference seen)

    @property
    def distinguishable(self) -> bool:
        return self.p_value < ALPHA


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided p-value of McNemar's exact test: the discordant pairs as Binomial(n, ½)."""
    n = only_a + only_b
    return 1.0 if n == 0 else float(sps.binomtest(only_b, n, 0.5).pvalue)


def samples_needed(difference: float, sd: float, alpha: float = ALPHA, power: float = POWER):
    """Pairs needed to detect a paired mean ``difference`` with per-pair deviation ``sd``
    (two-sided test at ``alpha``, given ``power``); None when no difference was seen."""
    if difference == 0 or not math.isfinite(difference):
        return None
    z = sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power)
    return max(2, math.ceil((z * sd / abs(difference)) ** 2))


def compare_paired(
    a: Any, b: Any, resamples: int = RESAMPLES, seed: int = 0, labels: Any = None
) -> Paired:
    """Compare per-sample correctness ``a`` and ``b`` (0/1, the same samples in both)."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape or not len(a):
        raise ValueError(f"paired comparison needs two equal, non-empty sets ({a.shape}, {b.shape})")  # fmt: skip
    d = b - a
    interval = bootstrap_interval(d, resamples=resamples, seed=seed, labels=labels)
    only_a, only_b = int(((a > 0) & (b == 0)).sum()), int(((b > 0) & (a == 0)).sum())
    sd = float(d.std(ddof=1)) if len(d) > 1 else 0.0
    return Paired(
        len(d), float(d.mean()), interval, mcnemar_exact(only_a, only_b), only_a, only_b,
        samples_needed(float(d.mean()), sd),
    )  # fmt: skip


# -- paired distances -------------------------------------------------------------------------
@dataclass(frozen=True)
class PairedDistance:
    """A distance to the real features (FD or KID) of cell b minus cell a, on paired samples."""

    metric: str  # "fd" or "kid"
    n: int  # pairs
    a: float  # measured on cell a's samples
    b: float
    difference: float  # b - a
    interval: list[float]  # paired bootstrap 95 % interval of the difference
    needed: int | None  # samples per cell to tell a difference this size (None: none seen)

    @property
    def distinguishable(self) -> bool:
        """The interval excludes 0."""
        return not self.interval[0] <= 0.0 <= self.interval[1]


def reference_for_kid(reference: Any, seed: int = 0) -> np.ndarray:
    """At most :data:`KID_REFERENCE` rows of the real features (a fixed random subset)."""
    ref = as_features(reference, "reference")
    if len(ref) <= KID_REFERENCE:
        return ref
    return ref[np.random.default_rng(seed).choice(len(ref), KID_REFERENCE, replace=False)]


def _distance_needed(n: int, difference: float, interval: Sequence[float]) -> int | None:
    """Samples per cell for the paired difference to be found at 5 % with 80 % power, from
    the bootstrap's standard error (which shrinks as 1/√n): ``n (z sd / |d|)²``."""
    if difference == 0 or not math.isfinite(difference):
        return None
    se = (interval[1] - interval[0]) / (2 * sps.norm.ppf(1 - ALPHA / 2))
    z = sps.norm.ppf(1 - ALPHA / 2) + sps.norm.ppf(POWER)
    return max(2, math.ceil(n * (z * se / abs(difference)) ** 2))


def compare_paired_distances(
    a: Any, b: Any, labels: Any, fd_reference: Any, kid_reference: Any | None = None,
    resamples: int = FD_RESAMPLES, seed: int = 0,
) -> dict[str, PairedDistance]:  # fmt: skip
    """Paired bootstrap of FD (and KID) between two cells whose samples come in pairs.

    ``a`` and ``b`` (N, D) are the judge features of the two cells' samples, row i of both
    drawn from the same noise; ``labels`` (N,) their classes. Each resample draws the same
    row indices (within each class) from both cells, recomputes both distances to the fixed
    reference (``fd_reference``: real features or their :func:`gaussian`; ``kid_reference``:
    real features, KID's unbiased MMD² on all of them) and takes their difference; the 95 %
    interval of the differences is bias-corrected around the measured difference. The noise
    the two cells share then cancels out of the comparison.
    """
    fa, fb = as_features(a, "features a"), as_features(b, "features b")
    if fa.shape != fb.shape or len(fa) < 2:
        raise ValueError(f"paired distances need two equal sets of 2+ samples ({fa.shape}, {fb.shape})")  # fmt: skip
    idx = resample_indices(labels, resamples, seed)
    counts = np.stack([np.bincount(i, minlength=len(fa)) for i in idx]).astype(np.float64)
    ones = np.ones((1, len(fa)))
    ref = fd_reference if isinstance(fd_reference, tuple) else gaussian(fd_reference)
    pairs = {"fd": lambda f, w: _fd_resampled(f, ref, w)}
    if kid_reference is not None:
        ref_kid = as_features(kid_reference, "reference")
        pairs["kid"] = lambda f, w: _kid_resampled(f, ref_kid, w)
    out = {}
    for metric, distance in pairs.items():
        va, vb = float(distance(fa, ones)[0]), float(distance(fb, ones)[0])
        d = np.asarray(distance(fb, counts)) - np.asarray(distance(fa, counts))
        interval = percentile_interval(d, centre=vb - va)
        needed = _distance_needed(len(fa), vb - va, interval)
        out[metric] = PairedDistance(metric, len(fa), va, vb, vb - va, interval, needed)
    return out


def diversity_interval(
    features: Any, groups: Any, measured: float, seed: int = 0, resamples: int = RESAMPLES
) -> list[float] | None:
    """95 % interval of the mean within-group pairwise distance (``measured``), resampling
    within each group (a Stable Diffusion sweep: the seeds of a prompt); None without a pair."""
    y = np.asarray(groups).reshape(-1)
    idx = resample_indices(y, resamples, seed)
    counts = np.stack([np.bincount(i, minlength=len(y)) for i in idx]).astype(np.float64)
    div = _diversity_resampled(as_features(features, "features"), y, counts)
    if not div:
        return None
    low, high = percentile_interval(div, centre=measured)
    return [max(low, 0.0), high]
