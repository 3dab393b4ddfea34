"""Few-step students of a DDPM run: progressive distillation with guidance folded in.

Owns ``difflab distill``: a teacher run becomes a student run that samples in K = 1, 2 or 4
DDIM steps of one network pass each. Progressive distillation (Salimans & Ho 2022,
"Progressive Distillation for Fast Sampling of Diffusion Models", Algorithm 2): the student
starts from the teacher's weights, and each round trains it so that one deterministic DDIM
step from ``t`` to ``t''`` lands where two steps of the round's teacher (``t -> t' -> t''``)
land; the round's student becomes the next round's teacher, so every round halves the steps.
The first round's teacher is the guided one, ``x0 = x0_uncond + s (x0_cond - x0_uncond)``
(with the run's interval, schedule and rescale; with its method cfg++ the teacher's DDIM
steps re-noise with the unconditional eps, Chung et al. 2024), so the student learns the
guided sampler in one conditional pass per step (Meng et al. 2023, "On Distillation of Guided Diffusion Models",
with s fixed rather than an input). The target ``x~`` is the paper's and its loss is weighted
by ``1 + SNR(t)`` (the paper's "SNR+1" weighting, which is the v-prediction loss); a student
of an eps teacher predicts v instead, which stays well-posed at one step. Everything is a
resumable run folder: the draws of step n come from ``(seed, n)``, the time of each round is
kept in the train state, and the student's ``config.json`` (its sample defaults set to DDIM
at the current round's steps with s = 1) records the teacher's path, hash and guidance.

By default a last, adversarial round follows (:mod:`difflab.ddpm.adversarial`); its critic
and the critic's optimizer are in the train state, so a resume is exact there too. The
network passes (teacher, student and critic) run under ``distill.mixed_precision``'s
autocast, ``auto`` as in training: bf16 where a training step measured faster on this CPU
(1.25-1.35x more updates per second than fp32 on a Zen 5 EPYC); the arithmetic of the
targets and losses stays float32, and Adam is the fused one. The step math lives in
:mod:`difflab.ddpm.distill_steps`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from difflab import runfolder
from difflab.config import DistillConfig, RunConfig, option_name
from difflab.ddpm import runs as ckpt
from difflab.ddpm.adversarial import STUDENT_LR, adversarial_step, make_critic
from difflab.ddpm.data import load_dataset
from difflab.ddpm.diffusion import GaussianDiffusion
from difflab.ddpm.distill_steps import (
    ddim_step,
    distillation_target,
    guided_x0,
    student_config,
    teacher_grid,
)
from difflab.ddpm.guidance import guidance_weight, sigmas
from difflab.devices import auto_mixed_precision, fused_optimizer
from difflab.errors import UsageError
from difflab.files import append_jsonl, file_sha256

# the options a resume may not change, with the names the command line gives them
FIXED = {"teacher": "TEACHER", **{k: option_name("distill", k) for k in (
    "steps", "teacher_steps", "teacher_guidance", "round_steps", "batch_size", "lr", "seed",
    "adversarial", "mixed_precision")}}  # fmt: skip


@dataclass
class DistillResult:
    run_dir: Path
    steps: int  # optimizer steps over all rounds
    rounds: int
    seconds: float
    final_loss: float
    precision: str = "fp32"  # the network passes': fp32 or bf16 (autocast)


def check_teacher(teacher: str | Path) -> Path:
    """The teacher's run folder; anything else is one line naming TEACHER."""
    try:
        return ckpt.check_run_dir(teacher)
    except UsageError as e:
        raise UsageError("TEACHER" + str(e).removeprefix("RUN")) from None


