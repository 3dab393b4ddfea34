"""Training mini-SD: three phases in one resumable folder, then the pipeline folder.

:func:`train_mini_sd` trains the VAE, then (on the VAE's latents, rescaled by the measured
``scaling_factor``) the UNet with the text encoder, then the lab safety checker
(:mod:`difflab.sd.mini`, :mod:`difflab.sd.mini_safety` own the models and losses). While it
trains, ``--out`` is a training folder: ``mini_train.safetensors`` (every weight) and
``train_state.pt`` (phase, step, optimizer, losses, time spent) written by
:func:`~difflab.runfolder.save_checkpoint` every ``checkpoint_every`` steps, at the end of each
phase and on SIGINT/SIGTERM (:func:`~difflab.runfolder.stop_on_signals`); each step's draws
come from :func:`~difflab.runfolder.step_generator`, so ``resume=True`` continues exactly (the
same weights as a run that was never stopped). ``minutes`` caps the wall time, shared out
between the phases (:data:`PHASE_SHARE`); the time spent is kept across a resume. At the end
the folder becomes a standard ``StableDiffusionPipeline`` folder and the training files go.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from difflab.errors import UsageError
from difflab.files import atomic_path
from difflab.runfolder import (
    TRAIN_STATE,
    TrainingDiverged,
    clean_folder,
    held,
    load_train_state,
    progress_bar,
    save_checkpoint,
    step_generator,
    stop_on_signals,
    weights_match,
)
from difflab.sd.mini import (
    MiniSDConfig,
    align_text_encoder,
    build_parts,
    caption,
    caption_templates,
    encode_all,
    measured_scaling_factor,
    save_mini_sd,
    to_pixels,
    unet_loss,
    vae_loss,
)
from difflab.sd.mini_safety import (
    checker_accuracy,
    checker_loss,
    clip_inputs,
    feature_extractor,
    finish_checker,
    new_checker,
)
from difflab.sd.tiny import _scheduler, tiny_tokenizer

WEIGHTS = "mini_train.safetensors"
PHASES = ("vae", "unet", "safety")
PHASE_SHARE = {"vae": 0.2, "unet": 0.72, "safety": 0.08}  # of --minutes
SEED_OFFSET = {"vae": 0, "unet": 1, "safety": 2}  # each phase its own random streams


@dataclass
class MiniSDResult:
    out: Path
    steps: dict[str, int]  # phase -> steps run
    seconds: dict[str, float]
    losses: dict[str, float]  # phase -> mean of its last 20 losses
    scaling_factor: float
    flagged_concept: str | None
    safety_accuracy: float | None
    notes: list[str] = field(default_factory=list)


def _weights(models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": v.detach().contiguous().clone()
        for name, m in models.items()
        for k, v in m.state_dict().items()
    }


def _load_weights(models: dict[str, torch.nn.Module], path: Path) -> None:
    tensors = load_file(path)
    for name, m in models.items():
        prefix = f"{name}."
        m.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})


def _write(models: dict[str, torch.nn.Module]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        with atomic_path(path) as tmp:
            save_file(_weights(models), str(tmp))

    return write


def train_mini_sd(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: tuple[str, ...],
    out: str | Path,
    dataset: str = "dataset",
    cfg: MiniSDConfig | None = None,
    flagged_concept: str | None = None,
    minutes: float | None = None,
    seed: int = 0,
    progress: bool = True,
    resume: bool = False,
    checkpoint_every: int = 200,
    options: dict[str, Any] | None = None,
) -> MiniSDResult:
    """Train mini-SD on ``images`` (uint8 (N, C, H, W)) with int ``labels`` into ``out`` (see
    module doc). ``flagged_concept``: the class name the safety checker flags (None: none).
    ``options``: what the caller wants checked on resume (saved in the train state)."""
    cfg = cfg or MiniSDConfig()
    out = Path(out)
    with held(out, create=True), stop_on_signals() as stop:
        clean_folder(out)
        torch.manual_seed(seed)
        x = to_pixels(images, cfg.resolution)
        y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        tokenizer = tiny_tokenizer()
        parts = build_parts(cfg, tokenizer) | {"tokenizer": tokenizer, "scheduler": _scheduler()}
        from diffusers import DDPMScheduler

        parts["noise_schedule"] = DDPMScheduler.from_config(parts["scheduler"].config)
        models = {k: parts[k] for k in ("vae", "text_encoder", "unet")}
        checker = concept = None
        if flagged_concept is not None:
            checker, concept = new_checker(tokenizer)
            models |= {"checker": checker, "concept": concept}
        state: dict[str, Any] = {
            "phase": "vae", "step": 0, "optimizer": None, "steps": {}, "seconds": {},
            "losses": {}, "recent": [], "scaling_factor": None, "options": options or {},
        }  # fmt: skip
        if resume:
            state = load_train_state(out)
            if not weights_match(state, out / WEIGHTS):
                raise UsageError(
                    f"--resume: {out / WEIGHTS} is not the one saved with {TRAIN_STATE}; the "
                    "run cannot be resumed: start it again in another folder"
                )
            _load_weights(models, out / WEIGHTS)
        if state["scaling_factor"] is not None:
            parts["vae"].register_to_config(scaling_factor=state["scaling_factor"])
        budget = None if minutes is None else 60.0 * minutes
        templates = caption_templates(dataset, class_names)
        captions_of = [[caption(t, c) for t in templates] for c in class_names]

        def checkpoint(opt: torch.optim.Optimizer | None) -> None:
            state["optimizer"] = None if opt is None else opt.state_dict()
            save_checkpoint(out, WEIGHTS, _write(models), state)

        options = " ".join(f"--{k} {v}" for k, v in state["options"].items() if v is not None)
        resume_command = f"difflab sd mini {options} --out {out} --resume".replace("  ", " ")
        flagged = None if checker is None else y == class_names.index(flagged_concept)
        inputs = None
        todo = PHASES[PHASES.index(state["phase"]) :] if state["phase"] in PHASES else ()
        for name in todo:
            if name == "safety" and checker is None:
                continue
            if name == "unet" and state["scaling_factor"] is None:
                parts["vae"].eval().requires_grad_(False)
                state["scaling_factor"] = measured_scaling_factor(
                    *encode_all(parts["vae"], x), seed
                )
                if cfg.text_align_steps:  # once, before the UNet's first step
                    state["losses"]["text_align"] = align_text_encoder(
                        parts["text_encoder"], tokenizer, captions_of, cfg.text_align_steps,
                        cfg.lr, seed + 3,
                    )  # fmt: skip
            parts["vae"].register_to_config(scaling_factor=state["scaling_factor"] or 1.0)
            if name == "safety":
                inputs = clip_inputs(feature_extractor(), x)
            params, loss_fn, lr, steps = _setup(name, parts, checker, concept, x, inputs, flagged, captions_of, y, cfg)  # fmt: skip
            opt = torch.optim.AdamW(params, lr=lr)
            if state["optimizer"] is not None and state["phase"] == name:
                opt.load_state_dict(state["optimizer"])
            share = None if budget is None else PHASE_SHARE[name] * budget
            _run_phase(name, steps, params, loss_fn, opt, share, seed + SEED_OFFSET[name],
                       state, checkpoint, checkpoint_every, stop, out, progress, resume_command)  # fmt: skip
            state |= {"phase": PHASES[PHASES.index(name) + 1] if name != "safety" else "done"}
            state |= {"step": 0, "recent": []}
            checkpoint(None)
        parts["unet"].eval().requires_grad_(False)
        parts["text_encoder"].eval().requires_grad_(False)
        accuracy = None
        if checker is not None:
            finish_checker(checker, concept)
            if inputs is None:
                inputs = clip_inputs(feature_extractor(), x)
            accuracy = checker_accuracy(checker, inputs, y == class_names.index(flagged_concept))
        record = {
            "format": "difflab mini-sd 1",
            "dataset": dataset,
            "class_names": list(class_names),
            "caption_templates": list(templates),
            "flagged_concept": flagged_concept,
            "safety_checker": "difflab lab stand-in: a StableDiffusionSafetyChecker whose concept "
            "embedding was trained to recognise the flagged class (not SD's NSFW checker)",
            "safety_accuracy_train": accuracy,
            "scaling_factor": state["scaling_factor"],
            "guidance": cfg.guidance,
            "text_encoder": "trained with the UNet"
            if cfg.train_text_encoder
            else "frozen (after the alignment)",
            "text_encoder_aligned_steps": cfg.text_align_steps,
            "seed": seed,
            "minutes": minutes,
            "steps": state["steps"],
            "seconds": {k: round(v, 2) for k, v in state["seconds"].items()},
            "final_loss": state["losses"],
            "config": asdict(cfg),
            "options": state["options"],
        }
        save_mini_sd(parts, checker, None if checker is None else feature_extractor(), record, out)
        for name in (WEIGHTS, TRAIN_STATE):
            (out / name).unlink(missing_ok=True)
    return MiniSDResult(
        out, state["steps"], state["seconds"], state["losses"], state["scaling_factor"],
        flagged_concept, accuracy,
    )  # fmt: skip


def _setup(
    name: str, parts: dict[str, Any], checker: Any, concept: Any, x: torch.Tensor,
    inputs: torch.Tensor | None, flagged: torch.Tensor | None, captions_of: list[list[str]],
    y: torch.Tensor, cfg: MiniSDConfig,
) -> tuple[list, Callable, float, int]:  # fmt: skip
    """The trained parameters, the loss of one batch, the learning rate and the step count of
    phase ``name``; every other part is frozen in eval mode."""
    for part in ("vae", "text_encoder", "unet"):
        parts[part].eval().requires_grad_(False)
    if checker is not None:
        checker.eval().requires_grad_(False)
    if name == "vae":
        vae = parts["vae"].train().requires_grad_(True)
        return list(vae.parameters()), lambda g: vae_loss(vae, x, cfg, g), cfg.lr, cfg.vae_steps
    if name == "unet":
        latents = encode_all(parts["vae"], x)  # (N, 4, h, w) mean and std of q(z|x)
        params = list(parts["unet"].train().requires_grad_(True).parameters())
        if cfg.train_text_encoder:
            params += list(parts["text_encoder"].train().requires_grad_(True).parameters())

        def loss(g: torch.Generator) -> torch.Tensor:
            return unet_loss(parts, latents, captions_of, y, cfg, g)

        return params, loss, cfg.unet_lr, cfg.unet_steps
    checker.train().requires_grad_(True)
    params = [*checker.vision_model.parameters(), *checker.visual_projection.parameters()]
    return (
        [*params, *concept.parameters()],
        lambda g: checker_loss(checker, concept, inputs, flagged, cfg, g),
        cfg.lr,
        cfg.safety_steps,
    )


def _run_phase(
    name: str, steps: int, params: list, loss_fn: Callable, opt: torch.optim.Optimizer,
    budget: float | None, seed: int, state: dict[str, Any], checkpoint: Callable,
    every: int, stop: Any, out: Path, progress: bool, resume_command: str,
) -> None:  # fmt: skip
    """Steps ``state["step"]`` .. ``steps`` of one phase (fewer when its ``budget`` in seconds
    is spent); the state holds the step, the time spent and the recent losses."""
    step = state["step"] if state["phase"] == name else 0
    state |= {"phase": name, "step": step}
    spent = state["seconds"].get(name, 0.0)
    start = time.monotonic() - spent
    bar = progress_bar(steps, step, f"mini-sd {name}", "step", progress)
    try:
        while step < steps:
            if budget is not None and step and time.monotonic() - start > budget:
                break
            loss = loss_fn(step_generator(seed, step))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            value = loss.item()
            if not math.isfinite(value):
                raise TrainingDiverged(f"mini-sd {name}: the loss became {value} at step {step}")
            step += 1
            state["recent"] = [*state["recent"], value][-20:]
            state["step"], state["steps"][name] = step, step
            state["seconds"][name] = time.monotonic() - start
            state["losses"][name] = float(np.mean(state["recent"]))
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
            bar.update(1)
            if stop:
                checkpoint(opt)
                raise stop.interrupted(step, out, resume_command)
            if every and step % every == 0 and step < steps:
                checkpoint(opt)
    finally:
        bar.close()
