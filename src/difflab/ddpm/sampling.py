"""Samplers as one generator: DDPM ancestral, DDIM, and any diffusers scheduler.

:func:`sample_steps` is the only sampling loop in difflab. It yields one :class:`Step` per
network evaluation, so figures, GIFs, progress bars, sweeps and the UI's live preview all
consume the same trajectory. Classifier-free guidance follows diffusers' convention,
``eps = eps_uncond + s * (eps_cond - eps_uncond)`` (s = 0 unconditional, 1 conditional),
with the conditional and unconditional passes batched in one forward. Timestep indices are
0-based as in diffusers: ``x_t`` at index ``t`` is the paper's ``x_{t+1}``. Every image's
initial and step noise follow the seeding rule of :mod:`difflab.seeds`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from difflab.checks import SAMPLERS, check_guidance_method, check_trajectory
from difflab.ddpm.diffusion import GaussianDiffusion
from difflab.ddpm.guidance import guidance_weight, rescale_guidance, sigmas
from difflab.errors import UsageError
from difflab.seeds import ImageNoise, indices_within_class

OWN_SAMPLERS = ("ddpm", "ddim")
DIFFUSERS_SAMPLERS = ("dpm++", "unipc", "euler")
assert set(SAMPLERS) == {*OWN_SAMPLERS, *DIFFUSERS_SAMPLERS}  # the names of config.SamplerName
SPACINGS = ("trailing", "leading", "linspace")


@dataclass(frozen=True)
class Step:
    index: int  # 0 .. num_steps - 1
    num_steps: int
    t: int  # timestep index of x_t (0-based, as the network sees it)
    t_prev: int  # timestep index of x_prev; -1 means x_prev is the final sample x_0
    x_t: torch.Tensor  # (B, C, H, W) input of this step
    x0_pred: torch.Tensor  # (B, C, H, W) the guided estimate of x_0 made from x_t
    x_prev: torch.Tensor  # (B, C, H, W) output of this step


def make_timesteps(num_train: int, steps: int, spacing: str = "trailing") -> list[int]:
    """Descending timestep indices, spaced as diffusers' ``timestep_spacing`` option."""
    assert 1 <= steps <= num_train, (steps, num_train)  # checked where the options are built
    if spacing == "leading":
        ratio = num_train // steps
        ts = (np.arange(0, steps) * ratio).round()[::-1]
    elif spacing == "trailing":
        ts = np.round(np.arange(num_train, 0, -num_train / steps)) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, num_train - 1, steps).round()[::-1]
    else:  # a run config's spacing is checked when it is loaded
        raise ValueError(f"spacing {spacing!r}: not one of {', '.join(SPACINGS)}")
    return [int(t) for t in ts]


