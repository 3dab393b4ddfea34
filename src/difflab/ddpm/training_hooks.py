"""What training does beside its steps: evaluations, the best weights, snapshots, trackers.

:class:`TrainingHooks` belongs to one :class:`~difflab.ddpm.training.Trainer`. It calls the
evaluator hook (built by the layer above from :mod:`difflab.evaluation`, as
``make_evaluator(cfg, device)``, before training starts) every ``train.eval_every`` steps
and/or ``train.eval_every_minutes`` minutes of training and once when training ends, and
writes each result as a row ``{"step", "epoch", "images_seen", "elapsed_s", "eval": {...}}``
of ``metrics.jsonl`` and a grid ``figures/progress/step-0001000.png``; the seconds an
evaluation takes are handed back so that the loop leaves them out of its clock. With
``train.keep_best`` it keeps the EMA weights of the best evaluation in ``best.safetensors``
(their step, metric and value in its metadata) and in the train state, so that a resume
puts back the best of the steps it keeps. Every ``train.snapshot_every`` steps it writes the
EMA weights to ``snapshots/step-0001000.safetensors``; at most :data:`MAX_SNAPSHOTS` are
kept: when a run goes on longer, the interval doubles and the snapshots between the new
multiples are removed (a rule of the step alone, so a resumed run keeps the same ones).
``train.log_with`` sends the logged rows, the evaluations and the grids to accelerate's
TensorBoard (``RUN/logs``) or Weights & Biases tracker. Rank 0 alone writes and logs.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from difflab import distributed, runfolder
from difflab.config import RunConfig
from difflab.ddpm.runs import (
    GUIDANCE,
    SNAPSHOTS,
    save_config,
    save_weights,
    snapshot_path,
    snapshot_steps,
    weights_metadata,
)
from difflab.errors import UsageError
from difflab.files import append_jsonl, write_json

BEST = "best.safetensors"
PROGRESS = Path("figures") / "progress"
LOGS = "logs"  # RUN/logs: the TensorBoard event files
MAX_SNAPSHOTS = 50
LOWER_IS_BETTER = {"fd": True, "kid": True, "accuracy": False}
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}

# make_evaluator(resolved config, device) -> evaluator; evaluator(ema model, step) -> an
# object with ``metrics`` (a dict of numbers) and ``grid`` ((H, W, 3) uint8 array or None)
MakeEvaluator = Callable[[RunConfig, torch.device], Callable[[torch.nn.Module, int], Any]]


def progress_path(run: str | Path, step: int) -> Path:
    return Path(run) / PROGRESS / f"step-{int(step):07d}.png"


def snapshot_interval(every: int, step: int, cap: int | None = None) -> int:
    """The snapshot interval at ``step``: ``every``, doubled until at most ``cap`` (default
    :data:`MAX_SNAPSHOTS`) multiples of it fit in ``step`` steps."""
    cap = MAX_SNAPSHOTS if cap is None else cap
    interval = every
    while step // interval > cap:
        interval *= 2
    return interval


def check_tracker(name: str | None) -> None:
    """Refuse ``--log-with NAME`` in one line when its package is not installed."""
    if name is None:
        return
    package = TRACKER_PACKAGES[name]
    if importlib.util.find_spec(package) is None:
        raise UsageError(
            f"--log-with {name}: the {package} package is not installed (pip install "
            + ("'difflab[log]')" if name == "tensorboard" else f"{package})")
        )


def accelerator_options(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """The ``Accelerator`` keyword arguments of the run's tracker (none without one)."""
    check_tracker(cfg.train.log_with)
    if cfg.train.log_with is None:
        return {}
    return {"log_with": cfg.train.log_with, "project_dir": str(run_dir)}


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class TrainingHooks:
    """Evaluations, best weights, snapshots and trackers of one trainer (module doc)."""

    def __init__(self, trainer: Any, make_evaluator: MakeEvaluator | None) -> None:
        self.trainer = trainer
        self.tc = trainer.cfg.train
        self.main = trainer.accelerator.is_main_process
        self.evaluator = None
        if self.tc.evaluates or self.tc.choose_guidance:
            if make_evaluator is None:
                flag = "--eval-every" if self.tc.evaluates else "--set train.choose_guidance"
                raise UsageError(
                    f"{flag}: this caller of the trainer gives no evaluator; train through "
                    f"difflab.train or `difflab train` (run: {trainer.run_dir})"
                )
            if self.main:  # the judge is trained or loaded now, before the training clock
                self.evaluator = make_evaluator(trainer.cfg, trainer.device)
        self.last_eval_step = -1
        self.last_eval_elapsed = 0.0
        self.best: dict[str, Any] | None = None  # {"step", "metric", "value", "ema"}
        self.guidance: dict[str, Any] | None = None  # what train.choose_guidance chose, at the end
        self.tracking = False

    # -- state ----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = {"eval_elapsed": self.last_eval_elapsed}
        if self.best is not None:
            out["best"] = self.best
        return out

    def resume(self, state: dict[str, Any], step: int) -> None:
        """Put back what the train state of ``step`` holds; remove files of later steps."""
        self.last_eval_elapsed = float(state.get("eval_elapsed", 0.0))
        self.last_eval_step = step if self._evaluated_at(step) else -1
        self.best = state.get("best")
        if not self.main:
            return
        run = self.trainer.run_dir
        runfolder.clean_folder(run, [SNAPSHOTS, str(PROGRESS)])
        for later in [s for s in snapshot_steps(run) if s > step]:
            snapshot_path(run, later).unlink()
        for grid in (run / PROGRESS).glob("step-*.png"):
            digits = grid.stem[len("step-") :]
            if digits.isdigit() and int(digits) > step:
                grid.unlink()
        best_file = run / BEST
        if self.best is None:
            best_file.unlink(missing_ok=True)  # written after the checkpoint resumed from
        elif self._best_step_on_disk() != self.best["step"]:
            self._write_best()  # a kill came after a later best, or the file is damaged

    def _best_step_on_disk(self) -> int | None:
        try:
            return weights_metadata(self.trainer.run_dir / BEST).get("step")
        except Exception:  # missing, truncated or not safetensors: written again
            return None

    def _evaluated_at(self, step: int) -> bool:
        from difflab.files import read_jsonl

        rows = read_jsonl(self.trainer.run_dir / runfolder.METRICS)
        return any(r.get("step") == step and "eval" in r for r in rows)

    # -- trackers -------------------------------------------------------------------------
    def start_tracking(self) -> None:
        if self.tc.log_with is None or self.tracking:
            return
        kwargs = {}
        if self.tc.log_with == "tensorboard" and self.trainer.step > 0:
            kwargs = {"tensorboard": {"purge_step": self.trainer.step + 1}}  # hide a killed tail
        if self.tc.log_with == "wandb":  # a project named after the run, its files in RUN/logs
            kwargs = {"wandb": {"dir": str(self.trainer.run_dir / LOGS)}}
            (self.trainer.run_dir / LOGS).mkdir(exist_ok=True)
        name = LOGS if self.tc.log_with == "tensorboard" else self.trainer.run_dir.name
        self.trainer.accelerator.init_trackers(name, init_kwargs=kwargs)
        self.tracking = True

    def log(self, values: dict[str, float], step: int) -> None:
        if self.tracking:
            self.trainer.accelerator.log(values, step=step)

    def log_row(self, row: dict[str, Any]) -> None:
        self.log({f"train/{k}": row[k] for k in ("loss", "lr", "images_per_s")}, row["step"])

    def finish(self) -> None:
        if self.tracking:
            self.trainer.accelerator.end_training()
            self.tracking = False

    # -- evaluations ----------------------------------------------------------------------
    def between_steps(self, step: int, t0: float) -> float:
        """An evaluation and a snapshot after ``step`` when due (the training clock started
        at ``t0``); returns the seconds they took, which the loop leaves off its clock."""
        t = self.trainer
        start = time.perf_counter()
        due = self.eval_due(step, start - t0)
        if self.tc.eval_every_minutes:  # rank 0's clock decides for every rank
            (due,) = distributed.from_main_process([due], t.device, t.world)
        if due:
            self.evaluate(step, start - t0)
        self.snapshot_if_due(step)
        return time.perf_counter() - start

    def at_end(self, step: int, elapsed: float) -> None:
        """The evaluation of the last weights, and the guidance chosen from them
        (``self.guidance``), when training ran to its end."""
        if self.tc.evaluates and step != self.last_eval_step and step > 0:
            self.evaluate(step, elapsed)
        self.guidance = self.choose_guidance()

    def choose_guidance(self) -> dict[str, Any] | None:
        """With ``train.choose_guidance``, the run's default guidance chosen from its finished
        EMA weights (rank 0): written into ``config.json`` with the record in ``guidance.json``;
        returns the record (None on the other ranks, or when not asked)."""
        t, record = self.trainer, None
        if self.tc.choose_guidance and self.main:
            devices = [t.device] if t.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                show = _to_stderr if t.progress else None  # a line per scale tried
                sample, record = self.evaluator.choose_guidance(t.ema_model, show=show)
            t.cfg = replace(t.cfg, sample=sample)
            write_json(t.run_dir / GUIDANCE, record)
            save_config(t.cfg, t.run_dir)
        if self.tc.choose_guidance and t.world > 1:
            t.accelerator.wait_for_everyone()
        return record

    def eval_due(self, step: int, elapsed: float) -> bool:
        """Whether an evaluation is due after ``step`` at ``elapsed`` training seconds."""
        if not self.tc.evaluates or step == self.last_eval_step:
            return False
        if self.tc.eval_every and step % self.tc.eval_every == 0:
            return True
        minutes = self.tc.eval_every_minutes
        return bool(minutes) and elapsed - self.last_eval_elapsed >= minutes * 60

    def evaluate(self, step: int, elapsed: float) -> None:
        """Evaluate the EMA weights at ``step`` (rank 0), write the row, the grid, the best."""
        t = self.trainer
        self.last_eval_step, self.last_eval_elapsed = step, elapsed
        if self.main:
            devices = [t.device] if t.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), torch.no_grad():  # training's RNG
                result = self.evaluator(t.ema_model, step)
            metrics = dict(result.metrics)
            row = {
                "step": step, "epoch": round(step / t.steps_per_epoch, 4),
                "images_seen": step * self.tc.batch_size, "elapsed_s": round(elapsed, 2),
                "eval": metrics,
            }  # fmt: skip
            append_jsonl(t.run_dir / runfolder.METRICS, row)
            grid = getattr(result, "grid", None)
            if grid is not None:
                from difflab.figures.images import save_png

                path = progress_path(t.run_dir, step)
                path.parent.mkdir(parents=True, exist_ok=True)
                save_png(path, grid, {"run": str(t.run_dir), "step": step, **metrics})
                if self.tracking:
                    self._log_image(grid, step)
            self.log({f"eval/{k}": float(v) for k, v in metrics.items()}, step)
            self._keep_if_best(metrics, step)
        if t.world > 1:
            t.accelerator.wait_for_everyone()

    def _log_image(self, grid: Any, step: int) -> None:
        tracker = self.trainer.accelerator.get_tracker(self.tc.log_with, unwrap=True)
        if self.tc.log_with == "tensorboard":
            tracker.add_image("eval/samples", grid, global_step=step, dataformats="HWC")
            tracker.flush()
        else:  # wandb
            import wandb

            tracker.log({"eval/samples": wandb.Image(grid)}, step=step)

    def _keep_if_best(self, metrics: dict[str, float], step: int) -> None:
        metric = self.tc.keep_best
        if metric is None:
            return
        value = float(metrics[metric])
        if self.best is not None:
            old = float(self.best["value"])
            better = value < old if LOWER_IS_BETTER[metric] else value > old
            if not better:
                return
        ema = {k: v.detach().cpu().clone() for k, v in self.trainer.ema_model.state_dict().items()}
        self.best = {"step": step, "metric": metric, "value": value, "ema": ema}
        self._write_best()

    def _write_best(self) -> None:
        meta = {k: self.best[k] for k in ("step", "metric", "value")} | {"dataset": self.tc.dataset}
        save_weights(self.best["ema"], self.trainer.run_dir / BEST, meta)

    # -- snapshots ------------------------------------------------------------------------
    def snapshot_if_due(self, step: int) -> None:
        every = self.tc.snapshot_every
        if not every or not self.main:
            return
        interval = snapshot_interval(every, step)
        if step % interval:
            return
        run = self.trainer.run_dir
        meta = {
            "step": step,
            "epoch": step / self.trainer.steps_per_epoch,
            "dataset": self.tc.dataset,
        }
        snapshot_path(run, step).parent.mkdir(exist_ok=True)
        save_weights(self.trainer.ema_model, snapshot_path(run, step), meta)
        for kept in snapshot_steps(run):
            if kept % interval:
                snapshot_path(run, kept).unlink(missing_ok=True)
