"""Where the time of one ``difflab sample`` command goes: start-up, imports, model load, sampling.

Runs the whole command as a user types it (``difflab sample RUN --n-per-class N --out F``,
its defaults otherwise) ``--repeats`` times in a fresh process, and beside it the same work in
pieces, each in a fresh process so that nothing is cached between them:

- ``python``: the interpreter alone (``python -c pass``);
- ``import torch``;
- ``import difflab.cli.main`` (what the command imports before it parses its arguments);
- ``import difflab.ddpm.generate`` (what ``sample`` imports before it samples);
- in-process: ``load_run`` (config + safetensors weights), sampling, writing the file.

Prints a Markdown table of medians; ``--json FILE`` saves every measurement.

    python benchmarks/bench_startup.py RUN --n-per-class 100 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PIECES = {
    "python": "pass",
    "import torch": "import torch",
    "import difflab.cli.main": "import difflab.cli.main",
    "import difflab.ddpm.generate": "import difflab.ddpm.generate",
}

IN_PROCESS = """
import json, sys, time
t0 = time.perf_counter()
from difflab.ddpm.generate import sample_run
from difflab.ddpm.runs import load_run
from difflab.options import SampleOptions
t1 = time.perf_counter()
load_run(sys.argv[1])
t2 = time.perf_counter()
r = sample_run(sys.argv[1], SampleOptions(n_per_class=int(sys.argv[2])), sys.argv[3], progress=False)
t3 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "load_run": t2 - t1, "sample_run": t3 - t2,
                  "sampling": r.seconds, "write + load": t3 - t2 - r.seconds}))
"""


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run")
    p.add_argument("--n-per-class", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()
    py = sys.executable
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "s.npz")
        command = [py, "-m", "difflab", "sample", args.run, "--n-per-class", str(args.n_per_class)]
        for _ in range(args.repeats):
            rows.setdefault("whole `difflab sample` command", []).append(
                wall([*command, "--out", out])
            )
            for name, code in PIECES.items():
                rows.setdefault(name, []).append(wall([py, "-c", code]))
            res = subprocess.run(
                [py, "-c", IN_PROCESS, args.run, str(args.n_per_class), out],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            for name, value in json.loads(res.stdout.strip().splitlines()[-1]).items():
                rows.setdefault(f"in process: {name}", []).append(value)
    print(f"{platform.processor() or platform.machine()}, {args.n_per_class * 10} samples")
    print("| part | median s | all |\n|---|---|---|")
    for name, values in rows.items():
        print(
            f"| {name} | {statistics.median(values):.2f} | {', '.join(f'{v:.2f}' for v in values)} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
