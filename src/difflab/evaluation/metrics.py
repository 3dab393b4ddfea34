"""Sample metrics measured with the reference classifier (the judge).

Conditional accuracy asks whether a sample drawn for class *c* is recognised as *c*. The
Fréchet distance and the KID (both from :mod:`.distances`) and the diversity are computed on
the judge's own penultimate features (:meth:`Judge.features`), not on Inception-v3 features:
they rank models trained on the same dataset and can be set against the real-vs-real floor
(:func:`real_floor`: train split against test split), but they are NOT comparable with
published Inception FID numbers. Features of real splits are cached in memory per judge.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Any

import numpy as np
import torch

from difflab.errors import UsageError
from difflab.evaluation.distances import as_features, frechet_distance

_FEATURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FLOORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _labels(labels: Any, n: int) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels))
    if y.ndim != 1 or y.numel() != n:
        raise UsageError(f"labels: expected {n} class indices, got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise UsageError(f"labels: expected integer class indices, got {y.dtype}")
    return y.to(torch.int64)


def conditional_accuracy(judge: Any, images: Any, labels: Any) -> dict[str, Any]:
    """How often the judge recognises each sample as the class it was drawn for.

    Returns ``overall`` (float), ``per_class`` (one float per class, None for a class with
    no samples), ``counts`` (samples per class), ``confusion`` (rows: intended class,
    columns: judged class), ``correct`` (per sample, 1 when recognised, else 0) and ``n``.
    """
    y = _labels(labels, int(images.shape[0]))
    k = judge.num_classes
    if y.numel() == 0:
        raise UsageError("images: no samples to evaluate")
    if int(y.min()) < 0 or int(y.max()) >= k:
        raise UsageError(
            f"labels: class indices must be in 0..{k - 1} for the {judge.dataset} judge"
        )
    pred = judge.predict(images)
    confusion = torch.zeros(k, k, dtype=torch.int64)
    confusion.index_put_((y, pred), torch.ones_like(y), accumulate=True)
    counts = confusion.sum(1)
    per_class = [
        float(confusion[c, c]) / int(counts[c]) if int(counts[c]) else None for c in range(k)
    ]
    return {
        "overall": float((pred == y).double().mean()),
        "per_class": per_class,
        "counts": counts.tolist(),
        "confusion": confusion.tolist(),
        "correct": (pred == y).to(torch.int64).tolist(),
        "n": int(y.numel()),
    }


def _fingerprint(data: Any) -> str:
    return hashlib.blake2b(data.images.contiguous().numpy().data, digest_size=16).hexdigest()


def features_of(judge: Any, data: Any) -> torch.Tensor:
    """The judge's features of a real ImageData split, cached in memory per judge."""
    key = (data.name, getattr(data, "split", None), len(data), _fingerprint(data))
    cache = _FEATURES.setdefault(judge, {})
    if key not in cache:
        cache[key] = judge.features(data.images)
    return cache[key]


def real_floor(judge: Any, train: Any, test: Any, n: int | None = None) -> float:
    """Fréchet distance of real train images against the whole test split (real vs real).

    ``n`` train images are drawn (fixed seed; default: as many as the test split has), so
    the floor has the sample-size bias of a sample FD measured with ``n`` samples against
    the test split. A model's FD near the floor is as close as real data gets.
    """
    n = len(test) if n is None else int(n)
    if n < 2:
        raise UsageError(f"n {n}: the real-vs-real floor needs at least 2 images")
    key = (train.name, len(train), _fingerprint(train), test.name, _fingerprint(test), n)
    cache = _FLOORS.setdefault(judge, {})
    if key not in cache:
        fa, fb = features_of(judge, train), features_of(judge, test)
        idx = torch.randperm(len(fa), generator=torch.Generator().manual_seed(0))[:n]
        cache[key] = frechet_distance(fa[idx], fb)
    return cache[key]


def diversity(features: Any, labels: Any, num_classes: int | None = None) -> dict[str, Any]:
    """Mean pairwise L2 feature distance within each class, and its mean over classes.

    ``per_class`` holds None for a class with fewer than two samples; ``mean`` averages the
    others. Identical samples give 0; mode collapse shows as a value far below real data's.
    """
    f = torch.as_tensor(as_features(features, "features"))
    y = _labels(labels, len(f))
    k = int(y.max()) + 1 if num_classes is None and y.numel() else int(num_classes or 0)
    per_class: list[float | None] = []
    for c in range(k):
        fc = f[y == c]
        m = len(fc)
        if m < 2:
            per_class.append(None)
            continue
        total = sum(float(torch.cdist(fc[i : i + 1024], fc).sum()) for i in range(0, m, 1024))
        per_class.append(total / (m * (m - 1)))
    valid = [v for v in per_class if v is not None]
    if not valid:
        raise UsageError("diversity: needs at least 2 samples of some class")
    return {"per_class": per_class, "mean": float(np.mean(valid)), "n": int(len(f))}
