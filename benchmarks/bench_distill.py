"""Distilled students of the ``quick`` preset: distillation time, quality, 1,000-sample time.

Trains a ``quick`` teacher on ``mnist5k`` (``--train-minutes``; or takes ``--teacher RUN``),
then for each K in ``--k`` runs the whole ``difflab distill TEACHER --steps K`` command
(``--minutes``: its budget; default the command's), ``difflab eval`` of the student with its
defaults (accuracy by the reference classifier, FD on its features against the
real-vs-real floor, copy rate), and the whole ``difflab sample`` command for
``--n-per-class`` samples of each class, timed from outside (start-up included). The
teacher is measured the same way with its own defaults. Every command runs in its own
process, one at a time; the machine's load (``uptime``) is printed beside each row. Prints a
Markdown table; ``--json FILE`` saves the rows.

    python benchmarks/bench_distill.py --train-minutes 5 --k 1,2,4 --workdir /tmp/bench-distill
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

COLUMNS = ("model", "distill_s", "accuracy", "fd_ratio", "copy_rate", "sample_s", "load")


def load() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def difflab(*args: str) -> float:
    """Run ``difflab ARGS`` in a fresh process; its wall-clock seconds (start-up included)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "difflab", *args], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - t0


def measure(name: str, run: Path, args, workdir: Path, distill_s: float | None) -> dict:
    n = str(args.n_per_class)
    difflab("eval", str(run), "--n", n, "--device", "cpu")
    shutil.copy(run / "eval.json", workdir / f"{name}-eval.json")
    ev = json.loads((run / "eval.json").read_text())
    sample_s = difflab("sample", str(run), "--n-per-class", n, "--device", "cpu",
                       "--out", str(workdir / f"{name}.npz"))  # fmt: skip
    s = ev["settings"]
    return {
        "model": f"{name} ({s['sampler']} {s['steps']}, s={s['guidance']:g})",
        "distill_s": distill_s,
        "accuracy": ev["accuracy"],
        "fd_ratio": ev["fd_ratio"],
        "copy_rate": ev.get("copy_rate"),
        "sample_s": sample_s,
        "load": load(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", help="a quick run folder (default: train one)")
    p.add_argument("--train-minutes", type=float, default=5.0)
    p.add_argument("--k", default="1,2,4", help="student steps, comma-separated")
    p.add_argument("--minutes", type=float, help="distill budget (default: the command's)")
    p.add_argument("--n-per-class", type=int, default=100)
    p.add_argument("--workdir", default="bench-distill")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    teacher = Path(args.teacher) if args.teacher else workdir / "teacher"
    if not args.teacher and not (teacher / "model.safetensors").is_file():
        difflab("train", "--preset", "quick", "--minutes", f"{args.train_minutes:g}",
                "--device", "cpu", "--out", str(teacher))  # fmt: skip
    rows = [measure("teacher", teacher, args, workdir, None)]
    for k in [int(v) for v in args.k.split(",")]:
        student = workdir / f"k{k}"
        shutil.rmtree(student, ignore_errors=True)
        extra = ["--minutes", f"{args.minutes:g}"] if args.minutes else []
        seconds = difflab("distill", str(teacher), "--steps", str(k), *extra,
                          "--device", "cpu", "--out", str(student))  # fmt: skip
        rows.append(measure(f"k{k}", student, args, workdir, seconds))
    cores = os.cpu_count()
    print(f"{platform.processor() or platform.machine()}, {cores} cores; torch threads default; "
          f"{10 * args.n_per_class} samples; `python {' '.join(sys.argv)}`")  # fmt: skip
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in rows:
        cells = [r["model"], "–" if r["distill_s"] is None else f"{r['distill_s']:.0f} s",
                 f"{r['accuracy']:.1%}", f"{r['fd_ratio']:.2f}x",
                 "–" if r["copy_rate"] is None else f"{r['copy_rate']:.1%}",
                 f"{r['sample_s']:.1f} s", r["load"]]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
