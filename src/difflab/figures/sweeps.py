"""Figures of a sweep folder: heat-maps, metric-vs-parameter lines and labelled image grids.

:func:`write_sweep_figures` draws, per sampler, into ``DIR/figures/``: ``heatmaps_S.png``
(accuracy, FD, KID and diversity over guidance × steps, seed means written in each square),
``vs_guidance_S.png`` (each metric against the guidance scale, one line per step count, mean
± std across seeds), ``vs_steps_S.png`` (against the step count, one line per guidance),
with a checkpoint axis of several values ``vs_checkpoint_S.png`` (accuracy and FD / floor
against the images seen in training, one line per guidance and step count, 95 % bands) and
``grid_S.png`` (rows = guidance, one panel per step count, the first samples of the sweep's
grid class and first seed; every row starts from the same noise). Reference levels (the
judge's own test accuracy, the real-vs-real FD floor, the diversity of real test images) are
drawn as dashed lines. Plots use matplotlib on an explicit Agg canvas; PNGs are written
atomically with their settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.ticker import PercentFormatter

from difflab.figures.images import Panel, draw_table, new_figure, render_figure, save_png

PANELS = (  # (metric, axis label, higher is better)
    ("accuracy", "conditional accuracy", True),
    ("fd", "Fréchet distance (judge features)", False),
    ("kid", "KID (judge features)", False),
    ("diversity", "within-class diversity", True),
)
GRID_SAMPLES = 4  # samples of the grid class shown per cell


def _table(summary: list[dict], sampler: str, metric: str, g: list, s: list) -> tuple:
    """(mean, std) arrays of shape (len(g), len(s)); NaN where a cell is missing."""
    mean, std = np.full((len(g), len(s)), np.nan), np.full((len(g), len(s)), np.nan)
    for r in summary:
        if r["sampler"] == sampler:
            i, j = g.index(r["guidance"]), s.index(r["steps"])
            mean[i, j] = r[f"{metric}_mean"]
            std[i, j] = np.nan if r[f"{metric}_std"] is None else r[f"{metric}_std"]
    return mean, std


def _reference(ax, metric: str, refs: dict) -> None:
    """A dashed line at the real-data level of ``metric``, labelled on the line itself."""
    label = {
        "accuracy": "judge on real test images",
        "fd": "real vs real floor",
        "diversity": "real test images",
    }.get(metric)
    value = refs.get(metric)
    if label and value is not None:
        ax.axhline(value, color="black", ls="--", lw=1)
        ax.annotate(f"{label}: {_fmt(metric, value)}", (0.01, value), xycoords=("axes fraction", "data"),
                    xytext=(0, 3), textcoords="offset points", fontsize=8, va="bottom",
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))  # fmt: skip


def _fmt(metric: str, v: float) -> str:
    if np.isnan(v):
        return "–"
    return f"{v:.0%}" if metric == "accuracy" else f"{v:.3f}" if metric == "kid" else f"{v:.2f}"


def heatmaps(summary: list[dict], sampler: str, g: list, s: list, title: str):
    fig = new_figure(11, 2.2 + 0.55 * len(g) * 2)
    axes = fig.subplots(2, 2).ravel()
    for ax, (metric, label, higher) in zip(axes, PANELS, strict=True):
        mean, _ = _table(summary, sampler, metric, g, s)
        im = ax.imshow(mean, cmap="viridis" if higher else "viridis_r", aspect="auto")
        finite = mean[np.isfinite(mean)]
        mid = (finite.min() + finite.max()) / 2 if finite.size else 0
        for i, j in np.ndindex(mean.shape):
            dark = (mean[i, j] < mid) == higher  # text on the dark end of viridis is white
            ax.text(j, i, _fmt(metric, mean[i, j]), ha="center", va="center", fontsize=9,
                    color="white" if dark else "black")  # fmt: skip
        ax.set_xticks(range(len(s)), [str(v) for v in s])
        ax.set_yticks(range(len(g)), [f"{v:g}" for v in g])
        ax.set_xlabel("sampling steps")
        ax.set_ylabel("guidance scale s")
        better = "higher" if higher else "lower"
        ax.set_title(f"{label} ({better} is better)", fontsize=10)
        bar = fig.colorbar(im, ax=ax, shrink=0.9)
        if metric == "accuracy":
            bar.ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    fig.suptitle(title, fontweight="bold")
    return fig


def lines(summary: list[dict], sampler: str, g: list, s: list, refs: dict, x_axis: str, title: str):
    """Each metric against ``x_axis`` ("guidance" or "steps"), one line per value of the other."""
    fig = new_figure(11, 7.5)
    axes = fig.subplots(2, 2).ravel()
    xs, others = (g, s) if x_axis == "guidance" else (s, g)
    cmap = colormaps["viridis"]
    for ax, (metric, label, _) in zip(axes, PANELS, strict=True):
        mean, std = _table(summary, sampler, metric, g, s)
        if x_axis == "steps":
            mean, std = mean.T, std.T  # (len(s), len(g)): rows follow the x axis
        for k, other in enumerate(others):
            colour = cmap(k / max(len(others) - 1, 1) * 0.9)
            name = f"{other} steps" if x_axis == "guidance" else f"s = {other:g}"
            y, e = mean[:, k], std[:, k]
            ax.errorbar(xs, y, yerr=None if np.isnan(e).all() else np.nan_to_num(e), marker="o",
                        ms=4, lw=1.8, capsize=3, color=colour, label=name)  # fmt: skip
        _reference(ax, metric, refs)
        if x_axis == "steps":
            ax.set_xscale("log")
            ax.set_xticks(s, [str(v) for v in s])
            ax.minorticks_off()
            ax.set_xlabel("sampling steps")
        else:
            ax.set_xticks(g, [f"{v:g}" for v in g])
            ax.set_xlabel("guidance scale s  (0 unconditional, 1 conditional, >1 guided)")
        if metric == "accuracy":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    what = "step count" if x_axis == "guidance" else "guidance"
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), title=f"one line per {what}",
               fontsize=9, title_fontsize=9, frameon=False)  # fmt: skip
    fig.suptitle(title, fontweight="bold")
    return fig


def vs_checkpoint(summary: list[dict], sampler: str, refs: dict, title: str):
    """Accuracy and FD / floor against the images seen in training (the checkpoint axis), one
    line per step count and guidance, each with its 95 % interval as a band."""
    fig = new_figure(11, 4.6)
    axes = fig.subplots(1, 2)
    rows = [r for r in summary if r["sampler"] == sampler and r.get("images_seen") is not None]
    settings = sorted({(r["steps"], r["guidance"]) for r in rows})
    several_steps = len({st for st, _ in settings}) > 1
    floor = refs.get("fd") or 1.0
    cmap = colormaps["viridis"]
    for k, (st, g) in enumerate(settings):
        line = sorted((r for r in rows if (r["steps"], r["guidance"]) == (st, g)), key=lambda r: r["images_seen"])  # fmt: skip
        x = np.array([r["images_seen"] for r in line], dtype=np.float64)
        colour = cmap(k / max(len(settings) - 1, 1) * 0.9)
        name = f"s = {g:g}" + (f", {st} steps" if several_steps else "")
        for ax, metric, scale in ((axes[0], "accuracy", 1.0), (axes[1], "fd", floor)):
            y = np.array([r[f"{metric}_mean"] for r in line], dtype=np.float64) / scale
            ax.plot(x, y, marker="o", ms=4, lw=1.8, color=colour, label=name)
            lo = [r.get(f"{metric}_ci_low") for r in line]
            hi = [r.get(f"{metric}_ci_high") for r in line]
            if None not in lo and None not in hi:
                ax.fill_between(x, np.array(lo) / scale, np.array(hi) / scale, color=colour, alpha=0.18, lw=0)  # fmt: skip
    _reference(axes[0], "accuracy", refs)
    if refs.get("fd"):
        axes[1].axhline(1.0, color="black", ls="--", lw=1)
        axes[1].annotate("real vs real floor", (0.01, 1.0), xycoords=("axes fraction", "data"),
                         xytext=(0, 3), textcoords="offset points", fontsize=8, va="bottom")  # fmt: skip
    axes[0].yaxis.set_major_formatter(PercentFormatter(1.0))
    axes[0].set_ylabel("conditional accuracy (higher is better)")
    axes[1].set_ylabel(
        "FD / real-vs-real floor (lower is better)" if refs.get("fd") else "Fréchet distance"
    )
    seen = [r["images_seen"] for r in rows if r["images_seen"] > 0]
    for ax in axes:
        if seen and max(seen) > 20 * min(seen):  # snapshots spread over decades of training
            ax.set_xscale("log")
        ax.set_xlabel("images seen in training (step × batch size)")
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6), fontsize=9,
               title="bands: 95% intervals", title_fontsize=9, frameon=False)  # fmt: skip
    fig.suptitle(title, fontweight="bold")
    return fig


def sweep_grid(out: Path, identity: dict, rows: list[dict], sampler: str, class_name: str):
    """Rows = guidance, one panel per step count: the first samples of the grid class.

    Each cell's images are its ``cells/KEY.npz`` (``KEY`` from its row); a missing cell is blank.
    """
    g, s, seed, c = (
        identity["guidance"],
        identity["steps"],
        identity["seeds"][0],
        identity["grid_class"],
    )
    k = min(GRID_SAMPLES, identity["n_per_class"])
    keys = {
        (r["steps"], r["guidance"]): r["key"]
        for r in rows
        if r["sampler"] == sampler and r["seed"] == seed and "key" in r
    }
    panels, blank = [], None
    for st in s:
        cells = []
        for gv in g:
            path = out / "cells" / f"{keys.get((st, gv))}.npz"
            if (st, gv) in keys and path.is_file():
                with np.load(path) as z:
                    cells.append(z["images"][z["labels"] == c][:k])
                    blank = np.full_like(cells[-1], 255)
            else:
                cells.append(None)
        if blank is None:
            continue
        cells = [blank if x is None else x for x in cells]
        panels.append(Panel(np.stack(cells), [], f"{st} steps"))
    if not panels:
        return None
    title = (
        f"Class {class_name}: {sampler}, seed {seed}; rows: guidance scale s, panels: sampling steps\n"
        "every row starts from the same noise x_T, so cells differ only by guidance and steps"
    )
    return draw_table(panels, row_labels=[f"s = {v:g}" for v in g], title=title).image


def write_sweep_figures(
    out: Path,
    identity: dict,
    rows: list[dict],
    summary: list[dict],
    class_names: Sequence[str] = (),
    along: list[dict] | None = None,
) -> list[Path]:
    """All of a sweep's figures into ``out/figures``; returns the paths written.

    ``class_names`` (the run's) title the grid; a class without a name is shown by its index.
    ``rows`` and ``summary`` are of one checkpoint; ``along`` (the summary of every checkpoint)
    draws ``vs_checkpoint_S.png`` when the sweep has more than one.
    """
    figures = Path(out) / "figures"
    figures.mkdir(exist_ok=True)
    if not rows:
        return []
    g, s = identity["guidance"], identity["steps"]
    refs = {
        "accuracy": rows[0].get("judge_test_accuracy"),
        "fd": rows[0].get("fd_floor"),
        "diversity": rows[0].get("diversity_real"),
    }
    known = list(class_names)
    names = [known[i] if i < len(known) else str(i) for i in range(identity["num_classes"])]
    seeds = identity["seeds"]
    about = f"{Path(identity['run']).name}, n = {identity['n_per_class']}/class, " + (
        f"mean ± std over seeds {','.join(map(str, seeds))}"
        if len(seeds) > 1
        else f"seed {seeds[0]}"
    )
    written = []
    settings = {"sweep": str(out), "run": identity["run"]}
    for smp in identity["samplers"]:
        figs = {
            f"heatmaps_{smp}.png": heatmaps(summary, smp, g, s, f"Sweep: {smp} sampler ({about})"),
            f"vs_guidance_{smp}.png": lines(summary, smp, g, s, refs, "guidance",
                                            f"Metrics against guidance: {smp} ({about})"),
            f"vs_steps_{smp}.png": lines(summary, smp, g, s, refs, "steps",
                                         f"Metrics against sampling steps: {smp} ({about})"),
        }  # fmt: skip
        if along and len(identity.get("checkpoints", ())) > 1:
            figs[f"vs_checkpoint_{smp}.png"] = vs_checkpoint(
                along, smp, refs, f"Quality against training compute: {smp} ({about})"
            )
        for name, fig in figs.items():
            save_png(figures / name, render_figure(fig), {"figure": name[:-4], **settings})
            written.append(figures / name)
        grid = sweep_grid(Path(out), identity, rows, smp, names[identity["grid_class"]])
        if grid is not None:
            save_png(figures / f"grid_{smp}.png", grid, {"figure": "grid", **settings})
            written.append(figures / f"grid_{smp}.png")
    return written
