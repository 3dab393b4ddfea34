"""Configuration: frozen dataclasses, named presets, and strict loading.

This module is the single source of defaults. A run's resolved configuration is saved as
``config.json`` next to its weights and read back with :func:`RunConfig.from_dict`, which
rejects unknown keys and wrong types by name. Options with a fixed set of values are
``Literal`` types, and the error lists what is allowed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

from difflab.errors import UsageError
from difflab.strict import build_dataclass as _build

Schedule = Literal["linear", "cosine"]
Objective = Literal["eps", "x0", "v"]
LossWeighting = Literal["none", "min_snr"]
TimestepSampling = Literal["uniform", "importance"]
SamplerName = Literal["ddpm", "ddim", "dpm++", "unipc", "euler"]
Spacing = Literal["trailing", "leading", "linspace"]
Precision = Literal["auto", "no", "bf16", "fp16"]
DistillPrecision = Literal["auto", "no", "bf16"]  # fp16 would need loss scaling
KeepBest = Literal["fd", "kid", "accuracy"]  # the evaluation metric whose best weights are kept
Tracker = Literal["tensorboard", "wandb"]
GuidanceSchedule = Literal["constant", "linear", "cosine"]
GuidanceMethod = Literal["cfg", "cfg++"]  # cfg++: Chung et al. 2024, DDIM only


# -- value checks: every config object checks its values once, where it is built -----------
MAX_SEED = 2**63 - 1
MAX_GUIDANCE = 100.0  # the largest DDPM guidance scale s anywhere (far past where images break)
EVAL_EVERY = 500  # the interval of a bare `train --eval-every` (steps)
FLAGS = {  # options with their own command-line flag; the rest are --set SECTION.KEY=VALUE
    ("train", "batch_size"): "--batch-size", ("train", "lr"): "--lr", ("train", "seed"): "--seed",
    ("train", "epochs"): "--epochs", ("train", "minutes"): "--minutes",
    ("train", "dataset"): "--dataset", ("train", "data_dir"): "--data-dir",
    ("train", "init_from"): "--init-from", ("train", "eval_every"): "--eval-every",
    ("train", "eval_every_minutes"): "--eval-every-minutes", ("train", "keep_best"): "--keep-best",
    ("train", "snapshot_every"): "--snapshot-every", ("train", "log_with"): "--log-with",
    ("distill", "steps"): "--steps", ("distill", "teacher_steps"): "--teacher-steps",
    ("distill", "teacher_guidance"): "--guidance", ("distill", "round_steps"): "--round-steps",
    ("distill", "adversarial"): "--adversarial", ("distill", "mixed_precision"): "--mixed-precision",
    **{("distill", k): f"--{k.replace('_', '-')}" for k in ("minutes", "batch_size", "lr", "seed")},
}  # fmt: skip


def option_name(section: str, key: str) -> str:
    """How the command line names a config key: its own flag, else ``--set SECTION.KEY``."""
    return FLAGS.get((section, key), f"--set {section}.{key}")


def _check_int(section: str, key: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UsageError(
            f"{option_name(section, key)} {value!r}: must be a whole number from {low} to {high:,}"
        )


def _check_choice(section: str, key: str, value: Any, kind: Any, why: str = "") -> None:
    if value not in get_args(kind):  # kind: a Literal
        allowed = ", ".join(get_args(kind))
        raise UsageError(f"{option_name(section, key)} {value!r}: {why}choose one of {allowed}")


def _check_float(
    section: str,
    key: str,
    value: float,
    low: float,
    high: float,
    *,
    open_low: bool = False,
    open_high: bool = False,
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = (
        ok
        and (value > low if open_low else value >= low)
        and (value < high if open_high else value <= high)
    )
    if not ok:
        if open_low and low == 0:
            hi = f"below {high:g}" if open_high else f"at most {high:g}"
            raise UsageError(
                f"{option_name(section, key)} {value!r}: must be positive and finite, {hi}"
            )
        lo, hi = ("(" if open_low else "[") + f"{low:g}", f"{high:g}" + (")" if open_high else "]")
        raise UsageError(
            f"{option_name(section, key)} {value!r}: must be a finite number in {lo}, {hi}"
        )


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the ContextUnet.

    ``patch_size`` p > 1 folds each p x p patch into channels first (pixel unshuffle), so the
    U-Net works at H/p x W/p: far cheaper on a CPU. H and W must be divisible by
    ``p * 2 ** (len(channel_mults) - 1)``.
    """

    in_channels: int = 1
    height: int = 28
    width: int = 28
    num_classes: int = 10
    class_names: tuple[str, ...] = ()  # filled in from the dataset when training starts
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention: bool = False  # self-attention at the lowest resolution
    patch_size: int = 1
    time_embed_dim: int = 128

    def __post_init__(self) -> None:
        for key, high in (("in_channels", 16), ("height", 4096), ("width", 4096), ("num_classes", 100_000),
                          ("base_channels", 4096), ("num_res_blocks", 16), ("patch_size", 64),
                          ("time_embed_dim", 8192)):  # fmt: skip
            _check_int("model", key, getattr(self, key), 1, high)
        if not self.channel_mults:
            raise UsageError("--set model.channel_mults []: give at least one level, e.g. [1,2]")
        for m in self.channel_mults:
            _check_int("model", "channel_mults", m, 1, 64)


