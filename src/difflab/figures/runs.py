"""Plots of training and of a noise schedule: the one loss curve and the schedule diagnostics.

:func:`loss_figure` draws logged losses (``step``, ``loss`` and optionally ``epoch`` per
row) with an exponentially smoothed curve on a log scale, steps below and epochs above; DDPM
training (``difflab plot``) and SD fine-tuning both draw their ``loss.png`` with it.
:func:`quality_figure` draws the evaluations made during training (rows with an ``eval``
object: the judge's accuracy and the Fréchet distance over its real-vs-real floor) beside
the loss, against images seen and against training time.
:func:`schedule_figure` draws ``ᾱ_t``, the signal and noise amplitudes and the SNR in dB
against t from a schedule's ``alphas_cumprod``, a reference schedule beside it, and the share
of the image left at t = T, with a warning when x_T is not pure noise. Both return a
matplotlib Figure on an explicit Agg canvas (:func:`~difflab.figures.images.render_figure`
makes it an image). Reading run folders is :mod:`difflab.ddpm.processes`'s work.
"""

from __future__ import annotations

import numpy as np
from matplotlib.ticker import FuncFormatter

from difflab.figures.images import NOTE_COLOUR, new_figure

SMOOTH_MIN_POINTS = 10  # fewer logged losses are drawn as points, without a smoothed curve


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


def loss_figure(rows: list[dict], title: str, target: str):
    """The loss curve of logged rows (each with ``step`` and ``loss``; ``epoch`` adds a top axis).

    ``target`` names what the MSE is measured on (ε, x₀, v). Rows without a finite positive
    loss are left out (the axis is logarithmic).
    """
    rows = _finite_loss_rows(rows)
    step = np.array([r["step"] for r in rows], dtype=np.float64)
    loss = np.array([r["loss"] for r in rows], dtype=np.float64)
    fig = new_figure(8, 4.5)
    ax = fig.add_subplot()
    _draw_loss(ax, step, loss)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"loss (MSE on {target})")
    last = rows[-1] if rows else {}
    if last.get("epoch"):  # a second x axis in epochs
        per_epoch = last["step"] / last["epoch"]
        top = ax.secondary_xaxis(
            "top", functions=(lambda s: s / per_epoch, lambda e: e * per_epoch)
        )
        top.set_xlabel("epoch")
    ax.set_title(title, fontsize=11)
    return fig


def _finite_loss_rows(rows: list[dict]) -> list[dict]:
    return sorted(
        (r for r in rows if "step" in r and isinstance(r.get("loss"), (int, float))
         and np.isfinite(r["loss"]) and r["loss"] > 0),
        key=lambda r: r["step"],
    )  # fmt: skip


