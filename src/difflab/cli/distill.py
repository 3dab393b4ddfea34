"""``difflab distill``: a run distilled into a student that samples in 1, 2 or 4 steps.

Builds the :class:`~difflab.config.DistillConfig` from the options given (its defaults and
checks live there), calls :func:`difflab.ddpm.distill.distill` and prints one summary line.
"""

from __future__ import annotations

import argparse

from difflab.cli.args import add_device, build, command, default
from difflab.config import DistillConfig
from difflab.devices import resolve_device


def add(sub) -> None:
    p = command(sub, "distill", "distil a run into a few-step student run (progressive "
                "distillation, guidance folded in, then an adversarial round)", _distill)  # fmt: skip
    p.add_argument("teacher", metavar="TEACHER", help="the run folder to distil")
    p.add_argument("--steps", type=int, required=True,
                   help="the student's sampling steps (network passes per image): 1, 2 or 4")  # fmt: skip
    p.add_argument("--teacher-steps", type=int, help="DDIM steps of the guided teacher that "
                   "the first round matches: --steps times a power of two (default "
                   "max(4, 2 x --steps)); each round halves them")  # fmt: skip
    p.add_argument("--guidance", type=float, dest="teacher_guidance",
                   help="the guidance scale s folded into the student (default: the teacher's)")  # fmt: skip
    p.add_argument("--minutes", type=float, help="budget of all rounds together (default "
                   f"{default(DistillConfig, 'minutes')})")  # fmt: skip
    p.add_argument("--adversarial", type=float, help="share of --minutes (or one round of "
                   "--round-steps) for a last, adversarial round against a critic of real "
                   f"images (default {default(DistillConfig, 'adversarial')}; 0: progressive only)")  # fmt: skip
    p.add_argument("--round-steps", type=int,
                   help="optimizer steps per round instead of a time budget (wins over --minutes)")  # fmt: skip
    p.add_argument("--batch-size", type=int, help=f"default {default(DistillConfig, 'batch_size')}")  # fmt: skip
    p.add_argument("--lr", type=float, help=f"Adam, annealed to 0 within each round (default "
                   f"{default(DistillConfig, 'lr')})")  # fmt: skip
    p.add_argument("--seed", type=int, help=f"default {default(DistillConfig, 'seed')}")
    p.add_argument("--mixed-precision", help="the network passes' precision: bf16 (autocast), "
                   "no (fp32) or auto (the default: bf16 on CUDA; on a CPU whichever measured "
                   "faster for a training step there, as train does)")  # fmt: skip
    add_device(p)
    p.add_argument("--out", required=True, help="the student's run folder, e.g. runs/NAME-k1")
    p.add_argument("--resume", action="store_true", default=False,
                   help="continue the distillation in --out exactly")  # fmt: skip


def _distill(args: argparse.Namespace) -> None:
    from difflab.ddpm.distill import distill

    dc = build(DistillConfig, args)
    r = distill(dc, args.out, device=resolve_device(args.device), resume=args.resume)
    rounds = f"{r.rounds} progressive round(s)" + (
        " and an adversarial one" if dc.adversarial else ""
    )
    print(f"wrote {r.run_dir}: {dc.steps}-step student after {rounds}, "
          f"{r.steps} steps in {r.seconds:.0f} s ({r.precision}), last loss {r.final_loss:.4f}")  # fmt: skip
