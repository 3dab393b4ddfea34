"""The seeding rule: an image's noise depends on (seed, class, index within class) only.

Byte for byte on the CPU. Every network pass here has at least 16 rows: on the CPU smaller
passes take other BLAS kernels (the embeddings' Linear layers; convolutions at one row),
whose outputs differ from a large batch's in the last bits (about 1e-7), so the images of
such small batches agree to about 1e-5 (see difflab.seeds).
"""

import json
import shutil

import numpy as np
import pytest
import torch

from difflab.cli import main
from difflab.ddpm import sampling
from difflab.ddpm.generate import sample_labels, sample_run
from difflab.ddpm.runs import load_run
from difflab.ddpm.sampling import sample, sample_steps
from difflab.experiments.ddpm_sweep import sweep_run
from difflab.options import DDPMSweepAxes, EvalOptions, SampleOptions
from difflab.seeds import ImageNoise, image_seeds, indices_within_class, initial_noise
from helpers import judged_tiny_run

SHAPE = (1, 8, 8)  # one digits image of the tiny run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny digits run; the judge is cached in a temporary folder and trained for one epoch."""
    tmp = tmp_path_factory.mktemp("seeds")
    with judged_tiny_run(tmp) as path:
        yield path


@pytest.fixture(scope="module")
def net(run):
    model, diffusion, _ = load_run(run, device="cpu")
    return model, diffusion


def by_class(npz) -> dict[int, np.ndarray]:
    return {int(c): npz["images"][npz["labels"] == c] for c in np.unique(npz["labels"])}


def test_indices_and_per_image_seeds():
    assert indices_within_class(torch.tensor([3, 7, 3, 3, 7])).tolist() == [0, 0, 1, 2, 1]
    seeds = image_seeds(5, [3, 7, 3], [0, 0, 1])
    assert len({s for pair in seeds for s in pair}) == 6  # every image and stream its own
    assert image_seeds(5, [3], [1]) == seeds[2:]  # nothing but (seed, class, index) counts
    noise = ImageNoise(5, [3, 7, 3], SHAPE)
    x_T = noise.initial()
    alone = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seeds[2][0]))
    assert torch.equal(x_T[2], alone) and torch.equal(initial_noise(5, [3], SHAPE, [1])[0], alone)
    first = noise.step()
    assert torch.equal(first[1], ImageNoise(5, [7], SHAPE).step()[0])
    assert not torch.equal(noise.step(), first)  # each step draws afresh


def test_first_step_noise_is_not_x_T(net, monkeypatch):
    """The step noise comes from its own stream, also when x_T is handed in (as sweeps do)."""
    model, diffusion = net
    labels = torch.arange(10).repeat_interleave(2)
    x_T = initial_noise(7, labels, SHAPE)
    seen = []
    real = sampling.ddpm_update
    monkeypatch.setattr(
        sampling, "ddpm_update", lambda *a: seen.append(a[-1]) or real(*a)
    )  # the noise argument of each step
    given = sample(model, diffusion, labels, steps=5, sampler="ddpm", seed=7, x_T=x_T)
    first = seen[0]
    assert first.shape == x_T.shape and not torch.equal(first, x_T)
    corr = torch.corrcoef(torch.stack([first.flatten(), x_T.flatten()]))[0, 1]
    assert abs(corr) < 0.2  # not x_T, and not tied to it
    drawn = sample(model, diffusion, labels, steps=5, sampler="ddpm", seed=7)
    assert torch.equal(given, drawn)  # x_T handed in changes nothing: the same trajectory


