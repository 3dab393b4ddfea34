"""The Train tab: start, follow, stop and resume a training into ``runs/NAME``.

A training is a job like any other (one at a time on the device); a run has at most one
training queued or running (checked and queued at once, so two quick clicks queue one), and
the job holds the run folder's lock (:func:`difflab.files.folder_lock`) as ``difflab train``
does, so the UI and the command line never train one run together. Stop cancels between two
steps, after which the trainer saves a checkpoint, so the run resumes exactly. With an
evaluation interval the trainer measures its EMA weights as it goes (``train --eval-every``);
the tab polls the latest training job every two seconds for its status line, its loss
curve, its quality curves (accuracy and FD over the floor against images seen) and the
latest grid of ``figures/progress/``.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from difflab.checks import check_choice, check_float, check_seed
from difflab.config import PRESETS, RunConfig, get_preset
from difflab.ddpm.data import DATASET_NAMES
from difflab.ddpm.runs import CONFIG, METRICS, TRAIN_STATE
from difflab.errors import UsageError
from difflab.files import folder_lock
from difflab.ui import limits
from difflab.ui.jobs import Job
from difflab.ui.lab import Lab, loss_rows
from difflab.ui.paths import inside, safe_name

DEFAULT_MINUTES = get_preset("quick").train.minutes  # as `difflab train` with no --minutes


def start_training(
    lab: Lab,
    name: str,
    dataset: str = "mnist5k",
    preset: str = "quick",
    minutes: float | None = DEFAULT_MINUTES,
    seed: int = 0,
    resume: bool = False,
    eval_every: int = 0,
) -> Job:
    """Queue a training (or its resumption) into ``runs/NAME``; returns the job.

    ``eval_every`` (steps; 0: off) evaluates the EMA weights as training goes; a resumed run
    keeps its own interval."""
    name = safe_name(name, "run name")
    out = inside(lab.runs, name, "run name")
    check_choice(preset, tuple(PRESETS), "preset")
    check_choice(dataset, tuple(DATASET_NAMES), "dataset")
    seed = check_seed(seed, "seed")
    if resume:
        if not (out / TRAIN_STATE).is_file():
            raise UsageError(f"run {name!r}: nothing to resume (no {TRAIN_STATE})")
        cfg = lab.run_config(out)
    else:
        if (out / TRAIN_STATE).exists() or (out / CONFIG).exists():
            raise UsageError(
                f"run {name!r}: already exists; tick 'resume' to continue it, or choose a new name"
            )
        minutes = check_float(minutes, "minutes", 0.05)
        limits.at_most(minutes, limits.TRAIN_MINUTES, "minutes")
        cfg = get_preset(preset)
        every = check_float(eval_every or 0, "evaluate every (steps)", 0)
        if every != int(every):
            raise UsageError(f"evaluate every (steps) {eval_every!r}: must be a whole number")
        tc = replace(cfg.train, dataset=dataset, seed=seed, minutes=minutes, epochs=None)
        cfg = replace(cfg, train=replace(tc, eval_every=int(every)))
    work = lambda job: _train(lab, job, cfg, out, resume)  # noqa: E731
    return lab.jobs.submit("train", name, work, key=f"run {name!r}")


def _train(lab: Lab, job: Job, cfg: RunConfig, out: Path, resume: bool) -> Any:
    job.update(0.0, "loading data and building the model")
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, "run name"):  # the lock `difflab train` takes
        return _fit(lab, job, cfg, out, resume)


def _fit(lab: Lab, job: Job, cfg: RunConfig, out: Path, resume: bool) -> str:
    from difflab.ddpm.processes import plot_run
    from difflab.ddpm.training import Trainer
    from difflab.evaluation.during_training import TrainingEvaluator

    if (cfg.train.evaluates or cfg.train.choose_guidance) and not resume:
        job.update(0.0, "loading the reference classifier (trained once, then cached)")
    trainer = Trainer(
        cfg, out, device=lab.device, resume=resume, progress=False,
        make_evaluator=TrainingEvaluator,
    )  # fmt: skip
    total, budget = trainer.total_steps, (cfg.train.minutes or 0) * 60
    t_start, first_step = time.perf_counter(), trainer.step

    def done() -> float:
        return trainer.step / total if total else trainer.elapsed / max(budget, 1e-9)

    start = done()

    def should_stop() -> bool:
        now, spent = done(), time.perf_counter() - t_start
        rate = (trainer.step - first_step) * cfg.train.batch_size / max(spent, 1e-9)
        text = f"step {trainer.step}, {rate:.0f} images/s"
        if now > start:
            text += f", about {spent * (1 - now) / (now - start):.0f} s left"
        job.update(now, text)
        return job.cancelled()

    result = trainer.fit(should_stop=should_stop)
    plot_run(out)  # loss and schedule figures for the Runs tab
    what = "stopped" if job.cancelled() else "finished"
    chosen = ""
    if result.guidance is not None:
        from difflab.evaluation.guidance_choice import describe

        chosen = "; " + describe(result.guidance)
    job.update(
        1.0 if not job.cancelled() else None,
        f"{what} at step {result.steps}; checkpoint saved in {out.name} "
        f"({result.images_per_s:.0f} images/s, {result.precision}){chosen}",
    )
    return str(out)


def training_status(lab: Lab, name: str | None = None) -> tuple[str, Path | None]:
    """One line about the latest training job (of ``name``, if given) and its run folder."""
    jobs = [j for j in lab.jobs.jobs() if j.kind == "train" and name in (None, j.title)]
    if not jobs:
        return "No training started from this UI yet.", None
    return jobs[0].status_line(), lab.runs / jobs[0].title


def quality_rows(run: Path | None) -> list[dict]:
    """The evaluations made while training (rows of ``metrics.jsonl`` with ``eval``)."""
    from difflab.files import read_jsonl

    if run is None:
        return []
    try:
        rows = read_jsonl(run / METRICS)
    except (OSError, UsageError, ValueError):
        return []
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get("eval"), dict)]


def quality_plots(rows: list[dict], batch_size: int | None) -> tuple[Any, Any]:
    """(accuracy %, FD / floor) against images seen, as the two LinePlots' frames."""
    import pandas as pd

    per_step = batch_size or 1
    seen = [r.get("images_seen", r["step"] * per_step) for r in rows]
    acc = [100 * float(r["eval"].get("accuracy", float("nan"))) for r in rows]
    ratio = [float(r["eval"].get("fd_ratio", float("nan"))) for r in rows]
    return (
        pd.DataFrame({"images seen": seen, "accuracy (%)": acc}),
        pd.DataFrame({"images seen": seen, "FD / floor": ratio}),
    )


