"""Parity of our DDPM and DDIM samplers with diffusers' schedulers on the same predictions."""

import json
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from difflab.config import DiffusionConfig, ModelConfig
from difflab.ddpm.diffusion import GaussianDiffusion
from difflab.ddpm.model import ContextUnet
from difflab.ddpm.sampling import (
    GuidedModel,
    ddim_update,
    ddpm_update,
    make_timesteps,
    sample,
    sample_steps,
)
from difflab.errors import UsageError
from difflab.seeds import image_seeds, indices_within_class


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        height=8, width=8, base_channels=8, channel_mults=(1, 2), time_embed_dim=16, **kw
    )
    model = ContextUnet(cfg)
    with torch.no_grad():  # the zero-initialised output layer would predict eps = 0 everywhere
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def reference_loop(scheduler, model, diffusion, labels, steps, guidance, seed, **step_kw):
    """The plain diffusers loop that our generator must reproduce.

    Its noise follows the seeding rule as diffusers draws it from lists of generators, one
    per image: x_T from each image's first generator, the step noise from its second.
    """
    pairs = image_seeds(seed, labels, indices_within_class(labels))
    initial = [torch.Generator().manual_seed(a) for a, _ in pairs]
    gen = [torch.Generator().manual_seed(b) for _, b in pairs]
    cfg = model.cfg
    x = randn_tensor((labels.shape[0], cfg.in_channels, cfg.height, cfg.width), generator=initial)
    scheduler.set_timesteps(steps)
    net = GuidedModel(model, diffusion, guidance)
    for t in scheduler.timesteps:
        tt = torch.full((labels.shape[0],), int(t))
        with torch.no_grad():
            both = model(
                torch.cat([x, x]),
                torch.cat([tt, tt]),
                torch.cat([labels, torch.full_like(labels, 10)]),
            )
        cond, uncond = both.chunk(2)
        eps = uncond + guidance * (cond - uncond)
        assert net.guidance == guidance
        x = scheduler.step(eps, t, x, generator=gen, **step_kw).prev_sample
    return x


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [10, 50])
def test_ddpm_matches_diffusers(spacing, steps):
    model, d = tiny_model(), GaussianDiffusion(DiffusionConfig())
    labels = torch.tensor([0, 3, 7])
    ref = DDPMScheduler(num_train_timesteps=1000, clip_sample=True, timestep_spacing=spacing)
    expect = reference_loop(ref, model, d, labels, steps, 2.0, seed=5)
    ours = sample(
        model, d, labels, guidance=2.0, steps=steps, sampler="ddpm", spacing=spacing, seed=5
    )
    # whole trajectories: float32 rounding accumulates over the steps
    torch.testing.assert_close(ours, expect.clamp(-1, 1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_matches_diffusers(eta, spacing):
    model, d = tiny_model(), GaussianDiffusion(DiffusionConfig())
    labels = torch.tensor([1, 2])
    ref = DDIMScheduler(
        num_train_timesteps=1000, clip_sample=True, set_alpha_to_one=True, timestep_spacing=spacing
    )
    expect = reference_loop(
        ref, model, d, labels, 20, 3.0, seed=1, eta=eta, use_clipped_model_output=True
    )
    ours = sample(
        model, d, labels, guidance=3.0, steps=20, sampler="ddim", eta=eta, spacing=spacing, seed=1
    )
    torch.testing.assert_close(ours, expect.clamp(-1, 1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_single_steps_match_diffusers_to_1e5(clip, schedule):
    """The same eps and noise give the same x_{t-1} as diffusers, to 1e-5, at every step."""
    d = GaussianDiffusion(DiffusionConfig(schedule=schedule, clip_x0=clip))
    beta = {"linear": "linear", "cosine": "squaredcos_cap_v2"}[schedule]
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta, clip_sample=clip)
    ddim = DDIMScheduler(
        num_train_timesteps=1000, beta_schedule=beta, clip_sample=clip, set_alpha_to_one=True
    )
    for sched in (ddpm, ddim):
        sched.set_timesteps(40)
    ts = make_timesteps(1000, 40, "leading")
    assert ts == [int(t) for t in ddpm.timesteps]
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        x, out = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
        eps, x0 = d.eps_x0_from_output(out, x, torch.full((2,), t))
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = d.predict_eps_from_x0(x, torch.full((2,), t), x0)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        ours = ddpm_update(d, x, t, t_prev, x0, noise if t > 0 else None)
        ref = ddpm.step(out, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        for eta in (0.0, 0.5):
            ours = ddim_update(d, x, t, t_prev, eps, x0, eta, noise)
            ref = ddim.step(
                out, t, x, eta=eta, use_clipped_model_output=True, variance_noise=noise
            ).prev_sample
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_each_step_matches_diffusers_step():
    """x_{t-1} from one step, for the same eps, with cosine betas and no clipping."""
    d = GaussianDiffusion(DiffusionConfig(schedule="cosine", clip_x0=False))
    ref = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False
    )
    ref.set_timesteps(50)
    model = tiny_model()
    steps = list(
        sample_steps(
            model, d, torch.tensor([4]), guidance=1.0, steps=50, sampler="ddpm", spacing="leading"
        )
    )
    assert [s.t for s in steps] == [int(t) for t in ref.timesteps]
    for s in steps[:5] + steps[-3:]:
        with torch.no_grad():
            eps = model(s.x_t, torch.tensor([s.t]), torch.tensor([4]))
        noise_free = ref.step(eps, s.t, s.x_t, generator=None)
        torch.testing.assert_close(s.x0_pred, noise_free.pred_original_sample, atol=1e-5, rtol=1e-5)


def test_v_prediction_matches_diffusers():
    d = GaussianDiffusion(DiffusionConfig(objective="v", clip_x0=False))
    ref = DDIMScheduler(num_train_timesteps=1000, prediction_type="v_prediction", clip_sample=False)
    ref.set_timesteps(10)
    x, v = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    t = int(ref.timesteps[3])
    eps, x0 = d.eps_x0_from_output(v, x, torch.full((2,), t))
    out = ref.step(v, t, x)
    torch.testing.assert_close(x0, out.pred_original_sample, atol=1e-5, rtol=1e-5)


def test_generator_yields_every_step_and_is_deterministic():
    model, d = tiny_model(), GaussianDiffusion(DiffusionConfig())
    labels = torch.arange(4)
    steps = list(sample_steps(model, d, labels, guidance=2.0, steps=7, sampler="ddpm", seed=3))
    assert len(steps) == 7 and [s.index for s in steps] == list(range(7))
    assert steps[0].t == 999 and steps[-1].t_prev == -1
    for a, b in zip(steps, steps[1:], strict=False):
        assert torch.equal(a.x_prev, b.x_t) and a.t_prev == b.t
    again = sample(model, d, labels, guidance=2.0, steps=7, sampler="ddpm", seed=3)
    assert torch.equal(again, steps[-1].x_prev.clamp(-1, 1))
    other = sample(model, d, labels, guidance=2.0, steps=7, sampler="ddpm", seed=4)
    assert not torch.equal(again, other)


def test_guidance_conventions():
    model, d = tiny_model(), GaussianDiffusion(DiffusionConfig(clip_x0=False))
    x = torch.randn(2, 1, 8, 8)
    labels = torch.tensor([1, 2])
    eps_c, _ = GuidedModel(model, d, 1.0)(x, 500, labels)
    eps_u, _ = GuidedModel(model, d, 0.0)(x, 500, labels)
    eps_g, _ = GuidedModel(model, d, 3.0)(x, 500, labels)
    with torch.no_grad():
        direct_c = model(x, torch.full((2,), 500), labels)
        direct_u = model(x, torch.full((2,), 500), torch.full((2,), 10))
    torch.testing.assert_close(eps_c, direct_c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps_u, direct_u, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps_g, direct_u + 3.0 * (direct_c - direct_u), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sampler", ["dpm++", "unipc", "euler"])
def test_diffusers_samplers_drive_our_model(sampler):
    model, d = tiny_model(), GaussianDiffusion(DiffusionConfig())
    steps = list(
        sample_steps(model, d, torch.tensor([0, 1]), guidance=2.0, steps=8, sampler=sampler, seed=0)
    )
    assert len(steps) == 8
    assert steps[0].t == 999 and steps[-1].t_prev == -1
    final = steps[-1].x_prev
    assert torch.isfinite(final).all() and final.shape == (2, 1, 8, 8)


def test_timesteps_match_diffusers_spacing():
    for spacing in ["leading", "trailing", "linspace"]:
        ref = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
        ref.set_timesteps(25)
        assert make_timesteps(1000, 25, spacing) == [int(t) for t in ref.timesteps]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sampler": "plms"}, "--sampler"),
        ({"steps": 0}, "--steps"),
        ({"steps": 2000}, "--steps"),
        ({"guidance": -1.0}, "--guidance"),
    ],
)
def test_bad_sampling_arguments(kwargs, match):
    model, d = tiny_model(), GaussianDiffusion(DiffusionConfig())
    with pytest.raises(UsageError, match=match):
        next(sample_steps(model, d, torch.tensor([0]), **kwargs))


def test_class_out_of_range():
    model, d = tiny_model(), GaussianDiffusion(DiffusionConfig())
    with pytest.raises(UsageError, match="--classes"):
        next(sample_steps(model, d, torch.tensor([10])))


def test_per_sample_guidance_plans_its_passes_once(monkeypatch):
    """Which samples need which pass is worked out once per trajectory, not at every step
    (``nonzero`` waits for a GPU), and the mixed batch still equals each scale alone."""
    model, d = tiny_model(), GaussianDiffusion(DiffusionConfig())
    labels = torch.arange(3).repeat(3)
    scales = torch.tensor([0.0, 1.0, 3.0]).repeat_interleave(3)
    calls = {"n": 0}
    real = torch.Tensor.nonzero

    def counting(self, *a, **k):
        calls["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "nonzero", counting)
    x_T = torch.randn(3, 1, 8, 8).repeat(3, 1, 1, 1)  # every block starts from the same noise
    mixed = sample(model, d, labels, guidance=scales, steps=6, sampler="ddim", x_T=x_T, groups=3)
    assert calls["n"] == 2  # conditional and unconditional index lists, once
    monkeypatch.setattr(torch.Tensor, "nonzero", real)
    for k, s in enumerate((0.0, 1.0, 3.0)):
        alone = sample(model, d, labels[:3], guidance=s, steps=6, sampler="ddim", x_T=x_T[:3])
        torch.testing.assert_close(mixed[3 * k : 3 * k + 3], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampling_steps_never_wait_for_the_gpu(sampler):
    """After x_T is on the device, no step synchronises with the host: CUDA-graph friendly."""
    model, d = tiny_model().cuda(), GaussianDiffusion(DiffusionConfig())
    labels = torch.arange(10).cuda()
    scales = torch.tensor([1.0, 3.0]).repeat_interleave(5)
    steps = sample_steps(model, d, labels, guidance=scales, steps=20, sampler=sampler, seed=0)
    first = next(steps)  # x_T's copy to the device and the pass plan are allowed to wait
    torch.cuda.set_sync_debug_mode("error")
    try:
        rest = list(steps)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(rest) == 19 and first.x_prev.is_cuda
    assert torch.isfinite(rest[-1].x_prev).all()


def test_precision_resolves_per_device():
    from difflab.devices import resolve_precision

    assert resolve_precision("auto", "cpu") is None and resolve_precision(None, "cpu") is None
    # (auto on a CPU is pinned to fp32 for the tests: conftest.py; measured below)
    assert (
        resolve_precision("auto", "cuda:1") == "bf16" and resolve_precision("auto", "mps") is None
    )
    assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("fp32", "cuda") is None
    with pytest.raises(UsageError, match="--precision 'fp16': choose one of auto, fp32, bf16"):
        resolve_precision("fp16", "cpu")


def test_cpu_auto_precision_is_measured_once_per_machine(tmp_path, monkeypatch, capsys):
    """auto on a CPU is bf16 only where it measured >= BF16_MIN_SPEEDUP faster; the choice and
    its figures are cached per CPU/torch/threads, and $DIFFLAB_CPU_PRECISION pins it."""
    from difflab import devices

    monkeypatch.delenv(devices.CPU_PRECISION_ENV)
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path))
    calls = []

    def fake(speedup):
        def measure():
            calls.append(speedup)
            return speedup

        return measure

    try:
        for speedup, expected in ((devices.BF16_MIN_SPEEDUP + 0.01, "bf16"), (1.0, None)):
            devices.cpu_sampling_precision.cache_clear()
            (tmp_path / "cpu-precision.json").unlink(missing_ok=True)
            monkeypatch.setattr(devices, "measure_bf16_speedup", fake(speedup))
            assert devices.resolve_precision("auto", "cpu") == expected
            assert devices.resolve_precision("fp32", "cpu") is None  # explicit wins
            saved = json.loads((tmp_path / "cpu-precision.json").read_text())
            (entry,) = saved.values()
            assert entry["choice"] == (expected or "fp32")
            assert entry["bf16_speedup"] == round(speedup, 3)
        # a new process reads the cache instead of measuring again
        devices.cpu_sampling_precision.cache_clear()
        monkeypatch.setattr(devices, "measure_bf16_speedup", fake(9.0))
        assert devices.resolve_precision("auto", "cpu") is None and calls[-1] == 1.0
        # a damaged cache is measured again and rewritten
        (tmp_path / "cpu-precision.json").write_text("{not json")
        devices.cpu_sampling_precision.cache_clear()
        assert devices.resolve_precision("auto", "cpu") == "bf16" and calls[-1] == 9.0
        assert (
            "sampling precision on this CPU: bf16 (bf16 measured 9.00x" in capsys.readouterr().err
        )
        # a cache that cannot be written: the choice still stands, and the notice says so
        blocker = tmp_path / "file"
        blocker.write_text("")
        monkeypatch.setenv("DIFFLAB_CACHE", str(blocker / "sub"))
        devices.cpu_sampling_precision.cache_clear()
        assert devices.resolve_precision("auto", "cpu") == "bf16"
        assert "not kept:" in capsys.readouterr().err and len(calls) == 4
        # the environment pins it without measuring; a bad value is one line naming it
        devices.cpu_sampling_precision.cache_clear()
        monkeypatch.setenv(devices.CPU_PRECISION_ENV, "fp32")
        assert devices.resolve_precision("auto", "cpu") is None and len(calls) == 4
        devices.cpu_sampling_precision.cache_clear()
        monkeypatch.setenv(devices.CPU_PRECISION_ENV, "fp16")
        with pytest.raises(UsageError, match="DIFFLAB_CPU_PRECISION='fp16': choose fp32 or bf16"):
            devices.resolve_precision("auto", "cpu")
        # empty is unset; another machine's entry stays beside the new one
        monkeypatch.setenv(devices.CPU_PRECISION_ENV, "")
        monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path))
        (tmp_path / "cpu-precision.json").write_text('{"another CPU": {"choice": "fp32"}}')
        devices.cpu_sampling_precision.cache_clear()
        assert devices.resolve_precision("auto", "cpu") == "bf16" and len(calls) == 5
        saved = json.loads((tmp_path / "cpu-precision.json").read_text())
        assert len(saved) == 2 and saved["another CPU"] == {"choice": "fp32"}
    finally:
        devices.cpu_sampling_precision.cache_clear()


