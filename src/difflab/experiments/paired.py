"""What a sweep folder keeps so that two of its cells can be compared sample by sample.

Cells of a sweep share their noise (:mod:`difflab.seeds`), so sample i of one cell and sample
i of another differ only by the swept setting. Accuracy is compared from the records' per-sample
correctness (McNemar, :mod:`difflab.experiments.conclusions`); the Fréchet distance and KID
need the judge features of every sample, which each cell's ``cells/KEY.npz`` holds beside its
images (``features``, (N, D) float32), and the real features the distances are taken to, kept
once per folder in ``reference.npz`` (their mean and covariance in float64 for the FD, and a
fixed subset of at most 2,000 real features for KID). :func:`distance_comparer` gives the
report a function that compares two summary rows with
:func:`difflab.evaluation.stats.compare_paired_distances` over the seeds both have.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from difflab.evaluation.stats import (
    PairedDistance,
    compare_paired_distances,
    gaussian,
    reference_for_kid,
)
from difflab.files import atomic_path

REFERENCE_FILE = "reference.npz"
SETTING = ("sampler", "steps", "guidance", "checkpoint")  # what tells two summary rows apart


def write_reference(out: Path, real_features: Any) -> None:
    """``reference.npz`` of the folder ``out`` from the judge's real test features (once)."""
    path = Path(out) / REFERENCE_FILE
    if path.is_file():
        return
    f = np.asarray(real_features, dtype=np.float64)
    mu, cov = gaussian(f)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, mu=mu, cov=cov, kid=reference_for_kid(f).astype(np.float32))


def _setting(r: dict) -> tuple:
    return tuple(r.get(k) for k in SETTING)


def distance_comparer(
    out: Path, cells: list[dict]
) -> Callable[[dict, dict], dict[str, PairedDistance] | None]:
    """``compare(a, b)``: FD and KID of summary row b minus a, paired over their common seeds;
    None when the folder kept no features (a sweep made before they were kept)."""
    out = Path(out)
    ref_path = out / REFERENCE_FILE
    by: dict[tuple, dict[int, str]] = {}
    for c in cells or []:
        if c.get("key") is not None:
            by.setdefault(_setting(c), {})[c.get("seed")] = c["key"]

    def features(key: str) -> tuple[np.ndarray, np.ndarray] | None:
        path = out / "cells" / f"{key}.npz"
        if not path.is_file():
            return None
        with np.load(path) as z:
            return (z["features"], z["labels"]) if "features" in z.files else None

    def compare(a: dict, b: dict) -> dict[str, PairedDistance] | None:
        if not ref_path.is_file():
            return None
        sa, sb = by.get(_setting(a), {}), by.get(_setting(b), {})
        parts = [(features(sa[s]), features(sb[s])) for s in sorted(set(sa) & set(sb))]
        if not parts or any(
            fa is None or fb is None or fa[0].shape != fb[0].shape for fa, fb in parts
        ):
            return None
        fa = np.concatenate([p[0][0] for p in parts])
        fb = np.concatenate([p[1][0] for p in parts])
        # classes of different seeds are resampled apart: (seed index, class) as the stratum
        labels = np.concatenate([p[0][1] + i * 1_000_000 for i, p in enumerate(parts)])
        with np.load(ref_path) as z:
            ref, kid = (z["mu"], z["cov"]), z["kid"]
        return compare_paired_distances(fa, fb, labels, ref, kid)

    return compare
