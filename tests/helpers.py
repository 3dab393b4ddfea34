"""Small configurations shared by the tests: tiny models on tiny data, seconds per test."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from difflab.config import DiffusionConfig, ModelConfig, RunConfig, SampleConfig, TrainConfig


def tiny_config(dataset: str = "digits", epochs: float = 0.1, **train) -> RunConfig:
    return RunConfig(
        preset="test",
        model=ModelConfig(base_channels=8, channel_mults=(1, 2), time_embed_dim=16),
        diffusion=DiffusionConfig(timesteps=100, beta_end=0.2),
        train=TrainConfig(
            dataset=dataset,
            batch_size=32,
            epochs=epochs,
            minutes=None,
            warmup_steps=2,
            log_every=1,
            checkpoint_every=1000,
            **train,
        ),
        sample=SampleConfig(steps=5),
    )


def tiny_run(tmp_path: Path, name: str = "run", **kw) -> Path:
    from difflab.ddpm.training import train

    out = tmp_path / name
    train(tiny_config(**kw), out, device="cpu", progress=False)
    return out


def train_args(out: Path, epochs: float, *extra: str, **train) -> list[str]:
    """``difflab train`` arguments for :func:`tiny_config` (``train`` overrides its fields)."""
    cfg = tiny_config(**train)
    args = ["train", "--device", "cpu", "--epochs", str(epochs), "--out", str(out)]
    for section in ("model", "diffusion", "train"):
        for key, value in asdict(getattr(cfg, section)).items():
            if key not in ("class_names", "epochs", "minutes"):
                args += ["--set", f"{section}.{key}={json.dumps(value)}"]
    return args + list(extra)  # after the --set options, so that they win


@contextmanager
def judged_tiny_run(tmp: Path, **kw) -> Iterator[Path]:
    """:func:`tiny_run` in ``tmp``, with the reference classifier cached under ``tmp`` and
    trained for one epoch while the context lasts (a module fixture yields from it)."""
    import pytest

    from difflab.evaluation import judge as judge_mod

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFLAB_CACHE", str(tmp / "cache"))
        real = judge_mod.train_judge
        mp.setattr(judge_mod, "train_judge", lambda *a, **k: real(*a, **{**k, "epochs": 1}))
        yield tiny_run(tmp, **kw)
