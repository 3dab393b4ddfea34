"""The Python face: ``import difflab`` does what the command line does, with the same checks."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import difflab
from difflab.errors import UsageError


def test_importing_difflab_is_cheap():
    code = "import sys, difflab; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_every_function_says_what_it_does():
    for name in difflab.__all__:
        assert getattr(difflab, name).__doc__, name


def test_the_lab_from_python_matches_the_command_line(tmp_path, capsys):
    from difflab.cli import main

    overrides = ["model.base_channels=8", "model.channel_mults=[1,2]", "diffusion.timesteps=50"]
    run = difflab.train(tmp_path / "run", dataset="digits", epochs=0.05, batch_size=32,
                        overrides=overrides, device="cpu", progress=False)  # fmt: skip
    model, diffusion, cfg = difflab.load_run(run)
    assert cfg.model.base_channels == 8 and diffusion.num_timesteps == 50
    r = difflab.sample(run, tmp_path / "py.npz", n_per_class=2, steps=3, seed=5, device="cpu")
    assert r.images.shape[0] == 20
    assert main(["sample", str(run), "--n-per-class", "2", "--steps", "3", "--seed", "5",
                 "--out", str(tmp_path / "cli.npz")]) == 0  # fmt: skip
    py, cli = np.load(tmp_path / "py.npz"), np.load(tmp_path / "cli.npz")
    assert np.array_equal(py["images"], cli["images"]) and np.array_equal(
        py["labels"], cli["labels"]
    )
    with pytest.raises(UsageError, match="--guidance"):  # the options object's one check
        difflab.sample(run, tmp_path / "bad.png", guidance=float("nan"))
    sweep = difflab.sweep(run, tmp_path / "sw", guidance=[0, 2], steps=[2], n_per_class=2,
                          device="cpu", progress=False)  # fmt: skip
    assert len(sweep.rows) == 2 and {r["guidance"] for r in sweep.rows} == {0.0, 2.0}
    rep = difflab.report([run, sweep.out], tmp_path / "report.html")
    assert rep.html.is_file() and rep.markdown.is_file()
    capsys.readouterr()
