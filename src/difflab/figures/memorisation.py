"""The memorisation figure: samples beside their nearest training images.

Two columns per row, the sample and the training image nearest to it in the judge's
features, for the samples nearest to the training set first; each row is labelled with the
distance, marked "copy" when it is below the near-copy threshold. The data work (features,
nearest neighbours, the threshold) is :mod:`difflab.evaluation.memorisation`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from difflab.figures.images import Panel, Table, auto_scale, draw_table

ROWS = 8


def nearest_train_figure(
    samples: np.ndarray, neighbours: np.ndarray, distances: Sequence[float],
    threshold: float, copy_rate: float, names: Sequence[str] | None = None, quantile: float = 0.01,
) -> Table:  # fmt: skip
    """``samples`` and their ``neighbours`` as (R, H, W, C) uint8, one row each."""
    images = np.stack([samples, neighbours], axis=1)  # (R, 2, H, W, C)
    labels = [
        (f"{names[i]}\n" if names else "") + f"d = {d:.2f}" + (" copy" if d <= threshold else "")
        for i, d in enumerate(distances)
    ]
    h, w = images.shape[2:4]
    return draw_table(
        [Panel(images, ["sample", "nearest\ntraining image"])],
        row_labels=labels,
        title=f"Samples nearest to the training set\nnear-copies: {copy_rate:.1%} of the samples",
        note=f"distance in the judge's features; near-copy: d <= {threshold:.2f} "
        f"({quantile:.0%} quantile of held-out test images' nearest-training distances)",
        scale=auto_scale(h, w),
    )
