"""A run's own default guidance, chosen from its samples when training ends.

The guidance scale that serves a run best depends on how far it has trained. On the
``quick`` preset, one minute of training needs s = 3 to be recognised 99 % of the time, while
five minutes reach that at s = 1.5, where the Fréchet distance is less than half of what
s = 3 gives there (docs/benchmarks.md). A fixed default therefore under-guides short runs or
over-guides long ones. With ``train.choose_guidance`` (on in the ``quick`` preset) the
trainer looks for the lowest scale of :data:`SCALES` whose samples reach the conditional
accuracy ``train.guidance_target`` by the reference classifier, each scale guided only where
the noise level sigma lies in :data:`INTERVAL` (Kynkäänniemi et al. 2024). Accuracy rises with
s, so it bisects: four scales tried at most out of ten. The FD also rises with s past the
lowest scale that reaches the target, so that scale has the lowest FD of those that do.
When no scale reaches it, the most accurate one tried is taken.

The choice becomes the run's ``sample.guidance`` and ``sample.guidance_interval`` in
``config.json`` (what ``sample``, ``eval``, ``distill`` and the UI use by default; a
``--guidance`` given to them still wins), and every scale measured is written to
``guidance.json`` with its accuracy, FD and FD / floor. The samples are
``train.guidance_n_per_class`` per class, with the run's seed, sampler and steps, so the
same weights always make the same choice.
"""

from __future__ import annotations

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


def pick(rows: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """The row chosen among the measured ones: the lowest scale whose accuracy reaches
    ``target``, else the most accurate (the lower FD between equals)."""
    reached = [r for r in rows if r["accuracy"] >= target]
    if reached:
        return min(reached, key=lambda r: r["guidance"])
    return max(rows, key=lambda r: (r["accuracy"], -r["fd"]))


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
        images = sample_labels(model, ev.diffusion, self.labels, seed=ev.seed, progress=False,
                               autocast=ev.autocast, **settings)  # fmt: skip
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
        target, rows = self.cfg.train.guidance_target, []
        t0 = time.perf_counter()

        def reaches(scale: float) -> bool:
            rows.append(self.measure(model, scale))
            if on_row is not None:
                on_row(rows[-1])
            return rows[-1]["accuracy"] >= target

        bisect_scales(reaches)
        chosen = pick(rows, target)
        record = {
            "chosen": {"guidance": chosen["guidance"], "guidance_interval": list(INTERVAL)},
            "reached_target": chosen["accuracy"] >= target,
            "target_accuracy": target,
            "n": int(self.labels.numel()),
            "fd_floor": self.floor,
            "sampler": self.cfg.sample.sampler,
            "steps": self.cfg.sample.steps,
            "seed": self.cfg.train.seed,
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
    why = (
        f"the lowest that reaches {record['target_accuracy']:.0%}"
        if record["reached_target"]
        else f"the most accurate; none reached {record['target_accuracy']:.0%}"
    )
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