def _draw_loss(ax, x: np.ndarray, loss: np.ndarray, legend: bool = True) -> None:
    """The logged loss (and its smoothed curve) against ``x`` on a log axis."""
    if len(loss) >= SMOOTH_MIN_POINTS:  # enough points for smoothing to mean something
        ax.plot(x, loss, color="#9ecae1", lw=1, label="logged loss")
        ax.plot(x, smooth(loss, max(3, len(loss) // 25)), color="#08519c", lw=2, label="smoothed")
    else:
        ax.plot(x, loss, color="#08519c", lw=2, marker="o", ms=4, label="logged loss")
    if len(loss):
        ax.set_yscale("log")
        decades = np.log10(loss.max() / loss.min())
        mantissas = (2, 3, 4, 5, 6, 8) if decades < 1 else (2, 3, 5) if decades < 3 else ()
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 1.2, not 1.2 x 10^0
        ax.yaxis.set_minor_formatter(
            FuncFormatter(lambda v, _: f"{v:g}" if _mantissa(v) in mantissas else "")
        )
    ax.grid(True, which="both", alpha=0.3)
    if legend:
        ax.legend(loc="upper right")


def _images(n: float, _pos=None) -> str:
    """An images-seen tick: 1.5k, 20k, 1.2M."""
    for div, unit in ((1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:g}{unit}"
    return f"{n:g}"


def quality_figure(
    loss_rows: list[dict], eval_rows: list[dict], batch_size: int, title: str, target: str,
    best_step: int | None = None,
):  # fmt: skip
    """Loss, accuracy and FD / floor against images seen (top) and training minutes (below).

    ``loss_rows`` have ``step``, ``loss`` and ``elapsed_s``; ``eval_rows`` have ``step``,
    ``elapsed_s`` and ``eval`` with ``accuracy``, ``fd`` and ``fd_floor``. ``batch_size``
    turns steps into images seen; ``best_step`` (the kept best weights) is ringed.
    """
    losses = _finite_loss_rows(loss_rows)
    evals = sorted(
        (r for r in eval_rows if isinstance(r.get("eval"), dict)), key=lambda r: r["step"]
    )
    fig = new_figure(13, 7.5)
    axes = fig.subplots(2, 3)
    acc = np.array([100 * r["eval"]["accuracy"] for r in evals], dtype=np.float64)
    ratio = np.array([r["eval"]["fd"] / max(r["eval"]["fd_floor"], 1e-12) for r in evals])
    for row, (key, label) in enumerate((("images", "images seen"), ("minutes", "training time (minutes)"))):  # fmt: skip

        def x_of(rs, key=key):
            if key == "images":
                return np.array([r["step"] * batch_size for r in rs], dtype=np.float64)
            return np.array([r.get("elapsed_s", np.nan) / 60 for r in rs], dtype=np.float64)

        a_loss, a_acc, a_fd = axes[row]
        _draw_loss(a_loss, x_of(losses), np.array([r["loss"] for r in losses]), legend=row == 0)
        a_loss.set_ylabel(f"loss (MSE on {target})")
        a_acc.plot(x_of(evals), acc, color="#238b45", lw=2, marker="o", ms=4)
        a_acc.set_ylim(-2, 102)
        a_acc.set_ylabel("conditional accuracy (%)")
        a_fd.plot(x_of(evals), ratio, color="#cb181d", lw=2, marker="o", ms=4)
        a_fd.axhline(1.0, color="grey", ls="--", lw=1)
        a_fd.annotate("real vs real (floor)", (0, 1), xycoords=("axes fraction", "data"),
                      xytext=(4, 4), textcoords="offset points", fontsize=8, color="grey")  # fmt: skip
        if len(ratio) and np.all(ratio > 0):
            a_fd.set_yscale("log")
            a_fd.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        a_fd.set_ylabel("FD / floor (judge features)")
        if best_step is not None:
            at = [i for i, r in enumerate(evals) if r["step"] == best_step]
            for ax, y in ((a_acc, acc), (a_fd, ratio)):
                if at:
                    ax.plot(x_of(evals)[at], y[at], "o", ms=11, mfc="none", mec="black",
                            label="kept best")  # fmt: skip
            if at and row == 0:
                a_fd.legend(loc="upper right", fontsize=9)
        for ax in (a_loss, a_acc, a_fd):
            ax.set_xlabel(label)
            ax.grid(True, which="both", alpha=0.3)
            if key == "images":
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _images(v)))
    if evals:
        last = evals[-1]["eval"]
        title += (
            f"\nlast evaluation (step {evals[-1]['step']}, {last.get('n', '?')} samples): "
            f"accuracy {last['accuracy']:.1%}, FD {last['fd']:.3g} = "
            f"{last['fd'] / max(last['fd_floor'], 1e-12):.3g} x the floor"
        )
    fig.suptitle(title, fontsize=11)
    return fig


def schedule_figure(
    alphas_cumprod: np.ndarray,
    schedule: str,
    reference: tuple[str, np.ndarray],
    warn_level: float,
):
    """ᾱ_t, √ᾱ_t, √(1-ᾱ_t) and SNR(t) in dB of ``alphas_cumprod`` (T,) named ``schedule``.

    ``reference`` (its name, its ``alphas_cumprod`` with the same T) is drawn dotted; the
    caption warns when √ᾱ_T exceeds ``warn_level`` (x_T is then not pure noise).
    """
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    other_kind, other = reference[0], np.asarray(reference[1], dtype=np.float64)
    T = len(abar)
    t = np.arange(1, T + 1)

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
    b.plot(t, snr_db, lw=2, color="#08519c", label=schedule)
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

    s = float(np.sqrt(abar[-1]))
    fig.suptitle(f"Noise schedule: {schedule}, T = {T}", fontweight="bold")
    if s > warn_level:
        msg = f"Warning: $x_T$ is not pure noise: at t = T, √ᾱ = {s:.3f}, so {s:.1%} of the image is left."
        fig.supxlabel(msg, color=NOTE_COLOUR, fontsize=11)
    else:
        msg = f"At t = T, √ᾱ = {s:.4f}: {s:.2%} of the image is left, $x_T$ is pure noise."
        fig.supxlabel(msg, color="#333333", fontsize=11)
    return fig
