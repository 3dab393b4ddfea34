"""Quality during training: evaluations on fixed noise, best weights, snapshots, TensorBoard."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace

import pytest
import torch
from safetensors.torch import load_file

from difflab.config import RunConfig
from difflab.ddpm import runs as ckpt
from difflab.ddpm import training_hooks as hooks
from difflab.ddpm.training import Trainer, train
from difflab.errors import UsageError
from helpers import tiny_config


@pytest.fixture(scope="module", autouse=True)
def judge_cache(tmp_path_factory):
    """One reference classifier for the module (trained once, in a folder of its own)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def quality_config(**train) -> RunConfig:
    """9 steps of the tiny model; evaluations of 2 samples per class in 2 sampling steps."""
    train = {"eval_n_per_class": 2, "eval_steps": 2, **train}
    return tiny_config(epochs=0.2, **train)


def evaluator(cfg, device):
    from difflab.evaluation.during_training import TrainingEvaluator

    return TrainingEvaluator(cfg, device)


@dataclass
class Fake:
    metrics: dict
    grid: None = None


def fake_evaluator(fd_by_step: dict[int, float] | None = None, sleep: float = 0.0):
    """An evaluator hook that measures nothing: FD from ``fd_by_step``, after ``sleep`` s."""
    calls: list[int] = []

    def make(cfg, device):
        def evaluate(model, step):
            calls.append(step)
            time.sleep(sleep)
            fd = (fd_by_step or {}).get(step, 10.0)
            return Fake({"accuracy": 0.5, "fd": fd, "fd_floor": 1.0, "kid": 0.1, "diversity": 1.0})

        return evaluate

    return make, calls


def rows(run, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if (kind in r)]


WATCHING = ("eval_every", "eval_every_minutes", "keep_best", "snapshot_every", "log_with")


def cli_args(out, epochs: float, *extra: str) -> list[str]:
    """``difflab train`` of the tiny model with small evaluations; ``extra`` flags win."""
    from helpers import train_args

    args = train_args(out, epochs, eval_n_per_class=2, eval_steps=2)
    kept = []
    for i, a in enumerate(args):
        pair = args[i + 1] if i + 1 < len(args) else ""
        if a == "--set" and pair.split("=")[0] in {f"train.{k}" for k in WATCHING}:
            continue
        if i and args[i - 1] == "--set" and a.split("=")[0] in {f"train.{k}" for k in WATCHING}:
            continue
        kept.append(a)
    return kept + list(extra)