def test_n_per_class_3_is_a_prefix_of_6(run, tmp_path):
    kw = dict(steps=3, sampler="ddpm", seed=2)
    sample_run(run, SampleOptions(n_per_class=3, **kw), tmp_path / "a.npz", progress=False)
    sample_run(run, SampleOptions(n_per_class=6, **kw), tmp_path / "b.npz", progress=False)
    three, six = by_class(np.load(tmp_path / "a.npz")), by_class(np.load(tmp_path / "b.npz"))
    assert sorted(three) == sorted(six) == list(range(10))
    for c in range(10):
        assert three[c].shape == (3, 8, 8, 1)
        assert np.array_equal(three[c], six[c][:3]), c
    assert not np.array_equal(six[0][:3], six[0][3:])  # the next three are other images


def test_some_classes_give_the_same_images_as_all_classes(run, tmp_path):
    kw = dict(n_per_class=8, steps=3, sampler="ddpm", seed=4)
    sample_run(run, SampleOptions(**kw), tmp_path / "all.npz", progress=False)
    sample_run(run, SampleOptions(classes="3,7", **kw), tmp_path / "some.npz", progress=False)
    sample_run(run, SampleOptions(classes="7,3", **kw), tmp_path / "swapped.npz", progress=False)
    every = by_class(np.load(tmp_path / "all.npz"))
    for name in ("some", "swapped"):
        some = by_class(np.load(tmp_path / f"{name}.npz"))
        assert sorted(some) == [3, 7]
        assert all(np.array_equal(some[c], every[c]) for c in (3, 7)), name


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++", "unipc", "euler"])
def test_batch_size_changes_nothing(net, sampler):
    model, diffusion = net
    labels = torch.arange(10).repeat(4)  # classes interleaved: two of each per batch of 20
    kw = dict(guidance=2.0, steps=3, sampler=sampler, eta=0.7, seed=3, progress=False)
    one = sample_labels(model, diffusion, labels, batch_size=500, **kw)
    two = sample_labels(model, diffusion, labels, batch_size=20, **kw)
    assert torch.equal(one, two)


def test_a_batch_in_another_order_gives_the_same_images(net):
    """Images follow their (class, index), not their position in the batch."""
    model, diffusion = net
    labels = torch.arange(10).repeat_interleave(2)
    order = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    indices = indices_within_class(labels)
    kw = dict(guidance=2.0, steps=3, sampler="ddpm", seed=3)
    straight = sample(model, diffusion, labels, **kw)
    shuffled = sample(model, diffusion, labels[order], indices=indices[order], **kw)
    assert torch.equal(shuffled, straight[order])


def test_two_eval_seeds_share_no_noise(run, monkeypatch):
    from difflab.evaluation.evaluate import evaluate_run

    # the rule itself, on eval's 1,000 images: no initial or step noise in common
    labels = torch.arange(10).repeat_interleave(100)
    rows = []
    for seed in (0, 1):
        noise = ImageNoise(seed, labels, SHAPE)
        rows += [noise.initial(), noise.step()]
    keys = [{r.numpy().tobytes() for r in x} for x in rows]
    assert all(len(k) == 1000 for k in keys)
    assert len(set().union(*keys)) == 4000

    # and `difflab eval` draws through it: record every x_T and step noise it uses
    expect = ImageNoise(0, torch.arange(10).repeat_interleave(2), SHAPE).initial()
    drawn = {}
    real_initial, real_step = ImageNoise.initial, ImageNoise.step
    for seed in (0, 1):
        seen = drawn[seed] = []
        monkeypatch.setattr(ImageNoise, "initial", lambda s, v=seen: v.append(real_initial(s)) or v[-1])  # fmt: skip
        monkeypatch.setattr(ImageNoise, "step", lambda s, v=seen: v.append(real_step(s)) or v[-1])
        opts = EvalOptions(n_per_class=2, steps=2, sampler="ddpm", seed=seed)
        evaluate_run(run, opts, progress=False, write=False)
    assert [len(v) for v in drawn.values()] == [2, 2]  # x_T and one noisy step per seed
    assert torch.equal(drawn[0][0], expect)
    rows0 = {r.numpy().tobytes() for x in drawn[0] for r in x}
    rows1 = {r.numpy().tobytes() for x in drawn[1] for r in x}
    assert len(rows0) == len(rows1) == 40 and not rows0 & rows1


