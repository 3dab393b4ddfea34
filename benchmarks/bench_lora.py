"""Seconds per step and peak memory of ``difflab sd finetune`` (LoRA fine-tuning).

Each variant (``--variants``: ``plain``, ``checkpointing`` = ``--gradient-checkpointing``,
``text-encoder`` = ``--train-text-encoder``, ``ema``) runs in a fresh Python process, so its
peak memory is its own: the peak resident set size of the process (``getrusage``; it includes
Python, torch and the loaded pipeline), the resident size right after loading (psutil, when
installed) and, on a GPU, ``torch.cuda.max_memory_allocated``. The training data are
``--images`` generated pictures at the training resolution; seconds per step are the median
over the steps after ``--warmup``. Prints a Markdown table; ``--json FILE`` saves the rows.

    OMP_NUM_THREADS=1 python benchmarks/bench_lora.py      # tiny random model, CPU, 32 px
    python benchmarks/bench_lora.py --sd15 [--model DIR]   # SD 1.5, 512 px, fp16, needs CUDA
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from difflab.errors import UsageError
from difflab.sd import DEFAULT_MODEL

VARIANTS = {
    "plain": {},
    "checkpointing": {"gradient_checkpointing": True},
    "text-encoder": {"train_text_encoder": True},
    "ema": {"ema": True},
}


def _images(folder: Path, n: int, size: int) -> Path:
    """``n`` smooth random colour fields (size x size), as PNGs."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(folder / f"{i:03d}.png")
    return folder


def _one(args: argparse.Namespace) -> dict:
    """Train one variant in this process and measure it."""
    from difflab.sd.finetune import FinetuneConfig, FineTuner

    with tempfile.TemporaryDirectory() as tmp:
        data = _images(Path(tmp) / "data", args.images, args.resolution)
        config = FinetuneConfig(
            str(data), "a photo of sks texture", rank=args.rank, steps=args.steps, lr=1e-4,
            batch_size=args.batch_size, resolution=args.resolution,
            mixed_precision=args.mixed_precision, checkpoint_every=args.steps, model=args.model,
            **VARIANTS[args.one],
        )  # fmt: skip
        t0 = time.perf_counter()
        tuner = FineTuner(config, Path(tmp) / "run", device=args.device, progress=False)
        load_s = time.perf_counter() - t0
        rss_loaded = _rss_now()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        result = tuner.fit()
        rows = [json.loads(x) for x in (result.out / "metrics.jsonl").read_text().splitlines()]
    per_step = statistics.median(r["seconds_per_step"] for r in rows[args.warmup :])
    return {
        "variant": args.one, "device": str(tuner.device), "load_s": load_s,
        "s_per_step": per_step, "steps_per_s": 1 / per_step,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "rss_after_load_mib": rss_loaded,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "final_loss": result.final_loss,
    }  # fmt: skip


def _rss_now() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss / 2**20


def _fmt(v: float | None, digits: int = 0) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sd15", action="store_true", help="SD 1.5 at 512 px, fp16 (needs CUDA)")
    p.add_argument("--model", help="diffusers folder or Hub id (default: tiny random / SD 1.5)")
    p.add_argument("--resolution", type=int, help="training size (default 32 tiny, 512 SD 1.5)")
    p.add_argument("--mixed-precision", help="no, fp16 or bf16 (default no; fp16 with --sd15)")
    p.add_argument("--variants", default="plain,checkpointing,text-encoder")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the median")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="save the rows here")
    p.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)  # a child process
    args = p.parse_args(argv)
    if args.one:
        try:
            print(json.dumps(_one(args)))
        except UsageError as e:
            print(f"bench_lora: {e}", file=sys.stderr)
            return 2
        return 0
    names = [v.strip() for v in args.variants.split(",")]
    if unknown := [v for v in names if v not in VARIANTS]:
        p.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.sd15 and not torch.cuda.is_available():
        print(
            "bench_lora: --sd15 needs a CUDA GPU (fine-tuning SD 1.5 at 512 px on a CPU takes "
            "minutes per step); none is available here",
            file=sys.stderr,
        )
        return 2
    args.resolution = args.resolution or (512 if args.sd15 else 32)
    args.mixed_precision = args.mixed_precision or ("fp16" if args.sd15 else "no")
    tiny = args.model is None and not args.sd15
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            if args.sd15:
                args.model = DEFAULT_MODEL
            else:
                from difflab.sd.load import quiet_loading
                from difflab.sd.tiny import build_tiny_sd

                with quiet_loading():
                    args.model = str(build_tiny_sd(Path(tmp) / "tiny-sd"))
        rows = []
        for name in names:
            child = [sys.executable, __file__, "--one", name, "--model", args.model,
                     "--resolution", str(args.resolution), "--mixed-precision", args.mixed_precision,
                     "--steps", str(args.steps), "--warmup", str(args.warmup), "--images",
                     str(args.images), "--rank", str(args.rank), "--batch-size",
                     str(args.batch_size), "--device", args.device]  # fmt: skip
            run = subprocess.run(child, capture_output=True, text=True)
            if run.returncode:
                last = (run.stderr.strip().splitlines() or ["(no output)"])[-1]
                print(f"bench_lora: variant {name} failed: {last}", file=sys.stderr)
                return run.returncode
            rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
    label = "tiny random SD (difflab.sd.tiny)" if tiny else args.model
    print(
        f"model {label}, {args.resolution}x{args.resolution}, rank {args.rank}, batch "
        f"{args.batch_size}, {args.images} images, mixed precision {args.mixed_precision}, "
        f"{args.steps} steps (median after {args.warmup}), {rows[0]['device']} "
        f"({platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)\n"
    )
    print(
        "| variant | s/step | steps/s | peak RSS MiB | RSS after load MiB | training adds MiB "
        "| CUDA peak MiB |\n|---|---|---|---|---|---|---|"
    )
    for r in rows:
        loaded = r["rss_after_load_mib"]
        adds = None if loaded is None else r["peak_rss_mib"] - loaded
        print(
            f"| {r['variant']} | {r['s_per_step']:.4f} | {r['steps_per_s']:.1f} | "
            f"{_fmt(r['peak_rss_mib'])} | {_fmt(loaded)} | {_fmt(adds)} | "
            f"{_fmt(r['cuda_peak_mib'])} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
