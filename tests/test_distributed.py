"""Data-parallel training in two CPU processes (torchrun, gloo) against the one-process run.

Every run here is tests/helpers.py's tiny config on the digits (1,433 training images, 44
steps of 32 per epoch) with a constant learning rate after warm-up: with cosine decay the
schedule depends on the total number of steps, so a 5-step run resumed to 9 steps would not
be the 9-step run. Each torchrun launch costs ~15 s of start-up on two cores.

Tolerances: two processes compute the same global batch in two halves, and DDP averages
the two half-batch gradients, so results differ from one process only by float32 summation
order (~1e-7 relative per step). Adam turns the rounding noise of gradients that are exactly
zero in theory (biases cancelled by a following one-channel-per-group GroupNorm) into steps
of up to the learning rate, so such weights may differ by ~1e-4 while the network's output
does not change. The tests therefore compare the network's outputs (measured difference
~2e-6 for outputs of magnitude ~0.4; atol 1e-4) and the per-step losses (rtol 1e-5), and the
weights only loosely (atol 1e-3, half a learning-rate step: wrong sharding or gradients that
are not averaged move weights by whole steps).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from difflab import distributed
from difflab.cli import main
from difflab.config import RunConfig
from difflab.ddpm.model import ContextUnet
from difflab.errors import UsageError
from helpers import train_args

RUN_FILES = {"config.json", "metrics.jsonl", "model.safetensors", "train_state.pt", ".lock"}


def _train_args(out: Path, epochs: float, *extra: str) -> list[str]:
    """``difflab train`` arguments for the tiny config (see the module docstring)."""
    return train_args(out, epochs, *extra, lr_schedule="constant")


def _torchrun(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ARGS``, one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def _train_two(run: Path, epochs: float, *extra: str) -> subprocess.CompletedProcess:
    r = _torchrun(run.parent, "-m", "difflab", *_train_args(run, epochs, *extra))
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _train_one(run: Path, epochs: float, *extra: str) -> None:
    assert main(_train_args(run, epochs, *extra)) == 0


def _outputs(run: Path) -> dict[str, torch.Tensor]:
    """The raw and the EMA network's outputs on one fixed batch of inputs."""
    cfg = RunConfig.load(run / "config.json").model
    state = torch.load(run / "train_state.pt", weights_only=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, cfg.in_channels, cfg.height, cfg.width, generator=g)
    t = torch.randint(0, 100, (64,), generator=g)
    y = torch.randint(0, cfg.num_classes + 1, (64,), generator=g)
    out = {}
    for key in ("model", "ema"):
        net = ContextUnet(cfg)
        net.load_state_dict(state[key])
        with torch.no_grad():
            out[key] = net(x, t, y)
    return out


def _assert_same_training(a: Path, b: Path) -> None:
    """Runs ``a`` and ``b`` reached the same network (see the module docstring)."""
    sa = torch.load(a / "train_state.pt", weights_only=True)
    sb = torch.load(b / "train_state.pt", weights_only=True)
    assert sa["step"] == sb["step"]
    for key in ("model", "ema"):
        for name, value in sa[key].items():
            torch.testing.assert_close(sb[key][name], value, rtol=0, atol=1e-3, msg=name)
    oa, ob = _outputs(a), _outputs(b)
    for key in oa:
        torch.testing.assert_close(ob[key], oa[key], rtol=0, atol=1e-4)
    la, lb = (
        [row["loss"] for row in map(json.loads, (r / "metrics.jsonl").read_text().splitlines())]
        for r in (a, b)
    )
    assert lb == pytest.approx(la, rel=1e-5)


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """5 steps in one process, 5 steps in two, and 9 steps straight in one process."""
    root = tmp_path_factory.mktemp("ddp")
    paths = {name: root / name for name in ("one", "two", "straight")}
    _train_one(paths["one"], 0.1)
    paths["two_stdout"] = root / "two_stdout.txt"
    paths["two_stdout"].write_text(_train_two(paths["two"], 0.1).stdout)
    _train_one(paths["straight"], 0.2)
    return paths


@pytest.mark.slow  # 15-35 s; `make test-all` runs it
def test_two_processes_match_one_process(runs):
    one, two = runs["one"], runs["two"]
    _assert_same_training(one, two)
    assert {p.name for p in two.iterdir()} == RUN_FILES  # no per-rank or temporary files
    assert _steps(two) == [1, 2, 3, 4, 5]  # one writer: every step logged once
    assert RunConfig.load(two / "config.json") == RunConfig.load(one / "config.json")
    assert runs["two_stdout"].read_text().count("trained 5 steps") == 1