def test_a_sweep_cell_is_difflab_sample_for_every_sampler(run, tmp_path, capsys):
    """Grouped guidance cells, stochastic samplers included (DDIM with eta = 0.5)."""
    mine = tmp_path / "run"
    shutil.copytree(run, mine)
    cfg = json.loads((mine / "config.json").read_text())
    cfg["sample"]["eta"] = 0.5  # a sweep takes eta from the run
    (mine / "config.json").write_text(json.dumps(cfg))
    samplers = ["ddim", "ddpm", "dpm++", "euler", "unipc"]
    axes = DDPMSweepAxes(
        guidance="0,2", steps="3", samplers=",".join(samplers), seeds="1", n_per_class=2
    )
    sweep_run(mine, axes, tmp_path / "sw", progress=False, plots=False, max_group=8)
    for smp in samplers:
        for g in (0, 2):
            out = tmp_path / f"{smp}_{g}.npz"
            args = ["--n-per-class", "2", "--guidance", str(g), "--steps", "3", "--seed", "1"]
            assert main(["sample", str(mine), *args, "--sampler", smp, "--device", "cpu", "--out", str(out)]) == 0  # fmt: skip
            cell = np.load(tmp_path / "sw" / "cells" / f"{smp}_steps3_g{g}_seed1.npz")
            assert np.array_equal(np.load(out)["images"], cell["images"]), (smp, g)
    args = ["--n-per-class", "2", "--guidance", "2", "--steps", "3", "--seed", "1", "--eta", "0"]
    assert main(["sample", str(mine), *args, "--device", "cpu", "--out", str(tmp_path / "e.npz")]) == 0  # fmt: skip
    assert not np.array_equal(np.load(tmp_path / "e.npz")["images"], np.load(tmp_path / "ddim_2.npz")["images"])  # fmt: skip
    capsys.readouterr()


def test_a_scheduler_that_draws_noise_follows_the_rule(net, monkeypatch):
    """A diffusers scheduler with step noise gets one generator per image, or is refused."""
    import diffusers

    model, diffusion = net
    made = []

    def sde(name, diffusion, spacing="trailing"):
        made.append(
            diffusers.DPMSolverMultistepScheduler(
                num_train_timesteps=diffusion.num_timesteps,
                trained_betas=diffusion.betas.numpy(),
                algorithm_type="sde-dpmsolver++",
                timestep_spacing=spacing,
            )
        )
        return made[-1]

    monkeypatch.setattr(sampling, "diffusers_scheduler", sde)
    handed = []
    real = ImageNoise.step_generators
    monkeypatch.setattr(
        ImageNoise, "step_generators", lambda s: handed.append(real(s)) or handed[-1]
    )
    kw = dict(steps=4, sampler="dpm++", seed=6)
    both = sample(model, diffusion, torch.tensor([3] * 16 + [7] * 16), **kw)
    threes = sample(model, diffusion, torch.tensor([3] * 16), **kw)
    assert torch.equal(both[:16], threes) and len(made) == 2
    assert [len(g) for g in handed] == [32, 16]  # diffusers drew from one generator per image
    x_T = initial_noise(6, [3] * 16, SHAPE)
    other_steps = sample(model, diffusion, torch.tensor([3] * 16), x_T=x_T, **kw | {"seed": 9})
    assert not torch.allclose(threes, other_steps, atol=1e-2)  # the SDE's noise does matter
    scales = torch.tensor([1.0, 2.0]).repeat_interleave(16)
    with pytest.raises(ValueError, match="draws step noise"):
        sample(model, diffusion, torch.tensor([3] * 16).repeat(2), guidance=scales, groups=2, **kw)


def test_groups_must_repeat_their_images(net):
    model, diffusion = net
    with pytest.raises(ValueError, match="same labels and indices"):
        next(sample_steps(model, diffusion, torch.arange(4), groups=2))