def test_bf16_speedup_is_measured_without_touching_the_random_state():
    from difflab.devices import measure_bf16_speedup

    before = torch.random.get_rng_state()
    speedup = measure_bf16_speedup(batch=4, repeats=1)
    assert math.isfinite(speedup) and speedup > 0
    assert torch.equal(torch.random.get_rng_state(), before)


def test_the_precision_cache_tells_cpus_of_one_name_apart_by_their_bf16_instructions():
    """Virtual machines name a Zen 3 and a Zen 4 both "AMD EPYC"; only one has bf16 dot
    products, so they must not share a cached choice. Other processors' entries are ignored."""
    from difflab.devices import _cpu_key

    def info(flags):
        return f"processor : 0\nmodel name : AMD EPYC\nflags : fpu {flags}\n\nprocessor : 1\nflags : x\n"

    zen3, zen4 = _cpu_key(info("avx2")), _cpu_key(info("avx2 avx512f avx512_bf16"))
    assert zen3 != zen4 and zen3.startswith("AMD EPYC |") and zen4.startswith("AMD EPYC |")
    assert "avx512_bf16" in zen4 and "avx512_bf16" not in zen3
    assert "amx_bf16" in _cpu_key(info("avx512_bf16 amx_bf16 amx_tile"))
    assert _cpu_key(info("avx2 sse4_2")) == zen3  # flags that do not decide bf16 do not split
    assert _cpu_key("") == _cpu_key("garbage without colons")  # unreadable: still one key


