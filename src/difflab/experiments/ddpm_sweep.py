"""Resumable sweeps of a run over guidance × steps × sampler × seed, measured by the judge.

:func:`sweep_run` (``difflab sweep``) takes :class:`~difflab.options.DDPMSweepAxes` (checked
when built), checks them against the run before any work, then samples each cell (one
setting of sampler, steps, guidance and seed, and of the guidance interval, schedule and
rescale when those are swept; ``n_per_class`` samples of every class) from the same initial
noise ``x_T`` per seed, so cells of a seed differ only by the swept parameter, and measures
it with the reference classifier (accuracy, FD, KID, diversity,
each with its 95 % interval, and the per-sample correctness kept for paired comparisons of
cells). With ``checkpoints`` the run's kept snapshots are one more axis
(:mod:`.ddpm_checkpoints`): each checkpoint's cells are sampled from its weights and the same
noise. The sweep folder holds
``sweep.json`` (its identity: run, hash of the run's weights, axes, sample count, and the
checkpoints' files and hashes), ``reference.npz`` (the real features, :mod:`.paired`),
``cells/KEY.npz`` (images, labels and judge features) + ``cells/KEY.json`` per finished cell
(each written atomically, the JSON last, so it marks the cell complete), and the tables
``metrics.csv`` / ``metrics.json`` / ``summary.csv`` (:mod:`.ddpm_tables`) rebuilt from the
cell files after each cell. A killed sweep re-run with the
same command skips the finished cells; another run or other settings into the same folder
are refused. The folder itself (identity, lock, records, tables) is
:mod:`difflab.experiments.core`'s; figures are drawn by :mod:`difflab.figures.sweeps`.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from difflab import distributed
from difflab.config import RunConfig
from difflab.ddpm.data import load_dataset
from difflab.ddpm.generate import save_npz
from difflab.ddpm.runs import CONFIG, WEIGHTS, check_run_dir, load_run
from difflab.ddpm.sampling import sample_steps
from difflab.devices import resolve_precision
from difflab.experiments import core, paired
from difflab.experiments import ddpm_checkpoints as ckpt
from difflab.experiments.core import RESUME_HINT, SweepFolder, Tables
from difflab.experiments.ddpm_tables import (  # noqa: F401 (CI_COLUMNS, METRICS: for the callers)
    CI_COLUMNS,
    CSV_COLUMNS,
    INTERVALS,
    METRICS,
    SHAPE_AXES,
    SHAPE_FIELDS,
    SUMMARY_COLUMNS,
    about,
    summarise,
    with_axes,
)
from difflab.files import file_sha256
from difflab.options import DDPMSweepAxes
from difflab.seeds import indices_within_class, initial_noise

SWEEP_FILE = "sweep.json"
FORMAT = 2  # 2: each image has its own seed (difflab.seeds); 1 seeded whole batches
OPTIONS = {"samplers": "--sampler", "steps": "--steps", "guidance": "--guidance", "seeds": "--seeds",
           "n_per_class": "--n", "precision": "--precision", "guidance_intervals": "--guidance-interval",
           "guidance_schedules": "--guidance-schedule", "guidance_rescales": "--guidance-rescale",
           "guidance_methods": "--guidance-method", "checkpoints": "--checkpoints"}  # fmt: skip
PRESENTATION = ("grid_class",)  # identity keys that may change without touching any cell
PLAIN = {"guidance_intervals": ["none"], "guidance_schedules": ["constant"], "guidance_rescales": [0.0],
         "guidance_methods": ["cfg"]}  # fmt: skip
# what an identity without these keys means (not written): sweeps made before the option
IMPLIED = {"precision": "fp32", **PLAIN}


def interval_text(interval: list | tuple | None) -> str:
    """``none`` or ``LO:HI`` (each number as it round-trips): a guidance interval as typed."""
    return "none" if interval is None else f"{float(interval[0])!r}:{float(interval[1])!r}"


@dataclass(frozen=True)
class Cell:
    """One cell. The guidance-shape fields are None when the sweep has no such axis (a cell
    record without them then matches, as records made before the axes existed); else the
    axis' value: the interval as :func:`interval_text`, the schedule's name, phi, the method
    (cfg or cfg++). So is
    ``checkpoint``: the training step of the weights sampled (:mod:`.ddpm_checkpoints`)."""

    sampler: str
    steps: int
    guidance: float
    seed: int
    guidance_interval: str | None = None
    guidance_schedule: str | None = None
    guidance_rescale: float | None = None
    guidance_method: str | None = None
    checkpoint: int | None = None

    @property
    def key(self) -> str:
        """A plain-guidance cell keeps the key it had before the guidance-shape axes existed."""
        key = f"{self.sampler}_steps{self.steps}_g{self.guidance:g}"
        shape = self.shape
        if shape["guidance_interval"] is not None:
            key += "_iv" + self.guidance_interval.replace(":", "-")
        if shape["guidance_schedule"] != "constant":
            key += f"_{self.guidance_schedule}"
        if shape["guidance_rescale"] != 0.0:
            key += f"_phi{self.guidance_rescale!r}"
        if shape["guidance_method"] != "cfg":
            key += "_cfgpp"
        key += f"_seed{self.seed}"
        return key if self.checkpoint is None else f"{key}_ckpt{self.checkpoint}"

    @property
    def shape(self) -> dict[str, Any]:
        """The keyword arguments of ``sample_steps`` that shape this cell's guidance."""
        iv = self.guidance_interval
        return {
            "guidance_interval": None if iv in (None, "none") else tuple(map(float, iv.split(":"))),
            "guidance_schedule": self.guidance_schedule or "constant",
            "guidance_rescale": self.guidance_rescale or 0.0,
            "guidance_method": self.guidance_method or "cfg",
        }  # fmt: skip

    @property
    def cost(self) -> int:
        """Network passes per sample: guided cells run the conditional and unconditional pass."""
        return self.steps * (1 if self.guidance in (0.0, 1.0) else 2)

    def columns(self) -> dict[str, Any]:
        """The guidance-shape fields the sweep has (the cell record's columns beside guidance)."""
        return {k: v for k in SHAPE_FIELDS if (v := getattr(self, k)) is not None}


