"""The training loop: one Trainer on top of Hugging Face accelerate.

Owns the DDPM training step (random t, q_sample, the objective's loss, label dropout for
classifier-free guidance), AdamW with warm-up and cosine decay, EMA weights, gradient
clipping, mixed precision, a NaN/Inf guard, progress and ``metrics.jsonl``, and atomic
checkpoints with an exact resume: the data order and each step's random draws are derived
from ``(seed, epoch)`` and ``(seed, step)``, so N steps straight and N/2 + resume + N/2 give
the same weights on the CPU.

Launched in several processes (``torchrun``, ``accelerate launch``), each process trains on
its share of every global batch (see :mod:`difflab.distributed`); rank 0 alone writes the
run folder and shows progress, and a run folder resumes with any number of processes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from difflab import distributed
from difflab.config import RunConfig
from difflab.ddpm import runs as ckpt
from difflab.ddpm.data import ImageData, load_dataset
from difflab.ddpm.diffusion import GaussianDiffusion
from difflab.ddpm.model import ContextUnet
from difflab.devices import resolve_device
from difflab.errors import UsageError
from difflab.files import LOCK_FILE, append_jsonl, folder_lock, read_jsonl, write_text


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the run folder keeps its last good checkpoint."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    seconds: float
    images_per_s: float
    final_loss: float


def resolve_config(cfg: RunConfig, data: ImageData) -> RunConfig:
    """Fit the model's input shape and class count to the dataset."""
    model = replace(
        cfg.model,
        in_channels=data.channels,
        height=data.height,
        width=data.width,
        num_classes=data.num_classes,
        class_names=tuple(data.class_names),
    )
    levels, p = len(model.channel_mults), model.patch_size
    while p > 1 and (data.height % p or data.width % p):
        p -= 1
    while levels > 1 and (
        data.height % (p * 2 ** (levels - 1)) or data.width % (p * 2 ** (levels - 1))
    ):
        levels -= 1  # e.g. 8x8 digits cannot be halved three times
    model = replace(model, channel_mults=model.channel_mults[:levels], patch_size=p)
    return replace(cfg, model=model)


def init_from_run(model: ContextUnet, run: str | Path) -> None:
    """Load another run's EMA weights into ``model`` (continued training / fine-tuning).

    The architectures must match except for the number of classes: the known classes keep
    their embeddings, the "no class" token moves to its new index, and new classes start
    from the "no class" embedding, i.e. as the unconditional model.
    """
    src = ckpt.check_run_dir(run)
    src_cfg = RunConfig.load(src / ckpt.CONFIG).model
    for name in ("in_channels", "height", "width", "base_channels", "channel_mults", "num_res_blocks",
                 "attention", "patch_size", "time_embed_dim"):  # fmt: skip
        a, b = getattr(src_cfg, name), getattr(model.cfg, name)
        if a != b:
            raise UsageError(
                f"--init-from {run}: its model.{name} is {a}, this run needs {b}; they must match"
            )
    state = ckpt.load_weights(src / ckpt.WEIGHTS)
    old = state.pop("class_embed.weight")  # (old_classes + 1, D)
    emb = model.class_embed.weight.detach().clone()
    n_old, n_new = old.shape[0] - 1, model.cfg.num_classes
    keep = min(n_old, n_new)
    emb[:keep] = old[:keep]
    emb[keep:n_new] = old[n_old]  # new classes start as "no class"
    emb[n_new] = old[n_old]
    state["class_embed.weight"] = emb
    model.load_state_dict(state)


