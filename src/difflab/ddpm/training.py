"""The training loop: one Trainer on top of Hugging Face accelerate.

Owns the DDPM training step (random t, q_sample, the objective's loss, label dropout for
classifier-free guidance), AdamW with warm-up and cosine decay, EMA weights, gradient
clipping, mixed precision, a NaN/Inf guard, progress and ``metrics.jsonl``, and atomic
checkpoints with an exact resume: the data order and each step's random draws are derived
from ``(seed, epoch)`` and ``(seed, step)``, so N steps straight and N/2 + resume + N/2 give
the same weights on the CPU. Evaluations, best weights, snapshots and trackers are
:mod:`.training_hooks`'s; the time they take is left out of the training clock.

Launched in several processes (``torchrun``, ``accelerate launch``), each process trains on
its share of every global batch (see :mod:`difflab.distributed`); rank 0 alone writes the
run folder and shows progress, and a run folder resumes with any number of processes.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from difflab import distributed, runfolder
from difflab.config import RunConfig
from difflab.ddpm import runs as ckpt
from difflab.ddpm.data import load_dataset
from difflab.ddpm.diffusion import GaussianDiffusion
from difflab.ddpm.model import ContextUnet
from difflab.ddpm.runs import init_from_run, resolve_config
from difflab.ddpm.training_hooks import MakeEvaluator, TrainingHooks, accelerator_options
from difflab.devices import auto_mixed_precision, fused_optimizer, resolve_device
from difflab.errors import UsageError
from difflab.files import append_jsonl
from difflab.runfolder import TrainingDiverged, TrainingInterrupted

__all__ = ["TrainResult", "Trainer", "TrainingDiverged", "TrainingInterrupted", "init_from_run",
           "resolve_config", "train"]  # fmt: skip


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    seconds: float
    images_per_s: float
    final_loss: float
    guidance: dict | None = None  # what train.choose_guidance measured and chose (guidance.json)
    precision: str = "fp32"  # the network's autocast in training: fp32, bf16 or fp16


def _lr_factor(progress: float, step: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


# on a GPU, the dataset moves there if it needs at most this share of the free memory
DATA_ON_GPU_SHARE = 0.25


class Trainer:
    """One training run in ``run_dir``: the model, its optimizer and EMA, and the loop."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: str | Path,
        device: str = "auto",
        resume: bool = False,
        progress: bool = True,
        make_evaluator: MakeEvaluator | None = None,
    ) -> None:
        """``make_evaluator(cfg, device)`` builds the evaluator of ``train.eval_every``."""
        from accelerate.utils import set_seed

        self.run_dir = Path(run_dir)
        self.progress = progress
        tc = cfg.train
        if resume:
            ckpt.check_run_dir(self.run_dir, need_weights=False)
            saved = RunConfig.load(self.run_dir / ckpt.CONFIG)
            # the run's own settings win; only the length of training may change
            cfg = replace(saved, train=replace(saved.train, epochs=tc.epochs, minutes=tc.minutes))
            tc = cfg.train
        if tc.epochs is None and tc.minutes is None:  # each is checked by TrainConfig
            raise UsageError("train: give --epochs or --minutes")
        dev = resolve_device(device)
        distributed.check_device(dev, distributed.launched_world_size())
        mp = auto_mixed_precision(dev) if tc.mixed_precision == "auto" else tc.mixed_precision
        extra = accelerator_options(cfg, self.run_dir)  # a tracker, when train.log_with asks
        self.accelerator = runfolder.accelerator(mp, cpu=dev == "cpu", **extra)
        self.precision = "fp32" if mp == "no" else mp
        self.device = self.accelerator.device
        self.world = self.accelerator.num_processes
        distributed.check_batch_size(tc.batch_size, self.world)
        self.rows = distributed.shard(tc.batch_size, self.accelerator.process_index, self.world)
        with self.accelerator.main_process_first():  # rank 0 downloads, the others then read
            self.data = load_dataset(tc.dataset, "train", tc.data_dir)
        self.cfg = resolve_config(cfg, self.data)
        self.diffusion = GaussianDiffusion(self.cfg.diffusion)
        self.images, self.labels = self._place_data()
        self.steps_per_epoch = max(1, len(self.data) // tc.batch_size)
        set_seed(tc.seed)  # the initial weights depend on the seed alone
        model = ContextUnet(self.cfg.model)
        if tc.init_from and not resume:
            init_from_run(model, tc.init_from)
        if tc.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.raw_model = model.to(self.device)  # weights, EMA and checkpoints use this one
        self.ema_model = copy.deepcopy(model).requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay,
                                **fused_optimizer(self.device))  # fmt: skip
        if tc.compile:
            model = self._compiled(model)
        self.model, self.optimizer = self.accelerator.prepare(model, opt)
        self.step = 0
        self.elapsed = 0.0
        self.last_checkpoint = 0
        self.weights_stale = False  # the weights file is not the one of the train state
        self.notes: list[str] = []  # for the user, before fit(): what resuming found
        with torch.random.fork_rng(devices=[]):  # the judge's training draws leave no trace
            self.hooks = TrainingHooks(self, make_evaluator)
        if resume:
            self._load_state()
        elif self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            runfolder.clean_folder(self.run_dir)  # left by a run killed before its checkpoint
            ckpt.save_config(self.cfg, self.run_dir)
            (self.run_dir / ckpt.METRICS).unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()  # all ranks have read the folder before rank 0 writes

    def _place_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The uint8 images and labels on the device when they fit, else in CPU memory.

        Data on the device makes a batch one indexing operation there (no host-to-device copy).
        """
        images, labels = self.data.images, self.data.labels
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            if images.nbytes + labels.nbytes > DATA_ON_GPU_SHARE * free:
                return images, labels  # each batch is copied over
        return images.to(self.device), labels.to(self.device)

    def _compiled(self, model: ContextUnet) -> torch.nn.Module:
        """``torch.compile(model)``, checked on one training step; the eager model if that fails.

        The check runs this process's shard of the first batch forward and backward (no
        optimizer step), so the graphs it compiles are the ones training uses. It runs before
        DDP wraps the model: a failure cannot leave a collective half done.
        """
        compiled = torch.compile(model)
        try:
            self._loss(compiled, 0).backward()
        except Exception as e:  # inductor raises many types (no compiler, unsupported op, ...)
            reason = next(iter(str(e).splitlines()), "")
            warnings.warn(
                f"train.compile: torch.compile failed ({type(e).__name__}: {reason}); "
                "training without it",
                stacklevel=3,
            )
            compiled = model
        model.zero_grad(set_to_none=True)
        return compiled

    # -- state ------------------------------------------------------------------------------
    @property
    def total_steps(self) -> int | None:
        e = self.cfg.train.epochs
        return None if e is None else max(1, math.ceil(e * self.steps_per_epoch))

    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "elapsed": self.elapsed,
            "model": self.raw_model.state_dict(),
            "ema": self.ema_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            **self.hooks.state(),
        }

    def _load_state(self) -> None:
        """Every rank reads the same state: nothing in it depends on the number of processes."""
        state = ckpt.load_train_state(self.run_dir)
        try:
            self.raw_model.load_state_dict(state["model"])
            self.ema_model.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            why = next(iter(str(e).strip().splitlines()), type(e).__name__)[:160]
            raise UsageError(
                f"--resume: {self.run_dir / ckpt.TRAIN_STATE} does not fit this run's "
                f"{ckpt.CONFIG} ({why})"
            ) from None
        self.step = int(state["step"])
        self.elapsed = float(state["elapsed"])
        self.last_checkpoint = self.step
        torch.set_rng_state(state["torch_rng"])
        self.weights_stale = not runfolder.weights_match(state, self.run_dir / ckpt.WEIGHTS)
        if self.weights_stale and self.accelerator.is_main_process:
            self.notes.append(runfolder.mismatch_note(self.run_dir, ckpt.WEIGHTS, self.step))
        if self.accelerator.is_main_process:
            runfolder.clean_folder(self.run_dir)  # temporary files of a killed checkpoint
            runfolder.trim_metrics(self.run_dir, self.step)  # logged after this checkpoint
        self.hooks.resume(state, self.step)

    def save_checkpoint(self) -> None:
        """Write the EMA weights, then the training state (rank 0 only; the ranks agree)."""
        if self.accelerator.is_main_process:
            meta = {
                "step": self.step,
                "epoch": self.step / self.steps_per_epoch,
                "dataset": self.data.name,
            }
            ckpt.save_checkpoint(self.run_dir, self.ema_model, self._state(), meta)
        self.last_checkpoint = self.step
        self.weights_stale = False

    # -- one step ---------------------------------------------------------------------------
    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's rows of global batch ``step``: images in [-1, 1] and labels."""
        tc = self.cfg.train
        epoch, j = divmod(step, self.steps_per_epoch)
        if getattr(self, "_perm_epoch", None) != epoch:  # one shuffle per epoch, not per step
            gen = runfolder.epoch_generator(tc.seed, epoch)
            self._perm = torch.randperm(len(self.data), generator=gen).to(self.images.device)
            self._perm_epoch = epoch
        idx = self._perm[j * tc.batch_size : (j + 1) * tc.batch_size][self.rows]
        x0 = self.images[idx].to(self.device).float().div_(127.5).sub_(1.0)  # (b, C, H, W)
        if tc.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        return x0, self.labels[idx].to(self.device)

    def _loss(self, model: torch.nn.Module, step: int) -> torch.Tensor:
        """The loss of this process's shard of step ``step`` (random t, q_sample, objective).

        The draws are made for the whole global batch from ``(seed, step)`` and sharded like
        the images, so every row gets the same t, noise and label dropout in any world size.
        """
        tc = self.cfg.train
        x0, y = self._batch(step)
        g = runfolder.step_generator(tc.seed, step, self.device)
        n, shape, dev = tc.batch_size, (tc.batch_size, *x0.shape[1:]), g.device
        t = self.diffusion.sample_timesteps(n, g)[self.rows]
        noise = torch.randn(shape, generator=g, device=dev)[self.rows]
        drop = (torch.rand(n, generator=g, device=dev) < tc.label_dropout)[self.rows]
        if tc.channels_last:
            noise = noise.contiguous(memory_format=torch.channels_last)
        y = torch.where(drop, torch.full_like(y, self.cfg.model.num_classes), y)
        with self.accelerator.autocast():
            out = model(self.diffusion.q_sample(x0, t, noise), t, y)
        return self.diffusion.training_loss(out, x0, t, noise)

    def train_step(self, lr: float) -> torch.Tensor:
        """One optimizer step on the global batch; returns its loss (the mean over ranks).

        The loss stays on the device: reading it waits for the GPU, so :meth:`fit` reads the
        losses only when it logs or saves (:meth:`_settle`), and checks them for NaN then.
        """
        tc = self.cfg.train
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self._loss(self.model, self.step)
        mean = distributed.mean_over_processes(loss, self.world)  # NaN anywhere: all ranks stop
        self.accelerator.backward(loss)  # DDP averages the gradients over the ranks
        if tc.grad_clip > 0:
            self.accelerator.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # the same update on every rank keeps the EMAs identical
            decay = runfolder.ema_decay(tc.ema_decay, self.step, tc.ema_warmup)
            ema = list(self.ema_model.parameters())  # looked up each step: under DDP, prepare()
            raw = [p.detach() for p in self.raw_model.parameters()]  # gives them new storage
            torch._foreach_lerp_(ema, raw, 1 - decay)  # one multi-tensor update
        self.step += 1
        return mean

    def _settle(self, pending: list[tuple[int, torch.Tensor]]) -> list[float]:
        """The values of the losses ``pending`` (step, loss) in one read; a NaN or Inf stops.

        Training stops before anything is written after the bad step, so the last checkpoint
        on disk is one from before it.
        """
        if not pending:
            return []
        values = torch.stack([v.float() for _, v in pending]).tolist()
        for (step, _), value in zip(pending, values, strict=True):
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"loss became {value} at step {step}; stopped. {self.run_dir} keeps the "
                    f"checkpoint of step {self.last_checkpoint}. Try a lower --lr or "
                    "--set train.grad_clip=1"
                )
        pending.clear()
        return values

    # -- the loop ---------------------------------------------------------------------------
    def fit(
        self, stop_at_step: int | None = None, should_stop: Callable[[], bool] | None = None
    ) -> TrainResult:
        """Train until the epochs or minutes are spent (or ``stop_at_step``, or ``should_stop()``).

        With several processes, rank 0's clock and ``should_stop()`` decide for every rank,
        so all ranks stop at the same step with the same learning rate schedule. SIGINT
        (Ctrl-C) or SIGTERM stops training the same way, after a checkpoint, and then raises
        :class:`TrainingInterrupted`.
        """
        if self.weights_stale:  # a kill came between the weights and the state: rewrite both
            self.save_checkpoint()
        with runfolder.stop_on_signals() as signalled:
            result = self._fit(
                stop_at_step, lambda: bool(signalled) or bool(should_stop and should_stop())
            )
        if signalled:
            e, m = self.cfg.train.epochs, self.cfg.train.minutes
            length = f"--epochs {e:g}" if e is not None else f"--minutes {m:g}"
            raise signalled.interrupted(
                self.step, self.run_dir, f"difflab train --resume --out {self.run_dir} {length}"
            )
        return result

    def _fit(self, stop_at_step: int | None, should_stop: Callable[[], bool]) -> TrainResult:
        tc = self.cfg.train
        total, budget = self.total_steps, None if tc.epochs is not None else tc.minutes * 60
        start_step, since_log = self.step, time.perf_counter()
        t0 = since_log - self.elapsed
        losses: list[float] = []
        pending: list[tuple[int, torch.Tensor]] = []  # losses not read back from the device yet
        bar = runfolder.progress_bar(
            total if total is not None else int(budget),
            self.step if total is not None else int(self.elapsed),
            f"train {self.data.name}",
            "step" if total is not None else "s",
            self.progress and self.accelerator.is_main_process,
        )
        loss, finished = float("nan"), False
        self.hooks.start_tracking()
        try:
            while True:
                self.elapsed = time.perf_counter() - t0
                done = self.step >= total if total is not None else self.elapsed >= budget
                at_stop = stop_at_step is not None and self.step >= stop_at_step
                stop = done or at_stop or should_stop()
                progress = self.step / total if total is not None else self.elapsed / budget
                stop, progress, done = distributed.from_main_process(
                    [stop, progress, done], self.device, self.world
                )
                if stop:
                    finished = bool(done)
                    break
                lr = tc.lr * _lr_factor(progress, self.step, tc.warmup_steps, tc.lr_schedule)
                pending.append((self.step, self.train_step(lr)))
                log_now = self.step % tc.log_every == 0 or (
                    total is not None and self.step == total
                )
                if log_now or self.step % tc.checkpoint_every == 0:
                    losses += self._settle(pending)
                    loss = losses[-1]
                if log_now:
                    now = time.perf_counter()
                    rate = len(losses) * tc.batch_size / max(now - since_log, 1e-9)
                    row = {
                        "step": self.step,
                        "epoch": round(self.step / self.steps_per_epoch, 4),
                        "loss": sum(losses) / len(losses),
                        "lr": lr,
                        "images_per_s": round(rate, 1),
                        "elapsed_s": round(now - t0, 2),
                    }
                    if self.accelerator.is_main_process:
                        append_jsonl(self.run_dir / ckpt.METRICS, row)
                    self.hooks.log_row(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{rate:.0f}", step=self.step)
                    losses, since_log = [], now
                if total is not None:
                    bar.update(1)
                else:
                    bar.update(int(time.perf_counter() - t0) - bar.n)
                spent = self.hooks.between_steps(self.step, t0)
                t0, since_log = t0 + spent, since_log + spent  # not on the training clock
                if self.step % tc.checkpoint_every == 0:
                    self.elapsed = time.perf_counter() - t0
                    self.save_checkpoint()
            losses += self._settle(pending)
            loss = losses[-1] if losses else loss
            self.elapsed = time.perf_counter() - t0
            if finished:
                bar.close()  # what the end prints goes below the finished bar
                self.hooks.at_end(self.step, self.elapsed)  # last weights: quality, guidance
        finally:
            bar.close()
            self.hooks.finish()
        if self.step != self.last_checkpoint or not (self.run_dir / ckpt.WEIGHTS).exists():
            self.save_checkpoint()
        if tc.init_from and self.accelerator.is_main_process:  # figures/before_after.png
            from difflab.ddpm.processes import before_after_figure

            try:
                before_after_figure(self.run_dir, device=str(self.device))
            except UsageError as e:  # the source run has moved since training started
                warnings.warn(f"before_after.png not drawn: {e}", stacklevel=2)
        self.accelerator.wait_for_everyone()  # the run folder is complete when any rank returns
        steps = self.step - start_step
        run_seconds = max(self.elapsed, 1e-9)
        rate = steps * tc.batch_size / run_seconds
        return TrainResult(
            self.run_dir, self.step, run_seconds, rate, loss, self.hooks.guidance, self.precision
        )


def train(
    cfg: RunConfig,
    out: str | Path,
    device: str = "auto",
    resume: bool = False,
    progress: bool = True,
    stop_at_step: int | None = None,
    on_note: Callable[[str], None] | None = None,
    make_evaluator: MakeEvaluator | None = None,
) -> TrainResult:
    """Train ``cfg`` into the run folder ``out`` (or resume the run there).

    What resuming finds (weights rewritten from the train state) goes to ``on_note``, one
    line each, or is issued as a warning. ``make_evaluator`` builds the evaluator of
    ``train.eval_every`` (:class:`difflab.evaluation.during_training.TrainingEvaluator`).
    """
    out = Path(out)
    if not resume and out.exists() and (out / ckpt.TRAIN_STATE).exists():
        raise UsageError(
            f"--out {out}: already holds a run; pass --resume to continue it or choose another --out"
        )
    with runfolder.held(out, create=not resume, lock=distributed.is_main_process()):
        trainer = Trainer(
            cfg, out, device=device, resume=resume, progress=progress, make_evaluator=make_evaluator
        )
        for note in trainer.notes:
            if on_note is None:
                warnings.warn(note, stacklevel=2)
            else:
                on_note(note)
        return trainer.fit(stop_at_step=stop_at_step)
