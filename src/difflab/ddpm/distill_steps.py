"""The arithmetic of progressive distillation (:mod:`difflab.ddpm.distill`), without state.

Salimans & Ho 2022, Algorithm 2: the student's grid and the teacher's twice-as-fine one, the
deterministic DDIM step both take, the guided teacher's estimate of x_0 (with guidance folded
in as Meng et al. 2023 do, and cfg++'s unconditional re-noising, Chung et al. 2024), and the
target ``x~`` whose one student step lands where the teacher's two land. The student's run
config is here too: DDIM on the trailing grid at s = 1, one pass per step.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from difflab.config import DistillConfig, RunConfig, SampleConfig
from difflab.ddpm.diffusion import GaussianDiffusion
from difflab.ddpm.guidance import rescale_guidance
from difflab.ddpm.sampling import make_timesteps

SPACING = "trailing"  # the student's grid: its first step starts from pure noise


def student_config(teacher: RunConfig, dc: DistillConfig, steps: int) -> RunConfig:
    """The student's config: the teacher's model and schedule, DDIM in ``steps`` steps at
    s = 1 (one pass per step), and the record ``dc`` of what it is distilled from."""
    objective = "v" if teacher.diffusion.objective == "eps" else teacher.diffusion.objective
    return replace(
        teacher,
        diffusion=replace(teacher.diffusion, objective=objective),
        sample=SampleConfig(sampler="ddim", steps=steps, guidance=1.0, eta=0.0, spacing=SPACING),
        distill=dc,
    )


def teacher_grid(num_timesteps: int, student_steps: int) -> torch.Tensor:
    """(2N + 1,) the round teacher's 2N timesteps and -1 (x_0): the student's step i goes
    from ``grid[2i]`` to ``grid[2i + 2]``, the teacher's through ``grid[2i + 1]``."""
    ts = make_timesteps(num_timesteps, 2 * student_steps, SPACING)
    assert ts[::2] == make_timesteps(num_timesteps, student_steps, SPACING)  # N a power of 2
    return torch.tensor([*ts, -1])


def distillation_target(
    z: torch.Tensor, z2: torch.Tensor, abar_t: torch.Tensor, abar_t2: torch.Tensor
) -> torch.Tensor:
    """x~ of Salimans & Ho 2022 (Algorithm 2): the x_0 whose one DDIM step z_t -> z_t'' lands
    on the teacher's two-step result ``z2``; ``abar_t2`` = 1 when t'' is the end (x~ = z2)."""
    ratio = ((1 - abar_t2) / (1 - abar_t)).sqrt()  # sigma_t'' / sigma_t
    return (z2 - ratio * z) / (abar_t2.sqrt() - ratio * abar_t.sqrt())


def ddim_step(
    abar: torch.Tensor, z: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, t_to: torch.Tensor,
    eps: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """One deterministic DDIM step z_t -> z_{t_to} through x0 (Song et al. 2021, eq. 12),
    re-noised with ``eps`` (None: the eps of x0 and z_t). ``abar``: (T + 1,), 1 at index -1."""
    a, a_to = abar[t].view(-1, 1, 1, 1), abar[t_to].view(-1, 1, 1, 1)
    if eps is None:
        eps = (z - a.sqrt() * x0) / (1 - a).sqrt()
    return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps


def guided_x0(
    net: torch.nn.Module, diffusion: GaussianDiffusion, z: torch.Tensor, t: torch.Tensor,
    y: torch.Tensor, s: torch.Tensor | None, sample: SampleConfig,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """A teacher's clipped estimate of x_0 from z_t, guided at the (B,) scales ``s`` (None:
    conditional only) with ``sample``'s rescale and method, and the eps its DDIM step
    re-noises with: None (the one of x_0), or with cfg++ the unconditional one (the x_0's own
    where s = 1). The network may run in lower precision; the arithmetic is float32."""
    eps = None
    if s is None or bool((s == 1).all()):
        out = net(z, t, y).float()
    else:  # the conditional and unconditional passes in one batch: (2B, C, H, W)
        null = torch.full_like(y, net.num_classes)
        both = net(torch.cat([z, z]), torch.cat([t, t]), torch.cat([y, null])).float()
        cond, uncond = both.chunk(2)
        out = uncond + s.view(-1, 1, 1, 1) * (cond - uncond)
        if sample.guidance_rescale > 0:
            out = rescale_guidance(out, cond, sample.guidance_rescale)
        if sample.guidance_method == "cfg++":
            eps = diffusion.sampling_eps_x0(uncond, z, t)[0]
    own, x0 = diffusion.sampling_eps_x0(out, z, t)
    if eps is not None:  # plain conditional where the step's scale is 1
        eps = torch.where((s == 1).view(-1, 1, 1, 1), own, eps)
    return x0, eps
