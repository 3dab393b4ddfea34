"""``difflab train``, ``sample``, ``eval``, ``forward``, ``reverse`` and ``plot``: the DDPM lab.

Each command builds its options object (:mod:`difflab.options`), calls one library function
and prints one summary line; every default and check lives in the options object.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from difflab.cli.args import (
    add_device,
    add_guidance_shape,
    add_precision,
    add_trust_pickle,
    build,
    command,
    default,
)
from difflab.devices import resolve_device
from difflab.errors import UsageError
from difflab.options import EvalOptions, ForwardOptions, ReverseOptions, SampleOptions

T_HELP = "comma-separated t in 0..T: integers or expressions like T, T/2, 3T/4"


def add(sub) -> None:
    for add_one in (_add_train, _add_sample, _add_eval, _add_forward, _add_reverse, _add_plot):
        add_one(sub)


# -- train ----------------------------------------------------------------------------------
def _add_train(sub) -> None:
    p = command(sub, "train", "train a class-conditional DDPM into a run folder", _train)
    p.add_argument("--preset", default="quick",
                   help="quick (CPU, minutes), paper (GPU, MNIST) or cifar10 (GPU)")  # fmt: skip
    p.add_argument(
        "--dataset", help="mnist5k, digits, mnist, fashion-mnist, cifar10 or folder:PATH"
    )
    p.add_argument("--data-dir", help="where torchvision datasets live (default ./data)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=float, help="passes over the training split")
    g.add_argument("--minutes", type=float,
                   help="wall-clock training budget (evaluations are not counted)")  # fmt: skip
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    add_device(p)
    p.add_argument("--out", required=True, help="run folder, e.g. runs/NAME")
    p.add_argument("--resume", action="store_true", default=False,
                   help="continue the run in --out exactly")  # fmt: skip
    p.add_argument(
        "--init-from", metavar="RUN", help="start from another run's weights (fine-tuning)"
    )
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any option")  # fmt: skip
    _add_train_watching(p)


def _add_train_watching(p: argparse.ArgumentParser) -> None:
    """Quality during training, best weights, snapshots and trackers (ddpm.training_hooks)."""
    from difflab.config import EVAL_EVERY

    p.add_argument("--eval-every", type=int, nargs="?", const=EVAL_EVERY, metavar="N",
                   help="evaluate the EMA weights every N steps (accuracy, FD/KID against the "
                   f"floor, diversity on fixed noise; alone: every {EVAL_EVERY}); 0: off")  # fmt: skip
    p.add_argument("--eval-every-minutes", type=float, metavar="M",
                   help="evaluate every M minutes of training (the evaluations' own time is "
                   "not counted); 0: off")  # fmt: skip
    p.add_argument("--keep-best", metavar="METRIC",
                   help="keep the EMA weights of the best evaluation in RUN/best.safetensors: "
                   "fd, kid or accuracy")  # fmt: skip
    p.add_argument("--snapshot-every", type=int, metavar="N",
                   help="keep the EMA weights every N steps in RUN/snapshots (at most 50: a "
                   "longer run doubles the interval and drops the ones between)")  # fmt: skip
    p.add_argument("--log-with", metavar="TRACKER",
                   help="also log to tensorboard (RUN/logs) or wandb")  # fmt: skip


def train_config(args: argparse.Namespace):
    """The preset with the options given on the command line applied; on ``--resume``, the
    run's own config, which the options given may not contradict (only the length may change)."""
    from dataclasses import replace

    from difflab.config import RunConfig, get_preset
    from difflab.ddpm.runs import CONFIG

    given = vars(args)
    keys = ("dataset", "data_dir", "batch_size", "lr", "seed", "init_from", "eval_every",
            "eval_every_minutes", "keep_best", "snapshot_every", "log_with")  # fmt: skip
    changes = {k: given[k] for k in keys if k in given}
    length = {}
    if "epochs" in given:
        length = dict(epochs=args.epochs, minutes=None)
    elif "minutes" in given:
        length = dict(minutes=args.minutes, epochs=None)
    saved_path = Path(args.out) / CONFIG
    if args.resume and saved_path.is_file():
        saved = RunConfig.load(saved_path)
        wanted = replace(saved, train=replace(saved.train, **changes))
        wanted = wanted.override(args.set) if args.set else wanted
        check_same_run(saved, wanted, saved_path)
        return replace(saved, train=replace(saved.train, **length)) if length else saved
    cfg = get_preset(args.preset)
    cfg = replace(cfg, train=replace(cfg.train, **changes, **length))
    return cfg.override(args.set) if args.set else cfg


