"""Memorisation: how many samples are near-copies of training images.

Each sample's nearest training image is found in the judge's feature space (Euclidean
distance between penultimate features). What counts as "near" is set by real data the
model never saw: the nearest-training distances of held-out test images (at most
:data:`REFERENCE` of them, fixed seed). A sample closer to its nearest training image than
the ``quantile`` (default 1st percentile) of those distances is a near-copy; the copy rate
is the share of such samples. A model that draws new images has a copy rate near
``quantile`` (as many as the test images themselves); one that recalls its training set
has a rate near 1 (the test of Carlini et al. 2023, "Extracting training data from
diffusion models", in the spirit of their nearest-neighbour criterion, on the judge's
features instead of pixels).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from difflab.evaluation.distances import as_features

QUANTILE = 0.01
REFERENCE = 1000  # held-out test images that set the threshold
CHUNK = 512


def nearest(queries: Any, train: Any) -> tuple[np.ndarray, np.ndarray]:
    """(distance, index) of each query's nearest training feature, both (N,)."""
    q = torch.as_tensor(as_features(queries, "queries"))
    t = torch.as_tensor(as_features(train, "train features"))
    dist, index = [], []
    for i in range(0, len(q), CHUNK):
        d = torch.cdist(q[i : i + CHUNK], t)  # (chunk, M)
        v, j = d.min(1)
        dist.append(v)
        index.append(j)
    if not dist:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    return torch.cat(dist).numpy(), torch.cat(index).numpy().astype(np.int64)


def copy_rate(
    samples: Any, train: Any, test: Any, quantile: float = QUANTILE, seed: int = 0
) -> dict[str, Any]:
    """Share of ``samples`` (features, (N, D)) nearer to a ``train`` feature than the
    ``quantile`` of held-out ``test`` features' nearest-training distances.

    Returns ``copy_rate``, ``threshold``, ``quantile``, ``reference`` (test images used) and,
    per sample, ``nearest_distance`` and ``nearest_index`` (rows of ``train``).
    """
    test = as_features(test, "test features")
    if len(test) > REFERENCE:
        test = test[np.random.default_rng(seed).choice(len(test), REFERENCE, replace=False)]
    ref_dist, _ = nearest(test, train)
    threshold = float(np.quantile(ref_dist, quantile))
    dist, index = nearest(samples, train)
    return {
        "copy_rate": float((dist <= threshold).mean()) if len(dist) else 0.0,
        "threshold": threshold,
        "quantile": quantile,
        "reference": int(len(test)),
        "nearest_distance": dist,
        "nearest_index": index,
    }
