"""A run's own default guidance, chosen from its samples when training ends.

The guidance scale that serves a run best depends on how far it has trained. On the
``quick`` preset, one minute of training needs s = 3 to be recognised 99 % of the time, while
five minutes reach that at s = 1.5, where the Fréchet distance is less than half of what
s = 3 gives there (docs/benchmarks.md). A fixed default therefore under-guides short runs or
over-guides long ones. With ``train.choose_guidance`` (on in the ``quick`` preset) the
trainer measures scales of :data:`SCALES` on the finished weights, each guided only where
the noise level sigma lies in :data:`INTERVAL` (Kynkäänniemi et al. 2024), against two
limits: the conditional accuracy ``train.guidance_target`` by the reference classifier, and
the FD / floor ``train.guidance_fd_target``. Accuracy rises with s and so does the FD, so:

1. a bisection finds the lowest scale that reaches the accuracy (four tries at most of ten);
   when none does, the most accurate one tried is taken;
2. if that scale's FD is past its limit too, no scale meets both, and it is kept: the lowest
   FD of the scales that reach the accuracy;
3. otherwise the scales above it are tried one by one until the *margin* shrinks: the
   smaller of the two distances inside the limits, each counted in its own sampling error
   (binomial for the accuracy; :data:`FD_RELATIVE_ERROR` of the FD). The lowest scale that
   reaches the accuracy is only just inside that limit, so a judge with other samples, or
   another classifier, would find it short about half the time; the scale of the widest
   margin lies as far inside both as the run allows.

The choice becomes the run's ``sample.guidance`` and ``sample.guidance_interval`` in
``config.json`` (what ``sample``, ``eval``, ``distill`` and the UI use by default; a
``--guidance`` given to them still wins), and every scale measured is written to
``guidance.json`` with its accuracy, FD, FD / floor and margin. The samples are
``train.guidance_n_per_class`` per class (100: as many as ``difflab eval``'s default, so the
FD / floor is on the same footing) with the run's sampler and steps. Their noise comes from
the run's seed plus :data:`SEED_OFFSET`, so they are never the samples an ``eval`` draws
with a seed anyone types, and the choice is not fitted to the measurement that reports it;
the same weights always make the same choice.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any

import torch

from difflab.config import SampleConfig
from difflab.ddpm.generate import sample_labels
from difflab.evaluation.distances import frechet_distance
from difflab.evaluation.metrics import conditional_accuracy, real_floor

SCALES = (1.25, 1.4, 1.5, 1.6, 1.75, 2.0, 2.25, 2.5, 3.0, 4.0)  # ascending: bisected
INTERVAL = (0.5, 1e6)  # sigma_lo, sigma_hi: guidance off below sigma = 0.5
SEED_OFFSET = 2**62  # the choice's samples: seed + this (mod 2^63), held out from any eval
# the sampling error of an FD of 1,000 samples, as a share of it: the half-width of the
# 95 % bootstrap interval of `difflab eval` on quick runs is 12-14 % of the FD (/ 1.96)
FD_RELATIVE_ERROR = 0.065
FD_ERROR_N = 1000  # ... at this many samples; it scales as 1 / sqrt(n)


def margin(row: dict[str, Any], target: float, fd_target: float, n: int) -> float:
    """How far ``row`` lies inside both limits: the smaller of (accuracy - target) and
    (fd_target - FD / floor), each in units of its sampling error with ``n`` samples
    (negative: outside one of them)."""
    acc_error = math.sqrt(max(target * (1 - target), 1e-4) / n)
    fd_error = FD_RELATIVE_ERROR * math.sqrt(FD_ERROR_N / n) * row["fd_ratio"]
    return min((row["accuracy"] - target) / acc_error,
               (fd_target - row["fd_ratio"]) / max(fd_error, 1e-12))  # fmt: skip


def pick(rows: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """The lowest scale among the measured rows whose accuracy reaches ``target``, else the
    most accurate (the lower FD between equals): step 1 of the choice."""
    reached = [r for r in rows if r["accuracy"] >= target]
    if reached:
        return min(reached, key=lambda r: r["guidance"])
    return max(rows, key=lambda r: (r["accuracy"], -r["fd"]))


def choice_seed(seed: int) -> int:
    """The seed of the choice's samples for a run of seed ``seed``."""
    return (seed + SEED_OFFSET) % 2**63


def bisect_scales(reaches, scales=SCALES) -> list[float]:
    """The scales a bisection tries, in order, to find the lowest of ``scales`` (ascending)
    for which ``reaches(scale)`` is true, assuming it is true from some scale on."""
    lo, hi, tried = 0, len(scales), []
    while lo < hi:
        mid = (lo + hi) // 2
        tried.append(scales[mid])
        if reaches(scales[mid]):
            hi = mid
        else:
            lo = mid + 1
    return tried