@dataclass
class SweepResult:
    out: Path
    cells_total: int
    cells_run: int  # computed by this call (the others were already finished)
    seconds: float
    rows: list[dict] = field(default_factory=list)
    summary: list[dict] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)


# -- identity -------------------------------------------------------------------------------
def sweep_identity(run: str | Path, axes: DDPMSweepAxes, device: str = "cpu") -> dict[str, Any]:
    """The sweep's identity for ``sweep.json``: ``axes`` checked against the run (no work done).

    A bf16 sweep (``precision``, resolved for ``device``) has ``"precision": "bf16"``; an
    fp32 sweep has no such key, as sweeps made before the option existed; so has a sweep
    whose guidance-shape axes (interval, schedule, rescale, method) are plain guidance only.
    """
    autocast = resolve_precision(axes.precision, device)
    shape = {
        "guidance_intervals": [interval_text(v) for v in axes.guidance_intervals],  # as typed
        "guidance_schedules": list(axes.guidance_schedules),
        "guidance_rescales": list(axes.guidance_rescales),
        "guidance_methods": list(axes.guidance_methods),
    }
    shape = {k: v for k, v in shape.items() if v != PLAIN[k]}
    run = check_run_dir(run)
    cfg = RunConfig.load(run / CONFIG)
    axes.for_run(cfg)
    sc = cfg.sample
    return {
        "format": FORMAT, "run": str(run.resolve()), "weights_sha256": file_sha256(run / WEIGHTS),
        "dataset": cfg.train.dataset, "samplers": list(axes.samplers), "steps": list(axes.steps),
        "guidance": list(axes.guidance), "seeds": list(axes.seeds), "n_per_class": axes.n_per_class,
        "num_classes": cfg.model.num_classes, "eta": sc.eta, "spacing": sc.spacing,
        "grid_class": axes.grid_class, **({"precision": autocast} if autocast else {}), **shape,
        **ckpt.identity(run, axes.checkpoints),
    }  # fmt: skip


def check_folder(out: str | Path, identity: dict[str, Any]) -> bool:
    """True when ``out`` holds this very sweep, False when it is new; refuses another sweep's
    folder with one line (reads only)."""
    return FOLDER.check(out, identity)


