"""Cost of a guidance × steps sweep with the cells of one step count batched, and without.

    python benchmarks/bench_sweep.py RUN [--guidance 0,1,2,4,8] [--steps 10,25,50,250] [--n 5]

Runs the same sweep twice into temporary folders, once one cell per network call
(``max_group=1``) and once with every guidance value of a step count in one batch (the
default), checks that both give the same table, and prints the seconds of each.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from difflab.experiments.ddpm_sweep import sweep_run
from difflab.options import DDPMSweepAxes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--guidance", default="0,1,2,4,8")
    p.add_argument("--steps", default="10,25,50,250")
    p.add_argument("--n", type=int, default=5, help="samples per class per cell")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    rows = []
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, group in (("one cell per call", 1), ("guidance batched", 8)):
            t0 = time.perf_counter()
            axes = DDPMSweepAxes(
                guidance=args.guidance, steps=args.steps, samplers=args.sampler, n_per_class=args.n
            )
            r = sweep_run(
                args.run, axes, Path(tmp) / name.replace(" ", "-"), device=args.device,
                progress=False, plots=False, max_group=group,
            )  # fmt: skip
            wall = time.perf_counter() - t0
            sampling = sum(row["seconds"] for row in r.rows)
            results[name] = r.rows
            rows.append((name, len(r.rows), wall, sampling))
    a, b = results.values()
    acc = max(abs(x["accuracy"] - y["accuracy"]) for x, y in zip(a, b, strict=True))
    fd = max(abs(x["fd"] - y["fd"]) / x["fd"] for x, y in zip(a, b, strict=True))
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.n} samples/class/cell")  # fmt: skip
    print("| mode | cells | wall s | sampling s |\n|---|---|---|---|")
    for name, n, wall, sampling in rows:
        print(f"| {name} | {n} | {wall:.1f} | {sampling:.1f} |")
    print(f"speed-up of sampling: {rows[0][3] / rows[1][3]:.2f}x; largest difference between "
          f"the two tables: accuracy {acc:.3f}, FD {100 * fd:.2f} % (relative)")  # fmt: skip
    assert np.isfinite(fd)


if __name__ == "__main__":
    main()
