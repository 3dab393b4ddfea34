"""``difflab sweep``, ``report`` and ``demo``: experiments over runs, and the lab end to end."""

from __future__ import annotations

import argparse

from difflab.cli.args import (
    add_device,
    add_guidance_shape,
    add_precision,
    build,
    command,
    default,
)
from difflab.devices import resolve_device
from difflab.options import DDPMSweepAxes


def add(sub) -> None:
    p = command(sub, "sweep", "resumable sweep of a run over guidance x steps (x sampler x seed x checkpoint), measured", _sweep)  # fmt: skip
    p.add_argument("run")
    for option, name, what in (
        ("--guidance", "guidance", "guidance scales"), ("--steps", "steps", "step counts"),
        ("--sampler", "samplers", "samplers, e.g. ddim,ddpm"),
        ("--seeds", "seeds", "seeds; each has its own shared x_T"),
    ):  # fmt: skip
        p.add_argument(option, help=f"{what} (default {default(DDPMSweepAxes, name)})")
    p.add_argument("--n", "--n-per-class", dest="n",
                   help=f"samples per class per cell (default {default(DDPMSweepAxes, 'n_per_class')}; "
                   "--n-per-class under torchrun, whose own options --n... would swallow --n)")  # fmt: skip
    p.add_argument("--grid-class", help="class shown in the image grid (default 0)")
    p.add_argument("--checkpoints", help="the run's weights as an axis: training steps it kept "
                   "(train --snapshot-every), e.g. 1000,2000, or all (every snapshot and the final "
                   "weights); default: the final weights only, no checkpoint column")  # fmt: skip
    add_guidance_shape(p, "; a comma-separated list sweeps them (default: plain guidance)")
    add_device(p)
    add_precision(p)
    p.add_argument("--out", required=True, help="sweep folder; the same command resumes it")

    p = command(sub, "report", "self-contained HTML report (+ Markdown) of runs and sweeps", _report)  # fmt: skip
    p.add_argument("inputs", nargs="+", metavar="RUN|DIR", help="run folders and sweep folders")
    p.add_argument("--out", default="report.html", help="FILE.html; FILE.md is written beside it")
    p.add_argument("--title", default=None, help="report title")

    p = command(sub, "demo", "the whole DDPM lab on the embedded data, on the CPU", _demo)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--minutes", type=float, default=None,
                   help="training budget (default: the quick preset's)")  # fmt: skip
    add_device(p)


def _sweep(args: argparse.Namespace) -> None:
    from difflab import distributed
    from difflab.experiments.ddpm_sweep import sweep_run

    axes = build(
        DDPMSweepAxes, args, samplers="sampler", n_per_class="n",
        guidance_intervals="guidance_interval", guidance_schedules="guidance_schedule",
        guidance_rescales="guidance_rescale", guidance_methods="guidance_method",
    )  # fmt: skip
    r = sweep_run(args.run, axes, args.out, device=resolve_device(args.device))
    distributed.shutdown()
    if not distributed.is_main_process():  # under torchrun: one summary, from rank 0
        return
    done = r.cells_total - r.cells_run
    print(
        f"sweep {r.out}: {r.cells_run} cells computed in {r.seconds:.0f} s"
        + (f", {done} already done" if done else "")
        + f"; tables metrics.csv, summary.csv, metrics.json; {len(r.figures)} figures"
    )


def _report(args: argparse.Namespace) -> None:
    from difflab.experiments.report import write_report

    r = write_report(args.inputs, args.out, title=args.title)
    print(f"wrote {r.html} and {r.markdown} ({len(r.images)} images)")
    for line in r.conclusions:
        print(f"  - {line}")


def _demo(args: argparse.Namespace) -> None:
    from difflab.experiments.demo import run_demo

    run_demo(args.out, minutes=args.minutes, device=resolve_device(args.device))
