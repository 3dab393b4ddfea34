"""Options of the Stable Diffusion actions, checked once (the rest of :mod:`difflab.options`).

:class:`SDPipelineSpec` says which pipeline, on which device, in which dtype, with which
LoRAs; :class:`SDGeneration` is ``difflab sd generate``, :class:`SDSweepAxes` ``sd sweep``
and :class:`MiniSDOptions` ``sd mini``. They follow the rules of :mod:`difflab.options` (and
are importable from it): built from typed text or Python values, checked by ``check()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from difflab.checks import Checked as _Checked
from difflab.checks import (
    check_choice,
    check_count,
    check_float,
    check_int,
    check_sd_guidance,
    check_seed,
    check_text,
    parse_list,
    parse_prompts,
    parse_size,
    split_scale,
)
from difflab.checks import maybe as _maybe
from difflab.checks import set_fields as _set
from difflab.devices import check_dtype, resolve_device, resolve_dtype
from difflab.errors import UsageError

DEFAULT_SD_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
SD_SCHEDULERS = (
    "euler", "euler_a", "dpm++_2m", "dpm++_2m_karras", "ddim", "pndm", "lms", "heun", "unipc",
)  # fmt: skip
SD_MAX_STEPS = 1000  # SD's T: a scheduler takes at most as many steps as it was trained with
SD_MAX_IMAGES = 1000
MAX_BATCH = 256


# -- Stable Diffusion -----------------------------------------------------------------------
@dataclass(frozen=True)
class SDPipelineSpec(_Checked):
    """Which Stable Diffusion pipeline, on which device, in which dtype, with which LoRAs."""

    model: str = DEFAULT_SD_MODEL  # Hub id, diffusers folder or FILE.safetensors
    model_config: str | None = None  # a diffusers folder with the configs of a single file
    vae: str | None = None
    device: str = "auto"  # resolved when built: auto -> cuda, mps or cpu
    dtype: str = "auto"  # auto (fp16 on CUDA/MPS, fp32 on the CPU), fp16, bf16 or fp32
    scheduler: str | None = None  # None: the model's own
    safety_checker: bool = True
    trust_pickle: bool = False  # allow a .ckpt pickle (unsafe)
    compile: bool = False  # torch.compile the UNet
    lora: tuple[str, ...] = ()  # FILE[:SCALE] each
    batch_size: int = 4  # images per pipeline call

    def check(self) -> None:
        model = str(self.model).strip()
        if not model:
            raise UsageError(
                "--model is empty: pass a Hub id, a diffusers folder or a .safetensors file"
            )
        _set(self, model=model, model_config=_maybe(self.model_config, str))
        _set(self, vae=_maybe(self.vae, str), device=resolve_device(self.device))
        _set(self, dtype=check_dtype(self.dtype), batch_size=check_count(self.batch_size, "--batch-size", MAX_BATCH))  # fmt: skip
        _set(self, scheduler=_maybe(self.scheduler, check_choice, SD_SCHEDULERS, "--scheduler"))
        for name in ("safety_checker", "trust_pickle", "compile"):
            _set(self, **{name: bool(getattr(self, name))})
        items = [self.lora] if isinstance(self.lora, (str, Path)) else list(self.lora or ())
        files = []
        for item in items:
            file, scale = split_scale(item)
            if scale is not None and not math.isfinite(scale):
                raise UsageError(f"--lora {item}: the scale must be a finite number, as in FILE:0.8")  # fmt: skip
            files.append(Path(file).expanduser().absolute())
            if files.count(files[-1]) > 1:
                raise UsageError(f"--lora {file}: is given twice; give it once with the summed scale")  # fmt: skip
        if items and self.compile:
            raise UsageError(
                "--lora with --compile: the UNet is compiled before the LoRA is loaded; "
                "drop --compile (or --lora)"
            )
        _set(self, lora=tuple(str(x).strip() for x in items))

    @property
    def resolved_dtype(self) -> str:
        """fp16, bf16 or fp32: ``dtype`` with ``auto`` resolved for the device."""
        return resolve_dtype(self.dtype, self.device)


@dataclass(frozen=True)
class SDGeneration(_Checked):
    """``difflab sd generate``: image i uses seed ``seed + i``."""

    prompt: str = ""  # empty only with unconditional
    negative_prompt: str = ""
    unconditional: bool = False
    guidance: float | None = None  # None: the model's (a mini-SD folder's own, else 7.5)
    steps: int = 25
    seed: int = 0
    n: int = 1
    size: tuple[int, int] | None = None  # (width, height); None: the model's own size

    def check(self) -> None:
        prompt = check_text(self.prompt, "--prompt")
        if self.unconditional and prompt.strip():
            raise UsageError(
                "--unconditional samples without a prompt; drop --prompt or --unconditional"
            )
        if not self.unconditional and not prompt.strip():
            raise UsageError(
                "--prompt is empty; give a prompt, or --unconditional to sample without one"
            )
        _set(
            self,
            prompt=prompt,
            negative_prompt=check_text(self.negative_prompt, "--negative-prompt"),
        )
        _set(self, unconditional=bool(self.unconditional))
        _set(self, guidance=_maybe(self.guidance, check_sd_guidance))
        _set(self, steps=check_int(self.steps, "--steps", 1, SD_MAX_STEPS))
        _set(self, seed=check_seed(self.seed), n=check_count(self.n, "--n", SD_MAX_IMAGES))
        check_seed(self.seed + self.n - 1, "--seed + --n - 1")
        _set(self, size=own_or_size(self.size))


def own_or_size(size: object) -> tuple[int, int] | None:
    """``--size`` parsed; None, blank or ``auto``: None, the model's own size (the UNet's
    ``sample_size`` x the VAE's scale factor, as the pipeline does: 512x512 for SD 1.5)."""
    if size is None or (isinstance(size, str) and size.strip().lower() in ("", "auto")):
        return None
    return parse_size(size)


