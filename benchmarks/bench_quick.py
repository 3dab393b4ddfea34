"""Speed and quality of the ``quick`` preset on ``mnist5k``, beside denoising-diffusion-pytorch.

For each training budget (``--minutes 2,5``) this trains the quick preset from scratch on the
CPU, then draws ``--n-per-class`` samples of every class and reports: training images/s,
sampling images/s, the reference classifier's conditional accuracy, and the Fréchet distance
on its features to the test split beside the real-vs-real floor (train vs test split).
With ``--baseline`` it trains lucidrains' classifier-free-guidance DDPM
(``denoising_diffusion_pytorch.classifier_free_guidance``) on the same data for the same time
and measures it the same way. Prints a Markdown table; ``--json FILE`` saves the rows.

    python benchmarks/bench_quick.py --minutes 2,5 --baseline
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from difflab.config import get_preset
from difflab.ddpm.data import load_dataset
from difflab.ddpm.generate import sample_labels
from difflab.ddpm.runs import load_run
from difflab.ddpm.training import train
from difflab.evaluation.during_training import TrainingEvaluator
from difflab.evaluation.evaluate import evaluate_samples


def bench_ours(minutes: float, args, workdir: Path) -> dict:
    cfg = get_preset("quick")
    cfg = replace(cfg, train=replace(cfg.train, minutes=minutes, epochs=None, seed=args.seed))
    if args.set:
        cfg = cfg.override(args.set)
    run = workdir / f"ours-{minutes:g}min"
    result = train(
        cfg, run, device="cpu", progress=not args.quiet, make_evaluator=TrainingEvaluator
    )
    model, diffusion, cfg = load_run(run)
    sc = cfg.sample
    sampler, steps = args.sampler or sc.sampler, args.steps or sc.steps
    guidance = sc.guidance if args.guidance is None else args.guidance
    labels = torch.arange(10).repeat_interleave(args.n_per_class)
    t0 = time.perf_counter()
    images = sample_labels(
        model, diffusion, labels, guidance=guidance, steps=steps, sampler=sampler,
        spacing=sc.spacing, seed=args.seed, batch_size=args.batch, progress=not args.quiet,
        guidance_interval=sc.guidance_interval if args.guidance is None else None,
    )  # fmt: skip
    sample_s = time.perf_counter() - t0
    m = evaluate_samples(images, labels, "mnist5k")
    return {
        "model": "difflab quick",
        "minutes": minutes,
        "train_s": result.seconds,
        "train_steps": result.steps,
        "train_img_s": result.images_per_s,
        "params": model.num_parameters(),
        "sampler": f"{sampler} {steps}, s={guidance:g}",
        "sample_s": sample_s,
        "sample_img_s": labels.numel() / sample_s,
        **{
            k: m[k]
            for k in ("accuracy", "fd", "fd_floor", "fd_ratio", "diversity", "diversity_real")
        },
        "run": str(run),
        "n_per_class": args.n_per_class,
    }


def bench_baseline(minutes: float, args) -> dict:
    from denoising_diffusion_pytorch.classifier_free_guidance import GaussianDiffusion, Unet
    from ema_pytorch import EMA

    torch.manual_seed(args.seed)
    data = load_dataset("mnist5k", "train")
    x_all = data.images.float() / 255.0  # their model normalises [0, 1] -> [-1, 1] itself
    y_all = data.labels
    net = Unet(
        dim=args.baseline_dim, dim_mults=(1, 2, 4), channels=1, num_classes=10, cond_drop_prob=0.1
    )
    steps = args.baseline_steps
    diffusion = GaussianDiffusion(
        net, image_size=28, timesteps=1000, sampling_timesteps=steps, ddim_sampling_eta=0.0
    )
    ema = EMA(diffusion, beta=0.995, update_every=1, update_after_step=50)
    opt = torch.optim.Adam(diffusion.parameters(), lr=args.baseline_lr)
    t0, n_steps, bs = time.perf_counter(), 0, 128
    while time.perf_counter() - t0 < minutes * 60:
        idx = torch.randint(0, len(data), (bs,))
        loss = diffusion(x_all[idx], classes=y_all[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
        ema.update()
        n_steps += 1
        if not args.quiet and n_steps % 50 == 0:
            print(f"  baseline step {n_steps} loss {loss.item():.4f}", file=sys.stderr)
    train_s = time.perf_counter() - t0
    model = ema.ema_model.eval()
    guidance = 2.0 if args.guidance is None else args.guidance
    labels = torch.arange(10).repeat_interleave(args.n_per_class)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = [
            model.sample(classes=c, cond_scale=guidance, rescaled_phi=0.0)
            for c in labels.split(args.batch)
        ]
    sample_s = time.perf_counter() - t0
    images = torch.cat(out) * 2 - 1
    m = evaluate_samples(images, labels, "mnist5k")
    return {
        "model": "denoising-diffusion-pytorch cfg",
        "minutes": minutes,
        "train_s": train_s,
        "train_steps": n_steps,
        "train_img_s": n_steps * bs / train_s,
        "params": sum(p.numel() for p in net.parameters()),
        "sampler": f"ddim {steps}, s={guidance:g}",
        "n_per_class": args.n_per_class,
        "sample_s": sample_s,
        "sample_img_s": labels.numel() / sample_s,
        **{
            k: m[k]
            for k in ("accuracy", "fd", "fd_floor", "fd_ratio", "diversity", "diversity_real")
        },
    }


def table(rows: list[dict]) -> str:
    head = "| model | train budget | steps | train img/s | params | sampler | 1,000 samples | accuracy | FD | floor | FD / floor |"
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        per_1000 = r["sample_s"] * 1000 / (10 * r["n_per_class"])
        lines.append(
            f"| {r['model']} | {r['minutes']:g} min | {r['train_steps']} | {r['train_img_s']:.0f} | "
            f"{r['params'] / 1e6:.2f} M | {r['sampler']} | {per_1000:.1f} s | {r['accuracy']:.1%} | "
            f"{r['fd']:.2f} | {r['fd_floor']:.2f} | {r['fd_ratio']:.1f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--minutes", default="2,5", help="comma-separated training budgets")
    p.add_argument("--n-per-class", type=int, default=100)
    p.add_argument("--sampler")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--batch", type=int, default=500, help="sampling batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--set", action="append", default=[], help="override the quick preset (SECTION.KEY=VALUE)"
    )
    p.add_argument("--baseline", action="store_true", help="also train denoising-diffusion-pytorch")
    p.add_argument("--baseline-only", action="store_true")
    p.add_argument("--baseline-dim", type=int, default=32)
    p.add_argument("--baseline-lr", type=float, default=1e-3)
    p.add_argument("--baseline-steps", type=int, default=50, help="DDIM steps of the baseline")
    p.add_argument("--workdir", help="keep the runs here (default: a temporary folder)")
    p.add_argument("--json", help="append the rows to this JSON-lines file")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    budgets = [float(m) for m in args.minutes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for minutes in budgets:
            if not args.baseline_only:
                rows.append(bench_ours(minutes, args, workdir))
                print(table(rows[-1:]), flush=True)
            if args.baseline or args.baseline_only:
                rows.append(bench_baseline(minutes, args))
                print(table(rows[-1:]), flush=True)
    for r in rows:
        r["overrides"] = args.set
        r["machine"] = (
            f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        )
        r["date"] = time.strftime("%Y-%m-%d")
    print()
    print(table(rows))
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
