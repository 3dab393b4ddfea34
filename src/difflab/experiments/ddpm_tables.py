"""The tables of a DDPM sweep: the columns of ``metrics.csv`` and ``summary.csv`` and the summary.

A cell record (:mod:`difflab.experiments.ddpm_sweep`) holds the cell's settings, its metrics
and their 95 % intervals; :func:`summarise` turns the records into one row per setting (mean ±
std over seeds, and intervals: a cell's own bootstrap for one seed, Student's t over seeds or
a pooled bootstrap of accuracy for several). The columns grow by one per optional axis the
sweep has (the guidance-shape axes beside guidance; the checkpoint axis adds ``checkpoint``,
the training step, and ``images_seen`` first), so a sweep without them keeps the columns it
always had.
"""

from __future__ import annotations

from typing import Any

from difflab.experiments import core

METRICS = ("accuracy", "fd", "kid", "diversity", "seconds")  # summarised as mean ± std
INTERVALS = ("accuracy", "fd", "kid", "diversity")  # with 95 % intervals (added last)
CI_COLUMNS = tuple(f"{m}_ci_{end}" for m in INTERVALS for end in ("low", "high"))
CSV_COLUMNS = (
    "sampler", "steps", "guidance", "seed", "n", "accuracy", "fd", "fd_ratio", "kid",
    "kid_std", "diversity", "seconds", "eval_seconds", *CI_COLUMNS,
)  # fmt: skip
SUMMARY_COLUMNS = (
    "sampler", "steps", "guidance", "seeds", *(f"{m}_{s}" for m in METRICS for s in ("mean", "std")),
    *CI_COLUMNS,
)  # fmt: skip
# The guidance-shape axes (difflab.ddpm.guidance): identity key -> the column of a cell's
# row. An identity holds such a key only when the axis is not plain.
SHAPE_AXES = {
    "guidance_intervals": "guidance_interval",
    "guidance_schedules": "guidance_schedule",
    "guidance_rescales": "guidance_rescale",
    "guidance_methods": "guidance_method",
}
SHAPE_FIELDS = tuple(SHAPE_AXES.values())  # of Cell, in the order of the tables' columns
CHECKPOINT_COLUMNS = ("checkpoint", "images_seen")  # the checkpoint axis (training step)


def shape_columns(identity: dict) -> tuple[str, ...]:
    return tuple(col for key, col in SHAPE_AXES.items() if key in identity)


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation across seeds (None for one seed) per sampler/steps/guidance
    (and guidance shape and checkpoint, when the sweep has those axes), with 95 % intervals: a cell's own
    bootstrap for one seed, Student's t over the seeds for several; accuracy's over several
    seeds is a bootstrap over all their samples together (each image has its own seed, so the
    seeds' samples are one larger sample)."""
    from difflab.evaluation.stats import bootstrap_interval

    shape = tuple(col for col in SHAPE_FIELDS if rows and col in rows[0])
    along = CHECKPOINT_COLUMNS if rows and "checkpoint" in rows[0] else ()
    keys = (*along, "sampler", "steps", *shape, "guidance")
    out = core.summarise(rows, keys, METRICS, intervals=INTERVALS)
    groups = core.group_rows(rows, keys)
    for entry, rs in zip(out, groups.values(), strict=True):
        if len(rs) > 1 and all(r.get("correct") for r in rs):
            pooled = [c for r in rs for c in r["correct"]]
            entry |= core.interval_columns({"accuracy": bootstrap_interval(pooled)})
    return out


def with_axes(columns: tuple[str, ...]):
    """``columns`` with a column per guidance-shape axis the sweep has (after guidance), and
    ``checkpoint`` and ``images_seen`` first when it has the checkpoint axis."""
    i = columns.index("guidance") + 1

    def of(identity: dict) -> tuple[str, ...]:
        along = CHECKPOINT_COLUMNS if "checkpoints" in identity else ()
        return (*along, *columns[:i], *shape_columns(identity), *columns[i:])

    return of


def about(rows: list[dict]) -> dict[str, Any]:
    first = rows[0] if rows else {}
    return {
        **{k: first.get(k) for k in ("fd_floor", "diversity_real", "judge_test_accuracy")},
        "note": "fd, kid and diversity are on the reference classifier's features; "
        "not comparable with Inception FID/KID",
    }
