"""Stable Diffusion experiments on the stock diffusers ``StableDiffusionPipeline``.

:mod:`~difflab.sd.load` resolves ``--model`` (Hub id, diffusers folder or single file),
device, dtype and scheduler; :mod:`~difflab.sd.generate` makes images with A1111-style PNG
metadata and an honest safety report; :mod:`~difflab.experiments.sd_sweep` runs resumable guidance x
steps x seed sweeps measured by :mod:`~difflab.evaluation.sd_metrics` (CLIP score, detail) and drawn by
:mod:`~difflab.figures.sd`; :mod:`~difflab.sd.finetune` trains LoRA layers (its options and run
folder are :mod:`~difflab.sd.finetune_run`'s, the run-folder plumbing it shares with DDPM
training :mod:`difflab.runfolder`'s); :mod:`~difflab.sd.mini_train` trains mini-SD, a small
model in SD's structure (:mod:`~difflab.sd.mini`) with a lab safety checker
(:mod:`~difflab.sd.mini_safety`), saved as a standard pipeline folder. Heavy imports (diffusers, transformers) happen inside functions,
so importing this package is cheap. What to load and make is described by
:class:`~difflab.options.SDPipelineSpec`, :class:`~difflab.options.SDGeneration` and
:class:`~difflab.options.SDSweepAxes` (defaults and checks in one place).
"""

from difflab.options import DEFAULT_CLIP_MODEL, DEFAULT_SD_MODEL, SD_SCHEDULERS

DEFAULT_MODEL = DEFAULT_SD_MODEL
SCHEDULER_NAMES = SD_SCHEDULERS

__all__ = ["DEFAULT_CLIP_MODEL", "DEFAULT_MODEL", "SCHEDULER_NAMES"]
