"""Sampling from a run folder into files: labelled PNG grids or ``.npz`` arrays.

:func:`sample_run` takes a :class:`~difflab.options.SampleOptions` (checked when it was
built; here only against the run). It loads a run once, draws ``n_per_class`` samples for
each requested class through the one
sampling generator (in batches, with progress), and writes a grid PNG carrying its settings
or an ``.npz`` with ``images`` (uint8, N x H x W x C) and ``labels`` (int64, N).
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from difflab.checks import grid_axes
from difflab.ddpm.runs import load_run
from difflab.ddpm.sampling import Step, sample_steps
from difflab.devices import resolve_precision
from difflab.errors import UsageError
from difflab.figures.images import Panel, draw_table, save_png, to_uint8
from difflab.files import atomic_path
from difflab.options import SampleOptions
from difflab.seeds import indices_within_class


@dataclass
class SampleResult:
    images: torch.Tensor  # (N, C, H, W) in [-1, 1]
    labels: torch.Tensor  # (N,)
    seconds: float
    settings: dict


def check_out_path(out: str | Path, suffixes: tuple[str, ...], option: str = "--out") -> Path:
    out = Path(out)
    if out.suffix.lower() not in suffixes:
        raise UsageError(f"{option} {out}: must end in {' or '.join(suffixes)}")
    if not out.parent.is_dir():
        raise UsageError(f"{option} {out}: folder {out.parent} does not exist")
    if out.exists() and not out.is_file():
        raise UsageError(f"{option} {out}: is a folder, not a file")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {out}: folder {out.parent} is not writable")
    return out


def sample_labels(
    model,
    diffusion,
    labels: torch.Tensor,
    *,
    guidance: float,
    steps: int,
    sampler: str,
    seed: int,
    eta: float = 0.0,
    spacing: str = "trailing",
    batch_size: int = 500,
    progress: bool = True,
    autocast: str | None = None,
    on_step: Callable[[Step], None] | None = None,
    **shape,
) -> torch.Tensor:
    """Samples (B, C, H, W) in [-1, 1] for ``labels``, in batches of at most ``batch_size``.

    Image i's noise comes from (``seed``, ``labels[i]``, its index within its class in
    ``labels``) by the seeding rule (:mod:`difflab.seeds`), so it does not depend on the
    batch size, on how many images are asked for or on the other classes.
    ``on_step(step)`` sees every step of every batch (live previews, cancelling by raising).
    ``shape`` holds :func:`~difflab.ddpm.sampling.sample_steps`'s
    ``guidance_interval``, ``guidance_schedule``, ``guidance_rescale`` and ``guidance_method``.
    """
    out = []
    indices = indices_within_class(labels)
    chunks = list(zip(labels.split(batch_size), indices.split(batch_size), strict=True))
    bar = tqdm(
        total=len(chunks) * steps, desc="sample", unit="step", disable=not progress, file=sys.stderr
    )
    for chunk, chunk_indices in chunks:
        x = None
        for step in sample_steps(
            model, diffusion, chunk, guidance=guidance, steps=steps, sampler=sampler, eta=eta,
            spacing=spacing, seed=seed, indices=chunk_indices, autocast=autocast, **shape,
        ):  # fmt: skip
            x = step.x_prev
            bar.update(1)
            if on_step is not None:
                on_step(step)
        out.append(x.clamp(-1, 1).cpu())
    bar.close()
    return torch.cat(out)


def sample_run(
    run: str | Path,
    opts: SampleOptions,
    out: str | Path,
    device: str = "cpu",
    progress: bool = True,
    trust_pickle: bool = False,
    on_step: Callable[[Step], None] | None = None,
) -> SampleResult:
    """``difflab sample``: sample ``opts`` from ``run`` and write ``out`` (.png grid or .npz).

    Several guidance or steps values make a PNG grid whose rows and columns are any two of
    class, sample, guidance and steps (class and sample, when not shown and several, repeat
    the rows). Every cell of a row starts from the same noise (the seeding rule gives an
    image the same x_T whatever the guidance or steps), so cells differ only by the swept
    option.
    """
    out = check_out_path(out, (".png", ".npz"))
    if out.suffix.lower() == ".npz" and (len(opts.guidance or ()) > 1 or len(opts.steps or ()) > 1):
        raise UsageError(
            f"--out {out}: several --guidance/--steps values make a grid; write a .png"
        )
    autocast = resolve_precision(opts.precision, device)
    model, diffusion, cfg = load_run(run, device=device, trust_pickle=trust_pickle)
    opts = opts.for_run(cfg)
    sc, cls, n_per_class = cfg.sample, list(opts.classes), opts.n_per_class
    g_list, s_list = list(opts.guidance), list(opts.steps)
    sizes = {
        "guidance": len(g_list),
        "steps": len(s_list),
        "class": len(cls),
        "sample": n_per_class,
    }
    row_axes, col_axis = grid_axes(opts.rows, opts.cols, sizes)
    labels = torch.tensor(cls).repeat_interleave(n_per_class)
    t0 = time.perf_counter()
    cells = {}  # (guidance index, steps index) -> (N, C, H, W); the same labels, so the same x_T
    for (gi, g), (si, st) in itertools.product(enumerate(g_list), enumerate(s_list)):
        cells[gi, si] = sample_labels(
            model, diffusion, labels, guidance=g, steps=st, sampler=opts.sampler, eta=opts.eta,
            spacing=sc.spacing, seed=opts.seed, progress=progress, on_step=on_step,
            autocast=autocast, **guidance_shape(opts),
        )  # fmt: skip
    seconds = time.perf_counter() - t0
    one = lambda v: v[0] if len(v) == 1 else v  # noqa: E731
    settings = {
        "run": str(run), "classes": cls, "n_per_class": n_per_class, "guidance": one(g_list),
        "steps": one(s_list), "sampler": opts.sampler, "eta": opts.eta, "seed": opts.seed,
        "spacing": sc.spacing,
    }  # fmt: skip
    settings.update(guidance_shape(opts, only_set=True))
    if autocast:
        settings["precision"] = autocast
    images = torch.cat(list(cells.values()))
    all_labels = labels.repeat(len(cells))
    if out.suffix.lower() == ".npz":
        save_npz(out, images, all_labels)
    else:
        settings.update(rows=row_axes[0], cols=col_axis)
        known = cfg.model.class_names
        names = [known[c] if c < len(known) else str(c) for c in cls]
        values = {
            "class": names,
            "sample": list(range(n_per_class)),
            "guidance": g_list,
            "steps": s_list,
        }
        grid = sample_grid(cells, values, row_axes, col_axis, opts.sampler, opts.seed)
        save_png(out, grid, settings)
    return SampleResult(images, all_labels, seconds, settings)


def guidance_shape(opts, only_set: bool = False) -> dict:
    """The guidance interval, schedule, rescale and method of resolved options (``for_run``),
    as the keyword arguments of :func:`sample_labels`; ``only_set``: only those not at their
    default (the settings written into a PNG, unchanged for plain guidance)."""
    shape = {
        "guidance_interval": opts.guidance_interval, "guidance_schedule": opts.guidance_schedule,
        "guidance_rescale": opts.guidance_rescale, "guidance_method": opts.guidance_method,
    }  # fmt: skip
    if only_set:
        plain = {
            "guidance_interval": None,
            "guidance_schedule": "constant",
            "guidance_rescale": 0.0,
            "guidance_method": "cfg",
        }
        shape = {k: v for k, v in shape.items() if v != plain[k]}
    return shape


def save_npz(
    out: str | Path, images: torch.Tensor, labels: torch.Tensor, **arrays: np.ndarray
) -> None:
    """``images`` uint8 (N, H, W, C) and ``labels`` int64 (N,) (and ``arrays`` by their
    names), written atomically."""
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f, images=to_uint8(images), labels=labels.numpy().astype(np.int64), **arrays
            )


def sample_grid(
    cells: dict[tuple[int, int], torch.Tensor],
    values: dict[str, list],
    row_axes: list[str],
    col_axis: str,
    sampler: str,
    seed: int,
):
    """Lay out ``cells[guidance index, steps index]`` (class-major, then sample) as a grid."""
    label = {
        "class": str, "sample": lambda k: f"#{k + 1}", "guidance": lambda g: f"s = {g:g}",
        "steps": lambda n: f"{n} steps",
    }  # fmt: skip
    arrays = {key: to_uint8(v) for key, v in cells.items()}
    per_class = len(values["sample"])
    tiles, row_labels = [], []
    for r in itertools.product(*(range(len(values[a])) for a in row_axes)):
        at = dict(zip(row_axes, r, strict=True))
        shown = [a for a in row_axes if a != "sample" or a == row_axes[0]]  # no "#k" on repeats
        row_labels.append(" ".join(label[a](values[a][at[a]]) for a in shown))
        for c in range(len(values[col_axis])):
            at[col_axis] = c
            item = at.get("class", 0) * per_class + at.get("sample", 0)
            tiles.append(arrays[at.get("guidance", 0), at.get("steps", 0)][item])
    col_labels = None if col_axis == "sample" else [label[col_axis](v) for v in values[col_axis]]
    fixed = {
        "steps": f"{values['steps'][0]} steps",
        "guidance": f"guidance {values['guidance'][0]:g}",
    }
    fixed = [text for axis, text in fixed.items() if axis not in (row_axes[0], col_axis)]
    title = ", ".join([sampler, *fixed, f"seed {seed}"])
    if (row_axes[0], col_axis) != ("class", "sample"):
        words = {"guidance": "guidance scale s", "steps": "sampling steps"}
        title += f"\nrows: {words.get(row_axes[0], row_axes[0])}, columns: {words.get(col_axis, col_axis)}"
    tiles = np.stack(tiles)  # (R * K, H, W, C), row by row
    h, w = tiles.shape[1:3]
    panel = Panel(tiles.reshape(len(row_labels), -1, *tiles.shape[1:]), col_labels or ())
    return draw_table(
        [panel], row_labels=row_labels, title=title, scale=max(1, 64 // max(h, w))
    ).image
