"""``difflab sd generate``: images from a prompt with the stock pipeline, settings in every PNG.

:func:`generate` takes :class:`~difflab.options.SDGeneration` and
:class:`~difflab.options.SDPipelineSpec` (checked when built: empty prompt only with
``unconditional``; guidance 0, 1 or > 1; steps >= 1; size a multiple of 8), loads the
pipeline (without a size, at the model's own size:
:func:`~difflab.sd.load.pipeline_size`, as the pipeline does), warns when a prompt is longer than CLIP's 77 tokens (saying what was cut), encodes
the prompt once with ``pipe.encode_prompt`` and calls the stock ``StableDiffusionPipeline``
with ``prompt_embeds`` / ``negative_prompt_embeds``. Image ``i`` uses seed ``seed + i``: its
initial latents come from its own CPU ``torch.Generator`` (the same draw the pipeline would
make, so a PNG's ``Seed`` reproduces it on any device) and that generator then feeds the
scheduler's noise. Guidance follows diffusers: ``eps_uncond + s (eps_cond - eps_uncond)``;
the stock pipeline skips guidance for ``s <= 1``, so ``s = 1`` is the plain conditional model,
``s = 0`` is run as the unconditional (negative-prompt) model, and ``0 < s < 1`` is refused.
Each image is written as ``NNNNN-SEED.png`` (A1111 ``parameters`` chunk) plus a JSON sidecar
with the safety diagnosis of :mod:`difflab.sd.safety`. ``lora`` (``--lora FILE[:SCALE]``,
repeatable) loads LoRAs for this call (:mod:`difflab.sd.lora`); the PNG names them as A1111
does (``<lora:NAME:SCALE>`` after the prompt, ``Lora hashes``) plus a ``Lora`` field, and the
sidecar lists file, scale and hash.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difflab import __version__
from difflab.errors import UsageError
from difflab.options import SDGeneration, SDPipelineSpec
from difflab.sd.load import LoadedPipeline, load_pipeline, model_guidance, pipeline_size
from difflab.sd.lora import LoraSpec, a1111_fields, applied, parse_loras
from difflab.sd.metadata import format_parameters, save_image
from difflab.sd.safety import Diagnosis, diagnose, to_uint8


@dataclass
class ImageRecord:
    png: Path
    sidecar: Path
    seed: int
    diagnosis: Diagnosis


@dataclass
class GenerateResult:
    out: Path
    images: list[ImageRecord]
    seconds: float  # in the pipeline, all images
    seconds_per_image: float
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> list[ImageRecord]:
        return [r for r in self.images if r.diagnosis.nsfw]

    @property
    def black_unflagged(self) -> list[ImageRecord]:
        return [r for r in self.images if not r.diagnosis.nsfw and r.diagnosis.note]


# -- the prompt -----------------------------------------------------------------------------
def truncation_note(tokenizer: Any, text: str, option: str) -> str | None:
    """A warning when ``text`` is longer than the text encoder reads, quoting what is cut."""
    limit = int(tokenizer.model_max_length)  # 77 for CLIP, with the start and end tokens
    try:
        enc = tokenizer(text, truncation=False, verbose=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError):  # a slow tokenizer: no offsets
        enc, offsets = tokenizer(text, truncation=False, verbose=False), None
    ids = enc["input_ids"]
    if len(ids) <= limit:
        return None
    if offsets is not None:
        cut = text[offsets[limit - 1][0] :].strip()
    else:
        cut = tokenizer.decode(ids[limit - 1 : -1], skip_special_tokens=True).strip()
    return (
        f"{option} has {len(ids) - 2} tokens but CLIP reads {limit - 2}; "
        f"this end was cut and has no effect: {cut!r}"
    )


# -- the pipeline call -----------------------------------------------------------------------
@torch.no_grad()
def encode(loaded: LoadedPipeline, prompt: str, negative_prompt: str) -> tuple[torch.Tensor, ...]:
    """(prompt_embeds, negative_prompt_embeds), each (1, 77, D), computed once per prompt."""
    pipe = loaded.pipe
    return pipe.encode_prompt(
        prompt, torch.device(loaded.device), 1, True, negative_prompt=negative_prompt or None
    )


def initial_latents(pipe: Any, seed: int, width: int, height: int) -> tuple[torch.Tensor, Any]:
    """x_T (1, C, H/f, W/f) for ``seed`` drawn as the pipeline draws it, and the CPU
    generator, now past that draw, for the scheduler's noise."""
    from diffusers.utils.torch_utils import randn_tensor

    g = torch.Generator("cpu").manual_seed(seed)
    f = pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, height // f, width // f)
    return randn_tensor(shape, generator=g, device=torch.device("cpu"), dtype=pipe.text_encoder.dtype), g  # fmt: skip


def run_pipeline(
    loaded: LoadedPipeline, embeds: tuple[torch.Tensor, torch.Tensor], guidance: float,
    steps: int, seeds: list[int], width: int, height: int,
    on_step: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, list[bool | None]]:  # fmt: skip
    """One stock pipeline call for ``seeds`` -> images (N, H, W, 3) floats in [0, 1] (NaN
    kept) and the safety checker's flag per image (None when no checker ran).
    ``on_step(i)`` is called after denoising step i (it may raise to stop the call)."""
    pipe = loaded.pipe
    pe, npe = embeds
    drawn = [initial_latents(pipe, s, width, height) for s in seeds]
    cond = npe if guidance == 0 else pe  # s = 0: eps_uncond alone
    k = len(seeds)
    out = pipe(
        prompt_embeds=cond.repeat(k, 1, 1), negative_prompt_embeds=npe.repeat(k, 1, 1),
        guidance_scale=guidance, num_inference_steps=steps, width=width, height=height,
        latents=torch.cat([lat for lat, _ in drawn]), generator=[g for _, g in drawn],
        output_type="np", **({} if on_step is None else {"callback_on_step_end": _step_end(on_step)}),
    )  # fmt: skip
    flags = out.nsfw_content_detected
    return np.asarray(out.images), [None] * k if flags is None else [bool(f) for f in flags]


