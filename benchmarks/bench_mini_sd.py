"""mini-SD end to end: train for ``--minutes``, then prompt accuracy, diversity and s/image.

Trains mini-SD (:func:`difflab.sd.mini_train.train_mini_sd`, the defaults of ``difflab sd
mini``; ``--set key=value`` overrides a :class:`~difflab.sd.mini.MiniSDConfig` field) on
``--dataset`` into ``--out`` (or reuses the folder ``--model``), loads it with the stock
``StableDiffusionPipeline`` on the CPU and, for every guidance scale of ``--guidance``, makes
``--per-prompt`` images (seeds 0..) of each class in a few prompt phrasings, all prompts of a
guidance batched ``--batch-size`` images per pipeline call. It prints, per guidance: prompt
accuracy (the dataset's reference classifier recognises the prompted class) with its 95 %
bootstrap interval, diversity (mean pairwise judge-feature distance over the seeds of a
prompt, averaged over prompts) with its interval, and seconds per image. ``--json FILE``
saves the rows.

    OMP_NUM_THREADS=2 python benchmarks/bench_mini_sd.py --minutes 10 --out /tmp/mini
    python benchmarks/bench_mini_sd.py --model /tmp/mini --guidance 1,2,3,5,7
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch

from difflab.evaluation.sd_metrics import feature_diversity, load_prompt_judge
from difflab.evaluation.stats import bootstrap_interval, diversity_interval
from difflab.options import SDPipelineSpec
from difflab.sd.generate import encode, initial_latents
from difflab.sd.load import load_pipeline, pipeline_size
from difflab.sd.mini import NUMBER_WORDS, MiniSDConfig, caption, caption_templates, read_record


def _config(pairs: list[str]) -> MiniSDConfig:
    cfg = MiniSDConfig()
    types = {f.name: f.type for f in fields(MiniSDConfig)}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in types:
            raise SystemExit(f"--set {pair}: no MiniSDConfig field {key!r}")
        old = getattr(cfg, key)
        if isinstance(old, tuple):
            new = tuple(int(v) for v in value.split(","))
        elif isinstance(old, bool):
            new = value.lower() in ("1", "true", "yes")
        else:
            new = type(old)(value)
        cfg = replace(cfg, **{key: new})
    return cfg


def train(args: argparse.Namespace) -> Path:
    from difflab.ddpm.data import load_dataset
    from difflab.sd.mini_train import train_mini_sd

    data = load_dataset(args.dataset, "train")
    cfg = _config(args.set)
    t0, c0 = time.perf_counter(), time.process_time()
    r = train_mini_sd(
        data.images.numpy(), data.labels.numpy(), data.class_names, args.out, data.name, cfg,
        data.class_names[-1], args.minutes, args.seed, progress=not args.quiet,
    )  # fmt: skip
    spent, cpu = time.perf_counter() - t0, time.process_time() - c0
    steps = ", ".join(f"{k} {n} steps {r.seconds[k]:.0f} s" for k, n in r.steps.items())
    losses = ", ".join(f"{k} {v:.4f}" for k, v in r.losses.items())
    print(f"trained in {spent:.0f} s wall, {cpu:.0f} s CPU ({steps}); losses {losses}; scaling {r.scaling_factor:.3f}")  # fmt: skip
    return Path(args.out)


def prompts_of(record: dict) -> list[tuple[str, int]]:
    """(prompt, class) pairs: each class in three phrasings (the plain template, a variant,
    for digits the number word)."""
    names = record["class_names"]
    templates = caption_templates(record["dataset"], tuple(names))
    out = []
    for i, name in enumerate(names):
        out.append((caption(templates[0], name), i))
        out.append((caption(templates[1], name), i))
        if name.isdigit():
            out.append((f"the digit {NUMBER_WORDS[int(name)]}", i))
        else:
            out.append((caption(templates[2], name), i))
    return out


@torch.no_grad()
def vae_ceiling(pipe, judge, dataset: str, n: int = 500) -> float:
    """The judge's accuracy on VAE reconstructions of ``n`` test images: what the decoder
    alone allows (prompt accuracy cannot pass it by much)."""
    from difflab.ddpm.data import load_dataset
    from difflab.sd.mini import to_pixels

    data = load_dataset(dataset, "test")
    x = to_pixels(data.images[:n].numpy(), pipe.vae.config.sample_size)
    rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    pixels = list(((rec.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8))
    judged, _ = judge.measure(pixels)
    return float(np.mean(np.array(judged) == data.labels[:n].numpy()))


@torch.no_grad()
def measure(model: Path, args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    loaded = load_pipeline(SDPipelineSpec(model=str(model), device="cpu", safety_checker=False))
    judge = load_prompt_judge(model)
    record = read_record(model)
    pipe = loaded.pipe
    width, height = pipeline_size(pipe)
    prompts = prompts_of(record)
    print(f"judge accuracy on VAE reconstructions: {vae_ceiling(pipe, judge, args.dataset):.1%}")
    embeds = [encode(loaded, p, "") for p, _ in prompts]
    jobs = [(k, s) for k in range(len(prompts)) for s in range(args.per_prompt)]
    rows = []
    for g in args.guidance:
        images, seconds = [], 0.0
        for start in range(0, len(jobs), args.batch_size):
            batch = jobs[start : start + args.batch_size]
            pe = torch.cat([embeds[k][0 if g != 0 else 1] for k, _ in batch])
            npe = torch.cat([embeds[k][1] for k, _ in batch])
            drawn = [initial_latents(pipe, s, width, height) for _, s in batch]
            t0 = time.perf_counter()
            out = pipe(
                prompt_embeds=pe, negative_prompt_embeds=npe, guidance_scale=g,
                num_inference_steps=args.steps, width=width, height=height,
                latents=torch.cat([lat for lat, _ in drawn]), generator=[gen for _, gen in drawn],
                output_type="np",
            )  # fmt: skip
            seconds += time.perf_counter() - t0
            images += list((np.clip(out.images, 0, 1) * 255).round().astype(np.uint8))
        judged, feats = judge.measure(images)
        want = np.array([prompts[k][1] for k, _ in jobs])
        group = np.array([k for k, _ in jobs])
        correct = (np.array(judged) == want).astype(float)
        per_prompt = [feature_diversity(feats[group == k]) for k in range(len(prompts))]
        div = float(np.mean([d for d in per_prompt if d is not None]))
        rows.append({
            "guidance": g, "images": len(images), "prompt_accuracy": float(correct.mean()),
            "prompt_accuracy_ci": bootstrap_interval(correct, labels=group),
            "diversity": div, "diversity_ci": diversity_interval(feats, group, div),
            "seconds_per_image": seconds / len(images),
        })  # fmt: skip
        phrasing = np.array([k % 3 for k, _ in jobs])
        rows[-1]["by_phrasing"] = {
            prompts[k][0].replace(str(prompts[k][1]), "N"): float(correct[phrasing == k].mean())
            for k in range(3)
        }
        r = rows[-1]
        lo, hi = r["prompt_accuracy_ci"]
        dl, dh = r["diversity_ci"] or (float("nan"),) * 2
        print(
            f"| {g:g} | {r['prompt_accuracy']:.1%} [{lo:.1%}, {hi:.1%}] | {div:.2f} "
            f"[{dl:.2f}, {dh:.2f}] | {r['seconds_per_image']:.3f} | "
            + ", ".join(f"{k}: {v:.0%}" for k, v in r["by_phrasing"].items()) + " |",
            flush=True,
        )  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--minutes", type=float, default=10.0, help="training wall-time cap")
    p.add_argument("--out", help="the mini-SD folder to train (must not exist)")
    p.add_argument("--model", help="an existing mini-SD folder: skip training")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a MiniSDConfig field, e.g. unet_channels=32,64 (repeatable)")  # fmt: skip
    p.add_argument("--guidance", default="1,2,3,5,7", help="guidance scales")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--per-prompt", type=int, default=10, help="seeds per prompt")
    p.add_argument("--batch-size", type=int, default=64, help="images per pipeline call")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", help="save the rows here")
    args = p.parse_args(argv)
    args.guidance = [float(g) for g in args.guidance.split(",")]
    if (args.model is None) == (args.out is None):
        p.error("give --out DIR (train there) or --model DIR (an existing mini-SD folder)")
    print(
        f"# mini-SD, {args.dataset}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, torch {torch.__version__}",
        flush=True,
    )
    model = Path(args.model) if args.model else train(args)
    record = read_record(model)
    if record is None:
        print(f"{model}: not a mini-SD folder (no mini_sd.json)", file=sys.stderr)
        return 2
    print(f"\n{args.steps} steps, {args.per_prompt} seeds x {len(prompts_of(record))} prompts")
    print("| guidance | prompt accuracy [95% CI] | diversity [95% CI] | s / image | by phrasing |")
    print("|---|---|---|---|---|")
    rows = measure(model, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
