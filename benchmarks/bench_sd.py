"""Seconds per image of ``difflab sd`` beside a plain ``StableDiffusionPipeline`` call.

Loads one pipeline (``--model``; default: the tiny random pipeline of
:mod:`difflab.sd.tiny`, built in a temporary folder; ``--model sd15-shaped``: SD 1.5's
architecture with random weights, :func:`difflab.sd.tiny.build_sd15_shaped`) and times, with
the same prompt, size, steps, guidance, scheduler and seeds: (0) the plain diffusers call
once per image, as a script looping over seeds would, (1) the plain call for all images
``pipe(prompt, generator=[...], output_type="np")``, (2) difflab's pipeline call
(:func:`difflab.sd.generate.run_pipeline`: prompt encoded once, latents drawn per seed on the
CPU), (3) ``difflab sd generate`` end to end (PNG + sidecar writes included, model already
loaded). One warm-up call each, then the median of ``--repeats``. Prints a Markdown table;
``--json FILE`` saves the rows. For SD 1.5 on a GPU:

    python benchmarks/bench_sd.py --model DIR --size 512x512 --steps 50 --device cuda
    python benchmarks/bench_sd.py --model sd15-shaped --steps 50 --device cuda --compile
    OMP_NUM_THREADS=1 python benchmarks/bench_sd.py            # tiny model, CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from difflab.checks import parse_size
from difflab.devices import resolve_device
from difflab.options import SDGeneration, SDPipelineSpec
from difflab.sd.generate import encode, generate, run_pipeline
from difflab.sd.load import load_pipeline
from difflab.sd.tiny import build_sd15_shaped, build_tiny_sd


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        help="Hub id, diffusers folder, or sd15-shaped (default: the tiny random model)",
    )
    p.add_argument("--size", default=None, help="WxH (default 64x64 tiny, 512x512 otherwise)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--n", type=int, default=4, help="images per call")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scheduler", default="euler")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", help="save the rows here")
    p.add_argument("--compile", action="store_true", help="torch.compile difflab's UNet")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "sd15-shaped":
            on_cpu = device == "cpu" and args.dtype in ("auto", "fp32")
            t0 = time.perf_counter()
            model = build_sd15_shaped(
                Path(tmp) / "sd15", torch.float32 if on_cpu else torch.float16, device
            )
            print(f"built SD 1.5's architecture, random weights: {time.perf_counter() - t0:.1f} s")
        else:
            model = args.model or build_tiny_sd(Path(tmp) / "tiny-sd")
        size = args.size or ("64x64" if args.model is None else "512x512")
        w, h = parse_size(size)
        spec = SDPipelineSpec(
            model=str(model),
            device=device,
            dtype=args.dtype,
            scheduler=args.scheduler,
            batch_size=args.n,
        )
        loaded = load_pipeline(spec)
        pipe, prompt, seeds = (
            loaded.pipe,
            "a photograph of an astronaut riding a horse",
            list(range(args.n)),
        )

        def one_by_one():
            for s in seeds:
                pipe(
                    prompt, guidance_scale=args.guidance, num_inference_steps=args.steps, width=w,
                    height=h, generator=torch.Generator().manual_seed(s), output_type="np",
                )  # fmt: skip

        def plain():
            pipe(
                prompt, num_images_per_prompt=args.n, guidance_scale=args.guidance, num_inference_steps=args.steps, width=w,
                height=h, generator=[torch.Generator().manual_seed(s) for s in seeds],
                output_type="np",
            )  # fmt: skip

        def ours():
            run_pipeline(loaded, encode(loaded, prompt, ""), args.guidance, args.steps, seeds, w, h)

        def end_to_end():
            opts = SDGeneration(
                prompt, guidance=args.guidance, steps=args.steps, n=args.n, size=size
            )
            generate(opts, Path(tmp) / "out", spec, loaded=loaded, progress=False)

        rows = []
        cases = [("plain StableDiffusionPipeline call, one image per call", one_by_one),
                 ("plain StableDiffusionPipeline call", plain),
                 ("difflab run_pipeline", ours),
                 ("difflab sd generate (with PNG writes)", end_to_end)]  # fmt: skip
        for name, fn in cases:
            s = _timed(fn, args.repeats)
            rows.append({"what": name, "s_per_image": s / args.n, "seconds_per_call": s})
        if args.compile:  # last, on the same pipeline: as load_pipeline(compile=True) does
            pipe.unet = torch.compile(pipe.unet)
            s = _timed(ours, args.repeats)
            rows.append({"what": "difflab run_pipeline, UNet compiled", "s_per_image": s / args.n,
                         "seconds_per_call": s})  # fmt: skip
    label = "tiny random SD (difflab.sd.tiny)" if args.model is None else args.model
    print(
        f"model {label}, {size}, {args.steps} steps, guidance {args.guidance:g}, "
        f"{args.scheduler}, {args.n} images per call, {loaded.dtype} on {device} "
        f"({platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads), median of {args.repeats}\n"
    )
    print("| what | s/image | speed-up over one image per call |\n|---|---|---|")
    for r in rows:
        gain = rows[0]["s_per_image"] / r["s_per_image"]
        print(f"| {r['what']} | {r['s_per_image']:.4f} | {gain:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
