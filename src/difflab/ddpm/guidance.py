"""Where and how classifier-free guidance acts: interval, schedule, rescale and method.

Four refinements of the guidance scale ``s`` (diffusers' convention, s = 1 conditional),
each a key of :class:`~difflab.config.SampleConfig` whose default leaves guidance as it is:

- **interval** (Kynkäänniemi et al. 2024): guidance only where the noise level
  ``sigma_t = sqrt((1 - abar_t) / abar_t)`` (the EDM sigma of step t) lies in the closed
  interval ``[sigma_lo, sigma_hi]``; plain conditional sampling (s = 1) elsewhere, which
  also saves the unconditional pass there;
- **schedule** (as studied by Wang et al. 2024, "Analysis of classifier-free guidance
  weight schedulers"): the excess guidance ``s - 1`` weighted by ``w(r)`` with
  ``r = (t + 1) / T`` in (0, 1] (1 at the first step from noise): ``constant`` w = 1,
  ``linear`` w = 2 (1 - r), ``cosine`` w = 1 + cos(pi r); both ramps rise from 0 at
  r = 1 to 2 at r = 0 and average 1 over r, so they keep the mean guidance of ``s``;
- **rescale** phi (Lin et al. 2024, "Common diffusion noise schedules and sample steps are
  flawed", section 3.4, as diffusers' ``rescale_noise_cfg``): the guided output is rescaled to
  the conditional output's standard deviation per sample, and mixed with the unrescaled one:
  ``phi * guided * std(cond) / std(guided) + (1 - phi) * guided``, on the network's output
  in its own parameterisation (eps, x0 or v);
- **method** ``cfg`` (the guided output gives both x_0 and the eps of the update) or
  ``cfg++`` (Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free Guidance for
  Diffusion Models", Algorithm 1, DDIM only, with s as the paper's lambda): the DDIM step
  goes through the guided x_0 but re-noises with the unconditional eps,
  ``x_prev = sqrt(abar_prev) x0_s + sqrt(1 - abar_prev - sigma^2) eps_uncond``.

The step's scale is then ``1 + (s - 1) * weight(t)`` with weight 0 outside the interval.
Nothing here draws random numbers.
"""

from __future__ import annotations

import math
from typing import get_args

import torch

from difflab.config import GuidanceSchedule

GUIDANCE_SCHEDULES: tuple[str, ...] = get_args(GuidanceSchedule)


def schedule_weight(schedule: str, r: float) -> float:
    """w(r) of ``schedule`` at ``r = t / T`` in (0, 1] (paper t, 1 at pure noise)."""
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 2.0 * (1.0 - r)
    if schedule == "cosine":
        return 1.0 + math.cos(math.pi * r)
    raise ValueError(f"guidance schedule {schedule!r}: not one of {', '.join(GUIDANCE_SCHEDULES)}")


def sigmas(alphas_cumprod: torch.Tensor) -> list[float]:
    """The EDM noise level of each timestep index, ``sqrt((1 - abar_t) / abar_t)`` (float64)."""
    abar = alphas_cumprod.double()
    return ((1 - abar) / abar).sqrt().tolist()


def guidance_weight(
    t: int,
    num_timesteps: int,
    sigma: float,
    interval: tuple[float, float] | None = None,
    schedule: str = "constant",
) -> float:
    """The weight of ``s - 1`` at timestep index ``t`` (0-based) whose noise level is ``sigma``:
    0 outside ``interval`` (closed), else the schedule's w((t + 1) / T)."""
    if interval is not None and not interval[0] <= sigma <= interval[1]:
        return 0.0
    return schedule_weight(schedule, (t + 1) / num_timesteps)


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2024, section 3.4: ``guided`` (B, ...) brought towards the per-sample standard
    deviation of ``cond`` by the share ``phi`` (0: unchanged)."""
    dims = list(range(1, guided.dim()))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)  # the std of cond, per sample
    return phi * rescaled + (1 - phi) * guided  # mixed back by phi
