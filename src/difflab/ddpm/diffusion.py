"""Noise schedules and the Gaussian diffusion process (Ho et al. 2020, "DDPM").

Owns the per-timestep buffers named after the paper (``betas``, ``alphas_cumprod``, ...),
the forward process ``q_sample`` (eq. 4), the posterior ``q(x_{t-1} | x_t, x_0)`` (eqs. 6-7),
conversions between the eps, x0 and v parameterisations, and the training loss with optional
min-SNR weighting (Hang et al. 2023). Timesteps are 0-based: ``t = 0 .. T-1``, where index
``t`` holds ``beta_{t+1}`` of the paper; ``alphas_cumprod[T-1]`` is the signal left at ``t = T``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from difflab.config import DiffusionConfig
from difflab.errors import UsageError

SIGNAL_WARN_LEVEL = 0.01  # warn when sqrt(alphas_cumprod[T-1]) exceeds this


def make_betas(cfg: DiffusionConfig) -> torch.Tensor:
    """float64 (T,) betas for the configured schedule."""
    T = cfg.timesteps
    if T < 2:
        raise UsageError(f"diffusion.timesteps={T}: must be at least 2")
    if cfg.schedule == "linear":
        if not 0 < cfg.beta_start <= cfg.beta_end < 1:
            raise UsageError("diffusion.beta_start/beta_end: need 0 < beta_start <= beta_end < 1")
        return torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float64)
    if cfg.schedule == "cosine":
        # Nichol & Dhariwal (2021), eq. 17, with s = 0.008 and betas clipped at 0.999
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        abar = f / f[0]
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise UsageError(f"diffusion.schedule={cfg.schedule!r}: choose one of linear, cosine")


def signal_at_T(cfg: DiffusionConfig) -> float:
    """sqrt(alphas_cumprod[T-1]): the share of the image's amplitude still in x_T."""
    abar = torch.cumprod(1 - make_betas(cfg), 0)
    return float(abar[-1].sqrt())


@dataclass
class _Buffers:
    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    timestep_probs: torch.Tensor | None = None  # importance sampling's p(t), set after the rest