# -- one update each; eps and x0 come from the same (guided, clipped) prediction -------------
def ddpm_update(
    diffusion: GaussianDiffusion,
    x: torch.Tensor,
    t: int,
    t_prev: int,
    x0: torch.Tensor,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """Ancestral step x_t -> x_{t_prev} through the posterior q(x_{t_prev} | x_t, x0) (eqs. 6-7).

    For skipped steps the betas are those of the sub-sequence: beta = 1 - abar_t / abar_prev.
    """
    abar = diffusion.buf("alphas_cumprod", x.device)
    a_t = abar[t]
    a_prev = abar[t_prev] if t_prev >= 0 else torch.ones((), device=x.device)
    alpha = a_t / a_prev
    beta = 1 - alpha
    mean = (a_prev.sqrt() * beta / (1 - a_t)) * x0 + (alpha.sqrt() * (1 - a_prev) / (1 - a_t)) * x
    if t_prev < 0 or noise is None:
        return mean
    variance = ((1 - a_prev) / (1 - a_t) * beta).clamp(min=1e-20)  # "fixed_small"
    return mean + variance.sqrt() * noise


def ddim_update(
    diffusion: GaussianDiffusion,
    x: torch.Tensor,
    t: int,
    t_prev: int,
    eps: torch.Tensor,
    x0: torch.Tensor,
    eta: float,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """DDIM step (Song et al. 2021, eq. 12); eta = 0 is deterministic, eta = 1 is DDPM-like."""
    abar = diffusion.buf("alphas_cumprod", x.device)
    a_t = abar[t]
    a_prev = abar[t_prev] if t_prev >= 0 else torch.ones((), device=x.device)
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()  # eq. 16
    x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
    if eta > 0 and noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev


def diffusers_scheduler(name: str, diffusion: GaussianDiffusion, spacing: str = "trailing"):
    """A diffusers scheduler set up with this run's betas, driving our eps predictions."""
    import diffusers

    common = dict(
        num_train_timesteps=diffusion.num_timesteps,
        trained_betas=diffusion.betas.numpy(),
        prediction_type="epsilon",
        timestep_spacing=spacing,
    )
    if name == "dpm++":
        return diffusers.DPMSolverMultistepScheduler(
            algorithm_type="dpmsolver++", solver_order=2, **common
        )
    if name == "unipc":
        return diffusers.UniPCMultistepScheduler(**common)
    if name == "euler":
        return diffusers.EulerDiscreteScheduler(**common)
    raise ValueError(f"sampler {name!r}: not one of {', '.join(DIFFUSERS_SAMPLERS)}")


class GuidedModel:
    """The network with classifier-free guidance and the conversion of its output to (eps, x0).

    ``interval``, ``schedule`` and ``rescale`` shape the guidance per step
    (:mod:`difflab.ddpm.guidance`); their defaults (None, constant, 0) compute exactly what
    plain guidance does. ``method`` ``cfg++`` (Chung et al. 2024, for DDIM) keeps the guided
    x_0 but returns the unconditional eps, with which the DDIM update re-noises.
    """

    def __init__(
        self,
        model: nn.Module,
        diffusion: GaussianDiffusion,
        guidance: float | torch.Tensor,
        autocast: str | None = None,
        interval: tuple[float, float] | None = None,
        schedule: str = "constant",
        rescale: float = 0.0,
        method: str = "cfg",
    ):
        """``guidance`` is one scale, or one per sample (B,) to batch several guidance values."""
        self.model, self.diffusion = model, diffusion
        self.guidance = guidance if isinstance(guidance, torch.Tensor) else float(guidance)
        self.autocast = autocast
        self.interval, self.schedule, self.rescale = interval, schedule, float(rescale)
        self.method = method
        self._sigmas = None if interval is None else sigmas(diffusion.alphas_cumprod)
        self.null_label = model.num_classes
        self._plans: dict[bool, tuple[torch.Tensor, ...]] = {}  # see _mixed

    def weight(self, t: int) -> float:
        """The weight of ``s - 1`` at timestep index ``t``: 0 outside the interval."""
        sigma = 0.0 if self._sigmas is None else self._sigmas[t]
        return guidance_weight(t, self.diffusion.num_timesteps, sigma, self.interval, self.schedule)

    @torch.no_grad()
    def __call__(
        self, x: torch.Tensor, t: int, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        tt = torch.full((b,), int(t), device=x.device, dtype=torch.long)
        null = torch.full_like(labels, self.null_label)
        w = self.weight(int(t))
        s = self.guidance
        if w == 0.0:  # outside the interval: plain conditional (s = 1) for every sample
            s = 1.0
        elif w != 1.0 and not isinstance(s, torch.Tensor):
            s = 1.0 + (s - 1.0) * w
        ctx = (
            torch.autocast(x.device.type, dtype=torch.bfloat16)
            if self.autocast == "bf16"
            else nullcontext()
        )
        renoise = None  # cfg++: the output whose eps re-noises the step (None: out's own)
        with ctx:
            if isinstance(s, torch.Tensor):
                out, renoise = self._mixed(x, tt, labels, null, w)
            elif s == 1.0:
                out = self.model(x, tt, labels)
            elif s == 0.0:
                out = self.model(x, tt, null)
            else:  # both passes in one batch: (2B, C, H, W)
                both = self.model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null]))
                cond, uncond = both.float().chunk(2)
                out = uncond + s * (cond - uncond)
                if self.rescale > 0:
                    out = rescale_guidance(out, cond, self.rescale)
                if self.method == "cfg++":
                    renoise = uncond
        eps, x0 = self.diffusion.sampling_eps_x0(out.float(), x, tt)
        if renoise is not None:  # CFG++: x0 guided, eps unconditional (Chung et al. 2024)
            eps = self.diffusion.sampling_eps_x0(renoise.float(), x, tt)[0]
        return eps, x0

    def _mixed(
        self, x, tt, labels, null, w: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward for a batch whose samples have different guidance scales (B,).

        Only the passes a sample needs are run: the conditional one unless s = 0, the
        unconditional one unless s = 1; all of them in a single batch. Which samples need
        which pass is worked out on the first call only (``nonzero`` waits for the device);
        a schedule's weight w != 1 moves s = 0 off 0, so those steps have a second plan in
        which every sample runs the conditional pass. Returns the guided output and, for
        cfg++, the output each sample re-noises with (unconditional; conditional where s = 1).
        """
        exact = w == 1.0
        if exact not in self._plans:
            s = self.guidance.to(x.device)
            need_c, need_u = (s != 0) if exact else torch.ones_like(s, dtype=torch.bool), s != 1
            ic, iu = need_c.nonzero().squeeze(1), need_u.nonzero().squeeze(1)
            self._plans[exact] = (s, need_c, need_u, ic, iu)
        s, need_c, need_u, ic, iu = self._plans[exact]
        if not exact:
            s = 1.0 + (s - 1.0) * w  # (B,) the step's scales; s = 1 stays 1
        both = self.model(
            torch.cat([x[ic], x[iu]]),
            torch.cat([tt[ic], tt[iu]]),
            torch.cat([labels[ic], null[iu]]),
        ).float()
        cond, uncond = torch.zeros_like(x), torch.zeros_like(x)
        cond[ic], uncond[iu] = both[: len(ic)], both[len(ic) :]
        w_ = s.float().view(-1, *([1] * (x.dim() - 1)))
        guided = uncond + w_ * (cond - uncond)
        if self.rescale > 0:
            guided = rescale_guidance(guided, cond, self.rescale)
        out = torch.where(
            ~need_u.view_as(w_), cond, torch.where(~need_c.view_as(w_), uncond, guided)
        )
        if self.method != "cfg++":
            return out, None
        return out, torch.where(~need_u.view_as(w_), cond, uncond)


def sample_steps(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    labels: torch.Tensor,
    *,
    guidance: float = 1.0,
    steps: int = 50,
    sampler: str = "ddim",
    eta: float = 0.0,
    spacing: str = "trailing",
    seed: int | None = 0,
    indices: torch.Tensor | None = None,
    x_T: torch.Tensor | None = None,
    autocast: str | None = None,
    groups: int = 1,
    guidance_interval: tuple[float, float] | None = None,
    guidance_schedule: str = "constant",
    guidance_rescale: float = 0.0,
    guidance_method: str = "cfg",
) -> Iterator[Step]:
    """Run the reverse process for ``labels`` (B,), yielding each :class:`Step`.

    The noise follows the seeding rule (:mod:`difflab.seeds`): image i has its own seed from
    (``seed``, ``labels[i]``, ``indices[i]``), its index within its class (default: the
    running count of each class in the order given), and two independent streams: x_T,
    drawn on the CPU, and the step noise (DDPM, DDIM with eta > 0), drawn on the model's
    device. A seed fixes each image's trajectory on a given kind of device, whatever batch
    it is in. ``x_T`` (B, C, H, W) may be given instead of the first stream; the step noise
    still comes from the step stream.

    ``guidance`` may be a tensor (B,) of per-sample scales; with ``groups = G`` the batch is
    G equal-sized blocks (one per guidance value, say) holding the same labels and indices:
    they share x_T and the step noise, so each block follows the trajectory it would follow
    if sampled on its own.

    ``guidance_interval``, ``guidance_schedule``, ``guidance_rescale`` and
    ``guidance_method`` (cfg, or cfg++ with the ddim sampler) shape the guidance per step
    (:mod:`difflab.ddpm.guidance`; the defaults leave it as it is).
    """
    scales = guidance.tolist() if isinstance(guidance, torch.Tensor) else [guidance]
    for g in sorted(set(scales)):  # a cheap guard: callers pass options checked when built
        check_trajectory(sampler, steps, g, eta, diffusion.num_timesteps)
    check_guidance_method(guidance_method, sampler)
    if groups < 1 or labels.shape[0] % groups:
        raise ValueError(f"groups={groups} does not divide the batch of {labels.shape[0]}")
    device = next(model.parameters()).device
    cfg = model.cfg
    labels_cpu = labels.detach().cpu().long()
    if labels.numel() and (labels_cpu.min() < 0 or labels_cpu.max() >= cfg.num_classes):
        raise UsageError(
            f"--classes: class index out of range; this run has classes 0..{cfg.num_classes - 1}"
        )
    shape = (labels.shape[0], cfg.in_channels, cfg.height, cfg.width)
    n = shape[0] // groups
    if indices is None:
        indices = indices_within_class(labels_cpu[:n]).repeat(groups)
    indices = torch.as_tensor(indices).cpu().long()
    if indices.shape != labels_cpu.shape:
        raise ValueError(f"indices have shape {tuple(indices.shape)}, labels {tuple(labels.shape)}")
    blocks = torch.stack([labels_cpu, indices]).view(2, groups, n)
    if groups > 1 and not (blocks == blocks[:, :1]).all():
        raise ValueError(f"groups={groups}: every block must hold the same labels and indices")
    noise = ImageNoise(seed, labels_cpu[:n], shape[1:], indices[:n], device)
    if x_T is None:
        x = noise.initial().repeat(groups, 1, 1, 1)
    else:
        x = x_T.detach().cpu().float().clone()
        if tuple(x.shape) != shape:
            raise UsageError(f"x_T has shape {tuple(x.shape)}, expected {shape}")
    x = x.to(device)
    labels = labels.to(device=device, dtype=torch.long)

    def step_noise() -> torch.Tensor:  # (B, C, H, W) on the device, the same for every block
        z = noise.step()
        return z if groups == 1 else z.repeat(groups, 1, 1, 1)

    net = GuidedModel(
        model, diffusion, guidance, autocast, guidance_interval, guidance_schedule,
        guidance_rescale, guidance_method,
    )  # fmt: skip
    was_training = model.training
    model.eval()
    try:
        if sampler in OWN_SAMPLERS:
            ts = make_timesteps(diffusion.num_timesteps, steps, spacing)
            for i, t in enumerate(ts):
                t_prev = ts[i + 1] if i + 1 < len(ts) else -1
                eps, x0 = net(x, t, labels)
                stochastic = sampler == "ddpm" or eta > 0
                z = step_noise() if stochastic and t_prev >= 0 else None
                if sampler == "ddpm":
                    x_prev = ddpm_update(diffusion, x, t, t_prev, x0, z)
                else:
                    x_prev = ddim_update(diffusion, x, t, t_prev, eps, x0, eta, z)
                yield Step(i, len(ts), t, t_prev, x, x0, x_prev)
                x = x_prev
        else:
            sched = diffusers_scheduler(sampler, diffusion, spacing)
            sched.set_timesteps(steps, device=device)
            ts = [int(round(float(t))) for t in sched.timesteps]
            x = x * sched.init_noise_sigma
            extra = {}
            if "generator" in inspect.signature(sched.step).parameters and not _deterministic(
                sched
            ):
                if groups > 1:  # diffusers would draw from each image's stream once per block
                    raise ValueError(
                        f"sampler {sampler!r} draws step noise: cannot share it in groups"
                    )
                extra = {"generator": noise.step_generators()}  # diffusers: one per image
            for i, t in enumerate(sched.timesteps):
                x_in = sched.scale_model_input(
                    x, t
                )  # the DDPM-scaled x_t the network was trained on
                eps, x0 = net(x_in, ts[i], labels)
                x_prev = sched.step(eps, t, x, **extra).prev_sample
                t_prev = ts[i + 1] if i + 1 < len(ts) else -1
                yield Step(i, len(ts), ts[i], t_prev, x_in, x0, x_prev)
                x = x_prev
    finally:
        model.train(was_training)


def _deterministic(sched) -> bool:
    """Whether a diffusers scheduler's step adds no noise (its generator goes unused)."""
    cfg = sched.config
    if "algorithm_type" in cfg:  # DPM-Solver: the SDE variants add noise
        return "sde" not in cfg.algorithm_type
    return True  # UniPC is deterministic; Euler adds noise only with s_churn > 0 (not used)


def sample(
    model: nn.Module, diffusion: GaussianDiffusion, labels: torch.Tensor, **kwargs
) -> torch.Tensor:
    """Run :func:`sample_steps` to the end and return x_0 (B, C, H, W) in [-1, 1]."""
    x = None
    for step in sample_steps(model, diffusion, labels, **kwargs):
        x = step.x_prev
    return x.clamp(-1, 1)
