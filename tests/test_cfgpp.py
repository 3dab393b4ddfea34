"""CFG++ (Chung et al. 2024): one DDIM step by hand, s = 1, sweeps, distillation, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from test_guidance import LABELS, TEN, Stub, X, by_hand
from test_sampling import tiny_model

from difflab.cli import main
from difflab.config import DiffusionConfig, DistillConfig, RunConfig, SampleConfig
from difflab.ddpm.diffusion import GaussianDiffusion
from difflab.ddpm.distill import Distiller
from difflab.ddpm.distill_steps import ddim_step
from difflab.ddpm.generate import guidance_shape
from difflab.ddpm.sampling import GuidedModel, sample, sample_steps
from difflab.errors import UsageError
from difflab.experiments.ddpm_sweep import all_cells, sweep_identity, sweep_run
from difflab.options import DDPMSweepAxes, EvalOptions, SampleOptions
from helpers import judged_tiny_run


def eps_x0(out, x, sa, s1, objective):
    """(eps, x0) of a raw network output where sqrt(abar) = ``sa``, sqrt(1 - abar) = ``s1``."""
    if objective == "eps":
        return out, (x - s1 * out) / sa
    x0 = sa * x - s1 * out  # v
    return (x - sa * x0) / s1, x0


# -- the formula ------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", ["eps", "v"])
@pytest.mark.parametrize("clip", [True, False])
def test_one_cfgpp_ddim_step_by_hand(objective, clip):
    """x_prev = sqrt(abar_prev) x0_s + sqrt(1 - abar_prev) eps_u from the raw cond/uncond outputs;
    batched per-sample scales (0, 1, 3) give the same, s = 1 being plain conditional."""
    model = tiny_model()
    d = GaussianDiffusion(DiffusionConfig(objective=objective, clip_x0=clip), warn=False)
    labels = torch.arange(3)
    for guidance, groups in ((3.0, 1), (torch.tensor([0.0, 1.0, 3.0]).repeat_interleave(3), 3)):
        lab = labels.repeat(groups)
        step = next(sample_steps(model, d, lab, guidance=guidance, steps=4, seed=5,
                                 groups=groups, guidance_method="cfg++"))  # fmt: skip
        x, t, t_prev = step.x_t, step.t, step.t_prev
        sa, s1 = d.buf("sqrt_alphas_cumprod")[t], d.buf("sqrt_one_minus_alphas_cumprod")[t]
        a_prev = d.buf("alphas_cumprod")[t_prev]  # float32, as the sampler computes
        tt = torch.full((len(lab),), t)
        with torch.no_grad():
            cond = model(x, tt, lab)
            uncond = model(x, tt, torch.full_like(lab, model.num_classes))
        s = torch.as_tensor(guidance).view(-1, 1, 1, 1)
        x0_s = eps_x0(uncond + s * (cond - uncond), x, sa, s1, objective)[1]
        eps_u, x0_u = eps_x0(torch.where(s == 1, cond, uncond), x, sa, s1, objective)
        if clip:
            x0_s, x0_u = x0_s.clamp(-1, 1), x0_u.clamp(-1, 1)
            eps_u = (x - sa * x0_u) / s1
        want = a_prev.sqrt() * x0_s + (1 - a_prev).sqrt() * eps_u
        # the passes ran in another batch: float32 rounding, times 1 / sqrt(abar) ~ 150 at t = T
        torch.testing.assert_close(step.x0_pred, x0_s, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(step.x_prev, want, atol=1e-4, rtol=1e-4)
        plain = next(sample_steps(model, d, lab, guidance=guidance, steps=4, seed=5, groups=groups))
        assert not torch.allclose(plain.x_prev[-3:], want[-3:])  # cfg re-noises with eps_s


def test_guided_model_returns_the_guided_x0_and_the_unconditional_eps():
    """The stub's outputs by hand (eps objective, no clipping): per-sample scales 0 and 3, and
    a scalar 3, keep x0 of the guided output but the eps of the unconditional one."""
    t = 6
    cond, uncond, guided = by_hand(t, 3.0)
    d = GaussianDiffusion(TEN, warn=False)
    a = d.buf("alphas_cumprod")[t]
    for guidance in (3.0, torch.tensor([3.0, 3.0])):
        eps, x0 = GuidedModel(Stub(), d, guidance, method="cfg++")(X, t, LABELS)
        torch.testing.assert_close(eps, uncond)
        torch.testing.assert_close(x0, (X - (1 - a).sqrt() * guided) / a.sqrt())
    eps, _ = GuidedModel(Stub(), d, torch.tensor([0.0, 1.0]), method="cfg++")(X, t, LABELS)
    torch.testing.assert_close(eps, torch.stack([uncond[0], cond[1]]))  # s = 1: conditional


def test_cfgpp_at_s_1_is_plain_conditional_ddim_and_cfg_is_todays_default():
    model, d = tiny_model(), GaussianDiffusion(DiffusionConfig())
    labels = torch.arange(4)
    kw = dict(steps=4, sampler="ddim", seed=1)
    cond = sample(model, d, labels, guidance=1.0, **kw)
    assert torch.equal(sample(model, d, labels, guidance=1.0, guidance_method="cfg++", **kw), cond)
    nowhere = dict(guidance_interval=(0.0, 1e-6), guidance_method="cfg++")  # s = 1 at every step
    assert torch.equal(sample(model, d, labels, guidance=3.0, **kw, **nowhere), cond)
    for eta in (0.0, 0.5):
        plain = sample(model, d, labels, guidance=3.0, eta=eta, **kw)
        assert torch.equal(sample(model, d, labels, guidance=3.0, eta=eta, guidance_method="cfg", **kw), plain)  # fmt: skip
        other = sample(model, d, labels, guidance=3.0, eta=eta, guidance_method="cfg++", **kw)
        assert torch.isfinite(other).all() and not torch.equal(other, plain)


# -- options, config ------------------------------------------------------------------------
def test_options_take_the_runs_method_and_plain_settings_stay_unwritten():
    opts = SampleOptions().for_run(RunConfig())
    assert opts.guidance_method == "cfg" and "guidance_method" not in guidance_shape(opts, True)
    cfg = RunConfig().override(["sample.guidance_method=cfg++"])
    assert cfg.sample.guidance_method == "cfg++"
    assert RunConfig.from_dict({"sample": {}}).sample.guidance_method == "cfg"  # an older config
    opts = EvalOptions().for_run(cfg)
    assert opts.guidance_method == "cfg++" and guidance_shape(opts, True) == {"guidance_method": "cfg++"}  # fmt: skip
    assert SampleOptions(guidance_method="cfg").for_run(cfg).guidance_method == "cfg"
    assert DDPMSweepAxes(guidance_methods="cfg++,cfg").guidance_methods == ("cfg", "cfg++")


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: RunConfig().override(["sample.guidance_method=cfgpp"]), "--set: sample: guidance_method: 'cfgpp' is not allowed; choose one of cfg, cfg++"),
        (lambda: SampleConfig(sampler="ddpm", guidance_method="cfg++"), "--set sample.guidance_method cfg++: CFG++ is defined for DDIM only; it needs --set sample.sampler ddim, not ddpm"),
        (lambda: SampleOptions(guidance_method="cfg++").for_run(RunConfig(sample=SampleConfig(sampler="unipc"))), "--guidance-method cfg++: CFG++ is defined for DDIM only; it needs --sampler ddim, not unipc"),
        (lambda: SampleOptions(sampler="euler").for_run(RunConfig().override(["sample.guidance_method=cfg++"])), "needs --sampler ddim, not euler"),
    ],
)  # fmt: skip
def test_bad_config_and_option_values(make, match):
    with pytest.raises(UsageError) as e:
        make()
    assert match in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cfgpp")
    with judged_tiny_run(tmp) as path:
        yield path


@pytest.fixture(scope="module")
def cfgpp_run(run, tmp_path_factory):
    """The same weights, its config saying cfg++."""
    out = tmp_path_factory.mktemp("cfgpp_run") / "run"
    shutil.copytree(run, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["sample"]["guidance_method"] = "cfg++"
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_a_runs_cfgpp_default_with_another_sampler_is_one_line(cfgpp_run, tmp_path, capsys, command):  # fmt: skip
    out = ["--out", str(tmp_path / "s.npz")] if command == "sample" else []
    assert main([command, str(cfgpp_run), "--sampler", "ddpm", "--device", "cpu", *out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--guidance-method cfg++" in err and "--sampler ddim, not ddpm" in err, err  # fmt: skip


def test_sweep_cell_with_cfgpp_equals_difflab_sample(run, cfgpp_run, tmp_path):
    axes = DDPMSweepAxes(guidance="1,3", steps="3", n_per_class=2, guidance_methods="cfg,cfg++")
    out = tmp_path / "sw"
    r = sweep_run(run, axes, out, progress=False, plots=False, max_group=8)  # s = 1, 3 batched
    assert r.cells_total == 4
    identity = json.loads((out / "sweep.json").read_text())
    assert identity["guidance_methods"] == ["cfg", "cfg++"]
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["sampler", "steps", "guidance", "guidance_method", "seed"]
    keys = sorted(x["key"] for x in r.rows)
    assert keys == ["ddim_steps3_g1_cfgpp_seed0", "ddim_steps3_g1_seed0", "ddim_steps3_g3_cfgpp_seed0", "ddim_steps3_g3_seed0"]  # fmt: skip
    cells = {k: np.load(out / "cells" / f"{k}.npz")["images"] for k in keys}
    base = ["sample", "--n-per-class", "2", "--steps", "3", "--device", "cpu"]
    for source, extra in ((run, ["--guidance-method", "cfg++"]), (cfgpp_run, [])):
        npz = tmp_path / "s.npz"
        assert main([base[0], str(source), *base[1:], "--guidance", "3", *extra, "--out", str(npz)]) == 0  # fmt: skip
        assert np.array_equal(np.load(npz)["images"], cells["ddim_steps3_g3_cfgpp_seed0"])
    assert np.array_equal(cells["ddim_steps3_g1_cfgpp_seed0"], cells["ddim_steps3_g1_seed0"])
    assert not np.array_equal(cells["ddim_steps3_g3_cfgpp_seed0"], cells["ddim_steps3_g3_seed0"])
    # the plain axis (given or not, whatever the run's default) is the sweep as before
    for source, methods in ((run, "cfg"), (cfgpp_run, ("cfg",))):
        ident = sweep_identity(source, DDPMSweepAxes(guidance="3", guidance_methods=methods))
        assert "guidance_methods" not in ident
        assert [c.key for c in all_cells(ident)] == [f"ddim_steps{s}_g3_seed0" for s in (10, 25, 50)]  # fmt: skip


# -- distillation ----------------------------------------------------------------------------
def test_a_cfgpp_teacher_steps_through_the_guided_x0_with_the_unconditional_eps(run, cfgpp_run, tmp_path):  # fmt: skip
    dc = dict(steps=1, teacher_steps=4, round_steps=2, teacher_guidance=3.0)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    plain = Distiller(DistillConfig(teacher=str(run), **dc), tmp_path / "a", device="cpu")
    pp = Distiller(DistillConfig(teacher=str(cfgpp_run), **dc), tmp_path / "b", device="cpu")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 1, 8, 8, generator=g)
    t, t_to, y = torch.tensor([99, 49, 74]), torch.tensor([49, 24, -1]), torch.tensor([0, 1, 2])
    x0, eps = plain._teacher_x0(z, t, y)
    assert eps is None  # the default path derives eps from x0, as before
    x0_pp, eps_pp = pp._teacher_x0(z, t, y)
    torch.testing.assert_close(x0_pp, x0)  # the same guided x0
    d, net = pp.t_diffusion, pp.teacher
    with torch.no_grad():
        uncond = net(z, t, torch.full_like(y, net.num_classes))
    sa = d.buf("sqrt_alphas_cumprod")[t].view(-1, 1, 1, 1)
    s1 = d.buf("sqrt_one_minus_alphas_cumprod")[t].view(-1, 1, 1, 1)
    x0_u = ((z - s1 * uncond) / sa).clamp(-1, 1)  # an eps teacher, x0 clipped
    eps_u = (z - sa * x0_u) / s1
    torch.testing.assert_close(eps_pp, eps_u, atol=1e-5, rtol=1e-5)
    a_to = torch.cat([d.buf("alphas_cumprod"), torch.ones(1)])[t_to].view(-1, 1, 1, 1)
    want = a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps_u
    torch.testing.assert_close(
        ddim_step(pp.abar, z, x0_pp, t, t_to, eps_pp), want, atol=1e-5, rtol=1e-5
    )
    assert float(pp.loss(0).detach()) != float(plain.loss(0).detach())
    pp.round = 1  # later rounds distil the student: no unconditional eps
    assert pp._teacher_x0(z, t, y)[1] is None
