"""difflab: a lab bench for diffusion models.

Train a class-conditional DDPM from scratch on small images, watch the forward and reverse
processes, measure samples with a reference classifier, and run controlled experiments on
it and on Stable Diffusion. This module is the Python face of the lab: each function below
is the library call behind one command, takes the command's options as keyword arguments
(checked once, by the same options objects the command line and the web UI build) and
returns what the command prints::

    import difflab

    run = difflab.train("runs/quick", minutes=2)                  # difflab train
    result = difflab.sample(run, "samples.png", guidance=[0, 1, 3], cols="guidance")
    scores = difflab.evaluate(run, n_per_class=100)                # difflab eval
    sweep = difflab.sweep(run, "runs/quick-sweep", guidance=[0, 2, 4], steps=[10, 25])
    difflab.report([run, sweep.out], "report.html")

Importing difflab is cheap: torch, diffusers and the rest load on the first call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"
__all__ = [
    "distill", "evaluate", "load_run", "report", "sample", "sd_finetune", "sd_generate", "sd_sweep",
    "sweep", "train",
]  # fmt: skip


def _device(device: str) -> str:
    from difflab.devices import resolve_device

    return resolve_device(device)


def train(
    out: str | Path,
    preset: str = "quick",
    *,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    overrides: list[str] | tuple[str, ...] = (),
    **train_options: Any,
) -> Path:
    """``difflab train``: train ``preset`` into the run folder ``out`` and return its path.

    ``train_options`` are the keys of :class:`~difflab.config.TrainConfig` (``dataset``,
    ``minutes`` or ``epochs``, ``batch_size``, ``lr``, ``seed``, ``init_from``, ...);
    ``overrides`` are ``--set`` strings such as ``"model.base_channels=64"``. With
    ``eval_every`` (steps) or ``eval_every_minutes`` the EMA weights are evaluated as training
    goes (rows with ``"eval"`` in ``metrics.jsonl``, grids in ``figures/progress/``);
    ``keep_best="fd"``, ``snapshot_every`` and ``log_with="tensorboard"`` work as the flags.
    """
    from dataclasses import replace

    from difflab.config import get_preset
    from difflab.ddpm.training import train as train_run
    from difflab.evaluation.during_training import TrainingEvaluator

    cfg = get_preset(preset)
    if "epochs" in train_options and "minutes" not in train_options:
        train_options["minutes"] = None
    cfg = replace(cfg, train=replace(cfg.train, **train_options))
    cfg = cfg.override(list(overrides)) if overrides else cfg
    return train_run(
        cfg, out, device=_device(device), resume=resume, progress=progress,
        make_evaluator=TrainingEvaluator,
    ).run_dir  # fmt: skip


def distill(
    teacher: str | Path,
    out: str | Path,
    steps: int = 1,
    *,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    **options: Any,
) -> Path:
    """``difflab distill``: distil the run ``teacher`` into a student run folder ``out`` that
    samples in ``steps`` (1, 2 or 4) network passes; returns its path. ``options`` are the
    keys of :class:`~difflab.config.DistillConfig` (``minutes``, ``teacher_steps``, ...)."""
    from difflab.config import DistillConfig
    from difflab.ddpm.distill import distill as distill_run

    dc = DistillConfig(teacher=str(teacher), steps=steps, **options)
    return distill_run(dc, out, device=_device(device), resume=resume, progress=progress).run_dir


def load_run(run: str | Path, device: str = "cpu") -> tuple[Any, Any, Any]:
    """(model, diffusion, config) of a run folder, its EMA weights read from safetensors."""
    from difflab.ddpm.runs import load_run as load

    return load(run, device=_device(device))


def sample(
    run: str | Path, out: str | Path, *, device: str = "auto", progress: bool = True, **options: Any
) -> Any:
    """``difflab sample``: write ``out`` (.png grid or .npz); returns the images (N, C, H, W)
    in [-1, 1], their labels, the seconds taken and the settings. ``options`` are the fields
    of :class:`~difflab.options.SampleOptions` (``classes``, ``n_per_class``, ``guidance``,
    ``steps``, ``sampler``, ``seed``, ``rows``, ``cols``, ...)."""
    from difflab.ddpm.generate import sample_run
    from difflab.options import SampleOptions

    return sample_run(run, SampleOptions(**options), out, device=_device(device), progress=progress)


def evaluate(
    run: str | Path, *, device: str = "auto", progress: bool = True, **options: Any
) -> dict:
    """``difflab eval``: accuracy by the reference classifier, FD/KID against the floor and
    diversity, also written to ``RUN/eval.json``. ``options`` are the fields of
    :class:`~difflab.options.EvalOptions` (``n_per_class``, ``guidance``, ``steps``, ...)."""
    from difflab.evaluation.evaluate import evaluate_run
    from difflab.options import EvalOptions

    return evaluate_run(run, EvalOptions(**options), device=_device(device), progress=progress)


def sweep(
    run: str | Path, out: str | Path, *, device: str = "auto", progress: bool = True, **axes: Any
) -> Any:
    """``difflab sweep``: measure every cell of the grid into the resumable folder ``out``.
    ``axes`` are the fields of :class:`~difflab.options.DDPMSweepAxes` (``guidance``,
    ``steps``, ``samplers``, ``seeds``, ``n_per_class``, ``checkpoints="all"`` or
    ``checkpoints=[1000, 2000]`` for the run's snapshots as an axis, ...)."""
    from difflab.experiments.ddpm_sweep import sweep_run
    from difflab.options import DDPMSweepAxes

    return sweep_run(run, DDPMSweepAxes(**axes), out, device=_device(device), progress=progress)


def report(
    inputs: list[str | Path], out: str | Path = "report.html", title: str | None = None
) -> Any:
    """``difflab report``: one self-contained HTML file (and its Markdown twin) from runs
    and sweep folders, ending in conclusions written from the numbers."""
    from difflab.experiments.report import write_report

    return write_report([str(p) for p in inputs], out, title=title)


def sd_generate(
    out: str | Path, *, pipeline: dict | None = None, progress: bool = True, **options: Any
) -> Any:
    """``difflab sd generate``: images with their A1111 metadata and safety report.
    ``options`` are the fields of :class:`~difflab.options.SDGeneration` (``prompt``,
    ``guidance``, ``steps``, ``seed``, ``n``, ...); ``pipeline`` those of
    :class:`~difflab.options.SDPipelineSpec` (``model``, ``device``, ``dtype``, ...)."""
    from difflab.options import SDGeneration, SDPipelineSpec
    from difflab.sd.generate import generate

    return generate(
        SDGeneration(**options), out, SDPipelineSpec(**(pipeline or {})), progress=progress
    )


def sd_sweep(
    out: str | Path, *, pipeline: dict | None = None, progress: bool = True, **axes: Any
) -> Any:
    """``difflab sd sweep``: prompts x guidance x steps x seeds into the resumable folder
    ``out``; ``axes`` are the fields of :class:`~difflab.options.SDSweepAxes`."""
    from difflab.experiments.sd_sweep import sd_sweep as run_sweep
    from difflab.options import SDPipelineSpec, SDSweepAxes

    spec = SDPipelineSpec(**(pipeline or {}))
    return run_sweep(SDSweepAxes(**axes), out, spec, progress=progress)


def sd_finetune(
    out: str | Path,
    *,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    **options: Any,
) -> Any:
    """``difflab sd finetune``: LoRA fine-tuning into the run folder ``out``; ``options`` are
    the fields of :class:`~difflab.sd.finetune_run.FinetuneConfig` (``data``, ``steps``, ...)."""
    from difflab.sd.finetune import FinetuneConfig, finetune

    return finetune(FinetuneConfig(**options), out, device=device, resume=resume, progress=progress)