@dataclass(frozen=True)
class DiffusionConfig:
    """Noise schedule and training objective (Ho et al. 2020; Nichol & Dhariwal 2021)."""

    schedule: Schedule = "linear"
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    objective: Objective = "eps"
    loss_weighting: LossWeighting = "none"
    min_snr_gamma: float = 5.0
    # uniform: t ~ U{0..T-1}, each item weighted by the loss weighting w(t); importance: t
    # drawn with p(t) proportional to w(t) and each item weighted w(t) / (T p(t)), which
    # keeps the expected loss of uniform sampling with less variance
    timestep_sampling: TimestepSampling = "uniform"
    clip_x0: bool = True  # clip the predicted x0 to [-1, 1] while sampling

    def __post_init__(self) -> None:
        _check_int("diffusion", "timesteps", self.timesteps, 1, 100_000)
        _check_float(
            "diffusion", "beta_start", self.beta_start, 0, 1, open_low=True, open_high=True
        )
        _check_float("diffusion", "beta_end", self.beta_end, 0, 1, open_low=True, open_high=True)
        if self.beta_end < self.beta_start:
            raise UsageError(
                f"--set diffusion.beta_end {self.beta_end:g}: must be at least beta_start {self.beta_start:g}"
            )
        _check_float("diffusion", "min_snr_gamma", self.min_snr_gamma, 0, 1e6, open_low=True)


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "mnist5k"
    data_dir: str | None = None
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    epochs: float | None = None  # train for this many passes over the data ...
    minutes: float | None = 2.0  # ... or for this long (epochs wins when both are set)
    ema_decay: float = 0.999
    ema_warmup: bool = True
    grad_clip: float = 1.0
    label_dropout: float = 0.1  # share of labels replaced by the "no class" token (for CFG)
    mixed_precision: Precision = "auto"
    channels_last: bool = False  # NHWC activations: faster convolutions on recent GPUs
    compile: bool = False  # torch.compile the model (falls back to eager with a warning)
    seed: int = 0
    log_every: int = 25
    checkpoint_every: int = 500
    init_from: str | None = None  # start from another run's EMA weights (fine-tuning)
    # quality during training (difflab.evaluation.during_training); 0 = off
    eval_every: int = 0  # evaluate the EMA weights every this many steps ...
    eval_every_minutes: float = 0.0  # ... and/or every this many minutes of training
    eval_n_per_class: int = 10  # samples per class of each evaluation (the same noise each time)
    eval_steps: int | None = None  # sampling steps of each evaluation (None: sample.steps)
    keep_best: KeepBest | None = (
        None  # keep the EMA weights of the best evaluation (best.safetensors)
    )
    snapshot_every: int = 0  # keep the EMA weights every this many steps (snapshots/; 0 = off)
    log_with: Tracker | None = None  # also log to TensorBoard (RUN/logs) or Weights & Biases
    # end by choosing the run's default guidance from its samples (evaluation.guidance_choice)
    choose_guidance: bool = False
    guidance_target: float = 0.99  # the conditional accuracy the chosen scale must reach
    guidance_fd_target: float = 1.5  # ... and the FD / floor it should stay within
    guidance_n_per_class: int = 100  # samples per class for each scale tried

    def __post_init__(self) -> None:
        _check_int("train", "batch_size", self.batch_size, 1, 65_536)
        _check_float("train", "lr", self.lr, 0, 1, open_low=True)
        _check_float("train", "weight_decay", self.weight_decay, 0, 10)
        _check_int("train", "warmup_steps", self.warmup_steps, 0, 10**9)
        if self.epochs is not None:
            _check_float("train", "epochs", self.epochs, 0, 1e6, open_low=True)
        if self.minutes is not None:
            _check_float("train", "minutes", self.minutes, 0, 525_600, open_low=True)  # a year
        _check_float("train", "ema_decay", self.ema_decay, 0, 1, open_high=True)
        _check_float("train", "grad_clip", self.grad_clip, 0, 1e6)
        _check_float("train", "label_dropout", self.label_dropout, 0, 1)
        _check_int("train", "seed", self.seed, 0, MAX_SEED)
        _check_int("train", "log_every", self.log_every, 1, 10**9)
        _check_int("train", "checkpoint_every", self.checkpoint_every, 1, 10**9)
        _check_int("train", "eval_every", self.eval_every, 0, 10**9)
        _check_float("train", "eval_every_minutes", self.eval_every_minutes, 0, 525_600)
        _check_int("train", "eval_n_per_class", self.eval_n_per_class, 2, 10_000)
        if self.eval_steps is not None:
            _check_int("train", "eval_steps", self.eval_steps, 1, 100_000)
        _check_int("train", "snapshot_every", self.snapshot_every, 0, 10**9)
        _check_float("train", "guidance_target", self.guidance_target, 0, 1)
        _check_float("train", "guidance_fd_target", self.guidance_fd_target, 0, 1e6, open_low=True)
        _check_int("train", "guidance_n_per_class", self.guidance_n_per_class, 2, 10_000)
        for key, kind in (("keep_best", KeepBest), ("log_with", Tracker)):
            if getattr(self, key) is not None:
                _check_choice("train", key, getattr(self, key), kind)
        if self.keep_best is not None and not (self.eval_every or self.eval_every_minutes):
            raise UsageError(
                f"--keep-best {self.keep_best}: needs evaluations; give --eval-every or "
                "--eval-every-minutes too"
            )

    @property
    def evaluates(self) -> bool:
        """Whether training evaluates its EMA weights as it goes."""
        return bool(self.eval_every or self.eval_every_minutes)


