"""Options of every action as data: frozen dataclasses with their defaults, checked once.

One class per action of the lab: :class:`SampleOptions` (``difflab sample``),
:class:`EvalOptions` (``eval``), :class:`ForwardOptions` and :class:`ReverseOptions` (the
process figures), :class:`DDPMSweepAxes` (``sweep``), :class:`SDPipelineSpec` (which Stable
Diffusion pipeline, on which device, in which dtype), :class:`SDGeneration` (``sd generate``)
and :class:`SDSweepAxes` (``sd sweep``). The command line and the UI build these objects and
take their defaults from them; the library functions take them and trust them. Building one
runs its ``check()``: every field accepts what a person types (``"0,1,3"``) or a Python value
(``(0, 1, 3)``), holds the parsed value, and a bad one is a :class:`~difflab.errors.UsageError`
of one line naming the option and what is allowed (the checks and the one list parser are
:mod:`difflab.checks`: the user's order kept, duplicates and non-finite values refused).
What needs the run (its T, its classes, the sampler and guidance it defaults to) is
``for_run(cfg)``. Sweep axes are sets, held sorted, so ``--guidance 2,0`` and ``0,2`` are
the same sweep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, get_args

from difflab.checks import (
    SAMPLERS,
    check_choice,
    check_classes,
    check_count,
    check_float,
    check_int,
    check_sd_guidance,
    check_seed,
    check_steps,
    check_text,
    grid_axes,
    parse_classes,
    parse_interval,
    parse_intervals,
    parse_list,
    parse_prompts,
    parse_size,
    parse_t,
    split_scale,
    t_values,
)
from difflab.config import GuidanceSchedule, RunConfig
from difflab.devices import check_dtype, check_precision, resolve_device, resolve_dtype
from difflab.errors import UsageError

DEFAULT_T = ("T", "T/2", "T/4", "1", "0")
MAX_SAMPLES = 10_000  # samples per class of one sample/eval/sweep cell
DEFAULT_SD_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
SD_SCHEDULERS = (
    "euler", "euler_a", "dpm++_2m", "dpm++_2m_karras", "ddim", "pndm", "lms", "heun", "unipc",
)  # fmt: skip
SD_MAX_STEPS = 1000  # SD's T: a scheduler takes at most as many steps as it was trained with
SD_MAX_IMAGES = 1000
MAX_BATCH = 256
GUIDANCE_SCHEDULES = get_args(GuidanceSchedule)
_ENOUGH_FOR_DIVERSITY = "need at least 2 samples per class (for diversity)"


def _set(obj: Any, **values: Any) -> None:
    for name, value in values.items():
        object.__setattr__(obj, name, value)


def _maybe(value: Any, check, *args) -> Any:
    return None if value is None else check(value, *args)


def _check_guidance_shape(opts: Any) -> None:
    """The guidance interval, schedule and rescale fields of ``opts`` (None: the run's)."""
    if opts.guidance_interval is not None:
        iv = opts.guidance_interval
        off = isinstance(iv, str) and iv.strip().lower() == "none"
        _set(opts, guidance_interval="none" if off else parse_interval(iv))
    schedule = _maybe(opts.guidance_schedule, check_choice, GUIDANCE_SCHEDULES, "--guidance-schedule", "schedule")  # fmt: skip
    rescale = _maybe(opts.guidance_rescale, check_float, "--guidance-rescale", 0, 1)
    _set(opts, guidance_schedule=schedule, guidance_rescale=rescale)


def _guidance_shape_for_run(opts: Any, cfg: RunConfig) -> dict[str, Any]:
    """The guidance interval (None: everywhere), schedule and rescale, the run's where None."""
    sc, iv = cfg.sample, opts.guidance_interval
    return {
        "guidance_interval": sc.guidance_interval if iv is None else None if iv == "none" else iv,
        "guidance_schedule": opts.guidance_schedule or sc.guidance_schedule,
        "guidance_rescale": sc.guidance_rescale if opts.guidance_rescale is None else opts.guidance_rescale,
    }  # fmt: skip


class _Checked:
    """Options are built checked: the constructor (and ``dataclasses.replace``) runs
    ``check()``, which parses every field into the value it holds or raises one line."""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        raise NotImplementedError


# -- DDPM -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleOptions(_Checked):
    """``difflab sample``; None is the run's own value (its ``sample`` config)."""

    classes: tuple[int, ...] | None = None  # None: every class of the run
    n_per_class: int | None = None  # None: 8 when a grid shows the samples of a class, else 1
    guidance: tuple[float, ...] | None = None  # several: a grid with one per row or column
    steps: tuple[int, ...] | None = None
    sampler: str | None = None
    eta: float | None = None
    # "LO:HI" noise levels or "none"; after for_run a tuple, or None for everywhere
    guidance_interval: tuple[float, float] | str | None = None
    guidance_schedule: str | None = None  # constant, linear or cosine
    guidance_rescale: float | None = None  # phi in [0, 1]
    seed: int = 0
    precision: str = "auto"  # auto, fp32 or bf16 (autocast)
    rows: str = "class"  # grid rows: class, sample, guidance or steps
    cols: str | None = None  # grid columns; None: the swept option, else sample

    def check(self) -> None:
        g = _maybe(self.guidance, parse_list, float, "--guidance", "0,1,3", 0)
        s = _maybe(self.steps, parse_list, int, "--steps", "10,50", 1)
        _set(self, classes=parse_classes(self.classes), guidance=g, steps=s)
        _set(self, sampler=_maybe(self.sampler, check_choice, SAMPLERS, "--sampler", "sampler"))
        _set(self, eta=_maybe(self.eta, check_float, "--eta", 0, 1), seed=check_seed(self.seed))
        _set(self, precision=check_precision(self.precision))
        _check_guidance_shape(self)
        sizes = {"guidance": len(g or (0,)), "steps": len(s or (0,)), "class": 2, "sample": 2}
        rows, cols = grid_axes(self.rows, self.cols, sizes)
        n = self.n_per_class
        n = (8 if "sample" in (rows[0], cols) else 1) if n is None else n
        _set(self, n_per_class=check_int(n, "--n-per-class", 1, MAX_SAMPLES))

    def for_run(self, cfg: RunConfig) -> SampleOptions:
        """Every None filled from ``cfg``, the classes and steps checked against the run."""
        sc, k = cfg.sample, cfg.model.num_classes
        opts = replace(
            self, classes=self.classes or tuple(range(k)), guidance=self.guidance or (sc.guidance,),
            steps=self.steps or (sc.steps,), sampler=self.sampler or sc.sampler,
            eta=sc.eta if self.eta is None else self.eta, **_guidance_shape_for_run(self, cfg),
        )  # fmt: skip
        check_classes(opts.classes, k)
        for st in opts.steps:
            check_steps(st, cfg.diffusion.timesteps)
        return opts


@dataclass(frozen=True)
class EvalOptions(_Checked):
    """``difflab eval``: every class, ``n_per_class`` samples each; None is the run's value."""

    n_per_class: int = 100
    guidance: float | None = None
    steps: int | None = None
    sampler: str | None = None
    guidance_interval: tuple[float, float] | str | None = None  # as SampleOptions
    guidance_schedule: str | None = None
    guidance_rescale: float | None = None
    seed: int = 0
    precision: str = "auto"
    inception: bool = False  # also Inception FID/KID (slow on a CPU)

    def check(self) -> None:
        n = check_int(self.n_per_class, "--n", 2, MAX_SAMPLES, _ENOUGH_FOR_DIVERSITY)
        _set(self, n_per_class=n, guidance=_maybe(self.guidance, check_float, "--guidance", 0))
        _set(self, steps=_maybe(self.steps, check_steps), seed=check_seed(self.seed))
        _set(self, sampler=_maybe(self.sampler, check_choice, SAMPLERS, "--sampler", "sampler"))
        _set(self, precision=check_precision(self.precision), inception=bool(self.inception))
        _check_guidance_shape(self)

    def for_run(self, cfg: RunConfig) -> EvalOptions:
        sc = cfg.sample
        opts = replace(
            self, guidance=sc.guidance if self.guidance is None else self.guidance,
            steps=self.steps or sc.steps, sampler=self.sampler or sc.sampler,
            **_guidance_shape_for_run(self, cfg),
        )  # fmt: skip
        check_steps(opts.steps, cfg.diffusion.timesteps)
        return opts


@dataclass(frozen=True)
class ForwardOptions(_Checked):
    """``difflab forward``: real images noised at the chosen t."""

    dataset: str | None = None  # None: the run's dataset, else mnist5k
    run: str | None = None  # whose noise schedule (None: linear, T = 1000)
    data_dir: str | None = None
    t: tuple[str, ...] = DEFAULT_T
    per_class: int = 1  # images per class (rows)
    seed: int = 0

    def check(self) -> None:  # t is checked against T: t_values(opts.t, T)
        _set(self, t=parse_t(self.t), per_class=check_int(self.per_class, "--per-class", 1, 20))
        _set(self, seed=check_seed(self.seed))
        _set(self, run=_maybe(self.run, str), data_dir=_maybe(self.data_dir, str))


@dataclass(frozen=True)
class ReverseOptions(_Checked):
    """``difflab reverse``: one trajectory per class, shown at the chosen t.

    The default is DDPM ancestral sampling with all T steps, as diffusers' ``DDPMPipeline``
    runs it: every t shown is exact. None is the run's value (all T steps for ddpm).
    """

    t: tuple[str, ...] = DEFAULT_T
    classes: tuple[int, ...] | None = None
    guidance: float | None = None
    sampler: str = "ddpm"
    steps: int | None = None
    eta: float | None = None
    seed: int = 0

    def check(self) -> None:
        _set(self, t=parse_t(self.t), classes=parse_classes(self.classes))
        _set(self, guidance=_maybe(self.guidance, check_float, "--guidance", 0))
        _set(self, sampler=check_choice(self.sampler, SAMPLERS, "--sampler", "sampler"))
        _set(self, steps=_maybe(self.steps, check_steps), seed=check_seed(self.seed))
        _set(self, eta=_maybe(self.eta, check_float, "--eta", 0, 1))

    def for_run(self, cfg: RunConfig) -> ReverseOptions:
        sc, T, k = cfg.sample, cfg.diffusion.timesteps, cfg.model.num_classes
        default_steps = T if self.sampler == "ddpm" else sc.steps
        opts = replace(
            self, classes=self.classes or tuple(range(k)), steps=self.steps or default_steps,
            guidance=sc.guidance if self.guidance is None else self.guidance,
            eta=sc.eta if self.eta is None else self.eta,
        )  # fmt: skip
        check_classes(opts.classes, k)
        check_steps(opts.steps, T)
        t_values(opts.t, T)
        return opts


@dataclass(frozen=True)
class DDPMSweepAxes(_Checked):
    """``difflab sweep``: the axes of a guidance x steps x sampler x seed sweep (sorted), and
    of the guidance interval, schedule and rescale (default: plain guidance only, whatever
    the run's ``sample`` config says, as for guidance itself)."""

    guidance: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 8.0)
    steps: tuple[int, ...] = (10, 25, 50)
    samplers: tuple[str, ...] = ("ddim",)
    seeds: tuple[int, ...] = (0,)
    n_per_class: int = 10  # samples per class per cell
    grid_class: int = 0  # the class shown in the image grid
    precision: str = "auto"
    guidance_intervals: tuple[tuple[float, float] | None, ...] = (None,)  # None: everywhere
    guidance_schedules: tuple[str, ...] = ("constant",)
    guidance_rescales: tuple[float, ...] = (0.0,)

    def check(self) -> None:
        g = parse_list(self.guidance, float, "--guidance", "0,1,2,4", minimum=0)
        s = parse_list(self.steps, int, "--steps", "10,25,50", minimum=1)
        samplers = parse_list(self.samplers, str, "--sampler", "ddim,ddpm")
        seeds = parse_list(self.seeds, int, "--seeds", "0,1,2", minimum=0)
        for x in samplers:
            check_choice(x, SAMPLERS, "--sampler", "sampler")
        for x in seeds:
            check_seed(x, "--seeds")
        _set(self, guidance=tuple(sorted(g)), steps=tuple(sorted(s)))
        _set(self, samplers=tuple(sorted(samplers)), seeds=tuple(sorted(seeds)))
        n = check_int(self.n_per_class, "--n", 2, MAX_SAMPLES, _ENOUGH_FOR_DIVERSITY)
        _set(self, n_per_class=n, grid_class=check_int(self.grid_class, "--grid-class", 0))
        _set(self, precision=check_precision(self.precision))
        intervals = parse_intervals(self.guidance_intervals, "--guidance-interval")
        schedules = parse_list(
            self.guidance_schedules, str, "--guidance-schedule", "constant,cosine"
        )
        for x in schedules:
            check_choice(x, GUIDANCE_SCHEDULES, "--guidance-schedule", "schedule")
        rescales = parse_list(self.guidance_rescales, float, "--guidance-rescale", "0,0.7", 0)
        for x in rescales:
            check_float(x, "--guidance-rescale", 0, 1)
        _set(self, guidance_intervals=intervals, guidance_schedules=tuple(sorted(schedules)))
        _set(self, guidance_rescales=tuple(sorted(rescales)))

    def for_run(self, cfg: RunConfig) -> DDPMSweepAxes:
        for st in self.steps:
            check_steps(st, cfg.diffusion.timesteps)
        k = cfg.model.num_classes
        if self.grid_class >= k:
            raise UsageError(
                f"--grid-class {self.grid_class}: out of range; this run has classes 0..{k - 1}"
            )
        return self


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
    guidance: float = 7.5
    steps: int = 25
    seed: int = 0
    n: int = 1
    size: tuple[int, int] = (512, 512)  # (width, height)

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
        _set(self, guidance=check_sd_guidance(self.guidance))
        _set(self, steps=check_int(self.steps, "--steps", 1, SD_MAX_STEPS))
        _set(self, seed=check_seed(self.seed), n=check_count(self.n, "--n", SD_MAX_IMAGES))
        check_seed(self.seed + self.n - 1, "--seed + --n - 1")
        _set(self, size=parse_size(self.size))


@dataclass(frozen=True)
class SDSweepAxes(_Checked):
    """``difflab sd sweep``: prompts x guidance x steps x seeds (x LoRA scale), axes sorted."""

    prompts: tuple[str, ...] = ()
    guidance: tuple[float, ...] = (1.0, 3.0, 7.5, 12.0, 20.0)
    steps: tuple[int, ...] = (10, 25, 50)
    seeds: tuple[int, ...] = (0, 1, 2)
    negative_prompt: str = ""
    size: tuple[int, int] = (512, 512)
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
        _set(self, negative_prompt=negative, size=parse_size(self.size))

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
