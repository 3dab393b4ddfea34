"""Plots of a run folder: the training loss curve and the noise schedule's diagnostics.

:func:`plot_run` (``difflab plot RUN``) writes ``loss.png`` (from ``metrics.jsonl``: the logged
losses, an exponentially smoothed curve on a log scale, steps below and epochs above) and
``schedule.png`` (``ᾱ_t``, the signal and noise amplitudes, and the SNR in dB against t, the
other schedule kind with the same T for reference, and the share of the image left at t = T
with a warning when x_T is not pure noise). Figures are drawn with matplotlib on an explicit
Agg canvas and saved atomically as PNGs that carry their settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from matplotlib.ticker import FuncFormatter

from difflab.config import RunConfig
from difflab.ddpm.diffusion import SIGNAL_WARN_LEVEL, GaussianDiffusion
from difflab.ddpm.runs import CONFIG, METRICS, WEIGHTS, check_run_dir
from difflab.errors import UsageError
from difflab.figures.images import NOTE_COLOUR, new_figure, render_figure, save_png
from difflab.files import read_jsonl

_TARGET = {"eps": "ε", "x0": "x₀", "v": "v"}


@dataclass
class PlotResult:
    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # why a plot was not drawn


def smooth(values: np.ndarray, span: int | None = None) -> np.ndarray:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing); span ~ n/25."""
    values = np.asarray(values, dtype=np.float64)
    span = max(1, len(values) // 25) if span is None else span
    alpha = 2.0 / (span + 1)
    out, avg, weight = np.empty_like(values), 0.0, 0.0
    for i, v in enumerate(values):
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out[i] = avg / weight
    return out


def _mantissa(v: float) -> int:
    return int(round(v / 10 ** np.floor(np.log10(v) + 1e-9))) if v > 0 else 0


def loss_figure(rows: list[dict], cfg: RunConfig, name: str):
    """The loss curve of ``metrics.jsonl`` rows (each with ``step`` and ``loss``)."""
    rows = sorted(rows, key=lambda r: r["step"])
    step = np.array([r["step"] for r in rows], dtype=np.float64)
    loss = np.array([r["loss"] for r in rows], dtype=np.float64)
    fig = new_figure(8, 4.5)
    ax = fig.add_subplot()
    if len(loss) >= 50:  # enough points for smoothing to mean something
        ax.plot(step, loss, color="#9ecae1", lw=1, label="logged loss")
        ax.plot(step, smooth(loss), color="#08519c", lw=2, label="smoothed")
    else:
        ax.plot(step, loss, color="#08519c", lw=2, marker="o", ms=4, label="logged loss")
    ax.set_yscale("log")
    decades = np.log10(loss.max() / loss.min())
    mantissas = (2, 3, 4, 5, 6, 8) if decades < 1 else (2, 3, 5) if decades < 3 else ()
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(
        FuncFormatter(lambda v, _: f"{v:g}" if _mantissa(v) in mantissas else "")
    )
    ax.set_xlabel("training step")
    ax.set_ylabel(f"loss (MSE on {_TARGET.get(cfg.diffusion.objective, cfg.diffusion.objective)})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right")
    last = rows[-1]
    if last.get("epoch"):  # a second x axis in epochs
        per_epoch = last["step"] / last["epoch"]
        top = ax.secondary_xaxis(
            "top", functions=(lambda s: s / per_epoch, lambda e: e * per_epoch)
        )
        top.set_xlabel("epoch")
    ax.set_title(
        f"Training loss: {name} ({cfg.train.dataset}, {cfg.diffusion.objective}-prediction), "
        f"last {loss[-1]:.4f} at step {int(step[-1])}",
        fontsize=11,
    )
    return fig


def schedule_figure(diffusion: GaussianDiffusion):
    """ᾱ_t, √ᾱ_t, √(1-ᾱ_t) and SNR(t) in dB; the other schedule kind dotted for reference."""
    c = diffusion.cfg
    T = c.timesteps
    t = np.arange(1, T + 1)
    abar = diffusion.alphas_cumprod.numpy()
    other_kind = "cosine" if c.schedule == "linear" else "linear"
    other_cfg = replace(c, schedule=other_kind, beta_start=1e-4, beta_end=0.02)
    other = GaussianDiffusion(other_cfg, warn=False).alphas_cumprod.numpy()

    fig = new_figure(11, 4.8)
    a, b = fig.subplots(1, 2)
    a.plot(t, np.sqrt(abar), lw=2, color="#08519c", label=r"signal $\sqrt{\bar\alpha_t}$")
    a.plot(t, np.sqrt(1 - abar), lw=2, color="#cb181d", label=r"noise $\sqrt{1-\bar\alpha_t}$")
    a.plot(t, abar, lw=1.5, ls="--", color="#08519c", label=r"$\bar\alpha_t$")
    a.plot(
        t,
        np.sqrt(other),
        lw=1,
        ls=":",
        color="grey",
        label=rf"$\sqrt{{\bar\alpha_t}}$, {other_kind}",
    )
    a.set_xlabel("timestep t")
    a.set_ylabel("amplitude in $x_t$")
    a.set_ylim(-0.02, 1.02)
    a.set_xlim(0, T)
    a.set_title(
        r"$x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon$", fontsize=11
    )
    a.grid(True, alpha=0.3)
    a.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=9, frameon=False)

    snr_db = 10 * np.log10(abar / (1 - abar))
    b.plot(t, snr_db, lw=2, color="#08519c", label=f"{c.schedule}")
    b.plot(t, 10 * np.log10(other / (1 - other)), lw=1, ls=":", color="grey", label=f"{other_kind}")
    b.axhline(0, color="black", lw=0.8)
    b.annotate(
        "signal = noise", (T, 0), xytext=(-4, 4), textcoords="offset points", ha="right", fontsize=9
    )
    b.plot([T], [snr_db[-1]], "o", color="#08519c")
    b.annotate(f"SNR(T) = {snr_db[-1]:.1f} dB", (T, snr_db[-1]), xytext=(-8, 0), textcoords="offset points",
               ha="right", va="center", fontsize=9)  # fmt: skip
    b.set_ylim(snr_db.min() - 8, snr_db.max() + 5)  # the reference may run off the bottom
    b.set_xlabel("timestep t")
    b.set_ylabel("SNR (dB)")
    b.set_xlim(0, T * 1.01)
    b.set_title(r"SNR(t) = $\bar\alpha_t\,/\,(1-\bar\alpha_t)$", fontsize=11)
    b.grid(True, alpha=0.3)
    b.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=9, frameon=False)

    s = diffusion.signal_at_T
    fig.suptitle(f"Noise schedule: {c.schedule}, T = {T}", fontweight="bold")
    if s > SIGNAL_WARN_LEVEL:
        msg = f"Warning: $x_T$ is not pure noise: at t = T, √ᾱ = {s:.3f}, so {s:.1%} of the image is left."
        fig.supxlabel(msg, color=NOTE_COLOUR, fontsize=11)
    else:
        msg = f"At t = T, √ᾱ = {s:.4f}: {s:.2%} of the image is left, $x_T$ is pure noise."
        fig.supxlabel(msg, color="#333333", fontsize=11)
    return fig


