"""A DDPM sweep split between two CPU processes (torchrun, gloo) equals the one-process sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from difflab.evaluation import judge as judge_mod
from difflab.experiments.ddpm_sweep import sweep_run
from difflab.options import DDPMSweepAxes, SDPipelineSpec, SDSweepAxes
from helpers import tiny_run


def same_images(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to one grey level: the processes run one thread, pytest maybe two, and the
    float sums of a convolution depend on how the work is split between threads."""
    return a.shape == b.shape and int(np.abs(a.astype(int) - b).max()) <= 1


AXES = ["--guidance", "0,2", "--steps", "2,3", "--n-per-class", "2", "--device", "cpu"]


def test_two_processes_split_the_cells_and_rank_0_merges(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DIFFLAB_CACHE", str(cache))
    real = judge_mod.train_judge
    monkeypatch.setattr(judge_mod, "train_judge", lambda *a, **k: real(*a, **{**k, "epochs": 1}))
    run = tiny_run(tmp_path)
    axes = DDPMSweepAxes(guidance="0,2", steps="2,3", n_per_class=2)
    one = sweep_run(
        run, axes, tmp_path / "one", progress=False
    )  # also caches the judge for the two processes

    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = tmp_path / "two"
    args = [*cmd, "-m", "difflab", "sweep", str(run), *AXES, "--out", str(two)]
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    doc = json.loads((two / "metrics.json").read_text())
    assert doc["complete"] and doc["cells_done"] == 4
    assert sorted(c["process"] for c in doc["cells"]) == [0, 0, 1, 1]  # two cells each
    for row in one.rows:  # the same images and numbers as one process
        a = np.load(tmp_path / "one" / "cells" / f"{row['key']}.npz")["images"]
        b = np.load(two / "cells" / f"{row['key']}.npz")["images"]
        assert same_images(a, b), row["key"]
        other = next(c for c in doc["cells"] if c["key"] == row["key"])
        assert other["accuracy"] == pytest.approx(row["accuracy"], abs=0.051)  # 1 of 20 may flip
        assert other["fd"] == pytest.approx(row["fd"], rel=0.02)
    assert (two / "figures").is_dir() and (two / "summary.csv").is_file()

    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 cells computed" in again.stdout  # resumable as before: nothing left to do


@pytest.mark.slow  # 15-35 s; `make test-all` runs it
def test_sd_sweep_split_between_two_processes(tmp_path):
    pytest.importorskip("transformers")
    from PIL import Image

    from difflab.experiments.sd_sweep import sd_sweep
    from difflab.sd.tiny import build_tiny_sd

    model = build_tiny_sd(tmp_path / "sd")
    axes = SDSweepAxes("a red cube", "1,3", "1,2", "0", size="64x64", clip_model="none")
    spec = SDPipelineSpec(model=str(model), device="cpu", batch_size=1)
    one = sd_sweep(axes, tmp_path / "one", spec, progress=False)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = tmp_path / "two"
    args = [
        *cmd, "-m", "difflab", "sd", "sweep", "--prompts", "a red cube", "--guidance", "1,3",
        "--steps", "1,2", "--seeds", "0", "--size", "64x64", "--clip-model", "none",
        "--model", str(model), "--device", "cpu", "--batch-size", "1", "--out", str(two),
    ]  # fmt: skip
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((two / "metrics.json").read_text())
    assert doc["complete"] and doc["cells_done"] == 4
    for row in one.rows:
        a = np.asarray(Image.open(tmp_path / "one" / "cells" / f"{row['key']}.png"))
        b = np.asarray(Image.open(two / "cells" / f"{row['key']}.png"))
        assert same_images(a, b), row["key"]
    assert (two / "grid_p00.png").is_file()
    assert r.stdout.count("sd sweep ") == 1  # one summary line, from rank 0