def search(measure, target: float, fd_target: float, scales=SCALES):
    """Steps 1-3 of the choice over ``scales`` (ascending); ``measure(scale)`` gives a row
    with its accuracy, FD / floor and margin, and is called once at most per scale. Returns
    the chosen row, the rows in the order measured, and whether step 3 moved up."""
    rows: dict[float, dict[str, Any]] = {}

    def row(scale: float) -> dict[str, Any]:
        if scale not in rows:
            rows[scale] = measure(scale)
        return rows[scale]

    bisect_scales(lambda scale: row(scale)["accuracy"] >= target, scales)
    chosen, widened = pick(list(rows.values()), target), False
    if chosen["accuracy"] >= target and chosen["fd_ratio"] <= fd_target:
        for scale in scales[scales.index(chosen["guidance"]) + 1 :]:
            if row(scale)["margin"] < chosen["margin"]:
                break  # past the widest: the FD's margin only shrinks from here
            if rows[scale]["margin"] > chosen["margin"]:  # on a tie, look further
                chosen, widened = rows[scale], True
    return chosen, list(rows.values()), widened


class GuidanceChooser:
    """Measures scales on one run's samples with a
    :class:`~difflab.evaluation.during_training.TrainingEvaluator`'s judge, data and settings."""

    def __init__(self, evaluator: Any) -> None:
        self.ev, self.cfg = evaluator, evaluator.cfg
        k = evaluator.judge.num_classes
        self.labels = torch.arange(k).repeat_interleave(self.cfg.train.guidance_n_per_class)
        n = min(len(self.labels), len(evaluator.train))
        self.floor = real_floor(evaluator.judge, evaluator.train, evaluator.test, n=n)

    def measure(self, model: torch.nn.Module, scale: float) -> dict[str, Any]:
        ev, t0 = self.ev, time.perf_counter()
        settings = {**ev.settings, "steps": self.cfg.sample.steps, "guidance": scale,
                    "guidance_interval": INTERVAL}  # fmt: skip
        images = sample_labels(model, ev.diffusion, self.labels, seed=choice_seed(ev.seed),
                               progress=False, autocast=ev.autocast, **settings)  # fmt: skip
        acc = conditional_accuracy(ev.judge, images, self.labels)["overall"]
        fd = frechet_distance(ev.judge.features(images), ev.test_features)
        return {
            "guidance": scale, "guidance_interval": list(INTERVAL), "accuracy": acc, "fd": fd,
            "fd_ratio": fd / self.floor if self.floor > 0 else float("inf"),
            "seconds": round(time.perf_counter() - t0, 2),
        }  # fmt: skip

    def choose(self, model: torch.nn.Module,
               on_row=None) -> tuple[SampleConfig, dict[str, Any]]:  # fmt: skip
        """The run's new sample settings and the record written to ``guidance.json``;
        ``on_row(row)`` sees each scale's measurement as it is made."""
        tc, n = self.cfg.train, int(self.labels.numel())
        target, fd_target = tc.guidance_target, tc.guidance_fd_target
        t0 = time.perf_counter()

        def measure(scale: float) -> dict[str, Any]:
            r = self.measure(model, scale)
            r["margin"] = round(margin(r, target, fd_target, n), 3)
            if on_row is not None:
                on_row(r)
            return r

        chosen, rows, widened = search(measure, target, fd_target)
        record = {
            "chosen": {"guidance": chosen["guidance"], "guidance_interval": list(INTERVAL)},
            "reached_target": chosen["accuracy"] >= target,
            "within_fd_target": chosen["fd_ratio"] <= fd_target,
            "widened": widened,
            "target_accuracy": target,
            "target_fd_ratio": fd_target,
            "n": n,
            "fd_floor": self.floor,
            "sampler": self.cfg.sample.sampler,
            "steps": self.cfg.sample.steps,
            "seed": choice_seed(self.cfg.train.seed),
            "rows": rows,
            "seconds": round(time.perf_counter() - t0, 2),
            "note": "accuracy and FD by the reference classifier; FD against the test split",
        }
        sample = replace(self.cfg.sample, guidance=chosen["guidance"], guidance_interval=INTERVAL)
        return sample, record


def describe(record: dict[str, Any]) -> str:
    """One line: the scale chosen, what it measured, and how."""
    c = next(r for r in record["rows"] if r["guidance"] == record["chosen"]["guidance"])
    lo, hi = record["chosen"]["guidance_interval"]
    acc, fd = f"{record['target_accuracy']:.0%}", f"{record.get('target_fd_ratio', 0):g}x"
    if not record["reached_target"]:
        why = f"the most accurate; none reached {acc}"
    elif record.get("within_fd_target"):
        why = f"the widest margin inside >= {acc} and <= {fd}"
    else:
        why = f"the lowest that reaches {acc}; none is also within {fd}"
    return (
        f"default guidance s = {c['guidance']:g} for sigma in [{lo:g}, {hi:g}] ({why}): "
        f"{c['accuracy']:.1%} recognised, FD {c['fd_ratio']:.2f}x the floor on {record['n']} "
        f"samples; {len(record['rows'])} scale(s) tried in {record['seconds']:.0f} s "
        f"(guidance.json)"
    )


def row_line(row: dict[str, Any]) -> str:
    """One scale's measurement, as the trainer shows it while choosing."""
    return (f"choosing guidance: s = {row['guidance']:g}: {row['accuracy']:.1%} recognised, "
            f"FD {row['fd_ratio']:.2f}x the floor ({row['seconds']:.1f} s)")  # fmt: skip
