"""Guidance options of one trained run, side by side: accuracy, FD / floor, diversity, copy rate.

Every row samples the same 1,000 images' noise (``--n-per-class`` per class, seed 0) from
``RUN`` with its own sampler and steps, changing only how guidance acts: the scale ``s``, the
noise-level interval (Kynkaenniemi et al. 2024), the weight schedule, rescaled guidance (Lin et
al. 2024) or CFG++ (Chung et al. 2024). Each row is one ``--row`` ``NAME:KEY=VALUE;...`` with KEY
one of ``guidance``, ``interval`` (``LO:HI``), ``schedule``, ``rescale``, ``method`` (``cfg`` or
``cfg++``), ``steps`` or ``sampler``; without ``--row`` a
built-in grid runs. Prints a Markdown table; ``--json FILE`` saves the rows.

    python benchmarks/bench_guidance.py runs/q5 --json guidance.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

GRID = (
    "s=1.5:guidance=1.5",
    "s=2:guidance=2",
    "s=3:guidance=3",
    "s=2 linear:guidance=2;schedule=linear",
    "s=2 cosine:guidance=2;schedule=cosine",
    "s=3 rescale 0.7:guidance=3;rescale=0.7",
    "s=3 in [0.3,5]:guidance=3;interval=0.3:5",
    "s=3 in [0.5,10]:guidance=3;interval=0.5:10",
    "s=3 in [1,20]:guidance=3;interval=1:20",
    "s=4 in [1,20]:guidance=4;interval=1:20",
)
KEYS = {"guidance": "guidance", "interval": "guidance_interval", "schedule": "guidance_schedule",
        "rescale": "guidance_rescale", "method": "guidance_method", "steps": "steps",
        "sampler": "sampler"}  # fmt: skip


def parse_row(text: str) -> tuple[str, dict]:
    name, _, spec = text.partition(":")
    opts: dict = {}
    for item in filter(None, spec.split(";")):
        key, _, value = item.partition("=")
        if key not in KEYS:
            raise SystemExit(f"--row {text!r}: unknown key {key!r}; one of {', '.join(KEYS)}")
        opts[KEYS[key]] = value
    return name, opts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--row", action="append", help="NAME:KEY=VALUE;... (repeatable)")
    ap.add_argument("--n-per-class", type=int, default=100)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()

    from difflab.evaluation.evaluate import evaluate_run
    from difflab.options import EvalOptions

    rows = []
    for text in args.row or GRID:
        name, opts = parse_row(text)
        ev = evaluate_run(args.run, EvalOptions(n_per_class=args.n_per_class, **opts),
                          progress=False, write=False)  # fmt: skip
        row = {"name": name, **ev["settings"], "accuracy": ev["accuracy"],
               "accuracy_ci": ev["ci95"]["accuracy"], "fd_ratio": ev["fd_ratio"],
               "diversity": ev["diversity"], "diversity_real": ev["diversity_real"],
               "copy_rate": ev.get("copy_rate"), "sampling_s": ev["sampling_seconds"],
               "load": os.getloadavg()[0],
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
        rows.append(row)
        print(f"{name}: {row['accuracy']:.1%} FD/floor {row['fd_ratio']:.2f} "
              f"div {row['diversity']:.2f} ({row['sampling_s']:.1f} s)", flush=True)  # fmt: skip
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.run}\n")
    print("| guidance | accuracy (95 % CI) | FD / floor | diversity | copy rate | sampling |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["accuracy_ci"]
        print(f"| {r['name']} | {r['accuracy']:.1%} [{lo:.1%}, {hi:.1%}] | {r['fd_ratio']:.2f}× "
              f"| {r['diversity']:.2f} | {r['copy_rate']:.1%} | {r['sampling_s']:.1f} s |")  # fmt: skip


if __name__ == "__main__":
    main()
