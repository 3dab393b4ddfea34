"""``difflab sd finetune``: LoRA fine-tuning of a Stable Diffusion 1.x/2.x pipeline.

As diffusers' ``train_dreambooth_lora`` / ``train_text_to_image_lora`` examples do: the
pipeline (:func:`~difflab.sd.load.load_pipeline`) is frozen, ``peft`` LoRA layers (rank
``--rank``, scale ``--alpha / --rank``, Gaussian-initialised A and zero B, so training starts
from the base model) go on the UNet's attention projections ``to_q``/``to_k``/``to_v``/
``to_out.0`` and, with ``--train-text-encoder``, on the CLIP text encoder's
``q_proj``/``k_proj``/``v_proj``/``out_proj``. Each step takes a batch of images of the
:mod:`~difflab.sd.dataset` folder, samples their VAE latents (each image is encoded once; its
latent mean and standard deviation are kept), scales them by ``vae.config.scaling_factor``,
noises them at random timesteps with a ``DDPMScheduler`` made from the model's scheduler
config, and takes the MSE between the UNet's prediction and the scheduler's target (the noise
for ``epsilon`` models, the velocity for ``v_prediction``). AdamW (weight decay 1e-2, gradient
norm clipped at 1) updates the LoRA parameters only; ``accelerate`` handles the device and
mixed precision (frozen weights in fp16/bf16, LoRA weights in fp32, as in the examples).
``--ema`` keeps an exponential moving average of the LoRA weights (decay ``min(0.999,
(1 + step) / (10 + step))``) and saves that.

Determinism and exact resume: the images of step ``s`` are positions ``s*B .. s*B+B-1`` of an
endless run of epochs, each a permutation drawn from ``(seed, epoch)``; the step's latent
sample, noise and timesteps come from a generator seeded with ``(seed, step)``. A checkpoint
(every ``--checkpoint-every`` steps and at the end) writes ``pytorch_lora_weights.safetensors``
(diffusers' LoRA format, read by ``StableDiffusionPipeline.load_lora_weights``) and then
``train_state.pt`` (LoRA and EMA weights, optimizer, step, RNG states and the image list;
read back with ``torch.load(weights_only=True)``), both atomically. ``--resume`` continues
from it, so N steps straight and K steps + resume + N - K steps give the same weights.
``config.json`` holds every option; a resume with other options (only ``--steps`` and
``--device`` may change) or with changed images is refused.

The run folder also gets ``metrics.jsonl`` (one line per step), ``figures/loss.png`` and,
with ``--validation-prompt`` or ``--validate-every``, ``validation/step_NNNNNN.png``: the
prompt at fixed seeds 0-3 before training, every ``--validate-every`` steps and at the end, made
as ``difflab sd generate --lora FILE --seed 0 --n 4 --guidance 7.5 --steps 25`` makes them (the
same images, in fp32).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from difflab import __version__
from difflab.checks import check_count, check_seed
from difflab.errors import UsageError
from difflab.files import (
    LOCK_FILE,
    append_jsonl,
    atomic_path,
    folder_lock,
    read_jsonl,
    write_json,
    write_text,
)
from difflab.options import SDPipelineSpec
from difflab.sd import DEFAULT_MODEL
from difflab.sd.dataset import ImageFolder, load_image_folder
from difflab.sd.generate import encode, run_pipeline
from difflab.sd.load import (
    LoadedPipeline,
    load_pipeline,
    model_fingerprint,
    quiet_loading,
    resolve_model,
)
from difflab.sd.lora import LORA_WEIGHTS
from difflab.sd.safety import to_uint8

FORMAT = 1
CONFIG = "config.json"
TRAIN_STATE = "train_state.pt"
METRICS = "metrics.jsonl"
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
MIXED_PRECISION = ("no", "fp16", "bf16")
CHANGEABLE_ON_RESUME = ("steps",)  # besides the device, which is not an option of the run
VALIDATION_SEEDS = (0, 1, 2, 3)
VALIDATION_STEPS = 25
VALIDATION_GUIDANCE = 7.5
EMA_DECAY = 0.999
MAX_GRAD_NORM = 1.0
WEIGHT_DECAY = 1e-2
ENCODE_BATCH = 8  # images per VAE call when the latents are cached


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
    g = torch.Generator().manual_seed((seed * 7919 + epoch) % (2**63))
    return tuple(torch.randperm(n, generator=g).tolist())


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The images of ``step``: positions ``step*B ..`` of epochs permuted by (seed, epoch)."""
    start = step * batch_size
    return [_permutation(n, seed, p // n)[p % n] for p in range(start, start + batch_size)]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of one step's random draws."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))


def _bnb_adamw(device: str) -> Any:
    """bitsandbytes' ``AdamW8bit``, or one line saying why it cannot be used here."""
    if not device.startswith("cuda"):
        raise UsageError(f"--adam-8bit needs a CUDA GPU (device: {device}); leave it out")
    try:
        import bitsandbytes
    except ImportError:
        raise UsageError("--adam-8bit needs bitsandbytes: pip install bitsandbytes") from None
    return bitsandbytes.optim.AdamW8bit


def _accelerator(mixed_precision: str, cpu: bool) -> Any:
    """An ``accelerate.Accelerator``. accelerate keeps one mixed-precision setting per process;
    a single-process caller (the tests, the UI) may start runs with different settings, so a
    conflicting state left by an earlier run is cleared first."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    state = AcceleratorState._shared_state
    single = PartialState._shared_state.get("num_processes", 1) == 1
    if (
        single
        and state
        and (state.get("_mixed_precision"), state.get("_cpu")) != (mixed_precision, cpu)
    ):
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "not set"
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


class FineTuner:
    """A LoRA fine-tuning run in the folder ``out``: construct (all checks, data and model
    loading; nothing written), read :attr:`notes`, then :meth:`fit`."""

    def __init__(
        self,
        config: FinetuneConfig,
        out: str | Path,
        device: str = "auto",
        resume: bool = False,
        progress: bool = True,
    ) -> None:
        from difflab.devices import resolve_device

        self.cfg = cfg = config.checked()
        self.out, self.resume, self.progress = Path(out), resume, progress
        device = resolve_device(device)
        if cfg.mixed_precision == "fp16" and not device.startswith("cuda"):
            raise UsageError(
                f"--mixed-precision fp16 needs a CUDA GPU (device: {device}); use bf16 or no"
            )
        if cfg.adam_8bit:
            _bnb_adamw(device)  # before any work: refuse on the CPU or without bitsandbytes
        self.source = resolve_model(cfg.model)
        self.fingerprint = model_fingerprint(self.source)
        state = self._check_out()
        self.data: ImageFolder = load_image_folder(cfg.data, cfg.resolution, cfg.instance_prompt)
        if state is not None:
            self._check_same_images(state)
        self.accelerator = _accelerator(cfg.mixed_precision, cpu=device == "cpu")
        self.device = self.accelerator.device
        self.loaded: LoadedPipeline = load_pipeline(
            SDPipelineSpec(model=cfg.model, device=str(self.device), dtype="fp32")
        )
        self.notes = list(self.loaded.notes) + self.data.notes
        self.weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            cfg.mixed_precision
        ]
        self._build()
        self.step, self.elapsed, self.last_checkpoint = 0, 0.0, 0
        if state is not None:
            self._load_state(state)

    # -- checks -----------------------------------------------------------------------------
    def _options(self) -> dict[str, Any]:
        """The options as ``config.json`` records them (data folder and model resolved)."""
        data = str(Path(self.cfg.data).expanduser().resolve())
        return asdict(self.cfg) | {"data": data, "model": self.source.location}

    def _check_out(self) -> dict[str, Any] | None:
        """Check ``--out`` against ``--resume``; the train state to resume from, or None."""
        out, where = self.out, f"--out {self.out}"
        if out.exists() and not out.is_dir():
            raise UsageError(f"{where}: is a file, not a folder")
        if not self.resume:
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
        try:
            saved = json.loads((out / CONFIG).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            raise UsageError(f"--resume: {out / CONFIG} is unreadable") from None
        mine = self._options()
        for f in fields(FinetuneConfig):
            if f.name not in CHANGEABLE_ON_RESUME and saved.get(f.name) != mine[f.name]:
                raise UsageError(
                    f"--resume: {_option(f.name)} is {_show(mine[f.name])} here but "
                    f"{_show(saved.get(f.name))} in the run in {out}; resume with the run's "
                    "options (only --steps and --device may change) or choose another --out"
                )
        if saved.get("model_fingerprint") != self.fingerprint:
            raise UsageError(f"--resume: --model {self.cfg.model} changed since the run started")
        state = torch.load(out / TRAIN_STATE, map_location="cpu", weights_only=True)
        if state.get("format") != FORMAT:
            raise UsageError(f"--resume: {out / TRAIN_STATE} is of another format")
        if self.cfg.steps < state["step"]:
            raise UsageError(
                f"--steps {self.cfg.steps}: the run in {out} is already at step {state['step']}"
            )
        return state

    def _check_same_images(self, state: dict[str, Any]) -> None:
        where = f"--resume: --data {self.cfg.data}"
        was, now = list(state["files"]), self.data.files
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
        if list(state["captions"]) != self.data.captions:
            raise UsageError(f"{where}: the captions changed since the run started")

    # -- set-up -----------------------------------------------------------------------------
    def _build(self) -> None:
        from diffusers import DDPMScheduler
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig, inject_adapter_in_model

        cfg, pipe = self.cfg, self.loaded.pipe
        self.unet, self.text_encoder, self.vae = pipe.unet, pipe.text_encoder, pipe.vae
        for m in (self.unet, self.text_encoder, self.vae):
            m.requires_grad_(False)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction = self.noise_scheduler.config.prediction_type
        if self.prediction not in ("epsilon", "v_prediction"):
            raise UsageError(
                f"--model {cfg.model}: predicts {self.prediction!r}; fine-tuning supports "
                "epsilon and v_prediction models"
            )
        self._cache_latents()
        self._cache_captions()
        if self.weight_dtype != torch.float32:  # frozen weights in half precision
            with quiet_loading():  # diffusers' note on casting with to(): nothing to keep fp32
                self.unet.to(dtype=self.weight_dtype)
                self.text_encoder.to(dtype=self.weight_dtype)
        torch.manual_seed(cfg.seed)  # the LoRA A matrices' initial values
        lora = {"r": cfg.rank, "lora_alpha": cfg.alpha, "init_lora_weights": "gaussian"}
        self.unet.add_adapter(LoraConfig(**lora, target_modules=list(UNET_TARGETS)))
        trained = [self.unet]
        if cfg.train_text_encoder:  # transformers' own add_adapter wants peft >= 0.22
            config = LoraConfig(**lora, target_modules=list(TEXT_ENCODER_TARGETS))
            inject_adapter_in_model(config, self.text_encoder)
            trained.append(self.text_encoder)
        cast_training_params(trained, dtype=torch.float32)
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                te = self.text_encoder  # transformers 5 renames the method
                getattr(te, "activation_checkpointing_enable", te.gradient_checkpointing_enable)()
        for m in trained:
            m.train()
        self.params = {
            f"{prefix}.{n}": p
            for prefix, m in zip(("unet", "text_encoder"), trained, strict=False)
            for n, p in m.named_parameters()
            if p.requires_grad
        }
        if cfg.adam_8bit:
            optimizer = _bnb_adamw(str(self.device))(
                self.params.values(), lr=cfg.lr, weight_decay=WEIGHT_DECAY
            )
        else:
            fused = {"fused": True} if self.device.type == "cuda" else {}
            optimizer = torch.optim.AdamW(
                self.params.values(), lr=cfg.lr, weight_decay=WEIGHT_DECAY, **fused
            )
        # the prepared modules (wrapped for distributed runs) train; the pipeline keeps its own
        *prepared, self.optimizer = self.accelerator.prepare(*trained, optimizer)
        self.unet_step = prepared[0]
        self.text_encoder_step = prepared[1] if cfg.train_text_encoder else self.text_encoder
        self.ema = {n: p.detach().clone() for n, p in self.params.items()} if cfg.ema else None

    @torch.no_grad()
    def _cache_latents(self) -> None:
        """Encode every image once; keep the mean and std of its latent distribution."""
        means, stds = [], []
        for i in range(0, len(self.data), ENCODE_BATCH):
            x = self.data.pixels[i : i + ENCODE_BATCH].to(self.device, torch.float32)
            dist = self.vae.encode(x / 127.5 - 1.0).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
        self.latent_mean, self.latent_std = torch.cat(means), torch.cat(stds)

    @torch.no_grad()
    def _cache_captions(self) -> None:
        """Tokenize each distinct caption once; embed them too when the text encoder is frozen."""
        tok = self.loaded.pipe.tokenizer
        distinct = sorted(set(self.data.captions))
        self.caption_index = torch.tensor([distinct.index(c) for c in self.data.captions])
        self.input_ids = tok(
            distinct, padding="max_length", max_length=tok.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)  # fmt: skip
        self.embeddings = (
            None
            if self.cfg.train_text_encoder
            else self.text_encoder(self.input_ids, return_dict=False)[0]
        )

    # -- state ------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        scaler = self.accelerator.scaler
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format": FORMAT, "step": self.step, "elapsed": self.elapsed,
            "lora": {n: p.detach().cpu().clone() for n, p in self.params.items()},
            "ema": None if self.ema is None else {n: t.cpu().clone() for n, t in self.ema.items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": None if scaler is None else scaler.state_dict(),
            "rng": rng, "files": self.data.files, "captions": self.data.captions,
        }  # fmt: skip

    def _load_state(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state["lora"][n])
            if self.ema is not None:
                for n, t in self.ema.items():
                    t.copy_(state["ema"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.accelerator.scaler is not None and state["scaler"] is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step = self.last_checkpoint = int(state["step"])
        self.elapsed = float(state["elapsed"])

    def save_lora(self, path: str | Path) -> None:
        """Write the LoRA weights (the EMA ones with ``--ema``) in diffusers' format."""
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        weights = self.ema if self.ema is not None else self.params
        layers: dict[str, Any] = {}
        for prefix, module in (("unet", self.unet), ("text_encoder", self.text_encoder)):
            mine = {
                n[len(prefix) + 1 :]: t for n, t in weights.items() if n.startswith(prefix + ".")
            }
            if mine:
                state = get_peft_model_state_dict(module, state_dict=mine)
                layers[f"{prefix}_lora_layers"] = convert_state_dict_to_diffusers(
                    {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
                )
                layers[f"{prefix}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
        with atomic_path(path) as tmp:
            StableDiffusionPipeline.save_lora_weights(tmp.parent, weight_name=tmp.name, **layers)

    def save_checkpoint(self) -> None:
        """The LoRA file, then the train state (which marks the checkpoint), both atomic."""
        if not self.accelerator.is_main_process:
            return
        self.save_lora(self.out / LORA_WEIGHTS)
        with atomic_path(self.out / TRAIN_STATE) as tmp:
            torch.save(self._state(), tmp)
        self.last_checkpoint = self.step

    def _config_record(self) -> dict[str, Any]:
        import diffusers
        import peft

        return self._options() | {
            "format": FORMAT, "model_fingerprint": self.fingerprint, "images": len(self.data),
            "prediction_type": self.prediction,
            "target_modules": {"unet": list(UNET_TARGETS), "text_encoder": list(TEXT_ENCODER_TARGETS) if self.cfg.train_text_encoder else []},
            "versions": {"difflab": __version__, "diffusers": diffusers.__version__, "peft": peft.__version__, "torch": torch.__version__},
        }  # fmt: skip

    # -- one step ---------------------------------------------------------------------------
    def _hidden_states(self, idx: list[int]) -> torch.Tensor:
        rows = self.caption_index[idx]
        if self.embeddings is not None:
            return self.embeddings[rows.to(self.device)]
        return self.text_encoder_step(self.input_ids[rows.to(self.device)], return_dict=False)[0]

    def train_step(self) -> float:
        """One optimizer step on the batch of ``self.step``; returns its loss."""
        from difflab.ddpm.training import TrainingDiverged

        cfg, dev = self.cfg, self.device
        idx = batch_indices(len(self.data), cfg.batch_size, cfg.seed, self.step)
        g = step_generator(cfg.seed, self.step)
        mean, std = self.latent_mean[idx], self.latent_std[idx]
        draw = torch.randn(mean.shape, generator=g).to(dev)
        noise = torch.randn(mean.shape, generator=g).to(dev)
        steps = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (len(idx),), generator=g).to(dev)
        latents = (mean + std * draw) * self.vae.config.scaling_factor
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        if self.prediction == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        with self.accelerator.autocast():
            hidden = self._hidden_states(idx)
            pred = self.unet_step(noisy.to(self.weight_dtype), t, hidden, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"loss became {loss.item()} at step {self.step}; stopped. {self.out} keeps the "
                f"checkpoint of step {self.last_checkpoint}. Try a lower --lr"
            )
        self.accelerator.backward(loss)
        self.accelerator.clip_grad_norm_(list(self.params.values()), MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            decay = min(EMA_DECAY, (1 + self.step) / (10 + self.step))
            with torch.no_grad():  # one fused call instead of a Python loop over the layers
                torch._foreach_lerp_(list(self.ema.values()), list(self.params.values()), 1 - decay)
        return loss.item()

    # -- validation -------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> Path:
        """Write ``validation/step_NNNNNN.png`` for the current weights (EMA with ``--ema``)."""
        from difflab.figures.images import save_png
        from difflab.figures.sd import validation_grid

        prompt, r = self.cfg.validation, self.cfg.resolution
        seeds = list(VALIDATION_SEEDS)
        raw = None
        if self.ema is not None:  # sample with the weights that are saved
            raw = {n: p.detach().clone() for n, p in self.params.items()}
            for n, p in self.params.items():
                p.copy_(self.ema[n])
        try:
            with self.accelerator.autocast():
                embeds = encode(self.loaded, prompt, "")
                images, flags = run_pipeline(
                    self.loaded, embeds, VALIDATION_GUIDANCE, VALIDATION_STEPS, seeds, r, r
                )
        finally:
            if raw is not None:
                for n, p in self.params.items():
                    p.copy_(raw[n])
        pixels = np.stack([to_uint8(img) for img in images])
        path = self.out / "validation" / f"step_{self.step:06d}.png"
        path.parent.mkdir(exist_ok=True)
        settings = {
            "step": self.step, "prompt": prompt, "seeds": seeds, "guidance": VALIDATION_GUIDANCE,
            "steps": VALIDATION_STEPS, "ema": self.ema is not None,
        }  # fmt: skip
        save_png(path, validation_grid(pixels, flags, seeds, self.step, prompt), settings)
        return path

    # -- the loop ---------------------------------------------------------------------------
    def fit(self) -> FinetuneResult:
        """Train to ``--steps``, checkpointing and validating on the way (module doc)."""
        self.out.mkdir(parents=True, exist_ok=True)
        with folder_lock(self.out):
            return self._fit()

    def _fit(self) -> FinetuneResult:
        cfg, out = self.cfg, self.out
        metrics = out / METRICS
        if self.resume:  # drop lines logged after the checkpoint we resume from
            rows = [r for r in read_jsonl(metrics) if r.get("step", 0) <= self.step]
            write_text(metrics, "".join(json.dumps(r) + "\n" for r in rows))
        else:
            write_json(out / CONFIG, self._config_record())
            metrics.unlink(missing_ok=True)
        validation, every = [], cfg.validate_every
        if cfg.validation is not None and self.step == 0:
            validation.append(self.validate())  # the base model, for comparison
        start, seconds = self.step, 0.0  # seconds: in training steps, this call
        t0 = time.perf_counter() - self.elapsed
        bar = tqdm(
            total=cfg.steps, initial=self.step, desc="sd finetune", unit="step",
            disable=not self.progress, file=sys.stderr, dynamic_ncols=True,
        )  # fmt: skip
        try:
            while self.step < cfg.steps:
                t1 = time.perf_counter()
                loss = self.train_step()
                now = time.perf_counter()
                self.elapsed, seconds = now - t0, seconds + now - t1
                append_jsonl(metrics, {
                    "step": self.step, "epoch": round(self.step * cfg.batch_size / len(self.data), 4),
                    "loss": loss, "lr": cfg.lr, "seconds_per_step": round(now - t1, 4),
                    "elapsed_s": round(self.elapsed, 2),
                })  # fmt: skip
                bar.set_postfix(loss=f"{loss:.4f}")
                bar.update(1)
                if every is not None and self.step % every == 0 and self.step < cfg.steps:
                    validation.append(self.validate())
                if self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
        finally:
            bar.close()
        if self.step != self.last_checkpoint or not (out / LORA_WEIGHTS).is_file():
            self.save_checkpoint()
        if cfg.validation is not None and self.step > start:
            validation.append(self.validate())
        figures = self._plot()
        rows = read_jsonl(metrics)
        tail = [r["loss"] for r in rows[-10:]]
        return FinetuneResult(
            out, out / LORA_WEIGHTS, self.step, self.step - start, seconds,
            float(np.mean(tail)) if tail else float("nan"), validation, figures, self.notes,
        )  # fmt: skip

    def _plot(self) -> list[Path]:
        from difflab.figures.images import save_png
        from difflab.figures.sd import loss_curve

        rows = read_jsonl(self.out / METRICS)
        if not rows:
            return []
        cfg = self.cfg
        target = "ε" if self.prediction == "epsilon" else "v"
        title = (
            f"LoRA fine-tuning: {self.out.name} (rank {cfg.rank}, lr {cfg.lr:g}, "
            f"{len(self.data)} images, batch {cfg.batch_size}), last loss {rows[-1]['loss']:.4f}"
        )
        path = self.out / "figures" / "loss.png"
        path.parent.mkdir(exist_ok=True)
        save_png(path, loss_curve(rows, title, target), {"run": str(self.out)})
        return [path]


def finetune(
    config: FinetuneConfig,
    out: str | Path,
    device: str = "auto",
    resume: bool = False,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune ``config`` into the run folder ``out`` (or resume the run there)."""
    return FineTuner(config, out, device, resume, progress).fit()