class GaussianDiffusion:
    """The fixed forward process and the maths that every sampler and the trainer share."""

    def __init__(self, cfg: DiffusionConfig, warn: bool = True) -> None:
        self.cfg = cfg
        self.num_timesteps = cfg.timesteps
        betas = make_betas(cfg)
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        self._b64 = _Buffers(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=abar,
            alphas_cumprod_prev=abar_prev,
            sqrt_alphas_cumprod=abar.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1 - abar).sqrt(),
            # eq. 7: beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t
            posterior_variance=betas * (1 - abar_prev) / (1 - abar),
            posterior_mean_coef1=betas * abar_prev.sqrt() / (1 - abar),
            posterior_mean_coef2=(1 - abar_prev) * alphas.sqrt() / (1 - abar),
        )
        w = self.loss_weight(torch.arange(self.num_timesteps)).double()
        self._b64.timestep_probs = w / w.sum()  # importance sampling's p(t): needs snr's buffers
        self.signal_at_T = float(abar[-1].sqrt())
        if warn and self.signal_at_T > SIGNAL_WARN_LEVEL:
            warnings.warn(
                f"x_T is not pure noise: {cfg.schedule} schedule with T={cfg.timesteps} keeps "
                f"sqrt(alphas_cumprod[T-1]) = {self.signal_at_T:.1%} of the image",
                stacklevel=2,
            )

    # buffers as float32 on the caller's device (cached per device)
    def buf(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        device = torch.device(device)
        cache = self.__dict__.setdefault("_cache", {})
        key = (name, device)
        if key not in cache:
            cache[key] = getattr(self._b64, name).to(device=device, dtype=torch.float32)
        return cache[key]

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._b64.alphas_cumprod

    @property
    def betas(self) -> torch.Tensor:
        return self._b64.betas

    def _at(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Gather buffer[t] and shape it to broadcast against x: (B,) -> (B, 1, 1, 1)."""
        v = self.buf(name, x.device)[t]
        return v.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)

    # -- forward process ------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        return (
            self._at("sqrt_alphas_cumprod", t, x0) * x0
            + self._at("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eqs. 6-7: mean and variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            self._at("posterior_mean_coef1", t, xt) * x0
            + self._at("posterior_mean_coef2", t, xt) * xt
        )
        return mean, self._at("posterior_variance", t, xt)

    # -- parameterisations -------------------------------------------------------------------
    def predict_x0_from_eps(
        self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
    ) -> torch.Tensor:
        return (xt - self._at("sqrt_one_minus_alphas_cumprod", t, xt) * eps) / self._at(
            "sqrt_alphas_cumprod", t, xt
        )

    def predict_eps_from_x0(
        self, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor
    ) -> torch.Tensor:
        return (xt - self._at("sqrt_alphas_cumprod", t, xt) * x0) / self._at(
            "sqrt_one_minus_alphas_cumprod", t, xt
        )

    def velocity(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022)."""
        return (
            self._at("sqrt_alphas_cumprod", t, x0) * eps
            - self._at("sqrt_one_minus_alphas_cumprod", t, x0) * x0
        )

    def eps_x0_from_output(
        self, out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn the network output (per the objective) into (eps, x0)."""
        obj = self.cfg.objective
        if obj == "eps":
            return out, self.predict_x0_from_eps(xt, t, out)
        if obj == "x0":
            return self.predict_eps_from_x0(xt, t, out), out
        a, s = (
            self._at("sqrt_alphas_cumprod", t, xt),
            self._at("sqrt_one_minus_alphas_cumprod", t, xt),
        )
        x0 = a * xt - s * out  # v-prediction
        eps = s * xt + a * out
        return eps, x0

    def sampling_eps_x0(
        self, out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x0) of a network output as a sampling step uses them: with ``clip_x0``, x0
        clipped to [-1, 1] and eps recomputed from the clipped x0."""
        eps, x0 = self.eps_x0_from_output(out, xt, t)
        if self.cfg.clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = self.predict_eps_from_x0(xt, t, x0)
        return eps, x0

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        abar = self.buf("alphas_cumprod", t.device)[t]
        return abar / (1 - abar)

    # -- training ---------------------------------------------------------------------------
    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """The per-item weight (B,) of the loss at timesteps ``t`` under uniform sampling:
        min(SNR, gamma) expressed for the chosen target (Hang et al. 2023, sec. 3.4), or 1."""
        if self.cfg.loss_weighting != "min_snr":
            return torch.ones(t.shape, device=t.device)
        snr = self.snr(t)
        clipped = snr.clamp(max=self.cfg.min_snr_gamma)
        return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[self.cfg.objective]

    def timestep_probs(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """p(t) (T,) of ``timestep_sampling="importance"``: proportional to the loss weight."""
        return self.buf("timestep_probs", device)

    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` training timesteps drawn with ``generator`` on its device (uniform, or by
        :meth:`timestep_probs`)."""
        dev = generator.device
        if self.cfg.timestep_sampling == "uniform":
            return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=dev)
        return torch.multinomial(self.timestep_probs(dev), n, replacement=True, generator=generator)

    def item_weight(self, t: torch.Tensor) -> torch.Tensor:
        """The weight (B,) of each item's loss at the drawn timesteps ``t``: the loss weight
        w(t) under uniform sampling; w(t) / (T p(t)) under importance sampling, which keeps
        the expected loss (and gradient) of uniform sampling."""
        w = self.loss_weight(t)
        if self.cfg.timestep_sampling == "uniform":
            return w
        return w / (self.num_timesteps * self.timestep_probs(t.device)[t])

    def training_loss(
        self,
        out: torch.Tensor,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """Mean squared error on the objective's target, weighted by :meth:`item_weight`.

        With importance sampling (t drawn with p(t) proportional to the weight w(t)) every
        item gets the same weight mean(w) = w(t) / (T p(t)): the expected loss and gradient
        are those of uniform sampling, with less variance.
        """
        obj = self.cfg.objective
        target = noise if obj == "eps" else x0 if obj == "x0" else self.velocity(x0, t, noise)
        per_item = F.mse_loss(out.float(), target.float(), reduction="none").flatten(1).mean(1)
        return (per_item * self.item_weight(t)).mean()