def _fitted_to_data(key: str, saved, wanted) -> bool:
    """Whether a model key of the saved run is what training made of ``wanted`` to fit the
    dataset (its shape and classes; fewer levels or a smaller patch for small images)."""
    if key in ("in_channels", "height", "width", "num_classes", "class_names"):
        return True
    if key == "channel_mults":
        return list(wanted)[: len(saved)] == list(saved)
    return key == "patch_size" and saved <= wanted


def check_same_run(saved, wanted, where: Path) -> None:
    """Refuse, with one line, options given with ``--resume`` that differ from the run's."""
    from difflab.config import option_name

    old, new = saved.to_dict(), wanted.to_dict()
    for section, values in new.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            was = old[section].get(key)
            if section == "model" and _fitted_to_data(key, was, value):
                continue
            if was != value:
                flag = option_name(section, key)
                raise UsageError(
                    f"--resume: {flag} {value!r} differs from the run's {old[section].get(key)!r} "
                    f"({where}); a resumed run keeps its settings, only --epochs, --minutes and "
                    "--device may change (start a new run with --init-from to change others)"
                )


def _train(args: argparse.Namespace) -> None:
    from difflab import distributed
    from difflab.ddpm.training import train
    from difflab.evaluation.during_training import TrainingEvaluator

    cfg = train_config(args)
    result = train(
        cfg, args.out, device=resolve_device(args.device), resume=args.resume,
        on_note=lambda note: print(f"difflab train: note: {note}", file=sys.stderr),
        make_evaluator=TrainingEvaluator,
    )  # fmt: skip
    distributed.shutdown()
    if distributed.is_main_process():  # under torchrun, one line for all processes
        print(
            f"trained {result.steps} steps in {result.seconds:.0f} s "
            f"({result.images_per_s:.0f} images/s, {result.precision}); run folder: {result.run_dir}"
        )
        if result.guidance is not None:
            from difflab.evaluation.guidance_choice import describe

            print(describe(result.guidance))


# -- sample and eval ------------------------------------------------------------------------
def _add_sample(sub) -> None:
    p = command(sub, "sample", "sample a labelled grid (.png) or arrays (.npz) from a run", _sample)  # fmt: skip
    p.add_argument("run")
    p.add_argument("--classes", help="comma-separated class indices (default: all)")
    p.add_argument("--n-per-class",
                   help="samples per class (default 8, or 1 when --cols is not sample)")  # fmt: skip
    _add_sampling(p, ", or a list: 0,1,3", ", or a list: 10,50")
    p.add_argument("--eta", help="DDIM eta (0 deterministic; default: the run's)")
    p.add_argument("--out", required=True, help="FILE.png or FILE.npz")
    add_trust_pickle(p)
    p.add_argument("--rows", help="grid rows: class (default), sample, guidance or steps")
    p.add_argument(
        "--cols", help="grid columns: class, sample, guidance or steps (default: the swept option)"
    )


def _add_sampling(
    p: argparse.ArgumentParser, guidance_list: str = "", steps_list: str = ""
) -> None:
    """What sample and eval share: the sampler's settings (default: the run's), seed, device."""
    p.add_argument("--guidance", help=f"classifier-free guidance scale s (diffusers "
                   f"convention){guidance_list} (default: the run's)")  # fmt: skip
    p.add_argument("--steps", help=f"sampling steps{steps_list} (default: the run's)")
    p.add_argument("--sampler", help="ddpm, ddim, dpm++, unipc or euler (default: the run's)")
    add_guidance_shape(p)
    p.add_argument("--seed", type=int, help=f"default {default(SampleOptions, 'seed')}")
    add_device(p)
    add_precision(p)


def _sample(args: argparse.Namespace) -> None:
    from difflab.ddpm.generate import sample_run

    opts = build(SampleOptions, args)
    r = sample_run(
        args.run, opts, args.out, device=resolve_device(args.device), trust_pickle=args.trust_pickle
    )
    n = r.images.shape[0]
    print(f"wrote {args.out}: {n} samples in {r.seconds:.1f} s ({n / r.seconds:.0f} images/s)")