def all_cells(identity: dict[str, Any]) -> list[Cell]:
    """Cells in run order: checkpoint (one model each, when the sweep has the axis), seed (one
    x_T each), then sampler, steps, the guidance-shape axes (interval, schedule, rescale,
    method; each only when the sweep has it) and guidance."""
    i = identity
    shape = [
        i.get("guidance_intervals", [None]), i.get("guidance_schedules", [None]),
        i.get("guidance_rescales", [None]), i.get("guidance_methods", [None]),
    ]  # fmt: skip
    return [
        Cell(smp, st, g, seed, iv, sch, phi, method, ck)
        for ck, seed, smp, st, iv, sch, phi, method, g in itertools.product(
            i.get("checkpoints", [None]),
            i["seeds"],
            i["samplers"],
            i["steps"],
            *shape,
            i["guidance"],
        )
    ]


# -- cells ----------------------------------------------------------------------------------
def sample_cells(
    model, diffusion, labels: torch.Tensor, x_T: torch.Tensor | None, cells: list[Cell],
    identity: dict, batch_size: int = 500, on_step=None,
) -> list[torch.Tensor]:  # fmt: skip
    """The samples (N, C, H, W) in [-1, 1] of cells that differ only in guidance, in one batch.

    Every image follows the seeding rule (:mod:`difflab.seeds`) with the cell's seed: it
    starts from its x_T (``x_T``, the seed's shared :func:`~difflab.seeds.initial_noise` of
    ``labels``, or None to draw it) and draws its own step noise, so a cell is exactly what
    ``difflab sample`` gives with the same settings, whatever ``batch_size``. The cells ride
    in one forward pass per step (batch size ``len(cells) * batch_size`` at most), so the
    model is called once per step, not per cell.
    """
    first = cells[0]
    assert all(
        (c.seed, c.sampler, c.steps, c.shape, c.checkpoint)
        == (first.seed, first.sampler, first.steps, first.shape, first.checkpoint)
        for c in cells
    )
    g = len(cells)
    scales = torch.tensor([c.guidance for c in cells])
    indices = indices_within_class(labels)
    if x_T is None:
        cfg = model.cfg
        x_T = initial_noise(first.seed, labels, (cfg.in_channels, cfg.height, cfg.width), indices)
    out: list[list[torch.Tensor]] = [[] for _ in cells]
    for start in range(0, len(labels), batch_size):
        part = slice(start, start + batch_size)
        n = len(labels[part])
        guidance = scales.repeat_interleave(n) if g > 1 else first.guidance
        x = None
        for step in sample_steps(
            model, diffusion, labels[part].repeat(g), guidance=guidance, steps=first.steps,
            sampler=first.sampler, eta=identity["eta"], spacing=identity["spacing"],
            seed=first.seed, indices=indices[part].repeat(g), x_T=x_T[part].repeat(g, 1, 1, 1),
            groups=g, autocast=identity.get("precision"), **first.shape,
        ):  # fmt: skip
            x = step.x_prev
            if on_step is not None:
                on_step(n)
        for i, block in enumerate(x.clamp(-1, 1).cpu().chunk(g)):
            out[i].append(block)
    return [torch.cat(parts) for parts in out]


def cell_groups(todo: list[Cell], max_cells: int) -> list[list[Cell]]:
    """Cells sharing checkpoint, seed, sampler, step count and guidance shape, in groups of at
    most ``max_cells``."""
    groups: dict[tuple, list[Cell]] = {}
    for c in todo:
        key = (c.checkpoint, c.seed, c.sampler, c.steps, *c.columns().values())
        groups.setdefault(key, []).append(c)
    return [v[i : i + max_cells] for v in groups.values() for i in range(0, len(v), max_cells)]