def plot_run(run: str | Path, out_dir: str | Path | None = None, device: str = "cpu") -> PlotResult:
    """``difflab plot RUN``: write ``loss.png`` and ``schedule.png`` into ``out_dir``.

    A run started with ``--init-from`` also gets ``before_after.png``: samples of the source
    run and of this one from the same noise (:func:`difflab.figures.process.before_after_figure`).

    ``out_dir`` defaults to ``RUN/figures`` (created); a given folder must exist. A run with
    no logged loss yet gets only the schedule plot, and the result says why.
    """
    run = check_run_dir(run, need_weights=False)
    cfg = RunConfig.load(run / CONFIG)
    if out_dir is None:
        out_dir = run / "figures"
        out_dir.mkdir(exist_ok=True)
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise UsageError(f"--out {out_dir}: folder does not exist")
    rows = [
        r
        for r in read_jsonl(run / METRICS)
        if isinstance(r.get("loss"), (int, float)) and "step" in r
    ]
    rows = [r for r in rows if np.isfinite(r["loss"]) and r["loss"] > 0]
    result = PlotResult()
    settings = {"run": str(run), "schedule": cfg.diffusion.schedule, "T": cfg.diffusion.timesteps}
    if rows:
        path = out_dir / "loss.png"
        save_png(
            path, render_figure(loss_figure(rows, cfg, run.name)), {"figure": "loss", **settings}
        )
        result.written.append(path)
    else:
        result.skipped.append(f"loss.png: {run / METRICS} has no logged loss yet")
    path = out_dir / "schedule.png"
    diffusion = GaussianDiffusion(cfg.diffusion, warn=False)
    save_png(path, render_figure(schedule_figure(diffusion)), {"figure": "schedule", **settings})
    result.written.append(path)
    if cfg.train.init_from:
        from difflab.figures.process import before_after_figure

        if (run / WEIGHTS).is_file():
            result.written.append(
                before_after_figure(run, out_dir / "before_after.png", device=device)
            )
        else:
            result.skipped.append(f"before_after.png: {run} has no weights yet")
    return result