def test_cpu_training_precision_is_measured_beside_sampling(tmp_path, monkeypatch, capsys):
    """train.mixed_precision=auto on a CPU: bf16 only where a training pass measured at least
    BF16_MIN_SPEEDUP faster. Its figures sit under "training" in the machine's entry, beside
    sampling's, and neither measurement overwrites the other."""
    from difflab import devices

    monkeypatch.delenv(devices.CPU_PRECISION_ENV)
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path))
    asked = []

    def fake(speedup_sampling, speedup_training):
        def measure(batch=200, repeats=3, training=False):
            asked.append(training)
            return speedup_training if training else speedup_sampling

        return measure

    def clear():
        devices.cpu_sampling_precision.cache_clear()
        devices.cpu_training_precision.cache_clear()

    try:
        # each task has its own measurement: fp32 training beside bf16 sampling
        clear()
        monkeypatch.setattr(devices, "measure_bf16_speedup", fake(2.0, 1.0))
        assert devices.auto_mixed_precision("cpu") == "no" and asked == [True]
        assert devices.resolve_precision("auto", "cpu") == "bf16" and asked == [True, False]
        (entry,) = json.loads((tmp_path / "cpu-precision.json").read_text()).values()
        assert entry["choice"] == "bf16" and entry["training"]["choice"] == "fp32"
        assert entry["training"]["bf16_speedup"] == 1.0
        assert "training precision on this CPU: fp32" in capsys.readouterr().err
        # read back in a new process without measuring
        clear()
        assert devices.auto_mixed_precision("cpu") == "no" and len(asked) == 2
        # and the other way round; measuring one task keeps the other's figures
        clear()
        (tmp_path / "cpu-precision.json").unlink()
        fast = devices.BF16_MIN_SPEEDUP
        monkeypatch.setattr(devices, "measure_bf16_speedup", fake(fast - 0.01, fast))
        assert devices.auto_mixed_precision("cpu") == "bf16"
        assert devices.resolve_precision("auto", "cpu") is None
        (entry,) = json.loads((tmp_path / "cpu-precision.json").read_text()).values()
        assert (entry["choice"], entry["training"]["choice"]) == ("fp32", "bf16")
        # CUDA trains in bf16 and MPS in fp32 without measuring; the environment pins the CPU
        n = len(asked)
        assert devices.auto_mixed_precision("cuda:0") == "bf16"
        assert devices.auto_mixed_precision("mps") == "no" and len(asked) == n
        clear()
        monkeypatch.setenv(devices.CPU_PRECISION_ENV, "bf16")
        assert devices.auto_mixed_precision("cpu") == "bf16" and len(asked) == n
        # under a launcher every rank trains alike, unmeasured: fp32 unless pinned to bf16
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert devices.auto_mixed_precision("cpu") == "bf16"
        monkeypatch.setenv(devices.CPU_PRECISION_ENV, "")
        assert devices.auto_mixed_precision("cpu") == "no" and len(asked) == n
        clear()  # a bad pin is refused under a launcher too, not read as fp32
        monkeypatch.setenv(devices.CPU_PRECISION_ENV, "fp16")
        with pytest.raises(UsageError, match="DIFFLAB_CPU_PRECISION='fp16': choose fp32 or bf16"):
            devices.auto_mixed_precision("cpu")
    finally:
        clear()


def test_training_speedup_is_measured_with_a_backward_pass():
    from difflab.devices import measure_bf16_speedup

    before = torch.random.get_rng_state()
    speedup = measure_bf16_speedup(batch=4, repeats=1, training=True)
    assert math.isfinite(speedup) and speedup > 0
    assert torch.equal(torch.random.get_rng_state(), before)