def same_weights(a, b) -> bool:
    ta, tb = load_file(a), load_file(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_evaluations_on_fixed_noise_at_the_right_steps(tmp_path):
    from difflab.evaluation.during_training import TrainingEvaluator

    run = tmp_path / "run"
    train(quality_config(eval_every=4), run, device="cpu", progress=False, make_evaluator=evaluator)
    evals = rows(run, "eval")
    assert [r["step"] for r in evals] == [4, 8, 9]  # every 4 steps, and the last weights
    assert [r["images_seen"] for r in evals] == [128, 256, 288]
    for r in evals:
        e = r["eval"]
        assert 0 <= e["accuracy"] <= 1 and e["fd"] > 0 and e["fd_floor"] > 0 and e["n"] == 20
        assert {"kid", "diversity", "fd_ratio"} <= e.keys()
        assert hooks.progress_path(run, r["step"]).is_file()
    assert [r["step"] for r in rows(run, "loss")] == list(range(1, 10))  # loss rows as before
    # the same weights on the same noise give the same numbers: the last row is model.safetensors
    cfg = RunConfig.load(run / "config.json")
    model, _, _ = ckpt.load_run(run)
    judge = TrainingEvaluator(cfg, "cpu")
    first, second = judge(model, 9).metrics, judge(model, 9).metrics
    for key in ("accuracy", "fd", "kid", "diversity", "fd_floor"):
        assert first[key] == second[key], key
        assert first[key] == pytest.approx(evals[-1]["eval"][key], rel=1e-6, abs=1e-9), key
    # plot draws the quality beside the loss
    from difflab.ddpm.processes import plot_run

    written = {p.name for p in plot_run(run).written}
    assert written == {"loss.png", "quality.png", "schedule.png"}


def test_evaluations_leave_training_as_it_was(tmp_path):
    """Weights trained with evaluations and snapshots are those trained without."""
    plain, watched = tmp_path / "plain", tmp_path / "watched"
    train(quality_config(), plain, device="cpu", progress=False)
    make, calls = fake_evaluator()
    cfg = quality_config(eval_every=2, snapshot_every=3)
    train(cfg, watched, device="cpu", progress=False, make_evaluator=make)
    assert calls == [2, 4, 6, 8, 9]
    assert same_weights(plain / "model.safetensors", watched / "model.safetensors")
    assert ckpt.snapshot_steps(watched) == [3, 6, 9]
    assert same_weights(ckpt.snapshot_path(watched, 9), watched / "model.safetensors")
    model, _, _ = ckpt.load_run(watched, step=6)
    assert model.cfg == RunConfig.load(watched / "config.json").model


def test_snapshots_and_best_weights_are_the_same_after_a_stop_and_resume(tmp_path):
    fds = {2: 5.0, 4: 7.0, 6: 3.0, 8: 4.0, 9: 6.0}  # the best is step 6
    cfg = quality_config(eval_every=2, snapshot_every=2, keep_best="fd")
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(cfg, straight, device="cpu", progress=False, make_evaluator=fake_evaluator(fds)[0])
    meta = ckpt.weights_metadata(straight / hooks.BEST)
    assert (meta["step"], meta["metric"], meta["value"]) == (6, "fd", 3.0)
    assert same_weights(straight / hooks.BEST, ckpt.snapshot_path(straight, 6))

    make, calls = fake_evaluator(fds)
    train(cfg, split, device="cpu", progress=False, stop_at_step=5, make_evaluator=make)
    assert calls == [2, 4] and ckpt.weights_metadata(split / hooks.BEST)["step"] == 2
    # a kill after a later best: the best file and a snapshot from after the checkpoint
    (split / hooks.BEST).write_bytes((straight / hooks.BEST).read_bytes())
    ckpt.save_weights(torch.nn.Linear(1, 1), ckpt.snapshot_path(split, 8))
    Trainer(cfg, split, device="cpu", resume=True, progress=False, make_evaluator=make)
    assert ckpt.weights_metadata(split / hooks.BEST)["step"] == 2  # put back from the state
    (split / hooks.BEST).write_bytes(b"damaged")
    Trainer(cfg, split, device="cpu", resume=True, progress=False, make_evaluator=make)
    assert ckpt.weights_metadata(split / hooks.BEST)["step"] == 2
    assert ckpt.snapshot_steps(split) == [2, 4]
    train(cfg, split, device="cpu", progress=False, resume=True, make_evaluator=make)
    assert calls == [2, 4, 6, 8, 9]
    assert ckpt.snapshot_steps(split) == ckpt.snapshot_steps(straight) == [2, 4, 6, 8]
    for step in (2, 4, 6, 8):
        assert same_weights(ckpt.snapshot_path(split, step), ckpt.snapshot_path(straight, step))
    assert same_weights(split / hooks.BEST, straight / hooks.BEST)
    assert ckpt.weights_metadata(split / hooks.BEST)["step"] == 6
    strip = lambda rs: [(r["step"], r["eval"]["fd"]) for r in rs]  # noqa: E731
    assert strip(rows(split, "eval")) == strip(rows(straight, "eval"))


def test_snapshots_are_thinned_beyond_the_cap(tmp_path, monkeypatch):
    assert hooks.snapshot_interval(100, 5000) == 100  # 50 fit
    assert hooks.snapshot_interval(100, 5100) == 200
    assert hooks.snapshot_interval(1, 9, cap=3) == 4
    monkeypatch.setattr(hooks, "MAX_SNAPSHOTS", 3)
    run = tmp_path / "run"
    train(quality_config(snapshot_every=1), run, device="cpu", progress=False)
    assert ckpt.snapshot_steps(run) == [4, 8]


def test_evaluation_time_is_not_on_the_training_clock(tmp_path):
    make, calls = fake_evaluator(sleep=0.3)
    cfg = quality_config(eval_every=1)
    cfg = replace(cfg, train=replace(cfg.train, epochs=None, minutes=0.03))
    t0 = time.perf_counter()
    result = train(cfg, tmp_path / "run", device="cpu", progress=False, make_evaluator=make)
    wall = time.perf_counter() - t0
    assert len(calls) >= result.steps  # one after every step
    assert result.seconds < 1.8 + 1.0  # the 1.8 s budget, not the evaluations' 0.3 s each
    assert wall > result.seconds + 0.3 * len(calls) - 0.1
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    assert state["elapsed"] == pytest.approx(result.seconds, abs=0.5)
    # the images/s of a row after an evaluation does not count the evaluation's time
    assert min(r["images_per_s"] for r in rows(tmp_path / "run", "loss")) > 32 / 0.3
    evals = rows(tmp_path / "run", "eval")
    assert all(r["elapsed_s"] <= result.seconds + 0.01 for r in evals)


def test_tensorboard_event_files_hold_the_scalars_and_grids(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    cfg = quality_config(eval_every=4, log_with="tensorboard")
    train(cfg, run, device="cpu", progress=False, make_evaluator=evaluator)
    acc = EventAccumulator(str(run / hooks.LOGS), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "train/images_per_s", "eval/fd", "eval/accuracy",
            "eval/fd_floor", "eval/kid", "eval/diversity"} <= set(tags["scalars"])  # fmt: skip
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 10))
    assert [e.step for e in acc.Scalars("eval/fd")] == [4, 8, 9]
    logged = [r["eval"]["fd"] for r in rows(run, "eval")]
    assert [e.value for e in acc.Scalars("eval/fd")] == pytest.approx(logged, rel=1e-5)
    assert [e.step for e in acc.Images("eval/samples")] == [4, 8, 9]


