"""Guidance interval, schedule and rescale: formulas by hand, defaults unchanged, sweeps, bad input."""

import json
import math

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from test_sampling import tiny_model
from torch import nn

from difflab.cli import main
from difflab.config import DiffusionConfig, RunConfig, SampleConfig
from difflab.ddpm.diffusion import GaussianDiffusion
from difflab.ddpm.guidance import guidance_weight, rescale_guidance, schedule_weight, sigmas
from difflab.ddpm.sampling import GuidedModel, sample
from difflab.errors import UsageError
from difflab.experiments.ddpm_sweep import sweep_run
from difflab.options import DDPMSweepAxes, SampleOptions
from helpers import judged_tiny_run

SAMPLERS = ("ddpm", "ddim", "dpm++", "unipc", "euler")


TEN = DiffusionConfig(timesteps=10, beta_start=0.05, beta_end=0.5, clip_x0=False)


class Stub(nn.Module):
    """A 'network' whose output is known by hand: cond = (c + 1) x + t / 100, uncond with c = 3."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, x, t, labels):
        self.batches.append(x.shape[0])
        return x * (labels.float() + 1).view(-1, 1, 1, 1) + t.float().view(-1, 1, 1, 1) / 100


def stub_net(**kw):
    d = GaussianDiffusion(TEN, warn=False)  # eps objective, sigma 0.23 .. 5.4
    return GuidedModel(Stub(), d, **kw), d


X = torch.linspace(-1, 1, 2 * 4).view(2, 1, 2, 2)  # (B, C, H, W)
LABELS = torch.tensor([0, 2])


def by_hand(t, s):
    cond = X * (LABELS.float() + 1).view(-1, 1, 1, 1) + t / 100
    uncond = 4 * X + t / 100
    return cond, uncond, uncond + s * (cond - uncond)


# -- formulas -------------------------------------------------------------------------------
def test_schedule_values():
    assert [schedule_weight("constant", r) for r in (0.1, 1.0)] == [1.0, 1.0]
    assert [schedule_weight("linear", r) for r in (1.0, 0.5, 0.25)] == [0.0, 1.0, 1.5]
    assert schedule_weight("cosine", 1.0) == pytest.approx(0.0, abs=1e-12)
    assert schedule_weight("cosine", 0.5) == pytest.approx(1.0)
    assert schedule_weight("cosine", 1 / 3) == pytest.approx(1.5)
    for name in ("linear", "cosine"):  # both ramps keep the mean guidance: mean weight 1
        rs = (np.arange(100_000) + 0.5) / 100_000
        assert np.mean([schedule_weight(name, r) for r in rs]) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="constant, linear, cosine"):
        schedule_weight("bogus", 0.5)


def test_interval_is_closed_at_both_ends():
    lo, hi = 0.5, 2.0
    on = [guidance_weight(3, 10, sig, (lo, hi)) for sig in (lo, 1.0, hi)]
    off = [guidance_weight(3, 10, sig, (lo, hi)) for sig in (math.nextafter(lo, 0), math.nextafter(hi, 9))]  # fmt: skip
    assert on == [1.0, 1.0, 1.0] and off == [0.0, 0.0]
    assert guidance_weight(3, 10, 1.0, (lo, hi), "linear") == pytest.approx(2 * (1 - 4 / 10))
    d = GaussianDiffusion(TEN, warn=False)
    abar = d.alphas_cumprod.double()
    assert sigmas(d.alphas_cumprod)[4] == pytest.approx(float(((1 - abar[4]) / abar[4]).sqrt()), rel=1e-12)  # fmt: skip


@pytest.mark.parametrize("phi", [0.0, 0.3, 0.7, 1.0])
def test_rescale_matches_diffusers(phi):
    g = torch.Generator().manual_seed(0)
    cond, guided = torch.randn(3, 2, 5, 5, generator=g), 3 * torch.randn(3, 2, 5, 5, generator=g)
    ours = rescale_guidance(guided, cond, phi)
    torch.testing.assert_close(ours, rescale_noise_cfg(guided, cond, phi), atol=1e-6, rtol=0)
    if phi == 1.0:  # fully rescaled: the conditional output's standard deviation, per sample
        torch.testing.assert_close(ours.flatten(1).std(1), cond.flatten(1).std(1))


# -- GuidedModel against the hand computation -------------------------------------------------
def test_interval_guides_inside_and_runs_only_the_conditional_pass_outside():
    net, d = stub_net(guidance=3.0, interval=(0.0, 0.5))
    sig = sigmas(d.alphas_cumprod)
    inside = [t for t in range(10) if sig[t] <= 0.5]
    outside = [t for t in range(10) if sig[t] > 0.5]
    assert inside and outside
    for t in (inside[-1], outside[0]):
        net.model.batches.clear()
        eps, _ = net(X, t, LABELS)
        cond, _, guided = by_hand(t, 3.0)
        if t in inside:
            torch.testing.assert_close(eps, guided, atol=1e-6, rtol=0)
            assert net.model.batches == [4]  # conditional and unconditional in one batch
        else:
            assert torch.equal(eps, cond) and net.model.batches == [2]  # s = 1 there


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_scales_the_excess_guidance(schedule):
    net, _ = stub_net(guidance=2.5, schedule=schedule)
    for t in (0, 4, 9):
        s = 1 + 1.5 * schedule_weight(schedule, (t + 1) / 10)
        eps, _ = net(X, t, LABELS)
        torch.testing.assert_close(eps, by_hand(t, s)[2], atol=1e-6, rtol=0)


def test_rescale_in_the_guided_model():
    net, _ = stub_net(guidance=4.0, rescale=0.7)
    cond, _, guided = by_hand(5, 4.0)
    eps, _ = net(X, 5, LABELS)
    torch.testing.assert_close(eps, rescale_noise_cfg(guided, cond, 0.7), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "kw", [dict(schedule="cosine"), dict(interval=(0.0, 0.5), rescale=0.5), dict(schedule="linear", rescale=1.0)]
)  # fmt: skip
def test_per_sample_scales_equal_each_scale_alone(kw):
    scales = torch.tensor([0.0, 1.0, 3.0])
    x, labels = X.repeat(3, 1, 1, 1), LABELS.repeat(3)
    mixed_net, _ = stub_net(guidance=scales.repeat_interleave(2), **kw)
    for t in (0, 5, 9):
        mixed, _ = mixed_net(x, t, labels)
        for k, s in enumerate(scales.tolist()):
            alone, _ = stub_net(guidance=s, **kw)[0](X, t, LABELS)
            torch.testing.assert_close(mixed[2 * k : 2 * k + 2], alone, atol=1e-6, rtol=0)


# -- every sampler; the defaults are today's images ----------------------------------------------
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_defaults_are_todays_images_and_each_option_acts(sampler):
    model, d = tiny_model(), GaussianDiffusion(DiffusionConfig())
    labels = torch.arange(4)
    kw = dict(guidance=3.0, steps=4, sampler=sampler, seed=1)
    plain = sample(model, d, labels, **kw)
    everywhere = (0.0, 1e9)  # an interval holding every noise level: guidance at every step
    same = sample(model, d, labels, **kw, guidance_interval=everywhere, guidance_schedule="constant", guidance_rescale=0.0)  # fmt: skip
    assert torch.equal(plain, same)
    tensor = sample(model, d, labels.repeat(2), **{**kw, "guidance": torch.tensor([3.0, 1.0]).repeat_interleave(4)}, groups=2)  # fmt: skip
    torch.testing.assert_close(tensor[:4], plain, atol=1e-4, rtol=1e-4)
    cond = sample(model, d, labels, **{**kw, "guidance": 1.0})
    nowhere = sample(model, d, labels, **kw, guidance_interval=(0.0, 1e-6))  # no step inside
    assert torch.equal(nowhere, cond)
    for option in (dict(guidance_schedule="cosine"), dict(guidance_rescale=0.7)):
        other = sample(model, d, labels, **kw, **option)
        assert torch.isfinite(other).all() and not torch.equal(other, plain)


# -- options, config, command line --------------------------------------------------------------
def test_options_take_the_runs_values_and_none_turns_the_interval_off():
    cfg = RunConfig(sample=SampleConfig(guidance_interval=(0.3, 5.0), guidance_schedule="linear"))
    opts = SampleOptions().for_run(cfg)
    assert (opts.guidance_interval, opts.guidance_schedule, opts.guidance_rescale) == ((0.3, 5.0), "linear", 0.0)  # fmt: skip
    opts = SampleOptions(guidance_interval="none", guidance_rescale="0.5").for_run(cfg)
    assert opts.guidance_interval is None and opts.guidance_rescale == 0.5
    assert SampleOptions(guidance_interval="0.28:5.42").guidance_interval == (0.28, 5.42)
    assert RunConfig.from_dict({"sample": {}}).sample.guidance_interval is None  # an older config
    cfg = RunConfig().override(["sample.guidance_interval=[0.28,5.42]", "sample.guidance_rescale=0.7"])  # fmt: skip
    assert cfg.sample.guidance_interval == (0.28, 5.42) and cfg.sample.guidance_rescale == 0.7
    axes = DDPMSweepAxes(guidance_intervals="0.3:5,none", guidance_schedules="cosine,constant")
    assert axes.guidance_intervals == (None, (0.3, 5.0))
    assert axes.guidance_schedules == ("constant", "cosine")


@pytest.mark.parametrize(
    "set_, match",
    [
        ("sample.guidance_interval=[NaN,1]", "--set sample.guidance_interval"),
        ("sample.guidance_interval=[5,1]", "LO is above HI"),
        ("sample.guidance_interval=[1]", "--set sample.guidance_interval"),
        ("sample.guidance_schedule=bogus", "constant, linear, cosine"),
        ("sample.guidance_rescale=1.5", "--set sample.guidance_rescale"),
    ],
)
def test_bad_config_values(set_, match):
    with pytest.raises(UsageError, match=match):
        RunConfig().override([set_])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guidance")
    with judged_tiny_run(tmp) as path:
        yield path


@pytest.mark.parametrize(
    "command, extra, match",
    [
        ("sample", ["--guidance-interval", "nan:1"], "--guidance-interval nan:1: not finite"),
        ("sample", ["--guidance-interval", "5:1"], "--guidance-interval 5:1: LO is above HI"),
        ("sample", ["--guidance-interval", "5"], "--guidance-interval"),
        ("sample", ["--guidance-schedule", "bogus"], "--guidance-schedule 'bogus': unknown schedule"),
        ("eval", ["--guidance-rescale", "nan"], "--guidance-rescale nan: must be a finite number"),
        ("sweep", ["--guidance-interval", "none,2:1"], "--guidance-interval 2:1: LO is above HI"),
        ("sweep", ["--guidance-schedule", "constant,bogus"], "--guidance-schedule 'bogus'"),
        ("sweep", ["--guidance-rescale", "0,2"], "--guidance-rescale 2: must be between 0 and 1"),
        ("sample", ["--guidance-method", "cfgpp"], "--guidance-method 'cfgpp': unknown guidance method; choose one of cfg, cfg++"),
        ("sample", ["--sampler", "ddpm", "--guidance-method", "cfg++"], "--guidance-method cfg++: CFG++ is defined for DDIM only; it needs --sampler ddim, not ddpm"),
        ("eval", ["--sampler", "dpm++", "--guidance-method", "cfg++"], "it needs --sampler ddim, not dpm++"),
        ("sweep", ["--guidance-method", "cfg,bogus"], "--guidance-method 'bogus': unknown guidance method"),
        ("sweep", ["--sampler", "ddim,ddpm", "--guidance-method", "cfg,cfg++"], "--guidance-method cfg++: CFG++ is defined for DDIM only; it needs --sampler ddim, not ddpm"),
    ],
)  # fmt: skip
def test_bad_values_one_line_exit_2(run, tmp_path, capsys, command, extra, match):
    out = tmp_path / ("s.npz" if command == "sample" else "sw")
    args = [command, str(run), "--device", "cpu", *extra] + (["--out", str(out)] if command != "eval" else [])  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert not out.exists()


def test_sweep_cell_with_an_interval_equals_difflab_sample(run, tmp_path, capsys):
    d = GaussianDiffusion(RunConfig.load(run / "config.json").diffusion)
    sig = sigmas(d.alphas_cumprod)
    ts = [99, 66, 32]  # 3 trailing steps of T = 100: guide at the last two only
    assert sig[99] > sig[66] > sig[32]
    lo, hi = float(f"{sig[32] * 0.99:.4g}"), float(f"{sig[66] * 1.01:.4g}")
    assert lo <= sig[32] and sig[66] <= hi < sig[99] and len(ts) == 3
    axes = DDPMSweepAxes(
        guidance="1,3", steps="3", n_per_class=2, guidance_intervals=f"none,{lo:g}:{hi:g}",
        guidance_rescales="0,0.5",
    )  # fmt: skip
    out = tmp_path / "sw"
    r = sweep_run(run, axes, out, progress=False, plots=False, max_group=8)
    assert r.cells_total == 8 and len(r.summary) == 8
    identity = json.loads((out / "sweep.json").read_text())
    assert (
        identity["guidance_intervals"] == ["none", f"{lo!r}:{hi!r}"]
        and "guidance_schedules" not in identity
    )
    row = next(x for x in r.rows if x["guidance_interval"] != "none" and x["guidance_rescale"] == 0.5 and x["guidance"] == 3)  # fmt: skip
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:6] == ["sampler", "steps", "guidance", "guidance_interval", "guidance_rescale", "seed"]  # fmt: skip
    npz = tmp_path / "s.npz"
    args = ["sample", str(run), "--n-per-class", "2", "--guidance", "3", "--steps", "3",
            "--guidance-interval", f"{lo:g}:{hi:g}", "--guidance-rescale", "0.5", "--device", "cpu"]  # fmt: skip
    assert main([*args, "--out", str(npz)]) == 0
    cell = np.load(out / "cells" / f"{row['key']}.npz")
    assert np.array_equal(np.load(npz)["images"], cell["images"])
    plain = np.load(out / "cells" / "ddim_steps3_g3_seed0.npz")  # the plain cell keeps its key
    assert not np.array_equal(plain["images"], cell["images"])
    only = next(x for x in r.rows if x["guidance_interval"] != "none" and x["guidance_rescale"] == 0 and x["guidance"] == 3)  # fmt: skip
    cond = np.load(out / "cells" / "ddim_steps3_g1_seed0.npz")["images"]
    only = np.load(out / "cells" / f"{only['key']}.npz")["images"]  # guided at 2 of 3 steps
    assert not np.array_equal(only, plain["images"]) and not np.array_equal(only, cond)
    again = ["sweep", str(run), "--guidance", "1,3", "--steps", "3", "--n", "2", "--device", "cpu"]
    assert main([*again, "--out", str(out)]) == 2  # the intervals and rescales are its identity
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"holds a sweep with --guidance-interval none,{lo!r}:{hi!r}, not none; "
                        "re-run the command that started it to resume, or choose another --out"), err  # fmt: skip


def test_an_older_sweep_folder_resumes_with_the_plain_axes(run, tmp_path):
    """A sweep folder written before the guidance-shape axes (no such keys) is the same sweep as
    one with the plain values given explicitly: it resumes, nothing recomputed or rewritten."""
    out = tmp_path / "old"
    base = ["sweep", str(run), "--guidance", "2", "--steps", "2", "--n", "2", "--device", "cpu"]
    assert main([*base, "--out", str(out)]) == 0
    identity = (out / "sweep.json").read_text()
    assert "guidance_intervals" not in identity and "guidance_rescales" not in identity
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert "guidance_interval" not in header
    explicit = ["--guidance-interval", "none", "--guidance-schedule", "constant", "--guidance-rescale", "0"]  # fmt: skip
    axes = DDPMSweepAxes(guidance="2", steps="2", n_per_class=2, guidance_intervals="none",
                         guidance_schedules="constant", guidance_rescales="0")  # fmt: skip
    r = sweep_run(run, axes, out, progress=False, plots=False)
    assert r.cells_run == 0 and (out / "sweep.json").read_text() == identity
    assert main([*base, *explicit, "--out", str(out)]) == 0
