import math
import warnings

import pytest
import torch
from diffusers import DDPMScheduler

from difflab.config import DiffusionConfig
from difflab.ddpm.diffusion import GaussianDiffusion, make_betas, signal_at_T
from difflab.errors import UsageError


def test_linear_schedule_matches_paper_and_diffusers():
    cfg = DiffusionConfig()
    betas = make_betas(cfg)
    assert betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    torch.testing.assert_close(betas.float(), ref.betas, rtol=1e-6, atol=1e-9)


def test_cosine_schedule_matches_diffusers():
    betas = make_betas(DiffusionConfig(schedule="cosine"))
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    torch.testing.assert_close(betas.float(), ref.betas, rtol=1e-5, atol=1e-7)


def test_q_sample_at_T_is_nearly_pure_noise():
    d = GaussianDiffusion(DiffusionConfig())
    x0 = torch.ones(4096, 1, 2, 2)
    xt = d.q_sample(x0, torch.full((4096,), 999), torch.randn_like(x0))
    assert abs(xt.mean().item()) < 0.05
    assert xt.std().item() == pytest.approx(1.0, abs=0.05)
    assert d.signal_at_T < 0.01


def test_warns_when_signal_is_left_at_T():
    cfg = DiffusionConfig(timesteps=400)
    assert signal_at_T(cfg) == pytest.approx(0.13, abs=0.02)
    with pytest.warns(UserWarning, match="not pure noise"):
        GaussianDiffusion(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GaussianDiffusion(DiffusionConfig())


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_objectives_round_trip(objective):
    d = GaussianDiffusion(DiffusionConfig(objective=objective))
    x0 = torch.rand(8, 1, 4, 4) * 2 - 1
    eps = torch.randn_like(x0)
    t = torch.randint(0, 1000, (8,))
    xt = d.q_sample(x0, t, eps)
    target = {"eps": eps, "x0": x0, "v": d.velocity(x0, t, eps)}[objective]
    eps_hat, x0_hat = d.eps_x0_from_output(target, xt, t)
    torch.testing.assert_close(eps_hat, eps, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(x0_hat, x0, atol=2e-3, rtol=1e-3)
    assert d.training_loss(target, x0, t, eps).item() == pytest.approx(0.0, abs=1e-6)


def test_posterior_matches_closed_form():
    d = GaussianDiffusion(DiffusionConfig())
    t = torch.tensor([10])
    x0, xt = torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 2)
    mean, var = d.q_posterior_mean_variance(x0, xt, t)
    b = d.betas[10].item()
    a_bar, a_prev = d.alphas_cumprod[10].item(), d.alphas_cumprod[9].item()
    expect = (
        math.sqrt(a_prev) * b / (1 - a_bar) * x0
        + math.sqrt(1 - b) * (1 - a_prev) / (1 - a_bar) * xt
    )
    torch.testing.assert_close(mean, expect, atol=1e-6, rtol=1e-5)
    assert var.flatten()[0].item() == pytest.approx((1 - a_prev) / (1 - a_bar) * b, rel=1e-5)


def test_min_snr_weighting_downweights_low_noise_steps():
    d = GaussianDiffusion(DiffusionConfig(loss_weighting="min_snr"))
    x0 = torch.zeros(2, 1, 2, 2)
    out = torch.ones(2, 1, 2, 2)
    noise = torch.zeros_like(x0)
    low_noise = d.training_loss(out[:1], x0[:1], torch.tensor([0]), noise[:1])
    high_noise = d.training_loss(out[:1], x0[:1], torch.tensor([999]), noise[:1])
    assert low_noise < 0.01 * high_noise


def test_bad_schedule_values_are_refused():
    with pytest.raises(UsageError, match="timesteps"):
        make_betas(DiffusionConfig(timesteps=1))
    with pytest.raises(UsageError, match="beta_start"):
        make_betas(DiffusionConfig(beta_start=0.5, beta_end=0.1))