@dataclass(frozen=True)
class SDSweepAxes(_Checked):
    """``difflab sd sweep``: prompts x guidance x steps x seeds (x LoRA scale), axes sorted."""

    prompts: tuple[str, ...] = ()
    guidance: tuple[float, ...] = (1.0, 3.0, 7.5, 12.0, 20.0)
    steps: tuple[int, ...] = (10, 25, 50)
    seeds: tuple[int, ...] = (0, 1, 2)
    negative_prompt: str = ""
    size: tuple[int, int] | None = None  # None: the model's own size
    clip_model: str | None = DEFAULT_CLIP_MODEL  # for the CLIP score; None (or "none"): none
    lora_scales: tuple[float, ...] | None = None  # the LoRA's scale as an axis (needs a LoRA)

    def check(self) -> None:
        g = parse_list(self.guidance, float, "--guidance", "1,3,7.5", minimum=0)
        s = parse_list(self.steps, int, "--steps", "10,25,50", minimum=1)
        seeds = parse_list(self.seeds, int, "--seeds", "0,1,2", minimum=0)
        for x in g:
            check_sd_guidance(x)
        for x in s:
            check_int(x, "--steps", 1, SD_MAX_STEPS)
        for x in seeds:
            check_seed(x, "--seeds")
        scales = _maybe(self.lora_scales, parse_list, float, "--lora-scales", "0,0.5,1")
        clip = self.clip_model
        clip = None if clip is None or str(clip).strip().lower() in ("", "none") else str(clip)
        _set(self, prompts=parse_prompts(self.prompts), guidance=tuple(sorted(g)))
        _set(self, steps=tuple(sorted(s)), seeds=tuple(sorted(seeds)), clip_model=clip)
        _set(self, lora_scales=None if scales is None else tuple(sorted(scales)))
        negative = check_text(self.negative_prompt, "--negative-prompt")
        _set(self, negative_prompt=negative, size=own_or_size(self.size))

    def lora_axis(self, spec: SDPipelineSpec) -> tuple[str | None, tuple[float, ...] | None]:
        """The swept LoRA file and its scales: ``lora_scales``, else the file's own scale."""
        if not spec.lora:
            if self.lora_scales is not None:
                raise UsageError("--lora-scales needs --lora FILE: the LoRA whose scale is swept")
            return None, None
        if len(spec.lora) > 1:
            raise UsageError("--lora: sd sweep takes one LoRA; sweep its scale with --lora-scales")
        file, scale = split_scale(spec.lora[0])
        if self.lora_scales is None:
            return file, (1.0 if scale is None else scale,)
        if scale is not None:
            raise UsageError(
                f"--lora {spec.lora[0]}: give the scales in --lora-scales or after the file, not both"
            )
        return file, self.lora_scales


@dataclass(frozen=True)
class MiniSDOptions(_Checked):
    """``difflab sd mini``: train mini-SD (a small SD-structured model) on a lab dataset."""

    dataset: str = "mnist5k"  # mnist5k, digits, mnist, fashion-mnist, cifar10 or folder:PATH
    minutes: float | None = None  # wall-time cap of the whole training; None: the step counts
    seed: int = 0
    flag: str | None = "last"  # the class the lab safety checker flags: a class name, last, none
    preset: str = "small"  # small (the model) or tiny (tests: seconds)

    def check(self) -> None:
        dataset = str(self.dataset).strip()
        if dataset.startswith("folder:"):
            if not dataset[len("folder:") :].strip():
                raise UsageError("--dataset 'folder:': give a folder, e.g. folder:my_images/")
        else:
            dataset = check_choice(dataset.lower(), MINI_SD_DATASETS, "--dataset")
        _set(self, dataset=dataset, seed=check_seed(self.seed))
        _set(self, minutes=_maybe(self.minutes, check_float, "--minutes", 0.0))
        if self.minutes is not None and self.minutes <= 0:
            raise UsageError(f"--minutes {self.minutes:g}: must be a number > 0")
        flag = None if self.flag is None else str(self.flag).strip()
        if flag == "":
            raise UsageError("--flag is empty: give a class name of the dataset, last or none")
        _set(self, flag=None if flag == "none" else flag)
        _set(self, preset=check_choice(self.preset, MINI_SD_PRESETS, "--preset"))


MINI_SD_DATASETS = ("mnist5k", "digits", "mnist", "fashion-mnist", "cifar10")  # or folder:PATH
MINI_SD_PRESETS = ("small", "tiny")
