"""``make demo``: the DDPM lab end to end on the embedded data.

Trains the ``quick`` preset on ``mnist5k`` (resuming if the run folder already holds a
finished run of the same settings), writes the lab's figures into ``figures/`` (a labelled
grid of every class, the forward and reverse processes with a GIF of every step, a guidance
grid, the loss curve and the schedule diagnostics), and prints the reference classifier's
conditional accuracy and Fréchet distance.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from difflab import checkpoint as ckpt
from difflab.config import get_preset
from difflab.evaluation.evaluate import evaluate_run, format_eval
from difflab.figures import forward_figure, reverse_figure
from difflab.generate import sample_run
from difflab.plots import plot_run
from difflab.training import train


def run_demo(
    out: str | Path = "runs/demo", minutes: float | None = None, device: str = "cpu"
) -> dict:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = get_preset("quick")
    if minutes is not None:
        cfg = replace(cfg, train=replace(cfg.train, minutes=minutes, epochs=None))
    if (out / ckpt.TRAIN_STATE).exists():
        print(f"{out} already holds a run; training it further (delete the folder to start over)")
        result = train(cfg, out, device=device, resume=True)
    else:
        result = train(cfg, out, device=device)
    print(
        f"trained {result.steps} steps in {result.seconds:.0f} s ({result.images_per_s:.0f} images/s)"
    )
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    grid = sample_run(out, figures / "samples.png", n_per_class=10, device=device)
    print(
        f"wrote {figures / 'samples.png'} ({grid.images.shape[0]} samples in {grid.seconds:.1f} s)"
    )
    write_figures(out, figures, device=device)
    report = evaluate_run(out, n_per_class=100, device=device)
    print(format_eval(report))
    return report


def write_figures(run: Path, figures: Path, device: str = "cpu") -> list[Path]:
    """The lab's figures of ``run`` into ``figures``: forward, reverse (+ GIF), guidance, plots."""
    written = [forward_figure(figures / "forward.png", run=run).path]
    rev = reverse_figure(run, figures / "reverse.png", gif=figures / "reverse.gif", device=device)
    written += [rev.path, *rev.extra]
    sample_run(run, figures / "guidance.png", guidance="0,1,3", cols="guidance", device=device)
    written += [figures / "guidance.png", *plot_run(run, figures).written]
    print(f"wrote {figures}/: {', '.join(p.name for p in written)}")
    return written