def sweep_run(
    run: str | Path,
    axes: DDPMSweepAxes,
    out: str | Path,
    device: str = "cpu",
    progress: bool = True,
    batch_size: int = 500,
    plots: bool = True,
    max_group: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_cell: Callable[[int, int], None] | None = None,
) -> SweepResult:
    """``difflab sweep``: run (or finish) the sweep of ``axes`` into ``out``; tables and figures.

    Cells that share seed, sampler and step count (they differ only in guidance) are sampled
    together, up to ``max_group`` at a time: one network call per step for all of them. By
    default 8 on an accelerator and 1 (no grouping) on the CPU, where the larger batches
    measured slower (docs/benchmarks.md).
    ``seconds`` of such a cell is its share of the group's time, by network passes.
    ``should_stop()`` is asked before each group (True: stop there, the finished cells kept);
    ``on_cell(done, total)`` is called after each finished cell.

    Started by ``torchrun``/``accelerate launch`` with N processes, the missing cells are
    split between them (accelerate's ``split_between_processes``): rank 0 checks the folder
    and holds its lock, every rank writes its own cell files, and rank 0 rebuilds the tables
    and draws the figures once all ranks are done.
    """
    identity = sweep_identity(run, axes, device)
    state = distributed.process_state(device)
    if state is not None and str(device) != "cpu":
        device = str(state.device)
    if max_group is None:
        max_group = 1 if str(device) == "cpu" else 8
    main = state is None or state.is_main_process
    out = Path(out)
    with FOLDER.hold(out, identity, state):  # locked before anything in it is touched
        cells = all_cells(identity)
        todo = [c for c in cells if FOLDER.load_cell(out, c) is None]
        distributed.barrier(state)  # every rank has the same list before anyone writes
        groups = cell_groups(todo, max_group)
        t0 = time.perf_counter()
        if groups:
            groups = distributed.my_share(state, groups, lambda g: sum(c.cost for c in g))
            _run_cells(
                run, out, identity, cells, todo, groups, device, progress and main, batch_size,
                should_stop, on_cell, state,
            )  # fmt: skip
        distributed.barrier(state)  # all cells of all ranks are on disk
        rows, summary = (FOLDER.write_tables if main else FOLDER.read_tables)(out, identity, cells)
        ran = len(rows) - (len(cells) - len(todo))  # fewer than len(todo) when stopped early
        result = SweepResult(out, len(cells), ran, time.perf_counter() - t0, rows, summary)
        if plots and main:
            from difflab.figures.sweeps import write_sweep_figures

            names = RunConfig.load(Path(identity["run"]) / CONFIG).model.class_names
            # one guidance shape (the first) and one checkpoint (the last) but in vs_checkpoint
            first = cells[0].columns() | {"checkpoint": cells[-1].checkpoint}
            shown = [[r for r in t if all(r.get(k) == v for k, v in first.items())] for t in (rows, summary)]  # fmt: skip
            along = [r for r in summary if all(r.get(k) == v for k, v in cells[0].columns().items())]  # fmt: skip
            result.figures = write_sweep_figures(out, identity, *shown, names, along)
    distributed.barrier(state)
    return result