@dataclass(frozen=True)
class SampleConfig:
    """Defaults for sampling and evaluation from this run."""

    sampler: SamplerName = "ddim"
    steps: int = 50
    guidance: float = 2.0
    eta: float = 0.0
    spacing: Spacing = "trailing"
    # where and how strongly guidance acts (difflab.ddpm.guidance); the defaults leave it as is
    guidance_interval: tuple[float, float] | None = None  # [sigma_lo, sigma_hi], EDM sigmas
    guidance_schedule: GuidanceSchedule = "constant"  # weight of s - 1: constant, linear, cosine
    guidance_rescale: float = 0.0  # phi of Lin et al. 2024 (0: off)
    guidance_method: GuidanceMethod = "cfg"  # cfg++: re-noise with the unconditional eps

    def __post_init__(self) -> None:
        _check_int("sample", "steps", self.steps, 1, 100_000)
        _check_float("sample", "guidance", self.guidance, 0, MAX_GUIDANCE)
        _check_float("sample", "eta", self.eta, 0, 1)
        if self.guidance_interval is not None:
            from difflab.checks import check_interval  # checks imports this module

            check_interval(self.guidance_interval, option_name("sample", "guidance_interval"))
        _check_choice("sample", "guidance_schedule", self.guidance_schedule, GuidanceSchedule,
                      "unknown schedule; ")  # fmt: skip
        _check_float("sample", "guidance_rescale", self.guidance_rescale, 0, 1)
        if self.guidance_method != "cfg":
            from difflab.checks import check_guidance_method  # checks imports this module

            name = option_name("sample", "guidance_method")
            check_guidance_method(self.guidance_method, self.sampler, name, "--set sample.sampler")


