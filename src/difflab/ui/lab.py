"""What every browser session of the web UI shares, as plain Python (no Gradio here).

:class:`Lab` holds the runs and models folders, the device and the job queue, and turns a run
name from the browser into a run folder (always inside the runs folder,
:func:`difflab.ui.paths.inside`). The tabs' actions (:mod:`difflab.ui.tabs`) are plain
functions over a :class:`Lab` that check their input first (one
:class:`~difflab.errors.UsageError` line, nothing written) and hand heavy work to the queue,
so the same behaviour is tested without a browser. :func:`preview_grid` makes the images the
page shows; :func:`write_sweep_report` serves both sweep tabs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from difflab.config import RunConfig
from difflab.ddpm.runs import CONFIG, METRICS
from difflab.errors import UsageError
from difflab.files import read_jsonl
from difflab.ui.jobs import JobQueue
from difflab.ui.paths import inside, list_runs

SWEEPS = "sweeps"  # runs_dir/sweeps/NAME: DDPM sweeps started from the UI
SD_OUT = "sd"  # runs_dir/sd/...: Stable Diffusion images and sweeps
PREVIEW_SIZE = 640  # pixels: the longer side of a preview cell grid is at least this


class Lab:
    def __init__(
        self,
        runs_dir: str | Path = "runs",
        models_dir: str | Path = "models",
        device: str = "auto",
        jobs: JobQueue | None = None,
    ) -> None:
        from difflab.devices import resolve_device

        self.runs = Path(runs_dir).expanduser().resolve()
        self.runs.mkdir(parents=True, exist_ok=True)
        self.models = Path(models_dir).expanduser().resolve()
        self.device = resolve_device(device)
        self.jobs = jobs or JobQueue()

    def run_names(self) -> list[str]:
        return [str(p.relative_to(self.runs)) for p in list_runs(self.runs)]

    def newest_run(self) -> str | None:
        names = self.run_names()
        return names[0] if names else None

    def run_path(self, name: str) -> Path:
        if not name:
            raise UsageError("run: choose a run first (train one in the Train tab)")
        path = inside(self.runs, name, "run")
        if not (path / CONFIG).is_file():
            raise UsageError(f"run {name!r}: not a run folder (no {CONFIG})")
        return path

    def run_config(self, run: Path) -> RunConfig:
        return RunConfig.load(run / CONFIG)


def loss_rows(run: Path) -> list[dict]:
    """The logged training losses of a run folder (``metrics.jsonl``)."""
    rows = read_jsonl(run / METRICS) if (run / METRICS).is_file() else []
    return [r for r in rows if isinstance(r.get("loss"), (int, float))]


def number(value: Any, kind: type, option: str, minimum: float | None = None) -> Any:
    """``value`` from a page widget as ``kind`` (int or float), or one line naming ``option``."""
    try:
        v = kind(value)
        if kind is int and float(value) != v:
            raise ValueError
    except (TypeError, ValueError):
        what = "a whole number" if kind is int else "a number"
        raise UsageError(f"{option} {value!r}: expected {what}") from None
    if minimum is not None and v < minimum:
        raise UsageError(f"{option} {value}: must be at least {minimum:g}")
    return v


def preview_grid(x: torch.Tensor, nrow: int) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> an uint8 RGB grid, enlarged (nearest) for the browser."""
    from torchvision.utils import make_grid

    grid = make_grid(x.detach().float().cpu().clamp(-1, 1), nrow=nrow, padding=1, pad_value=1.0)
    if grid.shape[0] == 1:
        grid = grid.repeat(3, 1, 1)
    img = ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    scale = max(1, PREVIEW_SIZE // max(x.shape[-1] * nrow, 1))
    return np.kron(img, np.ones((scale, scale, 1), dtype=np.uint8)) if scale > 1 else img


def write_sweep_report(lab: Lab, name: str, sd: bool = False) -> str:
    """Write ``report.html`` into a DDPM (or, with ``sd``, a Stable Diffusion) sweep folder."""
    from difflab.experiments.report import write_report

    where = f"{SD_OUT}/sweeps/{name}" if sd else f"{SWEEPS}/{name}"
    folder = inside(lab.runs, where, "sweep")
    if not (folder / "metrics.json").is_file():
        raise UsageError(f"sweep {name!r}: no finished cell yet")
    return str(write_report([folder], folder / "report.html").html)
