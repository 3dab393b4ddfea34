"""Options of every action as data: frozen dataclasses with their defaults, checked once.

One class per action of the lab: :class:`SampleOptions` (``difflab sample``),
:class:`EvalOptions` (``eval``), :class:`ForwardOptions` and :class:`ReverseOptions` (the
process figures), :class:`DDPMSweepAxes` (``sweep``); the Stable Diffusion ones
(:class:`SDPipelineSpec`, :class:`SDGeneration`, :class:`SDSweepAxes`, :class:`MiniSDOptions`)
live in :mod:`difflab.sd_options` and are importable from here. The command line and the UI build these objects and
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

from dataclasses import dataclass, replace
from typing import Any, get_args

from difflab.checks import (
    SAMPLERS,
    check_choice,
    check_classes,
    check_float,
    check_guidance_method,
    check_int,
    check_seed,
    check_steps,
    grid_axes,
    parse_classes,
    parse_interval,
    parse_intervals,
    parse_list,
    parse_t,
    t_values,
)
from difflab.checks import Checked as _Checked
from difflab.checks import maybe as _maybe
from difflab.checks import set_fields as _set
from difflab.config import MAX_GUIDANCE, GuidanceSchedule, RunConfig
from difflab.devices import check_precision
from difflab.errors import UsageError

DEFAULT_T = ("T", "T/2", "T/4", "1", "0")
MAX_SAMPLES = 10_000  # samples per class of one sample/eval/sweep cell
GUIDANCE_SCHEDULES = get_args(GuidanceSchedule)
_ENOUGH_FOR_DIVERSITY = "need at least 2 samples per class (for diversity)"


def _check_guidance_shape(opts: Any) -> None:
    """The guidance interval, schedule, rescale and method fields of ``opts`` (None: the
    run's); cfg++ with a sampler given other than ddim is refused here, the run's in for_run."""
    if opts.guidance_interval is not None:
        iv = opts.guidance_interval
        off = isinstance(iv, str) and iv.strip().lower() == "none"
        _set(opts, guidance_interval="none" if off else parse_interval(iv))
    schedule = _maybe(opts.guidance_schedule, check_choice, GUIDANCE_SCHEDULES, "--guidance-schedule", "schedule")  # fmt: skip
    rescale = _maybe(opts.guidance_rescale, check_float, "--guidance-rescale", 0, 1)
    _set(opts, guidance_schedule=schedule, guidance_rescale=rescale)
    if opts.guidance_method is not None:
        _set(opts, guidance_method=check_guidance_method(opts.guidance_method, opts.sampler))


def _guidance_shape_for_run(opts: Any, cfg: RunConfig) -> dict[str, Any]:
    """The guidance interval (None: everywhere), schedule, rescale and method, the run's where
    None; cfg++ (given or the run's) is checked against the sampler (given or the run's)."""
    sc, iv = cfg.sample, opts.guidance_interval
    method = opts.guidance_method or sc.guidance_method
    check_guidance_method(method, opts.sampler or sc.sampler)
    return {
        "guidance_interval": sc.guidance_interval if iv is None else None if iv == "none" else iv,
        "guidance_schedule": opts.guidance_schedule or sc.guidance_schedule,
        "guidance_rescale": sc.guidance_rescale if opts.guidance_rescale is None else opts.guidance_rescale,
        "guidance_method": method,
    }  # fmt: skip


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
    guidance_method: str | None = None  # cfg or cfg++ (ddim only)
    seed: int = 0
    precision: str = "auto"  # auto, fp32 or bf16 (autocast)
    rows: str = "class"  # grid rows: class, sample, guidance or steps
    cols: str | None = None  # grid columns; None: the swept option, else sample

    def check(self) -> None:
        g = _maybe(self.guidance, parse_list, float, "--guidance", "0,1,3", 0, MAX_GUIDANCE)
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
    guidance_method: str | None = None
    seed: int = 0
    precision: str = "auto"
    inception: bool = False  # also Inception FID/KID (slow on a CPU)

    def check(self) -> None:
        n = check_int(self.n_per_class, "--n", 2, MAX_SAMPLES, _ENOUGH_FOR_DIVERSITY)
        _set(
            self,
            n_per_class=n,
            guidance=_maybe(self.guidance, check_float, "--guidance", 0, MAX_GUIDANCE),
        )
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
        _set(self, guidance=_maybe(self.guidance, check_float, "--guidance", 0, MAX_GUIDANCE))
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
    """``difflab sweep``: the axes of a guidance x steps x sampler x seed sweep (sorted), of
    the guidance interval, schedule, rescale and method (default: plain guidance only, whatever the
    run's ``sample`` config says, as for guidance itself) and of the run's checkpoints (which
    of them the run kept is checked against its folder when the sweep starts)."""

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
    guidance_methods: tuple[str, ...] = ("cfg",)  # cfg++ needs every sampler to be ddim
    # training steps whose weights are swept (train --snapshot-every), sorted, or "all" (every
    # snapshot and the final weights); None: the final weights only, and no checkpoint axis
    checkpoints: tuple[int, ...] | str | None = None

    def check(self) -> None:
        ck = self.checkpoints
        if isinstance(ck, str) and ck.strip().lower() == "all":
            ck = "all"
        elif ck is not None:
            ck = tuple(sorted(parse_list(ck, int, "--checkpoints", "all or 1000,2000", 0)))
        _set(self, checkpoints=ck)
        g = parse_list(self.guidance, float, "--guidance", "0,1,2,4", 0, MAX_GUIDANCE)
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
        methods = parse_list(self.guidance_methods, str, "--guidance-method", "cfg,cfg++")
        for x in methods:
            check_guidance_method(x, None)
        if "cfg++" in methods:
            for x in samplers:
                check_guidance_method("cfg++", x)
        _set(self, guidance_methods=tuple(sorted(methods)))

    def for_run(self, cfg: RunConfig) -> DDPMSweepAxes:
        for st in self.steps:
            check_steps(st, cfg.diffusion.timesteps)
        k = cfg.model.num_classes
        if self.grid_class >= k:
            raise UsageError(
                f"--grid-class {self.grid_class}: out of range; this run has classes 0..{k - 1}"
            )
        return self


# the Stable Diffusion options live beside this module; importable from here too
from difflab.sd_options import (  # noqa: E402, F401
    DEFAULT_CLIP_MODEL,
    DEFAULT_SD_MODEL,
    MAX_BATCH,
    MINI_SD_DATASETS,
    MINI_SD_PRESETS,
    SD_MAX_IMAGES,
    SD_MAX_STEPS,
    SD_SCHEDULERS,
    MiniSDOptions,
    SDGeneration,
    SDPipelineSpec,
    SDSweepAxes,
)