def _run_cells(
    run, out, identity, cells, todo, groups, device, progress, batch_size, should_stop, on_cell,
    state,
) -> None:  # fmt: skip
    """Sample and measure ``groups`` (this process's share of ``todo``) into ``out``."""
    from difflab.evaluation.evaluate import evaluate_samples
    from difflab.evaluation.judge import get_judge
    from difflab.evaluation.metrics import features_of

    main = state is None or state.is_main_process
    loaded = groups[0][0].checkpoint if groups else None
    model, diffusion, cfg = load_run(run, device=device, step=ckpt.snapshot_step(identity, loaded))
    if main:  # trains and caches the judge on first use; the other ranks then read the cache
        judge = get_judge(cfg.train.dataset, root=cfg.train.data_dir, device=device, progress=progress)  # fmt: skip
    distributed.barrier(state)
    if not main:
        judge = get_judge(cfg.train.dataset, root=cfg.train.data_dir, device=device, progress=False)  # fmt: skip
    else:  # the real features every cell's FD and KID are taken to, for paired comparisons
        test = load_dataset(cfg.train.dataset, "test", cfg.train.data_dir)
        paired.write_reference(out, features_of(judge, test).cpu().numpy())
    labels = torch.arange(identity["num_classes"]).repeat_interleave(identity["n_per_class"])
    shape = (cfg.model.in_channels, cfg.model.height, cfg.model.width)
    mine = [c for g in groups for c in g]
    n_done = len(cells) - len(todo)
    ranks = (
        "" if state is None or state.num_processes == 1 else f" (rank 0 of {state.num_processes})"
    )
    bar = tqdm(
        total=sum(c.cost for c in mine) * len(labels), desc=f"sweep {n_done}/{len(cells)} cells{ranks}",
        unit="img-pass", unit_scale=True, disable=not progress, file=sys.stderr, dynamic_ncols=True,
    )  # fmt: skip
    x_T = {}  # seed -> (N, C, H, W): one initial noise per seed, shared by all its cells
    try:
        for group in groups:
            if should_stop is not None and should_stop():
                break
            seed = group[0].seed
            if group[0].checkpoint != loaded:  # groups come checkpoint by checkpoint
                loaded = group[0].checkpoint
                model = load_run(run, device, step=ckpt.snapshot_step(identity, loaded))[0]
            if seed not in x_T:
                x_T = {seed: initial_noise(seed, labels, shape)}
            passes = sum(c.cost for c in group) // group[0].steps
            t1 = time.perf_counter()
            images = sample_cells(
                model, diffusion, labels, x_T[seed], group, identity, batch_size,
                on_step=lambda b, p=passes: bar.update(b * p),
            )  # fmt: skip
            seconds = time.perf_counter() - t1
            for cell, cell_images in zip(group, images, strict=True):
                t2 = time.perf_counter()
                m = evaluate_samples(
                    cell_images, labels, cfg.train.dataset, cfg.train.data_dir, device,
                    judge=judge, seed=cell.seed,
                )  # fmt: skip
                share = seconds * cell.cost / sum(c.cost for c in group)
                feats = judge.features(cell_images).cpu().numpy().astype("float32")  # (N, D)
                row = {
                    "key": cell.key, **ckpt.columns(cell.checkpoint, cfg.train.batch_size),
                    "sampler": cell.sampler, "steps": cell.steps,
                    "guidance": cell.guidance, **cell.columns(), "seed": cell.seed, **m,
                    **core.interval_columns(m["ci95"]), "seconds": share,
                    "eval_seconds": time.perf_counter() - t2, "device": str(device),
                    "batched_cells": len(group), "process": 0 if state is None else state.process_index,
                }  # fmt: skip
                write = lambda p, x=cell_images, f=feats: save_npz(p, x, labels, features=f)  # noqa: E731
                FOLDER.write_cell(out, cell, row, write)
                n_done += 1
                bar.set_description(f"sweep {n_done}/{len(cells)} cells{ranks}")
                if on_cell is not None:
                    on_cell(n_done, len(cells))
                if not bar.disable:
                    bar.write(
                        f"{cell.key}: accuracy {m['accuracy']:.0%}, FD {m['fd']:.2f}, "
                        f"KID {m['kid']:.4f}, diversity {m['diversity']:.2f} ({share:.1f} s)"
                    )
            if main:
                FOLDER.write_tables(out, identity, cells)
    except KeyboardInterrupt:
        bar.close()
        print(
            f"sweep stopped after {n_done}/{len(cells)} cells; the same command continues it",
            file=sys.stderr,
        )
        raise
    bar.close()


def _another_run(old: dict, new: dict) -> str:
    return f"holds a sweep of another run ({old.get('run')}); {RESUME_HINT}"


def _older_format(old: dict, new: dict) -> str:
    return (
        f"holds a sweep made by an older difflab (format {old.get('format')}, now {new['format']}: "
        "images are now seeded one by one); choose another --out"
    )


def _weights_changed(old: dict, new: dict) -> str:
    return (
        f"the weights of {new['run']} changed since this sweep started ({WEIGHTS} differs); "
        "choose another --out"
    )


FOLDER = SweepFolder(
    SWEEP_FILE, ".npz",
    Tables(summarise, with_axes(CSV_COLUMNS), with_axes(SUMMARY_COLUMNS), about),
    options=OPTIONS, first={"format": _older_format, "run": _another_run, "weights_sha256": _weights_changed},
    implied=IMPLIED, presentation=PRESENTATION,
    changed=lambda key, old, new: ckpt.changed(key) or (
        f"the run's {key} changed since this sweep started ({old}, now {new}); choose another --out"
    ),
)  # fmt: skip