@pytest.mark.slow  # 15-35 s; `make test-all` runs it
def test_resume_across_process_counts(runs, tmp_path):
    """5 steps in two processes + 4 in one, and 5 in one + 4 in two, equal 9 straight."""
    two_then_one, one_then_two = tmp_path / "two_then_one", tmp_path / "one_then_two"
    shutil.copytree(runs["two"], two_then_one)
    shutil.copytree(runs["one"], one_then_two)
    _train_one(two_then_one, 0.2, "--resume")
    _train_two(one_then_two, 0.2, "--resume")
    for run in (two_then_one, one_then_two):
        _assert_same_training(runs["straight"], run)
        assert _steps(run) == list(range(1, 10))


def test_batch_size_and_device_checks():
    distributed.check_batch_size(32, 2)
    with pytest.raises(UsageError, match=r"batch_size=33: must be divisible by the 2 processes"):
        distributed.check_batch_size(33, 2)
    with pytest.raises(UsageError, match=r"--batch-size 3\)"):
        distributed.check_batch_size(2, 3)
    distributed.check_device("cuda", 8)
    with pytest.raises(UsageError, match="--device cuda:1: with 2 processes"):
        distributed.check_device("cuda:1", 2)
    distributed.check_device("mps", 1)
    rows = [distributed.shard(32, r, 4) for r in range(4)]
    assert [i for s in rows for i in range(32)[s]] == list(range(32))


@pytest.mark.slow
def test_indivisible_batch_size_fails_with_one_line(tmp_path):
    r = _torchrun(
        tmp_path,
        "-m",
        "difflab",
        *_train_args(tmp_path / "run", 0.1, "--set", "train.batch_size=33"),
    )
    assert r.returncode != 0
    assert "train.batch_size=33: must be divisible by the 2 processes" in r.stderr
    assert not (tmp_path / "run").exists()


_AGREEMENT_SCRIPT = """
import json, os, sys
import torch
from difflab.ddpm.training import Trainer, TrainingDiverged
sys.path.insert(0, {tests!r})
from helpers import tiny_config

rank, root = int(os.environ["RANK"]), {root!r}

def digest(module):
    return sum(float(v.double().sum()) * (i + 1) for i, v in enumerate(module.state_dict().values()))

budget = tiny_config().override(["train.epochs=null", "train.minutes=0.05"])
trainer = Trainer(budget, root + "/budget", device="cpu", progress=False)
trainer.fit()
report = {{"step": trainer.step, "raw": digest(trainer.raw_model), "ema": digest(trainer.ema_model)}}

trainer = Trainer(tiny_config(epochs=0.2), root + "/nan", device="cpu", progress=False)
if rank == 1:  # only rank 1 sees a NaN loss, at step 3
    original = trainer.diffusion.training_loss
    def poisoned(out, x0, t, noise):
        loss = original(out, x0, t, noise)
        return loss * float("nan") if trainer.step == 3 else loss
    trainer.diffusion.training_loss = poisoned
try:
    trainer.fit()
except TrainingDiverged as e:
    report["diverged"] = str(e)
with open(f"{{root}}/rank{{rank}}.json", "w") as f:
    json.dump(report, f)
"""


@pytest.mark.slow
def test_ranks_agree_on_budget_stop_ema_and_nan(tmp_path):
    """A time budget stops both ranks at rank 0's step with identical weights and EMA; a NaN
    on rank 1 alone stops both ranks at that step."""
    script = tmp_path / "agree.py"
    tests = str(Path(__file__).parent)
    script.write_text(_AGREEMENT_SCRIPT.format(tests=tests, root=str(tmp_path)))
    r = _torchrun(tmp_path, str(script))
    assert r.returncode == 0, r.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["step"] == r1["step"] > 0
    assert r0["raw"] == r1["raw"] and r0["ema"] == r1["ema"]
    assert "at step 3" in r0["diverged"] and "at step 3" in r1["diverged"]
    assert _steps(tmp_path / "nan") == [1, 2, 3]


@pytest.mark.slow
def test_two_processes_evaluate_and_snapshot_once(tmp_path, monkeypatch):
    """Rank 0 alone evaluates (the others wait) and writes snapshots; every row once."""
    run = tmp_path / "two"
    extra = ["--set", "train.eval_every=2", "--set", "train.snapshot_every=2", "--set",
             "train.eval_n_per_class=2", "--set", "train.eval_steps=2"]  # fmt: skip
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))  # the processes inherit it
    _train_two(run, 0.1, *extra)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval" in r] == [2, 4, 5]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == [
        "step-0000002.safetensors", "step-0000004.safetensors",
    ]  # fmt: skip