class Distiller:
    """One distillation into ``out``: the data, the round's teacher and student, the loop."""

    def __init__(self, dc: DistillConfig, out: str | Path, device: str = "cpu",
                 resume: bool = False, progress: bool = True) -> None:  # fmt: skip
        self.out, self.progress, self.device = Path(out), progress, torch.device(device)
        teacher_dir = check_teacher(dc.teacher)
        t_cfg = RunConfig.load(teacher_dir / ckpt.CONFIG)
        if t_cfg.distill is not None:
            raise UsageError(
                f"TEACHER {dc.teacher}: is itself a distilled student; distil its teacher"
            )
        if dc.teacher_steps > t_cfg.diffusion.timesteps:
            raise UsageError(
                f"--teacher-steps {dc.teacher_steps}: the teacher has only "
                f"{t_cfg.diffusion.timesteps} timesteps"
            )
        guidance = t_cfg.sample.guidance if dc.teacher_guidance is None else dc.teacher_guidance
        sha = file_sha256(teacher_dir / ckpt.WEIGHTS)
        dc = replace(dc, teacher=str(teacher_dir.resolve()), teacher_guidance=guidance,
                     teacher_sha256=sha)  # fmt: skip
        if resume:
            dc = self._check_resume(dc)
        self.dc, self.t_cfg = dc, t_cfg
        mp = dc.mixed_precision  # resolved once the teacher and the options are known good
        mp = auto_mixed_precision(str(self.device)) if mp == "auto" else mp
        self.precision = "bf16" if mp == "bf16" else "fp32"
        self.data = load_dataset(t_cfg.train.dataset, "train", t_cfg.train.data_dir)
        self.images = self.data.images.to(self.device)  # uint8 (N, C, H, W)
        self.labels = self.data.labels.to(self.device)
        self.cfg = student_config(t_cfg, dc, self.student_steps(0))
        self.t_diffusion = GaussianDiffusion(t_cfg.diffusion, warn=False)
        self.diffusion = GaussianDiffusion(self.cfg.diffusion, warn=False)
        self.abar = torch.cat([self.diffusion.buf("alphas_cumprod", self.device),
                               torch.ones(1, device=self.device)])  # fmt: skip  # [-1]: x_0
        self.scales = self._guidance_scales(t_cfg, guidance)
        self.teacher, _, _ = ckpt.load_run(teacher_dir, device=self.device)
        self.teacher.requires_grad_(False)
        self.student = copy.deepcopy(self.teacher).requires_grad_(True).train()
        self.round, self.round_step, self.round_elapsed, self.step = 0, 0, 0.0, 0
        self.elapsed = 0.0  # seconds of optimizer steps, all rounds
        self.optimizer = self._optimizer()
        self.phases = dc.rounds + (1 if dc.adversarial > 0 else 0)  # the rounds, adversarial last
        m = t_cfg.model
        self.critic, self.critic_optimizer = make_critic(
            m.in_channels, m.num_classes, dc.seed, self.device
        )
        self.critic_loss = float("nan")
        self.notes: list[str] = []
        if resume:
            self._load_state()
        else:
            runfolder.clean_folder(self.out)
            ckpt.save_config(self.cfg, self.out)
            (self.out / ckpt.METRICS).unlink(missing_ok=True)

    # -- set-up ---------------------------------------------------------------------------
    def student_steps(self, round_: int) -> int:
        """N, the sampling steps of round ``round_``'s student (the teacher takes 2N)."""
        return max(self.dc.teacher_steps >> (round_ + 1), self.dc.steps)

    def _guidance_scales(self, t_cfg: RunConfig, s: float) -> torch.Tensor:
        """(T,) the first teacher's scale at each timestep (the run's interval and schedule)."""
        sc, T = t_cfg.sample, t_cfg.diffusion.timesteps
        sig = sigmas(self.t_diffusion.alphas_cumprod) if sc.guidance_interval else [0.0] * T
        w = [guidance_weight(t, T, sig[t], sc.guidance_interval, sc.guidance_schedule)
             for t in range(T)]  # fmt: skip
        return (1 + (s - 1) * torch.tensor(w, dtype=torch.float32)).to(self.device)

    @property
    def adversarial_round(self) -> bool:
        return self.round >= self.dc.rounds

    def _optimizer(self) -> torch.optim.Optimizer:
        fused = fused_optimizer(self.device)
        if self.adversarial_round:  # betas as usual for adversarial training
            return torch.optim.Adam(self.student.parameters(), lr=STUDENT_LR, betas=(0.0, 0.99),
                                    **fused)  # fmt: skip
        return torch.optim.Adam(self.student.parameters(), lr=self.dc.lr, **fused)

    def autocast(self) -> torch.autocast:
        """The network passes' precision: bf16 autocast, or none (fp32)."""
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.precision == "bf16")

    def _student_x0(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            out = self.student(z, t, y)
        return self.diffusion.eps_x0_from_output(out.float(), z, t)[1]

    def round_seconds(self, round_: int) -> float:
        """Round ``round_``'s --minutes: the adversarial share, else an even part of the rest."""
        dc, share = self.dc, self.dc.adversarial
        if round_ >= dc.rounds:
            return dc.minutes * 60 * share
        return dc.minutes * 60 * (1 - share) / dc.rounds

    def _check_resume(self, dc: DistillConfig) -> DistillConfig:
        """The saved record, which the options given may not contradict (--minutes may change)."""
        if not (self.out / ckpt.CONFIG).is_file():
            raise UsageError(f"--resume: {self.out} holds no distillation to resume")
        saved = RunConfig.load(self.out / ckpt.CONFIG).distill
        if saved is None:
            raise UsageError(f"--resume: {self.out} is a trained run, not a distilled student")
        mine = asdict(dc)
        for name, option in FIXED.items():
            if getattr(saved, name) != mine[name]:
                raise UsageError(
                    f"--resume: {option} is {runfolder.show(mine[name])} here but "
                    f"{runfolder.show(getattr(saved, name))} in {self.out}; resume with the "
                    "student's options (only --minutes may change) or choose another --out"
                )
        if saved.teacher_sha256 != dc.teacher_sha256:
            raise UsageError(
                f"TEACHER {dc.teacher}: its weights changed since {self.out} was started from "
                "them; distil into another --out"
            )
        return replace(saved, minutes=dc.minutes)

    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step, "round": self.round, "round_step": self.round_step,
            "round_elapsed": self.round_elapsed, "elapsed": self.elapsed, "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict() if self.round > 0 else {},
            "optimizer": self.optimizer.state_dict(),
            "critic": self.critic.state_dict(), "critic_optimizer": self.critic_optimizer.state_dict(),
        }  # fmt: skip

    def _load_state(self) -> None:
        state = ckpt.load_train_state(self.out)
        try:
            self.student.load_state_dict(state["student"])
            self.round = int(state["round"])
            if self.round > 0:
                self.teacher.load_state_dict(state["teacher"])
            self.optimizer = self._optimizer()  # of the round resumed in
            self.optimizer.load_state_dict(state["optimizer"])
            self.critic.load_state_dict(state["critic"])
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            why = next(iter(str(e).strip().splitlines()), type(e).__name__)[:160]
            raise UsageError(
                f"--resume: {self.out / ckpt.TRAIN_STATE} does not fit ({why})"
            ) from None
        self.step, self.round = int(state["step"]), int(state["round"])
        self.round_step, self.round_elapsed = (
            int(state["round_step"]),
            float(state["round_elapsed"]),
        )
        self.elapsed = float(state["elapsed"])
        self.cfg = student_config(self.t_cfg, self.dc, self.student_steps(self.round))
        runfolder.clean_folder(self.out)
        runfolder.trim_metrics(self.out, self.step)
        ckpt.save_config(self.cfg, self.out)  # with the --minutes given now
        if not runfolder.weights_match(state, self.out / ckpt.WEIGHTS):
            self.notes.append(runfolder.mismatch_note(self.out, ckpt.WEIGHTS, self.step))
            self.save_checkpoint()

    def save_checkpoint(self) -> None:
        meta = {"step": self.step, "round": self.round, "student_steps": self.cfg.sample.steps,
                "dataset": self.data.name}  # fmt: skip
        ckpt.save_checkpoint(self.out, self.student, self._state(), meta)

    # -- one step (Salimans & Ho 2022, Algorithm 2) ----------------------------------------
    def _teacher_x0(
        self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The round teacher's (guided in the first round) x_0 and re-noising eps from z_t."""
        diffusion = self.t_diffusion if self.round == 0 else self.diffusion
        s = self.scales[t] if self.round == 0 else None  # (B,)
        with self.autocast():
            return guided_x0(self.teacher, diffusion, z, t, y, s, self.t_cfg.sample)

    def loss(self, step: int) -> torch.Tensor:
        """The distillation loss of step ``step``; its draws come from ``(seed, step)``."""
        if self.adversarial_round:
            return self.adversarial_loss(step)
        dc, n = self.dc, self.student_steps(self.round)
        g = runfolder.step_generator(dc.seed, step, self.device)
        idx = torch.randint(0, len(self.images), (dc.batch_size,), generator=g, device=g.device)
        i = torch.randint(0, n, (dc.batch_size,), generator=g, device=g.device)
        x = self.images[idx].float().div_(127.5).sub_(1.0)  # (B, C, H, W) in [-1, 1]
        noise = torch.randn(x.shape, generator=g, device=g.device)
        y = self.labels[idx]
        grid = teacher_grid(self.diffusion.num_timesteps, n).to(self.device)
        t, t1, t2 = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]  # t, t' and t'' of the paper
        z = self.diffusion.q_sample(x, t, noise)
        with torch.no_grad():  # two teacher steps t -> t' -> t''
            x0, eps = self._teacher_x0(z, t, y)
            z1 = ddim_step(self.abar, z, x0, t, t1, eps)
            x0, eps = self._teacher_x0(z1, t1, y)
            z2 = ddim_step(self.abar, z1, x0, t1, t2, eps)
        a, a2 = self.abar[t].view(-1, 1, 1, 1), self.abar[t2].view(-1, 1, 1, 1)
        x_target = distillation_target(z, z2, a, a2)
        x_hat = self._student_x0(z, t, y)
        per_item = (x_hat - x_target).pow(2).flatten(1).mean(1)
        return (per_item / (1 - a.flatten())).mean()  # weight 1 + SNR(t) = 1 / (1 - abar_t)

    def adversarial_loss(self, step: int) -> torch.Tensor:
        """A critic update, then the student's loss of step ``step``; draws from (seed, step)."""
        dc, n, b = self.dc, self.student_steps(self.round), self.dc.batch_size
        g = runfolder.step_generator(dc.seed, step, self.device)
        idx = torch.randint(0, len(self.images), (2, b), generator=g, device=g.device)
        i = torch.randint(0, n, (b,), generator=g, device=g.device)
        x, real = (self.images[j].float().div_(127.5).sub_(1.0) for j in idx)  # (B, C, H, W)
        noise = torch.randn(x.shape, generator=g, device=g.device)
        y, y_real = self.labels[idx[0]], self.labels[idx[1]]
        t = teacher_grid(self.diffusion.num_timesteps, n).to(self.device)[2 * i]
        z = self.diffusion.q_sample(x, t, noise)
        x_hat = self._student_x0(z, t, y)
        with torch.no_grad(), self.autocast():
            anchor = self.teacher(z, t, y)
        anchor = self.diffusion.eps_x0_from_output(anchor.float(), z, t)[1]
        with self.autocast():  # the critic's passes too
            loss, self.critic_loss = adversarial_step(self.critic, self.critic_optimizer, x_hat,
                                                      anchor, y, real, y_real)  # fmt: skip
        return loss

    # -- the loop ---------------------------------------------------------------------------
    def round_progress(self) -> float:
        dc = self.dc
        if dc.round_steps is not None:
            return self.round_step / dc.round_steps
        return self.round_elapsed / self.round_seconds(self.round)

    def _done(self) -> int:
        """Where the progress bar stands: steps, or seconds of the rounds' budgets."""
        dc = self.dc
        if dc.round_steps is not None:
            return self.step
        return int(sum(self.round_seconds(r) for r in range(self.round)) + self.round_elapsed)

    def _next_round(self) -> None:
        """The round's student becomes the teacher of the next, which halves the steps."""
        self.round += 1
        self.round_step, self.round_elapsed = 0, 0.0
        if self.round < self.phases:
            self.teacher = copy.deepcopy(self.student).requires_grad_(False).eval()
            self.optimizer = self._optimizer()
            self.cfg = student_config(self.t_cfg, self.dc, self.student_steps(self.round))
            ckpt.save_config(self.cfg, self.out)
        self.save_checkpoint()

    def fit(self, stop_at_step: int | None = None,
            should_stop: Callable[[], bool] | None = None) -> DistillResult:  # fmt: skip
        dc = self.dc
        total = self.phases * dc.round_steps if dc.round_steps is not None else int(dc.minutes * 60)
        adversarial = " +adversarial" if dc.adversarial else ""
        what = f"distill {dc.teacher_steps}->{dc.steps}{adversarial}, {self.precision}"
        bar = runfolder.progress_bar(total, self._done(), what,
                                     "step" if dc.round_steps else "s", self.progress)  # fmt: skip
        losses, loss, start, t_start = [], float("nan"), self.step, time.perf_counter()
        lr = dc.lr
        with runfolder.stop_on_signals() as signalled:
            try:
                while self.round < self.phases:
                    if (
                        signalled
                        or (stop_at_step is not None and self.step >= stop_at_step)
                        or (should_stop and should_stop())
                    ):
                        break
                    progress = self.round_progress()
                    if progress >= 1:
                        self._next_round()
                        continue
                    lr = (STUDENT_LR if self.adversarial_round else dc.lr) * (1 - progress)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    t0 = time.perf_counter()
                    value = self.loss(self.step)
                    value.backward()
                    torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    losses.append(float(value.detach()))
                    if not torch.isfinite(value):
                        raise runfolder.TrainingDiverged(
                            f"loss became {float(value)} at step {self.step}; stopped. {self.out} "
                            "keeps its last checkpoint. Try a lower --lr"
                        )
                    dt = time.perf_counter() - t0
                    self.step, self.round_step = self.step + 1, self.round_step + 1
                    self.round_elapsed, self.elapsed = self.round_elapsed + dt, self.elapsed + dt
                    if self.step % dc.log_every == 0:
                        loss = self._log(losses, lr)
                        bar.set_postfix(round=f"{self.round + 1}/{self.phases}", loss=f"{loss:.4f}")
                        losses = []
                    bar.update(self._done() - bar.n)
                    if self.step % dc.checkpoint_every == 0:
                        self.save_checkpoint()
            finally:
                bar.close()
            if losses:
                loss = self._log(losses, lr)
            if self.round < self.phases or not (self.out / ckpt.WEIGHTS).exists():
                self.save_checkpoint()
        if signalled:
            length = f"--minutes {dc.minutes:g}" if dc.round_steps is None else ""
            raise signalled.interrupted(
                self.step, self.out,
                f"difflab distill {dc.teacher} --steps {dc.steps} --resume --out {self.out} {length}".strip(),
            )  # fmt: skip
        seconds = time.perf_counter() - t_start
        return DistillResult(self.out, self.step - start, dc.rounds, seconds, loss, self.precision)

    def _log(self, losses: list[float], lr: float) -> float:
        row = {
            "step": self.step, "round": self.round + 1 if self.round < self.phases else self.round,
            "student_steps": self.cfg.sample.steps,
            "epoch": round(self.step * self.dc.batch_size / len(self.images), 4),
            "loss": sum(losses) / len(losses), "lr": lr,
            "images_per_s": round(self.dc.batch_size * self.step / max(self.elapsed, 1e-9), 1),
            "elapsed_s": round(self.elapsed, 2),
        }  # fmt: skip
        if self.adversarial_round and self.round < self.phases:
            row["critic_loss"] = self.critic_loss  # of the step's critic update
        append_jsonl(self.out / ckpt.METRICS, row)
        return row["loss"]


def distill(
    dc: DistillConfig,
    out: str | Path,
    device: str = "cpu",
    resume: bool = False,
    progress: bool = True,
    stop_at_step: int | None = None,
    on_note: Callable[[str], None] | None = None,
) -> DistillResult:
    """Distil ``dc.teacher`` into the student run folder ``out`` (or resume the one there)."""
    out = Path(out)
    check_teacher(dc.teacher)
    if not resume and out.exists():
        raise UsageError(
            f"--out {out}: already exists; pass --resume to continue it or choose another --out"
        )
    with runfolder.held(out, create=not resume):
        d = Distiller(dc, out, device=device, resume=resume, progress=progress)
        for note in d.notes:
            (on_note or print)(note)
        return d.fit(stop_at_step=stop_at_step)
