"""mini-SD: a small latent text-to-image model in Stable Diffusion's structure: its parts.

The parts of a ``StableDiffusionPipeline``, small, with fresh weights (:func:`build_parts`):
an ``AutoencoderKL`` trained on reconstruction + a small KL term (:func:`vae_loss`; Rombach et
al. 2022 without the perceptual and adversarial losses), whose ``scaling_factor`` is set to
1 / the measured standard deviation of the latents (:func:`measured_scaling_factor`), as SD's
0.18215 was; a ``CLIPTextModel`` on the byte-level ``CLIPTokenizer`` of :mod:`difflab.sd.tiny`;
a ``UNet2DConditionModel`` with cross-attention on the text's last hidden state (and, unlike
SD 1.5's, the attention-pooled text added to its timestep embedding:
``addition_embed_type="text"``, which the stock pipeline runs unchanged), trained on
eps-prediction on SD's scaled-linear schedule with captions dropped to ``""`` (what the
pipeline encodes for "no prompt") so classifier-free guidance works (:func:`unet_loss`), after a short shaping of the fresh text
encoder so its outputs tell the classes apart (:func:`align_text_encoder`).
Captions are free text: templates over the class names (:func:`caption_templates`).
:func:`save_mini_sd` writes a standard diffusers folder (``model_index.json``, scheduler
config, parts in safetensors) plus ``mini_sd.json``, the record of the data, the flagged
concept and the training. The training loop is :mod:`difflab.sd.mini_train`'s, the lab safety
checker :mod:`difflab.sd.mini_safety`'s.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from difflab.runfolder import step_generator

RECORD = "mini_sd.json"
DIGIT_TEMPLATES = (
    "a handwritten digit {c}",
    "the digit {c}",
    "a handwritten {c}",
    "the number {c}, handwritten",
    "a drawing of the digit {c}",
    "{c}",
    "the digit {w}",
    "a handwritten {w}",
)  # fmt: skip  ({w}: the digit's number word, "three")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
OBJECT_TEMPLATES = (
    "a photo of a {c}", "a {c}", "a small photo of a {c}", "a picture of the {c}",
    "a blurry photo of a {c}", "{c}",
)  # fmt: skip
FASHION_TEMPLATES = (
    "a photo of a {c}", "a {c}", "a grayscale photo of a {c}", "a piece of clothing: {c}",
    "a product photo of a {c}", "{c}",
)  # fmt: skip


@dataclass(frozen=True)
class MiniSDConfig:
    """The sizes of the parts and of training; ``tiny`` for tests, ``small`` by default."""

    resolution: int = 32  # images are resized to resolution x resolution RGB
    vae_channels: tuple[int, ...] = (16, 32, 32)  # VAE scale factor 2 ** (len - 1)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (32, 64)
    text_width: int = 64
    text_layers: int = 2
    attention_head_dim: int = 8
    vae_steps: int = 300
    unet_steps: int = 650  # 605 steps (10 min) gave 98 % prompt accuracy: bench_mini_sd.py
    safety_steps: int = 400
    batch_size: int = 32  # VAE and safety checker
    unet_batch_size: int = 128  # UNet and text encoder (a step costs little more than at 32)
    lr: float = 2e-3  # VAE, safety checker and the text encoder's alignment
    unet_lr: float = 2e-3  # UNet and text encoder
    kl_weight: float = 1e-4
    caption_dropout: float = 0.1  # share of captions replaced by "" (the unconditional text)
    train_text_encoder: bool = True  # else the random text encoder stays frozen
    guidance: float = 5.0  # saved in mini_sd.json: sd generate's guidance without --guidance
    text_time_embedding: bool = True  # the pooled text also joins the timestep embedding
    text_align_steps: int = 100  # steps shaping the fresh text encoder (align_text_encoder)

    @classmethod
    def preset(cls, name: str) -> MiniSDConfig:
        if name == "tiny":
            return cls(
                resolution=16, vae_channels=(8, 16), unet_channels=(16, 32), text_width=32,
                attention_head_dim=4, vae_steps=3, unet_steps=3, safety_steps=3, batch_size=8, text_align_steps=3,
                unet_batch_size=8,
            )  # fmt: skip
        return cls()


def caption_templates(dataset: str, class_names: tuple[str, ...]) -> tuple[str, ...]:
    """The caption templates (``{c}``: the class name) that suit the dataset."""
    if all(c.isdigit() for c in class_names):
        return DIGIT_TEMPLATES
    if "fashion" in dataset:
        return FASHION_TEMPLATES
    return OBJECT_TEMPLATES


def caption(template: str, name: str) -> str:
    """``template`` with ``{c}`` the class name (and ``{w}`` a digit's number word)."""
    word = NUMBER_WORDS[int(name)] if name.isdigit() and int(name) < 10 else name
    return template.format(c=name.replace("_", " "), w=word)


def to_pixels(images: np.ndarray, resolution: int) -> torch.Tensor:
    """uint8 (N, C, H, W), C = 1 or 3 -> float RGB (N, 3, R, R) in [-1, 1] (bilinear resize)."""
    x = torch.as_tensor(np.asarray(images)).float() / 127.5 - 1.0
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return x.clamp(-1, 1).contiguous()


def build_parts(cfg: MiniSDConfig, tokenizer: Any) -> dict[str, Any]:
    """The VAE, text encoder and UNet of ``cfg`` with fresh weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    n_vae, n_unet = len(cfg.vae_channels), len(cfg.unet_channels)
    groups = math.gcd(*cfg.vae_channels, *cfg.unet_channels, 32)
    latent = cfg.resolution // 2 ** (n_vae - 1)
    # diffusers' addition_embed_type="text": an attention-pooled text embedding is added to
    # the timestep embedding (a global path beside cross-attention; SD 1.5's UNet has none)
    text_time = {}
    if cfg.text_time_embedding:
        heads = max(1, cfg.text_width // 16)
        text_time = {"addition_embed_type": "text", "addition_embed_type_num_heads": heads}
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
        num_hidden_layers=cfg.text_layers, num_attention_heads=max(1, cfg.text_width // 16),
        max_position_embeddings=tokenizer.model_max_length, projection_dim=cfg.text_width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return dict(
        vae=AutoencoderKL(
            block_out_channels=cfg.vae_channels, down_block_types=("DownEncoderBlock2D",) * n_vae,
            up_block_types=("UpDecoderBlock2D",) * n_vae, latent_channels=cfg.latent_channels,
            norm_num_groups=groups, layers_per_block=1, sample_size=cfg.resolution,
        ),
        text_encoder=CLIPTextModel(text),
        unet=UNet2DConditionModel(
            sample_size=latent, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
            block_out_channels=cfg.unet_channels, layers_per_block=1, norm_num_groups=groups,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n_unet - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (n_unet - 1) + ("UpBlock2D",),
            cross_attention_dim=cfg.text_width, attention_head_dim=cfg.attention_head_dim,
            **text_time,
        ),
    )  # fmt: skip


def vae_loss(vae: Any, x: torch.Tensor, cfg: MiniSDConfig, g: torch.Generator) -> torch.Tensor:
    """Reconstruction (MSE) + ``kl_weight`` x KL(q(z|x) || N(0, I)) on one batch."""
    batch = x[torch.randint(len(x), (cfg.batch_size,), generator=g)]
    posterior = vae.encode(batch).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
    return F.mse_loss(vae.decode(z).sample, batch) + cfg.kl_weight * posterior.kl().mean()


@torch.no_grad()
def encode_all(vae: Any, x: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior mean and std of every image: (N, 4, h, w) each."""
    means, stds = [], []
    for i in range(0, len(x), batch):
        d = vae.encode(x[i : i + batch]).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def measured_scaling_factor(mean: torch.Tensor, std: torch.Tensor, seed: int) -> float:
    """1 / the std of latents drawn from q(z|x): the unit-variance rescaling of SD (sec. 4.3.2)."""
    z = mean + std * torch.randn(mean.shape, generator=step_generator(seed, -1))
    return float(1.0 / z.std())


def tokenize(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """Token ids as the pipeline makes them: padded to 77, truncated."""
    return tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids  # fmt: skip


def align_text_encoder(
    text_encoder: Any, tokenizer: Any, captions_of: list[list[str]], steps: int, lr: float,
    seed: int,
) -> float:  # fmt: skip
    """Shape a fresh text encoder so that its outputs tell the classes apart, before the UNet
    learns to read them: a linear probe on the mean of the last hidden state predicts each
    caption's class ("" its own), trained with the encoder for ``steps`` full-batch steps; the
    probe is thrown away. A fresh encoder's outputs differ by well under 1 % between "digit 3"
    and "digit 4" (the one differing token is diluted by the shared ones), too little for the
    UNet to pick up in minutes; SD's CLIP was pretrained to align text with images, and this is
    the lab's small stand-in. Returns the probe's last loss."""
    texts = [c for cs in captions_of for c in cs] + [""]
    y = torch.tensor([i for i, cs in enumerate(captions_of) for _ in cs] + [len(captions_of)])
    ids = tokenize(tokenizer, texts)
    with torch.random.fork_rng():  # the probe's init: its own seed, the global stream untouched
        torch.manual_seed(seed)
        probe = torch.nn.Linear(text_encoder.config.hidden_size, len(captions_of) + 1)
    params = [*text_encoder.parameters(), *probe.parameters()]
    opt = torch.optim.AdamW(params, lr=lr)
    text_encoder.train().requires_grad_(True)
    loss = torch.zeros(())
    for _ in range(steps):
        loss = F.cross_entropy(probe(text_encoder(ids)[0].mean(1)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    text_encoder.eval().requires_grad_(False)
    return loss.item()


def unet_loss(
    parts: dict[str, Any],
    latents: tuple[torch.Tensor, torch.Tensor],
    captions_of: list[list[str]],
    labels: torch.Tensor,
    cfg: MiniSDConfig,
    g: torch.Generator,
) -> torch.Tensor:
    """||eps - eps_theta(z_t, t, tau(y))||^2 (LDM eq. 3) on z = f * E(x), one batch; a caption
    is dropped to "" with probability ``caption_dropout``."""
    unet, text_encoder, tokenizer = parts["unet"], parts["text_encoder"], parts["tokenizer"]
    schedule = parts["noise_schedule"]  # a DDPMScheduler with the pipeline's betas
    f = parts["vae"].config.scaling_factor
    mean, std = latents
    idx = torch.randint(len(mean), (cfg.unet_batch_size,), generator=g)
    z0 = f * (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g))
    noise = torch.randn(z0.shape, generator=g)
    t = torch.randint(schedule.config.num_train_timesteps, (len(idx),), generator=g)
    which = torch.randint(10_000, (len(idx),), generator=g).tolist()
    drop = torch.rand(len(idx), generator=g) < cfg.caption_dropout
    texts = [
        "" if d else (c := captions_of[int(labels[i])])[w % len(c)]
        for i, w, d in zip(idx.tolist(), which, drop.tolist(), strict=True)
    ]
    unique = sorted(set(texts))  # a few dozen distinct captions: encode each once
    hidden = text_encoder(tokenize(tokenizer, unique))[0]  # (U, 77, width)
    hidden = hidden[torch.tensor([unique.index(t) for t in texts])]  # (B, 77, width)
    z_t = schedule.add_noise(z0, noise, t)  # q_sample
    return F.mse_loss(unet(z_t, t, encoder_hidden_states=hidden).sample, noise)


def save_mini_sd(
    parts: dict[str, Any], checker: Any, extractor: Any, record: dict[str, Any], out: str | Path
) -> Path:
    """Save a standard ``StableDiffusionPipeline`` folder plus ``mini_sd.json`` into ``out``:
    written in a hidden folder inside it, then moved up part by part, ``model_index.json``
    last, so a folder with ``model_index.json`` is complete."""
    from diffusers import StableDiffusionPipeline

    from difflab.sd.load import quiet_loading

    out = Path(out)
    keep = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
    pipe = StableDiffusionPipeline(
        **{k: parts[k] for k in keep}, safety_checker=checker, feature_extractor=extractor,
        image_encoder=None, requires_safety_checker=checker is not None,
    )  # fmt: skip
    tmp = out / ".pipeline.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_loading():
        pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    for entry in sorted(tmp.iterdir(), key=lambda p: p.name == "model_index.json"):
        target = out / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        entry.replace(target)
    tmp.rmdir()
    return out


def read_record(folder: str | Path) -> dict[str, Any] | None:
    """``mini_sd.json`` of a mini-SD folder; None for another pipeline folder."""
    path = Path(folder) / RECORD
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
