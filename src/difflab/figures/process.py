"""The lab's figures of the diffusion processes: forward strips, reverse strips and animations.

:func:`forward_figure` noises real images with a run's schedule (or the default one) and shows
one column per chosen ``t``; :func:`reverse_figure` runs the one sampling generator
(:func:`difflab.ddpm.sampling.sample_steps`) once and shows, per class, ``x_t`` and the model's
predicted ``x_0`` at the chosen steps, plus every step of the same trajectory as a GIF/MP4.
``t`` is the paper's: 0..T, ``x_0`` clean and ``x_T`` noise; paper ``t >= 1`` is the 0-based
timestep index ``t - 1``. Loss and schedule plots live in :mod:`difflab.figures.runs`. Every builder
checks all of its input before any work, and writes files atomically with their settings.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from difflab.checks import t_values
from difflab.config import DiffusionConfig, RunConfig
from difflab.ddpm.data import load_dataset
from difflab.ddpm.diffusion import SIGNAL_WARN_LEVEL, GaussianDiffusion
from difflab.ddpm.generate import check_out_path
from difflab.ddpm.runs import CONFIG, check_run_dir, load_run
from difflab.ddpm.sampling import sample_steps
from difflab.errors import UsageError
from difflab.figures.images import (
    Panel,
    Table,
    auto_scale,
    draw_table,
    save_gif,
    save_mp4,
    save_png,
    to_uint8,
)
from difflab.options import ForwardOptions, ReverseOptions

MAX_FRAMES = 120  # animations of longer trajectories keep this many evenly spaced frames
ANIMATION_S = 6.0  # target length of one pass through an animation


@dataclass
class FigureResult:
    path: Path
    settings: dict
    t: list[int]  # the paper t of each column, as drawn
    table: Table
    extra: list[Path] = field(default_factory=list)  # GIF / MP4 written beside the PNG
    frames: int = 0


def signal_level(diffusion: GaussianDiffusion, t: int) -> float:
    """sqrt(alphas_cumprod) at paper t (1 at t = 0, the clean image)."""
    return 1.0 if t == 0 else math.sqrt(float(diffusion.alphas_cumprod[t - 1]))


def column_label(diffusion: GaussianDiffusion, t: int) -> str:
    return f"t = {t}\n√ᾱ = {signal_level(diffusion, t):.3f}"


def not_pure_noise_note(diffusion: GaussianDiffusion) -> str | None:
    s = diffusion.signal_at_T
    if s <= SIGNAL_WARN_LEVEL:
        return None
    c = diffusion.cfg
    return (
        f"Warning: x_T is not pure noise. The {c.schedule} schedule with T = {c.timesteps} "
        f"keeps √ᾱ = {s:.3f} ({s:.0%} of the image) at t = T."
    )


# -- forward process ------------------------------------------------------------------------
def forward_process(
    diffusion: GaussianDiffusion, x0: torch.Tensor, ts: Sequence[int], noise: torch.Tensor
) -> torch.Tensor:
    """x_t for every paper t in ``ts`` with the same noise: (N, C, H, W) -> (N, len(ts), C, H, W)."""
    cols = []
    for t in ts:
        if t == 0:
            cols.append(x0)
        else:  # eq. 4 at 0-based index t - 1
            idx = torch.full((x0.shape[0],), t - 1, dtype=torch.long)
            cols.append(diffusion.q_sample(x0, idx, noise))
    return torch.stack(cols, 1)


def forward_figure(opts: ForwardOptions, out: str | Path) -> FigureResult:
    """``difflab forward``: real images noised with the run's (or the default) schedule.

    Rows are ``per_class`` images of every class (picked with ``seed``); columns are the
    chosen ``t`` in increasing order, titled with ``t`` and the signal level ``√ᾱ_t``. One
    noise draw per image is shared by all columns, so a row shows one image dissolving.
    """
    out = check_out_path(out, (".png",))
    run, dataset, data_dir, per_class, seed = (
        opts.run, opts.dataset, opts.data_dir, opts.per_class, opts.seed
    )  # fmt: skip
    if run is not None:
        cfg = RunConfig.load(check_run_dir(run, need_weights=False) / CONFIG)
        dcfg = cfg.diffusion
        dataset = dataset or cfg.train.dataset
        data_dir = data_dir or cfg.train.data_dir
    else:
        dcfg, dataset = DiffusionConfig(), dataset or "mnist5k"
    diffusion = GaussianDiffusion(dcfg, warn=False)
    ts = sorted(set(t_values(opts.t, diffusion.num_timesteps)))
    data = load_dataset(dataset, "train", data_dir)

    gen = torch.Generator().manual_seed(seed)
    idx, names = [], []
    for c, name in enumerate(data.class_names):
        members = (data.labels == c).nonzero().flatten()
        pick = members[torch.randperm(len(members), generator=gen)[:per_class]]
        idx += pick.tolist()
        names += [name] * len(pick)
    x0 = data.to_float(torch.tensor(idx))  # (N, C, H, W) in [-1, 1]
    noise = torch.randn(x0.shape, generator=gen)
    xt = forward_process(diffusion, x0, ts, noise)  # (N, K, C, H, W)

    n, k = xt.shape[:2]
    tiles = to_uint8(xt.flatten(0, 1)).reshape(n, k, *xt.shape[3:], xt.shape[2])
    title = f"Forward process q(xₜ | x₀)\n{data.name}, {dcfg.schedule} schedule, T = {dcfg.timesteps}, seed {seed}"
    table = draw_table(
        [Panel(tiles, [column_label(diffusion, v) for v in ts])], row_labels=names, title=title,
        note=not_pure_noise_note(diffusion), scale=auto_scale(*x0.shape[2:]),
    )  # fmt: skip
    settings = {
        "figure": "forward", "dataset": data.name, "run": None if run is None else str(run), "t": ts,
        "per_class": per_class, "seed": seed, "images": idx, "schedule": dcfg.schedule, "T": dcfg.timesteps,
    }  # fmt: skip
    save_png(out, table.image, settings)
    return FigureResult(out, settings, ts, table)


# -- reverse process ------------------------------------------------------------------------
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


def reverse_figure(
    run: str | Path,
    opts: ReverseOptions,
    out: str | Path,
    gif: str | Path | None = None,
    mp4: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
    trust_pickle: bool = False,
) -> FigureResult:
    """``difflab reverse``: one trajectory per class, as x_t and predicted x_0 at chosen t.

    The default (:class:`~difflab.options.ReverseOptions`) is DDPM with all T steps, so every
    requested t is exact; a sampler that skips steps shows the step whose x_t is nearest and
    titles the column with that step's t. The animation has one frame per step (its x_t and
    predicted x_0) plus a last frame with the final sample: ``steps + 1`` frames, evenly
    thinned to at most :data:`MAX_FRAMES` (always keeping the first and the last).
    """
    out = check_out_path(out, (".png",))
    gif = None if gif is None else check_out_path(gif, (".gif",), option="--gif")
    mp4 = None if mp4 is None else check_out_path(mp4, (".mp4",), option="--mp4")
    if mp4 is not None:
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise UsageError(
                f"--mp4 {mp4}: needs the imageio-ffmpeg package (or use --gif)"
            ) from None
    model, diffusion, cfg = load_run(run, device=device, trust_pickle=trust_pickle)
    opts = opts.for_run(cfg)
    sampler, steps, guidance, eta, seed = (
        opts.sampler,
        opts.steps,
        opts.guidance,
        opts.eta,
        opts.seed,
    )
    ts = sorted(set(t_values(opts.t, diffusion.num_timesteps)), reverse=True)
    cls = list(opts.classes)
    known = cfg.model.class_names
    names = [known[c] if c < len(known) else str(c) for c in cls]

    x_t, x0_pred, timesteps = [], [], []  # per step: (B, H, W, C) uint8
    bar = tqdm(total=steps, desc="reverse", unit="step", disable=not progress, file=sys.stderr)
    for step in sample_steps(
        model, diffusion, torch.tensor(cls), guidance=guidance, steps=steps, sampler=sampler,
        eta=eta, spacing=cfg.sample.spacing, seed=seed,
    ):  # fmt: skip
        x_t.append(to_uint8(step.x_t))
        x0_pred.append(to_uint8(step.x0_pred))
        timesteps.append(step.t)
        final = step.x_prev
        bar.update(1)
    bar.close()
    final = to_uint8(final)

    picks = pick_steps(timesteps, ts)
    shown = [0 if i is None else timesteps[i] + 1 for i in picks]  # paper t actually drawn
    left = np.stack([final if i is None else x_t[i] for i in picks], 1)  # (B, K, H, W, C)
    right = np.stack([final if i is None else x0_pred[i] for i in picks], 1)
    labels = [column_label(diffusion, v) for v in shown]
    how = f"{sampler}, {steps} steps, guidance s = {guidance:g}, seed {seed}"
    scale = auto_scale(*left.shape[2:4])
    table = draw_table(
        [Panel(left, labels, "xₜ: the sample being denoised"),
         Panel(right, labels, "predicted x₀ at each step")],
        row_labels=names, title=f"Reverse process p(xₜ₋₁ | xₜ)\n{how}",
        note=not_pure_noise_note(diffusion), scale=scale,
    )  # fmt: skip
    settings = {
        "figure": "reverse", "run": str(run), "t": shown, "classes": cls, "seed": seed,
        "guidance": guidance, "sampler": sampler, "steps": steps, "eta": eta, "spacing": cfg.sample.spacing,
    }  # fmt: skip
    result = FigureResult(out, settings, shown, table)
    if gif is not None or mp4 is not None:
        frames = _animation_frames(diffusion, x_t, x0_pred, timesteps, final, names)
        ms = int(min(400, max(40, 1000 * ANIMATION_S / len(frames))))
        if gif is not None:
            save_gif(gif, frames, [ms] * (len(frames) - 1) + [2000])
            result.extra.append(gif)
        if mp4 is not None:
            save_mp4(mp4, frames, fps=1000 / ms)
            result.extra.append(mp4)
        result.frames = len(frames)
        settings["frames"] = len(frames)
    save_png(out, table.image, settings)
    return result


def _animation_frames(diffusion, x_t, x0_pred, timesteps, final, names) -> list:
    """x_t above predicted x_0 for every step (thinned to MAX_FRAMES), then the final sample."""
    n = len(timesteps)
    frames = []
    for i in frame_indices(n + 1):
        if i == n:
            frames.append(_frame(final, final, names, "t = 0   (final sample)"))
            continue
        t = timesteps[i] + 1
        caption = f"t = {t}   (step {i + 1} of {n}, √ᾱ = {signal_level(diffusion, t):.3f})"
        frames.append(_frame(x_t[i], x0_pred[i], names, caption))
    return frames


def _frame(x_t: np.ndarray, x0: np.ndarray, names: Sequence[str], caption: str):
    """One animation frame: (B, H, W, C) x_t above predicted x_0, one column per class."""
    tiles = np.stack([x_t, x0], 0)  # (2, B, H, W, C)
    scale = auto_scale(*x_t.shape[1:3], target=56)
    return draw_table(
        [Panel(tiles, list(names))], row_labels=["xₜ", "predicted x₀"], title=caption, scale=scale
    ).image


def before_after_samples(
    run: Path, n_per_class: int = 3, seed: int = 0, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray, RunConfig, str]:
    """(before, after) uint8 samples (N, H, W, C) of the source run and of ``run``.

    Both use ``run``'s sampler, steps and guidance and the same seed and batch, so the same
    initial noise: each pair differs only by the weights. Classes the source run did not
    have are blank (white) in ``before``.
    """
    from difflab.ddpm.generate import sample_labels

    run = check_run_dir(run)
    cfg = RunConfig.load(run / CONFIG)
    source = cfg.train.init_from
    if not source:
        raise UsageError(f"{run}: was not started from another run (no train.init_from)")
    after_model, diffusion, cfg = load_run(run, device=device)
    before_model, before_diffusion, before_cfg = load_run(source, device=device)
    sc, k_new, k_old = cfg.sample, cfg.model.num_classes, before_cfg.model.num_classes
    labels = torch.arange(k_new).repeat_interleave(n_per_class)
    kw = dict(guidance=sc.guidance, steps=sc.steps, sampler=sc.sampler, seed=seed, eta=sc.eta,
              spacing=sc.spacing, progress=False)  # fmt: skip
    after = to_uint8(sample_labels(after_model, diffusion, labels, **kw))
    known = (labels < k_old).numpy()
    before = np.full_like(after, 255)
    if known.any():
        x = sample_labels(before_model, before_diffusion, labels.clamp(max=k_old - 1), **kw)
        before[known] = to_uint8(x)[known]
    return before, after, cfg, str(source)


def before_after_figure(
    run: str | Path, out: str | Path, n_per_class: int = 3, seed: int = 0, device: str = "cpu"
) -> Path:
    """One row per class: the source run's samples on the left, ``run``'s on the right."""
    run = Path(run)
    before, after, cfg, source = before_after_samples(run, n_per_class, seed, device)
    sc, k_new = cfg.sample, cfg.model.num_classes
    shape = (k_new, n_per_class, *after.shape[1:])
    names = list(cfg.model.class_names) or [str(c) for c in range(k_new)]
    h, w = after.shape[1:3]
    panels = [
        Panel(before.reshape(shape), title=f"before: {Path(source).name}"),
        Panel(after.reshape(shape), title=f"after: {run.name}"),
    ]
    table = draw_table(
        panels, row_labels=[names[c] if c < len(names) else str(c) for c in range(k_new)],
        title=f"{run.name}: before and after fine-tuning on {cfg.train.dataset}",
        note=f"{sc.sampler}, {sc.steps} steps, guidance {sc.guidance:g}, seed {seed}; same noise left and right",
        scale=auto_scale(h, w),
    )  # fmt: skip
    out = Path(out)
    save_png(out, table.image, {"run": str(run), "init_from": source, "seed": seed})
    return out
