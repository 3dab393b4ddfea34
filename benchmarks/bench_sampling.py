"""DDPM sampling throughput: images per second through ``sampling.sample_steps``.

    python benchmarks/bench_sampling.py [--run RUN | --preset paper] [--batch 10000]
        [--steps 50] [--sampler ddim] [--guidance 2] [--device cuda] [--modes eager,bf16,...]

Without ``--run`` the preset's model is built with random weights: speed does not depend on
the weights. Each mode samples one warm-up batch, then ``--repeats`` timed batches (the
median is reported); a compiled mode's warm-up includes its compilation, printed apart.

Modes (comma-separated; several combine with ``+``, e.g. ``bf16+compile``):
``eager`` fp32; ``bf16`` autocast; ``cl`` channels-last weights and activations;
``compile`` ``torch.compile`` (default mode); ``graphs`` ``torch.compile`` in
``reduce-overhead`` mode, which replays each step as a CUDA graph on a GPU.
Every mode's images are compared with the eager ones (max |difference| on the [-1, 1]
scale), so a fast mode that changes the pictures shows it.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time

import torch

from difflab.config import get_preset
from difflab.ddpm.diffusion import GaussianDiffusion
from difflab.ddpm.model import ContextUnet
from difflab.ddpm.runs import load_run
from difflab.ddpm.sampling import sample
from difflab.devices import resolve_device

MODES = ("eager", "bf16", "cl", "compile", "graphs")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_modes(text: str) -> list[tuple[str, ...]]:
    modes = []
    for item in text.split(","):
        parts = tuple(p.strip() for p in item.split("+") if p.strip())
        bad = [p for p in parts if p not in MODES]
        if not parts or bad:
            raise ValueError(f"--modes {text!r}: each mode is one of {', '.join(MODES)} or a+b")
        modes.append(parts)
    return modes


def prepared(model: ContextUnet, mode: tuple[str, ...]) -> torch.nn.Module:
    if "cl" in mode:  # on a copy: Module.to() converts in place, and later modes share `model`
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    if "graphs" in mode:
        return torch.compile(model, mode="reduce-overhead")
    if "compile" in mode:
        return torch.compile(model)
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="a run folder (default: the preset's model, random weights)")
    p.add_argument("--preset", default="paper")
    p.add_argument("--batch", type=int, default=10_000, help="images per batch")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--modes", default="eager,bf16,bf16+cl,bf16+compile,bf16+graphs")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    try:
        modes = parse_modes(args.modes)
    except ValueError as e:
        p.error(str(e))  # one line, exit code 2
    device = torch.device(resolve_device(args.device))
    if args.run:
        base, diffusion, cfg = load_run(args.run, device=str(device))
    else:
        cfg = get_preset(args.preset)
        torch.manual_seed(0)
        base, diffusion = ContextUnet(cfg.model), GaussianDiffusion(cfg.diffusion)
        with torch.no_grad():  # the output layer starts at zero: give it something to say
            for p in base.parameters():
                p.add_(0.02 * torch.randn_like(p))
    base = base.to(device).eval()
    labels = torch.arange(args.batch) % base.cfg.num_classes
    params = sum(p.numel() for p in base.parameters())
    print(
        f"{args.run or args.preset + ' preset (random weights)'}: {params / 1e6:.1f} M parameters, "
        f"{base.cfg.height}x{base.cfg.width}x{base.cfg.in_channels}, {args.batch} images per "
        f"batch, {args.sampler} {args.steps} steps, guidance {args.guidance:g}, on {device} "
        f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads), "
        f"median of {args.repeats}\n",
        flush=True,
    )
    rows, reference = [], None
    for mode in modes:
        model = prepared(base, mode)
        autocast = "bf16" if "bf16" in mode else None

        def run(seed: int, model=model, autocast=autocast) -> torch.Tensor:
            return sample(
                model, diffusion, labels, guidance=args.guidance, steps=args.steps,
                sampler=args.sampler, seed=seed, autocast=autocast,
            )  # fmt: skip

        t0 = time.perf_counter()
        try:
            first = run(0)
            _sync(device)
        except Exception as e:  # a compiler missing or failing: report it, go on
            print(f"{'+'.join(mode)}: failed ({type(e).__name__}: {str(e).splitlines()[0]})")
            continue
        warm = time.perf_counter() - t0
        times = []
        for r in range(args.repeats):
            _sync(device)
            t0 = time.perf_counter()
            run(r + 1)
            _sync(device)
            times.append(time.perf_counter() - t0)
        seconds = statistics.median(times)
        if reference is None:
            reference = first.float().cpu()
        diff = (first.float().cpu() - reference).abs().max().item()
        rows.append(("+".join(mode), args.batch / seconds, seconds, warm, diff))
        print(f"{'+'.join(mode)}: {args.batch / seconds:,.0f} images/s", flush=True)
    print("\n| mode | images/s | s per batch | first batch (s) | max abs diff vs first mode |")
    print("|---|---|---|---|---|")
    for name, rate, seconds, warm, diff in rows:
        print(f"| {name} | {rate:,.0f} | {seconds:.3f} | {warm:.1f} | {diff:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
