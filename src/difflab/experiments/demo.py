"""``make demo``: the DDPM lab end to end on the embedded data.

Trains the ``quick`` preset on ``mnist5k`` (resuming if the run folder already holds a
finished run of the same settings), writes the lab's figures into ``figures/`` (a labelled
grid of every class, the forward and reverse processes with a GIF of every step, a guidance
grid, the loss curve and the schedule diagnostics), prints the reference classifier's
conditional accuracy, Fréchet distance and KID, runs a small resumable sweep over guidance
and steps into ``sweep/`` and ends by writing the lab report, ``report.html`` (self-contained)
and ``report.md``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

from difflab.config import get_preset
from difflab.ddpm import runs as ckpt
from difflab.ddpm.generate import sample_run
from difflab.ddpm.processes import forward_figure, plot_run, reverse_figure
from difflab.ddpm.training import train
from difflab.evaluation.during_training import TrainingEvaluator
from difflab.evaluation.evaluate import evaluate_run, format_eval
from difflab.evaluation.guidance_choice import describe
from difflab.experiments.ddpm_sweep import SWEEP_FILE, sweep_identity, sweep_run
from difflab.experiments.report import write_report
from difflab.options import (
    DDPMSweepAxes,
    EvalOptions,
    ForwardOptions,
    ReverseOptions,
    SampleOptions,
)

# The demo's sweep: small enough for well under a minute on two CPU cores.
SWEEP = DDPMSweepAxes(guidance=(0, 1, 2, 4), steps=(10, 25), samplers=("ddim",), n_per_class=6)


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
        result = train(cfg, out, device=device, resume=True, make_evaluator=TrainingEvaluator)
    else:
        result = train(cfg, out, device=device, make_evaluator=TrainingEvaluator)
    print(
        f"trained {result.steps} steps in {result.seconds:.0f} s "
        f"({result.images_per_s:.0f} images/s, {result.precision})"
    )
    if result.guidance is not None:
        print(describe(result.guidance))
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    grid = sample_run(out, SampleOptions(n_per_class=10), figures / "samples.png", device=device)
    print(
        f"wrote {figures / 'samples.png'} ({grid.images.shape[0]} samples in {grid.seconds:.1f} s)"
    )
    write_figures(out, figures, device=device)
    report = evaluate_run(out, EvalOptions(n_per_class=100), device=device)
    print(format_eval(report))
    sweep_and_report(out, device=device)
    return report


def sweep_and_report(run: Path, device: str = "cpu") -> Path:
    """The demo's small sweep into ``run/sweep``, then ``run/report.html`` and ``report.md``."""
    folder = run / "sweep"
    if (folder / SWEEP_FILE).is_file():  # the demo's own folder: redo it when anything changed
        old = json.loads((folder / SWEEP_FILE).read_text(encoding="utf-8"))
        if old != sweep_identity(run, SWEEP, device=device):
            print(
                f"{run} or the demo's sweep settings changed since {folder} was made; sweeping again"
            )
            shutil.rmtree(folder)
    sweep = sweep_run(run, SWEEP, folder, device=device)
    print(
        f"sweep {folder}: {sweep.cells_total} cells ({sweep.cells_run} computed) in {sweep.seconds:.0f} s"
    )
    result = write_report([run, folder], run / "report.html")
    print(f"wrote {result.html} and {result.markdown}; conclusions:")
    for line in result.conclusions:
        print(f"  - {line}")
    return result.html


def write_figures(run: Path, figures: Path, device: str = "cpu") -> list[Path]:
    """The lab's figures of ``run`` into ``figures``: forward, reverse (+ GIF), guidance, plots."""
    written = [forward_figure(ForwardOptions(run=str(run)), figures / "forward.png").path]
    rev = reverse_figure(
        run, ReverseOptions(), figures / "reverse.png", gif=figures / "reverse.gif", device=device
    )
    written += [rev.path, *rev.extra]
    guidance = SampleOptions(guidance=(0, 1, 3), cols="guidance")
    sample_run(run, guidance, figures / "guidance.png", device=device)
    written += [figures / "guidance.png", *plot_run(run, figures).written]
    print(f"wrote {figures}/: {', '.join(p.name for p in written)}")
    return written