def _lr_factor(progress: float, step: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def _step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of step ``step``'s random draws, on ``device``.

    On a GPU the draws are made there (no per-step host-to-device copy of the noise), so a seed
    gives the same run on the same kind of device, not the same numbers as on the CPU.
    """
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) % (2**63))


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
    ) -> None:
        from accelerate import Accelerator
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
        if tc.epochs is None and tc.minutes is None:
            raise UsageError("train: give --epochs or --minutes")
        if (tc.epochs is not None and tc.epochs <= 0) or (
            tc.minutes is not None and tc.minutes <= 0
        ):
            raise UsageError("train: --epochs and --minutes must be positive")
        if tc.batch_size < 1:
            raise UsageError(f"train.batch_size={tc.batch_size}: must be at least 1")
        dev = resolve_device(device)
        distributed.check_device(dev, distributed.launched_world_size())
        mp = tc.mixed_precision
        if mp == "auto":
            mp = "bf16" if dev.startswith("cuda") else "no"
        self.accelerator = Accelerator(mixed_precision=mp, cpu=dev == "cpu")
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
        fused = {"fused": True} if self.device.type == "cuda" else {}
        opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, **fused)
        if tc.compile:
            model = self._compiled(model)
        self.model, self.optimizer = self.accelerator.prepare(model, opt)
        self.step = 0
        self.elapsed = 0.0
        self.last_checkpoint = 0
        if resume:
            self._load_state()
        elif self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
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
        }

    def _load_state(self) -> None:
        """Every rank reads the same state: nothing in it depends on the number of processes."""
        state = ckpt.load_train_state(self.run_dir)
        self.raw_model.load_state_dict(state["model"])
        self.ema_model.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.elapsed = float(state["elapsed"])
        self.last_checkpoint = self.step
        torch.set_rng_state(state["torch_rng"])
        if self.accelerator.is_main_process:  # drop metrics logged after this checkpoint
            path = self.run_dir / ckpt.METRICS
            rows = [r for r in read_jsonl(path) if r.get("step", 0) <= self.step]
            write_text(path, "".join(json.dumps(r) + "\n" for r in rows))

    def save_checkpoint(self) -> None:
        """Write the training state and the EMA weights (rank 0 only; the ranks agree)."""
        if self.accelerator.is_main_process:
            ckpt.save_train_state(self._state(), self.run_dir)
            meta = {
                "step": self.step,
                "epoch": self.step / self.steps_per_epoch,
                "dataset": self.data.name,
            }
            ckpt.save_weights(self.ema_model, self.run_dir / ckpt.WEIGHTS, meta)
        self.last_checkpoint = self.step

    # -- one step ---------------------------------------------------------------------------
    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's rows of global batch ``step``: images in [-1, 1] and labels."""
        tc = self.cfg.train
        epoch, j = divmod(step, self.steps_per_epoch)
        if getattr(self, "_perm_epoch", None) != epoch:  # one shuffle per epoch, not per step
            gen = torch.Generator().manual_seed(tc.seed * 7919 + epoch)
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
        g = _step_generator(tc.seed, step, self.device)
        n, shape, dev = tc.batch_size, (tc.batch_size, *x0.shape[1:]), g.device
        t = torch.randint(0, self.diffusion.num_timesteps, (n,), generator=g, device=dev)[self.rows]
        noise = torch.randn(shape, generator=g, device=dev)[self.rows]
        drop = (torch.rand(n, generator=g, device=dev) < tc.label_dropout)[self.rows]
        if tc.channels_last:
            noise = noise.contiguous(memory_format=torch.channels_last)
        y = torch.where(drop, torch.full_like(y, self.cfg.model.num_classes), y)
        with self.accelerator.autocast():
            out = model(self.diffusion.q_sample(x0, t, noise), t, y)
        return self.diffusion.training_loss(out, x0, t, noise)

    def _ema_decay(self) -> float:
        tc = self.cfg.train
        if not tc.ema_warmup:
            return tc.ema_decay
        return min(tc.ema_decay, (1 + self.step) / (10 + self.step))

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
            decay = self._ema_decay()
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
        so all ranks stop at the same step with the same learning rate schedule.
        """
        tc = self.cfg.train
        total, budget = self.total_steps, None if tc.epochs is not None else tc.minutes * 60
        start_step, t0, since_log = (
            self.step,
            time.perf_counter() - self.elapsed,
            time.perf_counter(),
        )
        losses: list[float] = []
        pending: list[tuple[int, torch.Tensor]] = []  # losses not read back from the device yet
        bar = tqdm(
            total=total if total is not None else int(budget),
            initial=self.step if total is not None else int(self.elapsed),
            unit="step" if total is not None else "s",
            desc=f"train {self.data.name}",
            disable=not self.progress or not self.accelerator.is_main_process,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        loss = float("nan")
        try:
            while True:
                self.elapsed = time.perf_counter() - t0
                done = self.step >= total if total is not None else self.elapsed >= budget
                stop = (
                    done
                    or (stop_at_step is not None and self.step >= stop_at_step)
                    or (should_stop is not None and should_stop())
                )
                progress = self.step / total if total is not None else self.elapsed / budget
                stop, progress = distributed.from_main_process(
                    [stop, progress], self.device, self.world
                )
                if stop:
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
                    bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{rate:.0f}", step=self.step)
                    losses, since_log = [], now
                if total is not None:
                    bar.update(1)
                else:
                    bar.update(int(time.perf_counter() - t0) - bar.n)
                if self.step % tc.checkpoint_every == 0:
                    self.elapsed = time.perf_counter() - t0
                    self.save_checkpoint()
            losses += self._settle(pending)
            loss = losses[-1] if losses else loss
        finally:
            bar.close()
        self.elapsed = time.perf_counter() - t0
        if self.step != self.last_checkpoint or not (self.run_dir / ckpt.WEIGHTS).exists():
            self.save_checkpoint()
        self.accelerator.wait_for_everyone()  # the run folder is complete when any rank returns
        steps = self.step - start_step
        run_seconds = max(self.elapsed, 1e-9)
        return TrainResult(
            self.run_dir, self.step, run_seconds, steps * tc.batch_size / run_seconds, loss
        )


def train(
    cfg: RunConfig,
    out: str | Path,
    device: str = "auto",
    resume: bool = False,
    progress: bool = True,
    stop_at_step: int | None = None,
) -> TrainResult:
    """Train ``cfg`` into the run folder ``out`` (or resume the run there)."""
    out = Path(out)
    if not resume and out.exists() and (out / ckpt.TRAIN_STATE).exists():
        raise UsageError(
            f"--out {out}: already holds a run; pass --resume to continue it or choose another --out"
        )
    if not out.parent.exists():
        raise UsageError(f"--out {out}: folder {out.parent} does not exist")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file, not a folder")
    main, fresh = distributed.is_main_process(), not out.exists()
    if not resume:
        out.mkdir(exist_ok=True)  # the run folder's lock lives in it: one training per run
    try:
        with folder_lock(out) if main and out.is_dir() else contextlib.nullcontext():
            trainer = Trainer(cfg, out, device=device, resume=resume, progress=progress)
            return trainer.fit(stop_at_step=stop_at_step)
    finally:
        if main and fresh and out.is_dir() and {p.name for p in out.iterdir()} <= {LOCK_FILE}:
            shutil.rmtree(out, ignore_errors=True)  # refused before anything was written