@dataclass(frozen=True)
class DistillConfig:
    """What a student run is distilled from, and how: :mod:`difflab.ddpm.distill`."""

    teacher: str = ""  # the teacher's run folder
    steps: int = 1  # K: the student's sampling steps, one network pass each
    teacher_steps: int | None = None  # the guided teacher's DDIM steps (None: max(4, 2 K))
    teacher_guidance: float | None = None  # the s folded in (None: the teacher's default)
    teacher_sha256: str = ""  # of the teacher's model.safetensors, filled in at the start
    method: Literal["progressive"] = "progressive"
    rounds: int | None = None  # log2(teacher_steps / steps), always derived
    minutes: float | None = 4.5  # the budget of all rounds together, split evenly, ...
    round_steps: int | None = None  # ... or this many optimizer steps per round (wins)
    batch_size: int = 32
    lr: float = 1e-3  # Adam, annealed linearly to 0 within each round
    adversarial: float = 0.4  # share of --minutes for a last, adversarial round (0: none)
    mixed_precision: DistillPrecision = "auto"  # the passes' autocast; auto as in train
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        if self.steps not in (1, 2, 4) or isinstance(self.steps, bool):
            raise UsageError(f"--steps {self.steps!r}: a student samples in 1, 2 or 4 steps")
        if self.teacher_steps is None:
            object.__setattr__(self, "teacher_steps", max(4, 2 * self.steps))
        _check_int("distill", "teacher_steps", self.teacher_steps, 2, 4096)
        ratio = self.teacher_steps // self.steps
        if self.teacher_steps % self.steps or ratio < 2 or ratio & (ratio - 1):
            raise UsageError(f"--teacher-steps {self.teacher_steps}: must be --steps "
                             f"{self.steps} times a power of two: each round halves the steps")  # fmt: skip
        object.__setattr__(self, "rounds", ratio.bit_length() - 1)
        for key, low, high in (("batch_size", 1, 65_536), ("seed", 0, MAX_SEED), ("log_every", 1, 10**9),
                               ("checkpoint_every", 1, 10**9), ("round_steps", 1, 10**9)):  # fmt: skip
            if key != "round_steps" or self.round_steps is not None:  # None: --minutes decides
                _check_int("distill", key, getattr(self, key), low, high)
        if self.teacher_guidance is not None:
            _check_float("distill", "teacher_guidance", self.teacher_guidance, 0, 100)
        if self.minutes is not None:
            _check_float("distill", "minutes", self.minutes, 0, 525_600, open_low=True)
        elif self.round_steps is None:
            raise UsageError("distill: give --minutes or --round-steps")
        _check_float("distill", "lr", self.lr, 0, 1, open_low=True)
        _check_float("distill", "adversarial", self.adversarial, 0, 1, open_high=True)
        _check_choice("distill", "mixed_precision", self.mixed_precision, DistillPrecision)