def latest_grid(run: Path | None) -> str | None:
    """The newest grid of ``figures/progress/`` (a path), or None."""
    if run is None or not (run / "figures" / "progress").is_dir():
        return None
    grids = sorted((run / "figures" / "progress").glob("step-*.png"))
    return str(grids[-1]) if grids else None


def stop_training(lab: Lab, name: str) -> str:
    """Cancel the training of run ``name`` (running: it saves a checkpoint and stops)."""
    active = [j for j in lab.jobs.active("train") if j.title == str(name).strip()]
    if not active:
        raise UsageError(f"run {name!r}: no training of it is running or queued")
    for job in active:
        job.cancel()
    return f"Stopping {name}: a checkpoint is saved first; tick 'resume' to continue it later."


def build(lab: Lab, page) -> None:
    import gradio as gr

    from difflab.ui.widgets import friendly, loss_plot, status_box

    with gr.Tab("Train", id="train"):
        with gr.Row():
            with gr.Column(scale=1):
                name = gr.Textbox(label="Run name", value="ui-run")
                dataset = gr.Dropdown(list(DATASET_NAMES), value="mnist5k", label="Dataset")
                preset = gr.Dropdown(list(PRESETS), value="quick", label="Preset")
                minutes = gr.Number(value=DEFAULT_MINUTES, label="Minutes of training", minimum=0.05, maximum=limits.TRAIN_MINUTES)  # fmt: skip
                seed = gr.Number(value=0, label="Seed", precision=0, minimum=0)
                eval_every = gr.Number(value=0, label="Evaluate every (steps; 0: never)", precision=0, minimum=0)  # fmt: skip
                resume = gr.Checkbox(label="Resume this run (keeps its settings)")
                with gr.Row():
                    start = gr.Button("Start", variant="primary")
                    stop = gr.Button("Stop", variant="stop")
            with gr.Column(scale=2):
                status = status_box()
                plot = gr.LinePlot(x="step", y="loss", label="Training loss", height=320)
                with gr.Row():
                    accuracy = gr.LinePlot(x="images seen", y="accuracy (%)", label="Accuracy while training", height=240)  # fmt: skip
                    fd = gr.LinePlot(x="images seen", y="FD / floor", label="FD over the real-vs-real floor", height=240)  # fmt: skip
                grid = gr.Image(label="Latest progress grid", type="filepath", interactive=False)
        timer = gr.Timer(2.0)

    @friendly
    def on_start(name, dataset, preset, minutes, seed, resume, eval_every=0):
        job = start_training(lab, name, dataset, preset, minutes, seed, resume, eval_every)
        return job.status_line()

    def on_tick():
        line, run = training_status(lab)
        rows = quality_rows(run)
        batch = rows[-1]["images_seen"] // max(rows[-1]["step"], 1) if rows else None
        acc, ratio = quality_plots(rows, batch)
        losses = loss_plot(loss_rows(run) if run is not None else [])
        return line, losses, acc, ratio, latest_grid(run)

    inputs = [name, dataset, preset, minutes, seed, resume, eval_every]
    start.click(on_start, inputs, status, api_name="train")
    stop.click(friendly(lambda n: stop_training(lab, n)), name, status, api_name="stop_training")
    timer.tick(on_tick, None, [status, plot, accuracy, fd, grid], api_name=False, show_progress="hidden")  # fmt: skip
