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


def _v_min_snr(**kw) -> GaussianDiffusion:
    return GaussianDiffusion(
        DiffusionConfig(objective="v", loss_weighting="min_snr", min_snr_gamma=1.0, **kw)
    )


def test_uniform_timesteps_are_the_plain_randint_draw():
    """The default draw is unchanged: torch.randint from the step's generator."""
    d = GaussianDiffusion(DiffusionConfig())
    got = d.sample_timesteps(64, torch.Generator().manual_seed(3))
    want = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, want)


def test_importance_sampling_keeps_the_expected_loss_of_uniform_sampling():
    """p(t) is proportional to the min-SNR weight w(t), so mean(w) = w(t) / (T p(t)) and
    sum_t p(t) * mean(w) * l(t) equals (1/T) sum_t w(t) l(t) for any per-step loss l."""
    uni, imp = _v_min_snr(), _v_min_snr(timestep_sampling="importance")
    t = torch.arange(1000)
    w = uni.loss_weight(t).double()
    snr = uni.snr(t).double()
    torch.testing.assert_close(w, snr.clamp(max=1.0) / (snr + 1))  # v target, gamma = 1
    p = imp.timestep_probs().double()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(p, w / w.sum(), rtol=1e-5, atol=1e-9)
    loss_t = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected_uniform = (w * loss_t).mean()
    expected_importance = (p * imp.item_weight(t).double() * loss_t).sum()
    assert expected_importance.item() == pytest.approx(expected_uniform.item(), rel=1e-5)
    # training_loss gives every item the weight mean(w) under importance sampling
    x0, noise = torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    out = torch.ones(2, 1, 2, 2)
    tt = torch.tensor([0, 999])
    got = imp.training_loss(out, x0, tt, noise).item()
    assert got == pytest.approx(w.mean().item(), rel=1e-5)
    assert uni.training_loss(out, x0, tt, noise).item() == pytest.approx(w[tt].mean().item())


def test_importance_draws_follow_their_probabilities():
    imp = _v_min_snr(timestep_sampling="importance")
    t = imp.sample_timesteps(200_000, torch.Generator().manual_seed(1))
    assert t.min() >= 0 and t.max() < 1000
    p = imp.timestep_probs().double()
    mean_t = (p * torch.arange(1000, dtype=torch.float64)).sum().item()
    assert t.double().mean().item() == pytest.approx(mean_t, abs=1.5)
    # the steps with almost no weight (nearly clean or pure noise) are hardly ever drawn
    assert (t < 20).double().mean().item() < 0.01 and (t > 900).double().mean().item() < 0.01
    again = imp.sample_timesteps(500, torch.Generator().manual_seed(1))
    assert torch.equal(again, imp.sample_timesteps(500, torch.Generator().manual_seed(1)))
