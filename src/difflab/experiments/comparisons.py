"""Sentences that compare two settings of a sweep paired, sample by sample.

Cells of a sweep share their noise, so two settings' samples come in pairs.
:func:`paired_correct` collects the per-sample correctness of two summary rows over the seeds
both have; :func:`compare_sentence` says whether their accuracies differ (the difference ± half
its paired bootstrap 95 % interval and McNemar's exact p, or that they cannot be told apart
with this many samples and about how many would be needed, :mod:`difflab.evaluation.stats`),
:func:`distance_sentence` the same of their Fréchet distance and KID (a paired bootstrap over
the sample indices). Every number in a sentence is taken from the input.
"""

from __future__ import annotations

import numpy as np

from difflab.evaluation.stats import PairedDistance, compare_paired


def pct(v: float) -> str:
    """Whole percent, or one decimal when rounding would hide the difference (99.5 % ≠ 100 %)."""
    return f"{v:.0%}" if abs(v * 100 - round(v * 100)) < 0.05 else f"{v:.1%}"


def setting(r: dict) -> tuple:
    return (r["sampler"], r["steps"], r["guidance"], r.get("checkpoint"))


def paired_correct(cells: list[dict] | None, a: dict, b: dict) -> tuple[list, list] | None:
    """The per-sample correctness of settings ``a`` and ``b`` (summary rows) over the seeds
    both have, in the same order; None when the cells did not keep it."""
    if not cells:
        return None
    by: dict[tuple, dict] = {}
    for c in cells:
        if c.get("correct"):
            by.setdefault(setting(c), {})[c["seed"]] = c["correct"]
    sa, sb = by.get(setting(a), {}), by.get(setting(b), {})
    seeds = sorted(set(sa) & set(sb))
    if not seeds or any(len(sa[s]) != len(sb[s]) for s in seeds):
        return None
    return [v for s in seeds for v in sa[s]], [v for s in seeds for v in sb[s]]


def compare_sentence(name_a: str, name_b: str, correct_a: list, correct_b: list) -> str:
    """Whether setting b's accuracy differs from a's, paired sample by sample."""
    p = compare_paired(correct_a, correct_b)
    d, half = 100 * p.difference, 100 * (p.interval[1] - p.interval[0]) / 2
    acc_a, acc_b = float(np.mean(correct_a)), float(np.mean(correct_b))
    if p.distinguishable:
        hi, lo = (name_b, name_a) if d > 0 else (name_a, name_b)
        return (
            f"{hi} beats {lo} in accuracy by {abs(d):.1f} ± {half:.1f} points "
            f"({pct(max(acc_a, acc_b))} against {pct(min(acc_a, acc_b))}; paired over {p.n} "
            f"samples, McNemar p = {p.p_value:.2g})"
        )
    text = (
        f"{name_a} and {name_b} cannot be told apart in accuracy with {p.n} samples "
        f"({pct(acc_a)} against {pct(acc_b)}, difference {d:+.1f} ± {half:.1f} points, "
        f"paired McNemar p = {p.p_value:.2g})"
    )
    if p.needed is None:
        return text + "; they agree on every sample"
    return (
        text + f"; about {p.needed} samples per cell would be needed to tell a difference this size"
    )


def distance_sentence(
    name_a: str, name_b: str, d: dict[str, PairedDistance] | None, short: bool = False
) -> str:
    """Whether setting b's Fréchet distance (and KID) differs from a's, paired sample by sample
    (:func:`difflab.evaluation.stats.compare_paired_distances`); "" without the comparison.
    ``short``: the two are named already (after :func:`compare_sentence`)."""
    if not d or "fd" not in d:
        return ""
    fd = d["fd"]
    half = (fd.interval[1] - fd.interval[0]) / 2
    kid = d.get("kid")
    kid_text = "" if kid is None else (
        f"; KID {kid.difference:+.4f} ± {(kid.interval[1] - kid.interval[0]) / 2:.4f}"
        + (", an interval that excludes 0" if kid.distinguishable else ", an interval that holds 0")
    )  # fmt: skip
    if fd.distinguishable:
        (lo, lo_v), (hi, hi_v) = sorted([(name_a, fd.a), (name_b, fd.b)], key=lambda t: t[1])
        return (
            f"{lo} has FD {abs(fd.difference):.2f} ± {half:.2f} lower than {hi} ({lo_v:.2f} "
            f"against {hi_v:.2f}; paired bootstrap over {fd.n} samples{kid_text})"
        )
    who = "in FD they" if short else f"{name_a} and {name_b}"
    text = (
        f"{who} cannot be told apart{'' if short else ' in FD'} with {fd.n} samples (FD difference "
        f"{fd.difference:+.2f} ± {half:.2f}, paired bootstrap{kid_text})"
    )
    if fd.needed is None:
        return text
    return text + f"; about {fd.needed} samples per cell would be needed to tell an FD difference this size"  # fmt: skip


def compare_both(name_a: str, name_b: str, pair, a: dict, b: dict, distances) -> str:
    """Accuracy (McNemar) and, when the folder kept features, FD compared paired."""
    said = compare_sentence(name_a, name_b, *pair)
    fd = distance_sentence(name_a, name_b, distances(a, b) if distances else None, short=True)
    return said + (f"; {fd}" if fd else "")
