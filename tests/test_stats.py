"""Statistics of measurements: bootstrap intervals, paired comparisons, memorisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from difflab.evaluation.distances import frechet_distance, kid
from difflab.evaluation.memorisation import copy_rate
from difflab.evaluation.metrics import diversity
from difflab.evaluation.stats import (
    bootstrap_interval,
    compare_paired,
    compare_paired_distances,
    gaussian,
    mcnemar_exact,
    resample_indices,
    sample_intervals,
    samples_needed,
    seed_interval,
)
from difflab.experiments.conclusions import sweep_conclusions
from difflab.experiments.ddpm_sweep import summarise


def test_bootstrap_interval_covers_a_binomial_share():
    hits = 0
    for seed in range(100):
        draws = np.random.default_rng(1000 + seed).random(200) < 0.7
        low, high = bootstrap_interval(draws, resamples=400, seed=seed)
        hits += low <= 0.7 <= high
    assert 88 <= hits <= 99  # a 95 % interval: about 95 of 100


def test_bootstrap_interval_matches_scipy_and_is_deterministic():
    x = np.random.default_rng(3).random(300) < 0.4
    ours = bootstrap_interval(x, resamples=2000, seed=0)
    ref = sps.bootstrap((x.astype(float),), np.mean, n_resamples=2000, method="percentile", random_state=0)  # fmt: skip
    ci = ref.confidence_interval
    assert ours == pytest.approx([ci.low, ci.high], abs=0.012)
    assert bootstrap_interval(x, resamples=2000, seed=0) == ours


def test_resamples_stay_within_their_class():
    labels = np.repeat(np.arange(3), 4)
    idx = resample_indices(labels, 50, seed=1)
    assert idx.shape == (50, 12)
    assert (labels[idx] == labels[None, :]).all()


def test_mcnemar_and_samples_needed_by_hand():
    # 2 samples right only in a, 9 right only in b: two-sided exact binomial on 11 pairs
    assert mcnemar_exact(2, 9) == pytest.approx(2 * (1 + 11 + 55) / 2**11)
    assert mcnemar_exact(0, 0) == 1.0
    a = np.array([1] * 40 + [1, 1] + [0] * 9 + [0] * 9)
    b = np.array([1] * 40 + [0, 0] + [1] * 9 + [0] * 9)
    p = compare_paired(a, b)
    assert (p.only_a, p.only_b, p.n) == (2, 9, 60)
    assert p.p_value == pytest.approx(134 / 2048) and not p.distinguishable
    assert p.difference == pytest.approx(7 / 60)
    assert p.interval[0] < p.difference < p.interval[1]
    d = b - a
    z = sps.norm.ppf(0.975) + sps.norm.ppf(0.8)
    assert p.needed == math.ceil((z * d.std(ddof=1) / d.mean()) ** 2)
    assert samples_needed(0.0, 0.3) is None


def test_seed_interval_is_students_t():
    v = [0.8, 0.9, 0.85]
    half = sps.t.ppf(0.975, 2) * np.std(v, ddof=1) / math.sqrt(3)
    assert seed_interval(v) == pytest.approx([np.mean(v) - half, np.mean(v) + half])
    assert seed_interval([0.5]) is None


def test_sample_intervals_hold_the_measured_values():
    rng = np.random.default_rng(0)
    f, ref = rng.normal(size=(60, 16)), rng.normal(size=(300, 16)) + 0.3
    y = np.repeat(np.arange(6), 10)
    ok = rng.random(60) < 0.8
    measured = {"fd": frechet_distance(f, ref), "kid": kid(f, ref).mean, "diversity": diversity(f, y)["mean"]}  # fmt: skip
    ci = sample_intervals(ok, f, y, ref, measured, resamples=300, fd_resamples=100)
    assert set(ci) == {"accuracy", "fd", "kid", "diversity"}
    for m, v in {**measured, "accuracy": ok.mean()}.items():
        assert ci[m][0] <= v <= ci[m][1], m
    assert ci == sample_intervals(ok, f, y, ref, measured, resamples=300, fd_resamples=100)


def test_copy_rate_of_training_images_and_of_noise():
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(500, 16)), rng.normal(size=(300, 16))
    copies = copy_rate(train[:80], train, test)
    assert copies["copy_rate"] == 1.0 and copies["threshold"] > 0
    assert (copies["nearest_index"] == np.arange(80)).all()
    noise = copy_rate(rng.normal(size=(200, 16)) * 3, train, test)
    assert noise["copy_rate"] <= 0.02


def _cells(correct_a, correct_b):
    rows = []
    for g, ok in ((1.0, correct_a), (2.0, correct_b)):
        rows.append({
            "sampler": "ddim", "steps": 10, "guidance": g, "seed": 0, "accuracy": float(np.mean(ok)),
            "fd": 5.0, "kid": 0.1, "diversity": 7.0, "seconds": 1.0, "correct": list(ok),
            "accuracy_ci_low": 0.0, "accuracy_ci_high": 1.0,
        })  # fmt: skip
    return rows


def test_conclusions_say_when_two_cells_cannot_be_told_apart():
    same = [1] * 50 + [0] * 10
    rows = _cells(same, same)
    text = " ".join(sweep_conclusions(summarise(rows), {}, rows))
    assert "s = 2 and s = 1 cannot be told apart in accuracy with 60 samples" in text
    assert "they agree on every sample" in text
    rows = _cells([1] * 20 + [0] * 40, [1] * 55 + [0] * 5)
    text = " ".join(sweep_conclusions(summarise(rows), {}, rows))
    assert "s = 2 beats s = 1 in accuracy by 58.3 ±" in text and "McNemar p = " in text
    rows = _cells([1] * 50 + [0] * 10, [1] * 52 + [0] * 8)
    text = " ".join(sweep_conclusions(summarise(rows), {}, rows))
    assert "cannot be told apart" in text and "samples per cell would be needed" in text


def test_paired_distances_by_hand():
    """Identical cells: the difference is exactly 0 (its interval holds 0, nothing is told
    apart); cell b shifted away from the real features: FD and KID higher, the interval
    excludes 0 on the positive side; the reference given as features or as its Gaussian
    gives the same FD, and the measured values are the plain float64 FD."""
    rng = np.random.default_rng(0)
    real = rng.normal(size=(500, 6))
    labels = np.repeat(np.arange(4), 15)
    a = rng.normal(size=(60, 6))
    same = compare_paired_distances(a, a, labels, real, real)
    for d in same.values():
        assert d.difference == 0 and d.interval[0] <= 0 <= d.interval[1]
        assert not d.distinguishable and d.needed is None
    b = a + 1.5
    apart = compare_paired_distances(a, b, labels, real, real, resamples=100)
    fd, kd = apart["fd"], apart["kid"]
    assert fd.a == pytest.approx(frechet_distance(a, real), rel=1e-9)
    assert fd.b == pytest.approx(frechet_distance(b, real), rel=1e-9)
    assert fd.difference > 0 and 0 < fd.interval[0] <= fd.difference <= fd.interval[1]
    assert fd.distinguishable and kd.distinguishable and kd.interval[0] > 0
    again = compare_paired_distances(a, b, labels, gaussian(real), None, resamples=100)
    assert again["fd"] == fd and "kid" not in again  # deterministic, and the Gaussian suffices
    # the other way round: the same interval, mirrored
    back = compare_paired_distances(b, a, labels, real, resamples=100)["fd"]
    assert back.interval == pytest.approx([-fd.interval[1], -fd.interval[0]])
    # a small difference of a small sample: not told apart, and more samples would be needed
    near = compare_paired_distances(a, a + rng.normal(size=a.shape) * 0.02, labels, real)["fd"]
    assert not near.distinguishable and near.needed > len(a)


def test_conclusions_hold_the_paired_fd_statement():
    rows = _cells([1] * 50 + [0] * 10, [1] * 50 + [0] * 10)
    rng = np.random.default_rng(1)
    real, feats = rng.normal(size=(400, 5)), rng.normal(size=(60, 5))
    labels = np.repeat(np.arange(3), 20)

    def distances(a, b):  # s = 1's samples sit on the real ones, s = 2's are shifted away
        of = lambda r: feats + 2.0 * (r["guidance"] - 1)  # noqa: E731
        return compare_paired_distances(of(a), of(b), labels, real, real)

    text = " ".join(sweep_conclusions(summarise(rows), {}, rows, distances))
    # the runner-up is s = 2 (a tie goes to the smaller guidance): s = 1 has the lower FD
    d = distances(rows[1], rows[0])["fd"]
    half = (d.interval[1] - d.interval[0]) / 2
    assert f"s = 1 has FD {abs(d.difference):.2f} ± {half:.2f} lower than s = 2" in text
    assert "paired bootstrap over 60 samples" in text


def test_memorisation_through_the_judge():
    """Training images are near-copies of themselves; uniform noise is not (an untrained
    judge's features are enough to tell)."""
    from difflab.ddpm.data import load_dataset
    from difflab.evaluation.evaluate import evaluate_samples
    from difflab.evaluation.judge import Judge, JudgeNet

    torch.manual_seed(0)
    judge = Judge(JudgeNet(1, 10).eval(), {"dataset": "digits", "height": 8, "width": 8})
    train = load_dataset("digits", "train")
    images = train.images[:40].float() / 127.5 - 1
    m = evaluate_samples(images, train.labels[:40], "digits", judge=judge, memorisation=True)
    assert m["copy_rate"] == 1.0 and set(m["ci95"]) == {"accuracy", "fd", "kid", "diversity"}
    assert len(m["correct"]) == 40 and m["nearest_train"]["index"][:3] == [0, 1, 2]
    noise = torch.rand_like(images) * 2 - 1
    m = evaluate_samples(noise, train.labels[:40], "digits", judge=judge, memorisation=True)
    assert m["copy_rate"] <= 0.05
