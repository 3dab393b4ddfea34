"""Pictures of the diffusion processes: forward strips, reverse strips, animations, before/after.

The drawing half of ``difflab forward`` / ``difflab reverse``: these functions take images and
labels, never a run. :func:`forward_table` lays out ``x_t`` of real images, one column per
chosen ``t``; :func:`reverse_table` takes the steps of one sampling trajectory (anything with
``t``, ``x_t``, ``x0_pred`` and, on the last step, ``x_prev``, as
:class:`difflab.ddpm.sampling.Step` has) and shows ``x_t`` and the predicted ``x_0`` at the
chosen steps; :func:`reverse_frames` turns every step into an animation frame and
:func:`save_animation` writes them as GIF/MP4; :func:`before_after_table` sets two models'
samples side by side. Column headers give the signal level ``√ᾱ_t`` read from the schedule's
``alphas_cumprod`` (T,). ``t`` is the paper's: 0..T, ``x_0`` clean and ``x_T`` noise; paper
``t >= 1`` is the 0-based timestep index ``t - 1``. Loading runs and data and running the
sampler is :mod:`difflab.ddpm.processes`'s work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from difflab.figures.images import (
    Panel,
    Table,
    auto_scale,
    draw_table,
    save_gif,
    save_mp4,
    to_uint8,
)

MAX_FRAMES = 120  # animations of longer trajectories keep this many evenly spaced frames
ANIMATION_S = 6.0  # target length of one pass through an animation


def signal_level(alphas_cumprod: Any, t: int) -> float:
    """sqrt(alphas_cumprod) at paper t (1 at t = 0, the clean image)."""
    return 1.0 if t == 0 else math.sqrt(float(alphas_cumprod[t - 1]))


def column_label(alphas_cumprod: Any, t: int) -> str:
    return f"t = {t}\n√ᾱ = {signal_level(alphas_cumprod, t):.3f}"


def not_pure_noise_text(schedule: str, T: int, signal: float) -> str:
    """The warning under a figure whose x_T keeps ``signal`` (√ᾱ_T) of the image."""
    return (
        f"Warning: x_T is not pure noise. The {schedule} schedule with T = {T} "
        f"keeps √ᾱ = {signal:.3f} ({signal:.0%} of the image) at t = T."
    )


def _u8(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """(B, C, H, W) floats in [-1, 1] -> (B, H, W, C) uint8; uint8 arrays pass through."""
    return x if isinstance(x, np.ndarray) else to_uint8(x)


# -- forward process ------------------------------------------------------------------------
def forward_table(
    x_t: torch.Tensor,
    ts: Sequence[int],
    alphas_cumprod: Any,
    row_labels: Sequence[str],
    title: str,
    note: str | None = None,
) -> Table:
    """``x_t`` (N, K, C, H, W) in [-1, 1] of N images at the K paper ``ts``, one row per image."""
    n, k = x_t.shape[:2]
    tiles = to_uint8(x_t.flatten(0, 1)).reshape(n, k, *x_t.shape[3:], x_t.shape[2])
    return draw_table(
        [Panel(tiles, [column_label(alphas_cumprod, v) for v in ts])], row_labels=row_labels,
        title=title, note=note, scale=auto_scale(*tiles.shape[2:4]),
    )  # fmt: skip


# -- reverse process ------------------------------------------------------------------------
@dataclass(frozen=True)
class StepPictures:
    """What the figures keep of one sampling step: (B, H, W, C) uint8 images, not tensors."""

    t: int  # 0-based timestep index of x_t
    x_t: np.ndarray
    x0_pred: np.ndarray
    x_prev: np.ndarray | None  # the final sample on the last step (t_prev == -1), else None


def pictures(step: Any) -> StepPictures:
    """A light copy of a :class:`~difflab.ddpm.sampling.Step` (a whole trajectory fits in memory)."""
    last = getattr(step, "t_prev", -1) < 0
    return StepPictures(
        step.t, _u8(step.x_t), _u8(step.x0_pred), _u8(step.x_prev) if last else None
    )


def pick_steps(timesteps: Sequence[int], wanted: Sequence[int]) -> list[int | None]:
    """For each paper t the index of the step whose x_t is nearest (None: the final x_0)."""
    picks: list[int | None] = []
    for t in wanted:
        i = None if t == 0 else int(np.argmin([abs(s - (t - 1)) for s in timesteps]))
        if i not in picks:
            picks.append(i)
    return picks


def frame_indices(num_frames: int, limit: int = MAX_FRAMES) -> list[int]:
    """At most ``limit`` evenly spaced indices of 0..num_frames-1, always the first and last."""
    if num_frames <= limit:
        return list(range(num_frames))
    return sorted({int(round(v)) for v in np.linspace(0, num_frames - 1, limit)})


def reverse_table(
    steps: Sequence[Any],
    ts: Sequence[int],
    alphas_cumprod: Any,
    row_labels: Sequence[str],
    title: str,
    note: str | None = None,
) -> tuple[Table, list[int]]:
    """x_t (left) and predicted x_0 (right) of one trajectory at the paper ``ts``, t descending.

    A trajectory that skips steps shows the step whose x_t is nearest each wanted t and
    titles the column with that step's t; returns the table and the t values drawn.
    """
    timesteps = [s.t for s in steps]
    final = _u8(steps[-1].x_prev)
    picks = pick_steps(timesteps, ts)
    shown = [0 if i is None else timesteps[i] + 1 for i in picks]  # paper t actually drawn
    # (B, K, H, W, C): one column per picked step
    left = np.stack([final if i is None else _u8(steps[i].x_t) for i in picks], 1)
    right = np.stack([final if i is None else _u8(steps[i].x0_pred) for i in picks], 1)
    labels = [column_label(alphas_cumprod, v) for v in shown]
    table = draw_table(
        [Panel(left, labels, "xₜ: the sample being denoised"),
         Panel(right, labels, "predicted x₀ at each step")],
        row_labels=row_labels, title=title, note=note, scale=auto_scale(*left.shape[2:4]),
    )  # fmt: skip
    return table, shown


def reverse_frames(
    steps: Sequence[Any], alphas_cumprod: Any, names: Sequence[str]
) -> list[Image.Image]:
    """x_t above predicted x_0 for every step (thinned to MAX_FRAMES), then the final sample."""
    n = len(steps)
    final = _u8(steps[-1].x_prev)
    frames = []
    for i in frame_indices(n + 1):
        if i == n:
            frames.append(_frame(final, final, names, "t = 0   (final sample)"))
            continue
        t = steps[i].t + 1
        caption = f"t = {t}   (step {i + 1} of {n}, √ᾱ = {signal_level(alphas_cumprod, t):.3f})"
        frames.append(_frame(_u8(steps[i].x_t), _u8(steps[i].x0_pred), names, caption))
    return frames


def _frame(x_t: np.ndarray, x0: np.ndarray, names: Sequence[str], caption: str) -> Image.Image:
    """One animation frame: (B, H, W, C) x_t above predicted x_0, one column per class."""
    tiles = np.stack([x_t, x0], 0)  # (2, B, H, W, C)
    scale = auto_scale(*x_t.shape[1:3], target=56)
    return draw_table(
        [Panel(tiles, list(names))], row_labels=["xₜ", "predicted x₀"], title=caption, scale=scale
    ).image


def save_animation(
    frames: Sequence[Image.Image], gif: Path | None = None, mp4: Path | None = None
) -> list[Path]:
    """Write ``frames`` as a GIF and/or MP4 lasting about :data:`ANIMATION_S`; the last holds."""
    ms = int(min(400, max(40, 1000 * ANIMATION_S / len(frames))))
    written = []
    if gif is not None:
        save_gif(gif, frames, [ms] * (len(frames) - 1) + [2000])
        written.append(gif)
    if mp4 is not None:
        save_mp4(mp4, frames, fps=1000 / ms)
        written.append(mp4)
    return written


# -- before and after -----------------------------------------------------------------------
def before_after_table(
    before: np.ndarray,
    after: np.ndarray,
    row_labels: Sequence[str],
    titles: tuple[str, str],
    title: str,
    note: str | None = None,
) -> Table:
    """Two (R, K, H, W, C) uint8 sets side by side, one row per class: ``titles`` above each."""
    panels = [Panel(before, title=titles[0]), Panel(after, title=titles[1])]
    h, w = after.shape[2:4]
    return draw_table(panels, row_labels=row_labels, title=title, note=note, scale=auto_scale(h, w))