@dataclass(frozen=True)
class RunConfig:
    preset: str = "quick"
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    distill: DistillConfig | None = None  # a distilled student: what it was distilled from

    # -- (de)serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)  # a trained run's config.json has no distill section
        return {k: v for k, v in data.items() if k != "distill" or v is not None}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> RunConfig:
        distill = data.get("distill")
        if isinstance(distill, dict) and "adversarial" not in distill:
            data = {**data, "distill": {**distill, "adversarial": 0.0}}  # a student made before it
        return _build(cls, data, where)

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        from difflab.files import read_json

        return cls.from_dict(read_json(path), where=str(path))

    def override(self, assignments: list[str]) -> RunConfig:
        """Apply ``section.key=value`` strings (values parsed as JSON, else as text)."""
        data = self.to_dict()
        for item in assignments:
            key, sep, raw = item.partition("=")
            parts = key.strip().split(".")
            if not sep or len(parts) != 2 or not isinstance(data.get(parts[0]), dict):
                sections = ", ".join(k for k, v in data.items() if isinstance(v, dict))
                raise UsageError(
                    f"--set {item!r}: expected SECTION.KEY=VALUE with SECTION one of {sections}"
                )
            section, name = parts
            if name not in data[section]:
                allowed = ", ".join(data[section])
                raise UsageError(f"--set {key}: unknown key; {section} has {allowed}")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            data[section][name] = value
        return RunConfig.from_dict(data, where="--set")


# -- presets ----------------------------------------------------------------------------
PRESETS: dict[str, RunConfig] = {
    # CPU, minutes: the embedded 5k MNIST subset on two cores. A 2x2-patch U-Net; v, min-SNR
    # (gamma = 1), importance-sampled timesteps, a 50-step warm-up: fast early learning. The
    # cosine schedule wins on FD after a few minutes but wants more guidance early, so a run
    # ends by choosing its own guidance. DPM++ 15 steps (10: ~4 % more FD). docs/benchmarks.md
    "quick": RunConfig(
        preset="quick",
        model=ModelConfig(base_channels=32, channel_mults=(1, 2), patch_size=2),
        diffusion=DiffusionConfig(
            objective="v",
            loss_weighting="min_snr",
            min_snr_gamma=1.0,
            timestep_sampling="importance",
            schedule="cosine",
        ),
        train=TrainConfig(
            batch_size=32, lr=2e-3, minutes=2.0, warmup_steps=50, choose_guidance=True
        ),
        sample=SampleConfig(sampler="dpm++", steps=15, guidance=2.0),
    ),
    # The lab's recipe: a wider model on full MNIST, meant for a GPU.
    "paper": RunConfig(
        preset="paper",
        model=ModelConfig(
            base_channels=64, channel_mults=(1, 2, 4), num_res_blocks=2, attention=True
        ),
        diffusion=DiffusionConfig(objective="v", loss_weighting="min_snr"),
        train=TrainConfig(
            dataset="mnist", batch_size=256, lr=1e-3, epochs=20, minutes=None, warmup_steps=500
        ),
        sample=SampleConfig(sampler="ddim", steps=50, guidance=2.0),
    ),
    # CIFAR-10 on a GPU, for an hour by default: a 30 M-parameter U-Net in the shape of Ho et
    # al.'s CIFAR-10 model (128 channels, x1,2,2,2, two blocks per level), v-prediction with
    # min-SNR weighting. A starting point: not yet tuned on a GPU (see docs/benchmarks.md).
    "cifar10": RunConfig(
        preset="cifar10",
        model=ModelConfig(
            in_channels=3,
            height=32,
            width=32,
            base_channels=128,
            channel_mults=(1, 2, 2, 2),
            num_res_blocks=2,
            attention=True,
            time_embed_dim=512,
        ),
        diffusion=DiffusionConfig(objective="v", loss_weighting="min_snr"),
        train=TrainConfig(
            dataset="cifar10",
            batch_size=256,
            lr=2e-4,
            minutes=60.0,
            warmup_steps=1000,
            ema_decay=0.9995,
            checkpoint_every=2000,
        ),
        sample=SampleConfig(sampler="dpm++", steps=25, guidance=1.5),
    ),
}


def get_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise UsageError(f"--preset {name!r}: unknown preset; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


__all__ = [
    "DiffusionConfig",
    "DistillConfig",
    "ModelConfig",
    "PRESETS",
    "RunConfig",
    "SampleConfig",
    "TrainConfig",
    "get_preset",
    "replace",
]
