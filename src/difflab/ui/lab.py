"""What every browser session of the web UI shares, as plain Python (no Gradio here).

:class:`Lab` holds the runs and models folders, the device, the job queue and whether any
model may be loaded; it turns a run name from the browser into a run folder (always inside
the runs folder, :func:`difflab.ui.paths.inside`) and a typed model into a confined path
(:func:`difflab.ui.paths.confine_model`). The tabs' actions (:mod:`difflab.ui.tabs`) are
plain functions over a :class:`Lab` that build the action's options object (its ``check()``
gives the one-line error, nothing written) and hand heavy work to the queue, so the same
behaviour is tested without a browser. :func:`preview_grid` makes the images the page shows;
:func:`write_sweep_report` serves both sweep tabs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difflab.config import RunConfig
from difflab.ddpm.runs import CONFIG, METRICS
from difflab.errors import UsageError
from difflab.files import read_json
from difflab.ui.jobs import JobQueue
from difflab.ui.paths import confine_model, inside, list_runs

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
        allow_any_model: bool = False,
    ) -> None:
        from difflab.devices import resolve_device

        self.runs = Path(runs_dir).expanduser().resolve()
        self.runs.mkdir(parents=True, exist_ok=True)
        self.models = Path(models_dir).expanduser().resolve()
        self.device = resolve_device(device)
        self.jobs = jobs or JobQueue()
        self.allow_any_model = allow_any_model  # else models from models_dir and the HF cache

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
        return RunConfig.from_dict(read_json(run / CONFIG), where=str(run / CONFIG))

    def model(self, text: str, what: str = "model", marker: str = "model_index.json") -> str:
        """A model typed in the page, confined unless the server allows any model."""
        return confine_model(text, self.models, self.allow_any_model, what, marker)


def loss_rows(run: Path) -> list[dict]:
    """The logged training losses of a run folder (``metrics.jsonl``; unreadable lines skipped)."""
    try:
        text = (run / METRICS).read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("loss"), (int, float)):
            if isinstance(row.get("step"), (int, float)):
                rows.append(row)
    return rows


def as_text(value: Any) -> str:
    """An option's value as a text box shows it: ``(0.0, 2.5)`` -> ``"0,2.5"``, None -> ``""``
    (an empty box: the run's own value)."""
    if value is None:
        return ""
    if isinstance(value, (tuple, list)):
        return ",".join(as_text(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def blank(value: Any) -> Any:
    """None for an empty widget (the options' "the run's own value"), else ``value``."""
    return None if value is None or (isinstance(value, str) and not value.strip()) else value


def preview_grid(x: torch.Tensor, nrow: int, enlarged: bool = True) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> an uint8 RGB grid, enlarged (nearest) for the browser."""
    from torchvision.utils import make_grid

    grid = make_grid(x.detach().float().cpu().clamp(-1, 1), nrow=nrow, padding=1, pad_value=1.0)
    if grid.shape[0] == 1:
        grid = grid.repeat(3, 1, 1)
    img = ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return enlarge(img) if enlarged else img


def enlarge(img: np.ndarray) -> np.ndarray:
    """An (H, W, 3) grid scaled up by a whole factor (nearest) to about :data:`PREVIEW_SIZE`."""
    scale = max(1, PREVIEW_SIZE // max(img.shape[1], 1))
    return np.kron(img, np.ones((scale, scale, 1), dtype=np.uint8)) if scale > 1 else img


def write_sweep_report(lab: Lab, name: str, sd: bool = False) -> str:
    """Write ``report.html`` into a DDPM (or, with ``sd``, a Stable Diffusion) sweep folder."""
    from difflab.experiments.report import write_report

    where = f"{SD_OUT}/sweeps/{name}" if sd else f"{SWEEPS}/{name}"
    folder = inside(lab.runs, where, "sweep")
    if not (folder / "metrics.json").is_file():
        raise UsageError(f"sweep {name!r}: no finished cell yet")
    return str(write_report([folder], folder / "report.html").html)
