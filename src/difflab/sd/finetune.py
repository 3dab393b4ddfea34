"""``difflab sd finetune``: LoRA fine-tuning of a Stable Diffusion 1.x/2.x pipeline (the loop).

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
(1 + step) / (10 + step))``) and saves that. Each step's latent sample, noise and timesteps
come from a generator seeded with ``(seed, step)`` and its images from
:func:`~difflab.sd.finetune_run.batch_indices`, so N steps straight and K steps + resume +
N - K steps give the same weights. A checkpoint (every ``--checkpoint-every`` steps, at the
end, and on SIGINT/SIGTERM) writes the LoRA file, then ``train_state.pt``
(:mod:`difflab.runfolder`); with ``--validation-prompt`` or ``--validate-every`` the prompt is
drawn at seeds 0-3 before training, every ``--validate-every`` steps and at the end, as
``difflab sd generate --lora FILE --seed 0 --n 4 --guidance 7.5 --steps 25`` draws it (fp32).
The options and the run folder are :mod:`~difflab.sd.finetune_run`'s.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difflab import runfolder
from difflab.errors import UsageError
from difflab.files import append_jsonl, folder_lock, read_jsonl, write_json
from difflab.options import SDPipelineSpec
from difflab.runfolder import METRICS, TrainingDiverged
from difflab.sd.dataset import ImageFolder, load_image_folder
from difflab.sd.finetune_run import (
    FORMAT,
    SUBFOLDERS,
    TEXT_ENCODER_TARGETS,
    UNET_TARGETS,
    VALIDATION_GUIDANCE,
    VALIDATION_SEEDS,
    VALIDATION_STEPS,
    FinetuneConfig,
    FinetuneResult,
    batch_indices,
    check_same_images,
    config_record,
    open_run,
    plot_loss,
    write_lora,
    write_validation,
)
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

__all__ = ["FineTuner", "FinetuneConfig", "FinetuneResult", "batch_indices", "finetune"]

EMA_DECAY = 0.999
MAX_GRAD_NORM = 1.0
WEIGHT_DECAY = 1e-2
ENCODE_BATCH = 8  # images per VAE call when the latents are cached
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _bnb_adamw(device: str) -> Any:
    """bitsandbytes' ``AdamW8bit``, or one line saying why it cannot be used here."""
    if not device.startswith("cuda"):
        raise UsageError(f"--adam-8bit needs a CUDA GPU (device: {device}); leave it out")
    try:
        import bitsandbytes
    except ImportError:
        raise UsageError("--adam-8bit needs bitsandbytes: pip install bitsandbytes") from None
    return bitsandbytes.optim.AdamW8bit


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
        state = open_run(self.out, resume, cfg, self.source, self.fingerprint)
        self.data: ImageFolder = load_image_folder(cfg.data, cfg.resolution, cfg.instance_prompt)
        if state is not None:
            check_same_images(state, self.data, cfg)
        self.accelerator = runfolder.accelerator(cfg.mixed_precision, cpu=device == "cpu")
        self.device = self.accelerator.device
        self.loaded: LoadedPipeline = load_pipeline(
            SDPipelineSpec(model=cfg.model, device=str(self.device), dtype="fp32")
        )
        self.notes = list(self.loaded.notes) + self.data.notes
        self.weight_dtype = WEIGHT_DTYPES[cfg.mixed_precision]
        self._build()
        self.step, self.elapsed, self.last_checkpoint = 0, 0.0, 0
        self.lora_stale = False  # the LoRA file is not the one of the train state
        if state is not None:
            self._load_state(state)
            self.lora_stale = not runfolder.weights_match(state, self.out / LORA_WEIGHTS)
            if self.lora_stale:
                self.notes.append(runfolder.mismatch_note(self.out, LORA_WEIGHTS, self.step))

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
        weights = self.ema if self.ema is not None else self.params
        write_lora(path, weights, {"unet": self.unet, "text_encoder": self.text_encoder})

    def save_checkpoint(self) -> None:
        """The LoRA file, then the train state (which marks the checkpoint), both atomic."""
        if not self.accelerator.is_main_process:
            return
        runfolder.save_checkpoint(self.out, LORA_WEIGHTS, self.save_lora, self._state())
        self.last_checkpoint = self.step
        self.lora_stale = False

    # -- one step ---------------------------------------------------------------------------
    def _hidden_states(self, idx: list[int]) -> torch.Tensor:
        rows = self.caption_index[idx]
        if self.embeddings is not None:
            return self.embeddings[rows.to(self.device)]
        return self.text_encoder_step(self.input_ids[rows.to(self.device)], return_dict=False)[0]

    def train_step(self) -> float:
        """One optimizer step on the batch of ``self.step``; returns its loss."""
        cfg, dev = self.cfg, self.device
        idx = batch_indices(len(self.data), cfg.batch_size, cfg.seed, self.step)
        g = runfolder.step_generator(cfg.seed, self.step)
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
            decay = runfolder.ema_decay(EMA_DECAY, self.step)
            with torch.no_grad():  # one fused call instead of a Python loop over the layers
                torch._foreach_lerp_(list(self.ema.values()), list(self.params.values()), 1 - decay)
        return loss.item()

    # -- validation -------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> Path:
        """Write ``validation/step_NNNNNN.png`` for the current weights (EMA with ``--ema``)."""
        prompt, r = self.cfg.validation, self.cfg.resolution
        raw = None
        if self.ema is not None:  # sample with the weights that are saved
            raw = {n: p.detach().clone() for n, p in self.params.items()}
            for n, p in self.params.items():
                p.copy_(self.ema[n])
        try:
            with self.accelerator.autocast():
                embeds = encode(self.loaded, prompt, "")
                images, flags = run_pipeline(
                    self.loaded, embeds, VALIDATION_GUIDANCE, VALIDATION_STEPS,
                    list(VALIDATION_SEEDS), r, r,
                )  # fmt: skip
        finally:
            if raw is not None:
                for n, p in self.params.items():
                    p.copy_(raw[n])
        pixels = np.stack([to_uint8(img) for img in images])
        return write_validation(self.out, self.step, pixels, flags, prompt, self.ema is not None)

    # -- the loop ---------------------------------------------------------------------------
    def fit(self) -> FinetuneResult:
        """Train to ``--steps``, checkpointing and validating on the way (module doc).

        SIGINT (Ctrl-C) or SIGTERM stops after the current step and a checkpoint, and then
        raises :class:`~difflab.runfolder.TrainingInterrupted`.
        """
        self.out.mkdir(parents=True, exist_ok=True)
        with folder_lock(self.out), runfolder.stop_on_signals() as signalled:
            result = self._fit(lambda: bool(signalled))
        if signalled:
            raise signalled.interrupted(
                self.step, self.out, "the same difflab sd finetune command with --resume"
            )
        return result

    def _fit(self, should_stop) -> FinetuneResult:
        cfg, out = self.cfg, self.out
        metrics = out / METRICS
        runfolder.clean_folder(out, SUBFOLDERS)  # temporary files of a killed write
        if self.resume:  # drop lines logged after the checkpoint we resume from
            runfolder.trim_metrics(out, self.step)
            if self.lora_stale:
                self.save_checkpoint()
        else:
            record = config_record(
                cfg, self.source, self.fingerprint, len(self.data), self.prediction
            )
            write_json(out / runfolder.CONFIG, record)
            metrics.unlink(missing_ok=True)
        validation, every = [], cfg.validate_every
        if cfg.validation is not None and self.step == 0:
            validation.append(self.validate())  # the base model, for comparison
        start, seconds = self.step, 0.0  # seconds: in training steps, this call
        t0 = time.perf_counter() - self.elapsed
        bar = runfolder.progress_bar(cfg.steps, self.step, "sd finetune", "step", self.progress)
        try:
            while self.step < cfg.steps and not should_stop():
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
        if cfg.validation is not None and self.step > start and not should_stop():
            validation.append(self.validate())
        figures = plot_loss(out, cfg, self.prediction, len(self.data))
        tail = [r["loss"] for r in read_jsonl(metrics)[-10:]]
        return FinetuneResult(
            out, out / LORA_WEIGHTS, self.step, self.step - start, seconds,
            float(np.mean(tail)) if tail else float("nan"), validation, figures, self.notes,
        )  # fmt: skip


def finetune(
    config: FinetuneConfig,
    out: str | Path,
    device: str = "auto",
    resume: bool = False,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune ``config`` into the run folder ``out`` (or resume the run there)."""
    return FineTuner(config, out, device, resume, progress).fit()