def _add_eval(sub) -> None:
    p = command(sub, "eval", "conditional accuracy and Frechet distance of a run's samples", _eval)  # fmt: skip
    p.add_argument("--inception", action="store_true",
                   help="also Inception FID/KID (slow on a CPU)")  # fmt: skip
    p.add_argument("run")
    p.add_argument("--n", help=f"samples per class (default {default(EvalOptions, 'n_per_class')})")  # fmt: skip
    _add_sampling(p)


def _eval(args: argparse.Namespace) -> None:
    from difflab.evaluation.evaluate import evaluate_run, format_eval

    opts = build(EvalOptions, args, n_per_class="n")
    print(format_eval(evaluate_run(args.run, opts, device=resolve_device(args.device))))


# -- figures --------------------------------------------------------------------------------
def _add_forward(sub) -> None:
    p = command(sub, "forward", "figure of the forward process: real images dissolving into noise", _forward)  # fmt: skip
    p.add_argument("--dataset", help="images to noise (default: the run's dataset, else mnist5k)")
    p.add_argument("--data-dir", help="where torchvision datasets live (default ./data)")
    p.add_argument("--run", help="use this run's noise schedule (default: linear, T = 1000)")
    p.add_argument("--t", help=f"{T_HELP} (default {default(ForwardOptions, 't')}); columns run from 0 to T")  # fmt: skip
    p.add_argument("--per-class", type=int, help="images per class (rows; default 1, at most 20)")
    p.add_argument("--seed", type=int, help=f"default {default(ForwardOptions, 'seed')}")
    p.add_argument("--out", required=True, help="FILE.png")


def _forward(args: argparse.Namespace) -> None:
    from difflab.ddpm.processes import forward_figure

    r = forward_figure(build(ForwardOptions, args), args.out)
    print(f"wrote {r.path} (t = {', '.join(map(str, r.t))})")


def _add_reverse(sub) -> None:
    p = command(sub, "reverse", "figure of the reverse process: x_t and predicted x_0 per class", _reverse)  # fmt: skip
    p.add_argument("run")
    p.add_argument("--t", help=f"{T_HELP} (default {default(ReverseOptions, 't')}); columns run from T to 0")  # fmt: skip
    p.add_argument("--classes", help="comma-separated class indices (default: all)")
    p.add_argument("--seed", type=int, help=f"default {default(ReverseOptions, 'seed')}")
    p.add_argument("--guidance", help="classifier-free guidance scale s (default: the run's)")
    p.add_argument("--sampler", help=f"ddpm, ddim, dpm++, unipc or euler (default {default(ReverseOptions, 'sampler')})")  # fmt: skip
    p.add_argument("--steps", help="sampling steps (default: all T for ddpm, else the run's)")
    p.add_argument("--eta", help="DDIM eta (0 deterministic; default: the run's)")
    add_device(p)
    p.add_argument("--out", required=True, help="FILE.png")
    p.add_argument(
        "--gif", help="also an animation of every step (at most 120 frames, first and last kept)"
    )
    p.add_argument("--mp4", help="the same animation as an H.264 video")
    add_trust_pickle(p)


def _reverse(args: argparse.Namespace) -> None:
    from difflab.ddpm.processes import reverse_figure

    r = reverse_figure(
        args.run, build(ReverseOptions, args), args.out, gif=getattr(args, "gif", None),
        mp4=getattr(args, "mp4", None), device=resolve_device(args.device),
        trust_pickle=args.trust_pickle,
    )  # fmt: skip
    extra = "".join(f", {p}" for p in r.extra) + (f" ({r.frames} frames)" if r.frames else "")
    print(f"wrote {r.path}{extra} (t = {', '.join(map(str, r.t))})")


def _add_plot(sub) -> None:
    p = command(sub, "plot", "a run's training loss curve and noise schedule diagnostics", _plot)
    p.add_argument("run")
    p.add_argument("--out", default=None, help="folder for loss.png and schedule.png (default RUN/figures)")  # fmt: skip
    add_device(p, "for before_after.png of an --init-from run")


def _plot(args: argparse.Namespace) -> None:
    from difflab.ddpm.processes import plot_run

    r = plot_run(args.run, args.out)
    for note in r.skipped:
        print(f"skipped {note}")
    print("wrote " + ", ".join(map(str, r.written)))
