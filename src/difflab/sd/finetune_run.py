"""The options and the run folder of ``difflab sd finetune`` (the loop is :mod:`~difflab.sd.finetune`).

:class:`FinetuneConfig` holds every option with its default and checks it once; the data order
(:func:`batch_indices`: step ``s`` takes positions ``s*B .. s*B+B-1`` of an endless run of
epochs, each a permutation drawn from ``(seed, epoch)``) makes a resume exact. The run folder
(:mod:`difflab.runfolder` names it and writes its checkpoints) holds ``config.json`` (every
option, the model's fingerprint, the library versions), ``pytorch_lora_weights.safetensors``
(diffusers' LoRA format), ``train_state.pt`` (LoRA and EMA weights, optimizer, step, RNG
states and the image list), ``metrics.jsonl``, ``figures/loss.png`` and ``validation/``.
:func:`open_run` checks ``--out`` against ``--resume``: a non-empty folder needs ``--resume``;
a resume with other options (only ``--steps`` and ``--device`` may change), another model,
other images or a damaged train state is refused with one line.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difflab import __version__, runfolder
from difflab.checks import check_count, check_seed
from difflab.errors import UsageError
from difflab.files import LOCK_FILE, atomic_path, read_json, read_jsonl
from difflab.runfolder import CONFIG, TRAIN_STATE
from difflab.sd import DEFAULT_MODEL
from difflab.sd.dataset import ImageFolder
from difflab.sd.load import ModelSource

FORMAT = 1
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
MIXED_PRECISION = ("no", "fp16", "bf16")
CHANGEABLE_ON_RESUME = ("steps",)  # besides the device, which is not an option of the run
SUBFOLDERS = ("figures", "validation")  # written by a run besides its top-level files
VALIDATION_SEEDS = (0, 1, 2, 3)
VALIDATION_STEPS = 25
VALIDATION_GUIDANCE = 7.5


@dataclass(frozen=True)
class FinetuneConfig:
    """Every option of a fine-tuning run; the defaults of ``difflab sd finetune``."""

    data: str
    instance_prompt: str | None = None  # for images without a caption
    rank: int = 4
    alpha: float | None = None  # None: equal to rank (LoRA scale 1)
    steps: int = 500
    lr: float = 1e-4
    batch_size: int = 1
    resolution: int = 512
    train_text_encoder: bool = False
    ema: bool = False
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    adam_8bit: bool = False  # bitsandbytes' 8-bit AdamW (CUDA only): optimizer state in 8 bits
    validation_prompt: str | None = None
    validate_every: int | None = None  # None: before training and at the end only
    checkpoint_every: int = 500
    seed: int = 0
    model: str = DEFAULT_MODEL

    def checked(self) -> FinetuneConfig:
        """This config with every option checked (a UsageError names the first bad one) and
        ``alpha`` resolved."""
        check_count(self.rank, "--rank")
        check_count(self.steps, "--steps")
        check_count(self.batch_size, "--batch-size")
        check_count(self.checkpoint_every, "--checkpoint-every")
        if self.validate_every is not None:
            check_count(self.validate_every, "--validate-every")
        check_seed(self.seed)
        alpha = self.rank if self.alpha is None else self.alpha
        for option, value in (("--alpha", alpha), ("--lr", self.lr)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UsageError(f"{option} {value!r}: must be a number > 0")
            if not math.isfinite(value) or value <= 0:
                raise UsageError(f"{option} {value:g}: must be a number > 0")
        r = self.resolution
        if isinstance(r, bool) or not isinstance(r, int) or r < 8 or r % 8:
            raise UsageError(f"--resolution {r}: must be a multiple of 8 (512 for SD 1.5)")
        if self.mixed_precision not in MIXED_PRECISION:
            raise UsageError(
                f"--mixed-precision {self.mixed_precision!r}: choose one of "
                + ", ".join(MIXED_PRECISION)
            )
        for option, text in (
            ("--instance-prompt", self.instance_prompt),
            ("--validation-prompt", self.validation_prompt),
        ):
            if text is not None and not str(text).strip():
                raise UsageError(f"{option} is empty; give a prompt or leave the option out")
        if self.validate_every is not None and not (self.validation_prompt or self.instance_prompt):
            raise UsageError("--validate-every needs --validation-prompt (or --instance-prompt)")
        if not str(self.data).strip():
            raise UsageError("--data is empty: pass the folder that holds the images")
        return replace(self, alpha=float(alpha), lr=float(self.lr))

    @property
    def validation(self) -> str | None:
        """The validation prompt, or None when no validation images are made."""
        if self.validation_prompt is None and self.validate_every is None:
            return None
        return self.validation_prompt or self.instance_prompt


@dataclass
class FinetuneResult:
    out: Path
    lora: Path
    steps: int  # where the run stands
    steps_run: int  # trained by this call
    seconds: float  # training time of this call
    final_loss: float  # mean of the last (up to) 10 steps
    validation: list[Path] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(self.steps_run, 1)


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    g = runfolder.epoch_generator(seed, epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The images of ``step``: positions ``step*B ..`` of epochs permuted by (seed, epoch)."""
    start = step * batch_size
    return [_permutation(n, seed, p // n)[p % n] for p in range(start, start + batch_size)]


# -- the folder ----------------------------------------------------------------------------
def recorded_options(cfg: FinetuneConfig, source: ModelSource) -> dict[str, Any]:
    """The options as ``config.json`` records them (data folder and model resolved)."""
    data = str(Path(cfg.data).expanduser().resolve())
    return asdict(cfg) | {"data": data, "model": source.location}


def open_run(
    out: Path, resume: bool, cfg: FinetuneConfig, source: ModelSource, fingerprint: dict
) -> dict[str, Any] | None:
    """Check ``--out`` against ``--resume``; the train state to resume from, or None."""
    where = f"--out {out}"
    if out.exists() and not out.is_dir():
        raise UsageError(f"{where}: is a file, not a folder")
    if not resume:
        if out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()):
            raise UsageError(
                f"{where}: is not empty; pass --resume to continue the run there, "
                "or choose another --out"
            )
        return None
    if not (out / TRAIN_STATE).is_file() or not (out / CONFIG).is_file():
        raise UsageError(
            f"--resume: {out} holds no checkpoint ({TRAIN_STATE}) to resume; "
            "start the run in an empty --out"
        )
    saved = read_json(out / CONFIG)  # one line naming the file when it is not a JSON object
    names = [f.name for f in fields(FinetuneConfig) if f.name not in CHANGEABLE_ON_RESUME]
    mine = recorded_options(cfg, source)
    runfolder.check_same_options(saved, mine, names, out, "--steps and --device")
    if saved.get("model_fingerprint") != fingerprint:
        raise UsageError(f"--resume: --model {cfg.model} changed since the run started")
    state = runfolder.load_train_state(out)
    if state.get("format") != FORMAT:
        raise UsageError(f"--resume: {out / TRAIN_STATE} is of another format")
    if cfg.steps < state["step"]:
        raise UsageError(
            f"--steps {cfg.steps}: the run in {out} is already at step {state['step']}"
        )
    return state


def check_same_images(state: dict[str, Any], data: ImageFolder, cfg: FinetuneConfig) -> None:
    """Refuse a resume on other images or captions than the run started with."""
    where = f"--resume: --data {cfg.data}"
    was, now = list(state["files"]), data.files
    if was != now:
        added = sorted(set(now) - set(was))
        removed = sorted(set(was) - set(now))
        detail = "; ".join(
            f"{what} {', '.join(names[:3])}" + (" ..." if len(names) > 3 else "")
            for what, names in (("added", added), ("removed", removed))
            if names
        )
        raise UsageError(
            f"{where}: the images changed since the run started ({detail}); "
            "an exact resume needs the same images"
        )
    if list(state["captions"]) != data.captions:
        raise UsageError(f"{where}: the captions changed since the run started")


def config_record(
    cfg: FinetuneConfig, source: ModelSource, fingerprint: dict, images: int, prediction: str
) -> dict[str, Any]:
    """What ``config.json`` holds: the options, the model's fingerprint and the versions."""
    import diffusers
    import peft

    te = list(TEXT_ENCODER_TARGETS) if cfg.train_text_encoder else []
    return recorded_options(cfg, source) | {
        "format": FORMAT, "model_fingerprint": fingerprint, "images": images,
        "prediction_type": prediction,
        "target_modules": {"unet": list(UNET_TARGETS), "text_encoder": te},
        "versions": {"difflab": __version__, "diffusers": diffusers.__version__,
                     "peft": peft.__version__, "torch": torch.__version__},
    }  # fmt: skip


def write_lora(path: Path, weights: dict[str, torch.Tensor], modules: dict[str, Any]) -> None:
    """Write LoRA ``weights`` (named ``PREFIX.PARAMETER``, PREFIX a key of ``modules``: the
    peft-adapted ``unet`` and ``text_encoder``) as diffusers' ``save_lora_weights`` does."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers: dict[str, Any] = {}
    for prefix, module in modules.items():
        mine = {n[len(prefix) + 1 :]: t for n, t in weights.items() if n.startswith(prefix + ".")}
        if mine:
            state = get_peft_model_state_dict(module, state_dict=mine)
            layers[f"{prefix}_lora_layers"] = convert_state_dict_to_diffusers(
                {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
            )
            layers[f"{prefix}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
    with atomic_path(path) as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp.parent, weight_name=tmp.name, **layers)


def write_validation(
    out: Path, step: int, pixels: np.ndarray, flags: list[bool], prompt: str, ema: bool
) -> Path:
    """``validation/step_NNNNNN.png``: the validation images of ``step`` in one labelled row."""
    from difflab.figures.images import save_png
    from difflab.figures.sd import validation_grid

    seeds = list(VALIDATION_SEEDS)
    path = out / "validation" / f"step_{step:06d}.png"
    path.parent.mkdir(exist_ok=True)
    settings = {
        "step": step, "prompt": prompt, "seeds": seeds, "guidance": VALIDATION_GUIDANCE,
        "steps": VALIDATION_STEPS, "ema": ema,
    }  # fmt: skip
    save_png(path, validation_grid(pixels, flags, seeds, step, prompt), settings)
    return path


def plot_loss(out: Path, cfg: FinetuneConfig, prediction: str, images: int) -> list[Path]:
    """``figures/loss.png`` from ``metrics.jsonl`` (nothing when no step was logged)."""
    from difflab.figures.images import render_figure, save_png
    from difflab.figures.runs import loss_figure

    rows = read_jsonl(out / runfolder.METRICS)
    if not rows:
        return []
    target = "ε" if prediction == "epsilon" else "v"
    title = (
        f"LoRA fine-tuning: {out.name} (rank {cfg.rank}, lr {cfg.lr:g}, "
        f"{images} images, batch {cfg.batch_size}), last loss {rows[-1]['loss']:.4f}"
    )
    path = out / "figures" / "loss.png"
    path.parent.mkdir(exist_ok=True)
    save_png(path, render_figure(loss_figure(rows, title, target)), {"run": str(out)})
    return [path]
