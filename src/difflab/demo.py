"""``make demo``: the DDPM lab end to end on the embedded data.

Trains the ``quick`` preset on ``mnist5k`` (resuming if the run folder already holds a
finished run of the same settings), samples a labelled grid of every class, and prints the
reference classifier's conditional accuracy and Fréchet distance.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from difflab import checkpoint as ckpt
from difflab.config import get_preset
from difflab.evaluation.evaluate import evaluate_run, format_eval
from difflab.generate import sample_run
from difflab.training import train


def run_demo(out: str | Path = "runs/demo", minutes: float | None = None, device: str = "cpu") -> dict:
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
    print(f"trained {result.steps} steps in {result.seconds:.0f} s ({result.images_per_s:.0f} images/s)")
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    grid = sample_run(out, figures / "samples.png", n_per_class=10, device=device)
    print(f"wrote {figures / 'samples.png'} ({grid.images.shape[0]} samples in {grid.seconds:.1f} s)")
    report = evaluate_run(out, n_per_class=100, device=device)
    print(format_eval(report))
    return report