def _step_end(on_step: Callable[[int], None]) -> Callable:
    def callback(pipe: Any, i: int, t: Any, kwargs: dict) -> dict:
        on_step(i)
        return kwargs

    return callback


def attention_name(pipe: Any) -> str:
    procs = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    return ",".join(sorted(procs)) or "none"


def image_settings(
    loaded: LoadedPipeline, prompt: str, negative_prompt: str, guidance: float, steps: int,
    seed: int, width: int, height: int, loras: Sequence[LoraSpec] = (),
) -> tuple[str, dict[str, Any]]:  # fmt: skip
    """The A1111 ``parameters`` text and the sidecar settings of one image."""
    tags, lora_fields = a1111_fields(loras)
    fields = {
        "Steps": steps, "Sampler": loaded.sampler, "CFG scale": guidance, "Seed": seed,
        "Size": f"{width}x{height}", "Model": loaded.source.label, **lora_fields,
    }  # fmt: skip
    text = format_parameters((prompt + tags).strip(), negative_prompt, fields)
    import diffusers

    sidecar = {
        "prompt": prompt, "negative_prompt": negative_prompt, "guidance": guidance,
        "steps": steps, "seed": seed, "width": width, "height": height,
        "scheduler": loaded.scheduler, "sampler": loaded.sampler,
        "model": loaded.source.location, "model_kind": loaded.source.kind,
        "device": loaded.device, "dtype": loaded.dtype, "attention": attention_name(loaded.pipe),
        "safety_checker": loaded.safety_checker, "parameters": text,
        "versions": {"difflab": __version__, "diffusers": diffusers.__version__, "torch": torch.__version__},
    }  # fmt: skip
    if loras:
        sidecar["loras"] = [spec.as_dict() for spec in loras]
    return text, sidecar


def _next_index(out: Path) -> int:
    nums = [int(m[1]) for p in out.glob("*.png") if (m := re.match(r"(\d{5,})-", p.name))]
    return max(nums, default=0) + 1


def generate(
    opts: SDGeneration,
    out: str | Path,
    spec: SDPipelineSpec | None = None,
    progress: bool = True,
    loaded: LoadedPipeline | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> GenerateResult:
    """``difflab sd generate``: ``opts.n`` images into the folder ``out`` (see module doc).

    ``spec`` (default :class:`~difflab.options.SDPipelineSpec`) says which pipeline and which
    LoRAs; ``loaded`` reuses a pipeline from :func:`~difflab.sd.load.load_pipeline` (the UI
    does), and the LoRAs of ``spec`` are removed from it again afterwards. ``on_step(done,
    total)`` is called before every pipeline call and after every denoising step (steps of all
    calls counted); an exception it raises stops the generation there, before anything is
    written.
    """
    spec = SDPipelineSpec() if spec is None else spec
    prompt, negative_prompt = opts.prompt, opts.negative_prompt
    steps = opts.steps
    n, batch_size = opts.n, spec.batch_size
    loras = parse_loras(spec.lora)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file, not a folder")
    if loaded is None:
        loaded = load_pipeline(spec, progress)
    width, height = opts.size or pipeline_size(loaded.pipe)  # None: the model's own size
    guidance = model_guidance(loaded.source) if opts.guidance is None else opts.guidance
    notes = list(loaded.notes)
    for text, option in ((prompt, "--prompt"), (negative_prompt, "--negative-prompt")):
        note = truncation_note(loaded.pipe.tokenizer, text, option) if text else None
        notes += [note] if note else []
    seeds = [opts.seed + i for i in range(n)]
    images, flags, seconds = [], [], 0.0
    with applied(loaded.pipe, loras):
        embeds = encode(loaded, prompt, negative_prompt)  # a LoRA may adapt the text encoder
        total = -(-n // batch_size) * steps
        for start in range(0, n, batch_size):
            done = start // batch_size * steps
            step_done = None if on_step is None else lambda i, d=done: on_step(d + i + 1, total)
            if on_step is not None:
                on_step(done, total)
            t0 = time.perf_counter()
            batch = seeds[start : start + batch_size]
            imgs, fl = run_pipeline(
                loaded, embeds, guidance, steps, batch, width, height, step_done
            )
            seconds += time.perf_counter() - t0
            images.extend(imgs)
            flags.extend(fl)
    out.mkdir(parents=True, exist_ok=True)
    first = _next_index(out)
    records = []
    for i, (img, flag, s) in enumerate(zip(images, flags, seeds, strict=True)):
        text, settings = image_settings(
            loaded, prompt, negative_prompt, guidance, steps, s, width, height, loras
        )
        d = diagnose(img, flag)
        png = out / f"{first + i:05d}-{s}.png"
        sidecar = {
            **settings, "unconditional": opts.unconditional, **d.as_dict(), "seconds": seconds / n,
        }  # fmt: skip
        records.append(ImageRecord(png, save_image(png, to_uint8(img), text, sidecar), s, d))
    per_image = ("seed", "parameters", "nsfw", "black", "nan_fraction", "note")
    settings = {k: v for k, v in sidecar.items() if k not in per_image}
    return GenerateResult(out, records, seconds, seconds / n, settings, notes)
