"""Sampling from a run folder into files: labelled PNG grids or ``.npz`` arrays.

Loads a run once, draws ``n_per_class`` samples for each requested class through the one
sampling generator (in batches, with progress), and writes a grid PNG carrying its settings
or an ``.npz`` with ``images`` (uint8, N x H x W x C) and ``labels`` (int64, N).
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from difflab.ddpm.runs import load_run
from difflab.ddpm.sampling import Step, check_sampling_args, sample_steps
from difflab.devices import resolve_precision
from difflab.errors import UsageError
from difflab.figures.images import Panel, draw_table, save_png, to_uint8
from difflab.files import atomic_path
from difflab.seeds import indices_within_class


@dataclass
class SampleResult:
    images: torch.Tensor  # (N, C, H, W) in [-1, 1]
    labels: torch.Tensor  # (N,)
    seconds: float
    settings: dict


def parse_classes(text: str | None, num_classes: int) -> list[int]:
    if text is None or text.strip() in ("", "all"):
        return list(range(num_classes))
    try:
        classes = [int(c) for c in text.split(",") if c.strip() != ""]
    except ValueError:
        raise UsageError(
            f"--classes {text!r}: expected comma-separated class indices like 0,3,7"
        ) from None
    if not classes:
        raise UsageError(f"--classes {text!r}: no class given")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise UsageError(
            f"--classes: {bad[0]} is out of range; this run has classes 0..{num_classes - 1}"
        )
    return classes


def check_out_path(out: str | Path, suffixes: tuple[str, ...], option: str = "--out") -> Path:
    out = Path(out)
    if out.suffix.lower() not in suffixes:
        raise UsageError(f"{option} {out}: must end in {' or '.join(suffixes)}")
    if not out.parent.is_dir():
        raise UsageError(f"{option} {out}: folder {out.parent} does not exist")
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
) -> torch.Tensor:
    """Samples (B, C, H, W) in [-1, 1] for ``labels``, in batches of at most ``batch_size``.

    Image i's noise comes from (``seed``, ``labels[i]``, its index within its class in
    ``labels``) by the seeding rule (:mod:`difflab.seeds`), so it does not depend on the
    batch size, on how many images are asked for or on the other classes.
    ``on_step(step)`` sees every step of every batch (live previews, cancelling by raising).
    """
    check_sampling_args(sampler, steps, guidance, eta, diffusion.num_timesteps)
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
            spacing=spacing, seed=seed, indices=chunk_indices, autocast=autocast,
        ):  # fmt: skip
            x = step.x_prev
            bar.update(1)
            if on_step is not None:
                on_step(step)
        out.append(x.clamp(-1, 1).cpu())
    bar.close()
    return torch.cat(out)


GRID_AXES = ("class", "sample", "guidance", "steps")


def parse_values(value, kind: type, option: str, example: str) -> list | None:
    """``"0,1,3"`` / ``2.0`` / ``[10, 50]`` -> a list of ``kind``; None stays None."""
    if value is None:
        return None
    items = (
        value.split(",")
        if isinstance(value, str)
        else value
        if isinstance(value, (list, tuple))
        else [value]
    )
    try:
        out = [kind(v.strip()) if isinstance(v, str) else kind(v) for v in items]
    except (TypeError, ValueError):
        raise UsageError(
            f"{option} {value!r}: expected a value or a comma-separated list like {example}"
        ) from None
    if not out:
        raise UsageError(f"{option} {value!r}: no value given")
    if kind is int and any(isinstance(v, float) and not v.is_integer() for v in items):
        raise UsageError(f"{option} {value!r}: expected whole numbers like {example}")
    return out


def grid_axes(rows: str, cols: str | None, sizes: dict[str, int]) -> tuple[list[str], str]:
    """Row axes (the chosen one, then class/sample when they vary) and the column axis."""
    if rows not in GRID_AXES:
        raise UsageError(f"--rows {rows!r}: choose one of {', '.join(GRID_AXES)}")
    if cols is None:  # the swept option goes on the columns, else the samples of a class
        swept = [a for a in ("guidance", "steps") if sizes[a] > 1 and a != rows]
        if len(swept) > 1:
            raise UsageError(
                "--guidance and --steps both have several values: put one on --rows, the other on --cols"
            )
        cols = swept[0] if swept else "sample" if rows != "sample" else "class"
    if cols not in GRID_AXES:
        raise UsageError(f"--cols {cols!r}: choose one of {', '.join(GRID_AXES)}")
    if cols == rows:
        raise UsageError(f"--cols {cols}: must differ from --rows {rows}")
    for axis in ("guidance", "steps"):
        if sizes[axis] > 1 and axis not in (rows, cols):
            raise UsageError(f"--{axis}: several values need --rows {axis} or --cols {axis}")
    folded = [a for a in ("class", "sample") if a not in (rows, cols) and sizes[a] > 1]
    return [rows, *folded], cols


def sample_run(
    run: str | Path,
    out: str | Path,
    classes: str | None = None,
    n_per_class: int | None = None,
    guidance: float | str | list[float] | None = None,
    steps: int | str | list[int] | None = None,
    sampler: str | None = None,
    eta: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    trust_pickle: bool = False,
    rows: str = "class",
    cols: str | None = None,
    on_step: Callable[[Step], None] | None = None,
    precision: str = "auto",
) -> SampleResult:
    """``difflab sample``: check everything, sample, and write ``out`` (.png grid or .npz).

    ``guidance`` and ``steps`` may be lists (``"0,1,3"``) for a PNG grid whose ``rows`` and
    ``cols`` are any two of class, sample, guidance and steps (class and sample, when not
    shown and several, repeat the rows). Every cell of a row starts from the same noise (the
    seeding rule gives an image the same x_T whatever the guidance or steps), so cells differ
    only by the swept option. ``n_per_class`` defaults to 8 when the samples of
    a class are an axis of the grid, else 1.
    """
    out = check_out_path(out, (".png", ".npz"))
    autocast = resolve_precision(precision, device)
    g_list = parse_values(guidance, float, "--guidance", "0,1,3")
    s_list = parse_values(steps, int, "--steps", "10,50")
    if out.suffix.lower() == ".npz" and (len(g_list or ()) > 1 or len(s_list or ()) > 1):
        raise UsageError(
            f"--out {out}: several --guidance/--steps values make a grid; write a .png"
        )
    sizes = {"guidance": len(g_list or [0]), "steps": len(s_list or [0])}
    shown = grid_axes(rows, cols, {**sizes, "class": 2, "sample": 2})
    if n_per_class is None:
        n_per_class = 8 if "sample" in (shown[0][0], shown[1]) else 1
    if n_per_class < 1:
        raise UsageError(f"--n-per-class {n_per_class}: must be at least 1")
    model, diffusion, cfg = load_run(run, device=device, trust_pickle=trust_pickle)
    sc = cfg.sample
    g_list = g_list or [sc.guidance]
    s_list = s_list or [sc.steps]
    sampler = sc.sampler if sampler is None else sampler
    eta = sc.eta if eta is None else eta
    for g, st in itertools.product(g_list, s_list):
        check_sampling_args(sampler, st, g, eta, diffusion.num_timesteps)
    cls = parse_classes(classes, cfg.model.num_classes)
    row_axes, col_axis = grid_axes(rows, cols, {**sizes, "class": len(cls), "sample": n_per_class})
    labels = torch.tensor(cls).repeat_interleave(n_per_class)
    t0 = time.perf_counter()
    cells = {}  # (guidance index, steps index) -> (N, C, H, W); the same labels, so the same x_T
    for (gi, g), (si, st) in itertools.product(enumerate(g_list), enumerate(s_list)):
        cells[gi, si] = sample_labels(
            model, diffusion, labels, guidance=g, steps=st, sampler=sampler, eta=eta,
            spacing=sc.spacing, seed=seed, progress=progress, on_step=on_step, autocast=autocast,
        )  # fmt: skip
    seconds = time.perf_counter() - t0
    one = lambda v: v[0] if len(v) == 1 else v  # noqa: E731
    settings = {
        "run": str(run), "classes": cls, "n_per_class": n_per_class, "guidance": one(g_list),
        "steps": one(s_list), "sampler": sampler, "eta": eta, "seed": seed, "spacing": sc.spacing,
    }  # fmt: skip
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
        grid = sample_grid(cells, values, row_axes, col_axis, sampler, seed)
        save_png(out, grid, settings)
    return SampleResult(images, all_labels, seconds, settings)


def save_npz(out: str | Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    """``images`` uint8 (N, H, W, C) and ``labels`` int64 (N,), written atomically."""
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, images=to_uint8(images), labels=labels.numpy().astype(np.int64))


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