def test_an_evaluation_interval_needs_an_evaluator(tmp_path):
    with pytest.raises(UsageError, match="--eval-every"):
        train(quality_config(eval_every=2), tmp_path / "run", device="cpu", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "extra, option",
    [
        (["--eval-every", "-1"], "--eval-every"),
        (["--eval-every", "x"], "--eval-every"),
        (["--eval-every-minutes", "nan"], "--eval-every-minutes"),
        (["--eval-every-minutes", "-2"], "--eval-every-minutes"),
        (["--keep-best", "fd"], "--keep-best"),  # without evaluations
        (["--eval-every", "5", "--keep-best", "loss"], "--keep-best"),
        (["--snapshot-every", "-5"], "--snapshot-every"),
        (["--snapshot-every", "1.5"], "--snapshot-every"),
        (["--log-with", "mlflow"], "--log-with"),
        (["--set", "train.eval_n_per_class=1"], "--set train.eval_n_per_class"),
        (["--set", "train.eval_steps=0"], "--set train.eval_steps"),
    ],
)
def test_bad_values_of_the_new_options_are_one_line(tmp_path, capsys, extra, option):
    from difflab.cli import main

    out = tmp_path / "run"
    assert main(cli_args(out, 0.05, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and option in err, err
    assert not out.exists()


def test_a_missing_tracker_package_is_one_line(tmp_path, capsys, monkeypatch):
    from difflab.cli import main

    real = hooks.importlib.util.find_spec
    monkeypatch.setattr(hooks.importlib.util, "find_spec",
                        lambda name: None if name == "wandb" else real(name))  # fmt: skip
    assert main(cli_args(tmp_path / "run", 0.05, "--log-with", "wandb")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--log-with wandb" in err and "pip install wandb" in err


def test_the_command_line_trains_with_evaluations_and_resume_keeps_them(tmp_path, capsys):
    from difflab.cli import main

    out = tmp_path / "run"
    args = cli_args(out, 0.2, "--eval-every", "4", "--keep-best", "fd", "--snapshot-every", "3")
    assert main(args) == 0
    cfg = RunConfig.load(out / "config.json").train
    assert (cfg.eval_every, cfg.keep_best, cfg.snapshot_every) == (4, "fd", 3)
    assert [r["step"] for r in rows(out, "eval")] == [4, 8, 9]
    assert (out / hooks.BEST).is_file() and ckpt.snapshot_steps(out) == [3, 6, 9]
    capsys.readouterr()
    resumed = cli_args(out, 0.3, "--eval-every", "2", "--resume")
    assert main(resumed) == 2
    assert "--eval-every 2" in capsys.readouterr().err
    assert main(cli_args(out, 0.3, "--resume")) == 0  # the run's own interval goes on
    assert [r["step"] for r in rows(out, "eval")] == [4, 8, 9, 12, 14]


def test_a_bare_eval_every_takes_the_default_interval():
    from difflab.cli import build_parser
    from difflab.config import EVAL_EVERY

    args = build_parser().parse_args(["train", "--out", "x", "--eval-every"])
    assert args.eval_every == EVAL_EVERY == 500


def test_the_quality_figure_draws_accuracy_and_fd_over_the_floor():
    from difflab.figures.runs import quality_figure

    losses = [{"step": s, "loss": 1.0 / s, "elapsed_s": 0.5 * s} for s in range(1, 41)]
    evals = [
        {"step": s, "elapsed_s": 0.5 * s, "eval": {"accuracy": a, "fd": fd, "fd_floor": 2.0}}
        for s, a, fd in ((10, 0.2, 40.0), (20, 0.6, 10.0), (40, 0.9, 4.0))
    ]
    fig = quality_figure(losses, evals, 32, "title", "v", best_step=40)
    axes = fig.get_axes()
    assert len(axes) == 6
    by_label = {(ax.get_xlabel(), ax.get_ylabel()): ax for ax in axes}
    acc = by_label["images seen", "conditional accuracy (%)"].get_lines()[0]
    assert acc.get_xdata().tolist() == [320, 640, 1280]
    assert acc.get_ydata().tolist() == pytest.approx([20, 60, 90])
    fd = by_label["training time (minutes)", "FD / floor (judge features)"]
    assert fd.get_lines()[0].get_ydata().tolist() == pytest.approx([20, 5, 2])
    assert fd.get_yscale() == "log"
    assert fd.get_lines()[0].get_xdata().tolist() == pytest.approx([5 / 60, 10 / 60, 20 / 60])
    assert any(line.get_label() == "kept best" for line in fd.get_lines())
    assert "accuracy 90.0%" in fig._suptitle.get_text()


def test_evaluations_every_few_minutes_of_training(tmp_path):
    make, calls = fake_evaluator(sleep=0.05)
    cfg = quality_config(eval_every_minutes=0.005)  # every 0.3 s of training
    cfg = replace(cfg, train=replace(cfg.train, epochs=None, minutes=0.025))
    result = train(cfg, tmp_path / "run", device="cpu", progress=False, make_evaluator=make)
    times = [r["elapsed_s"] for r in rows(tmp_path / "run", "eval")]
    assert len(times) == len(calls) >= 3
    gaps = [b - a for a, b in zip([0.0, *times[:-2]], times[:-1], strict=True)]
    assert min(gaps) >= 0.3 - 0.02  # not before 0.3 s of training since the last one
    assert times[-1] == pytest.approx(result.seconds, abs=0.02)  # and the last weights


def test_a_resume_hides_the_tensorboard_rows_of_a_killed_tail(tmp_path):
    pytest.importorskip("tensorboard")
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, kept = tmp_path / "run", tmp_path / "kept"
    cfg = quality_config(log_with="tensorboard")
    train(cfg, run, device="cpu", progress=False, stop_at_step=4)
    kept.mkdir()
    for name in ("model.safetensors", "train_state.pt"):
        shutil.copy(run / name, kept / name)
    train(cfg, run, device="cpu", progress=False, resume=True)  # steps 5..9 logged ...
    for name in ("model.safetensors", "train_state.pt"):  # ... then "killed" before a checkpoint
        shutil.copy(kept / name, run / name)
    train(cfg, run, device="cpu", progress=False, resume=True)
    acc = EventAccumulator(str(run / hooks.LOGS), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 10))
    assert [r["step"] for r in rows(run, "loss")] == list(range(1, 10))
