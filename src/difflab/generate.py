"""Sampling from a run folder into files: labelled PNG grids or ``.npz`` arrays.

Loads a run once, draws ``n_per_class`` samples for each requested class through the one
sampling generator (in batches, with progress), and writes a grid PNG carrying its settings
or an ``.npz`` with ``images`` (uint8, N x H x W x C) and ``labels`` (int64, N).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from difflab.checkpoint import load_run
from difflab.errors import UsageError
from difflab.files import atomic_path
from difflab.sampling import check_sampling_args, sample_steps
from difflab.viz import labelled_grid, save_png, to_uint8


@dataclass
class SampleResult:
    images: torch.Tensor  # (N, C, H, W) in [-1, 1]
    labels: torch.Tensor  # (N,)
    seconds: float
    settings: dict


def parse_classes(text: str | None, num_classes: int) -> list[int]:
    if text is None or text.strip() in ("", "all"):
        return list(range(num_classes))
    try:
        classes = [int(c) for c in text.split(",") if c.strip() != ""]
    except ValueError:
        raise UsageError(f"--classes {text!r}: expected comma-separated class indices like 0,3,7") from None
    if not classes:
        raise UsageError(f"--classes {text!r}: no class given")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise UsageError(f"--classes: {bad[0]} is out of range; this run has classes 0..{num_classes - 1}")
    return classes


def check_out_path(out: str | Path, suffixes: tuple[str, ...]) -> Path:
    out = Path(out)
    if out.suffix.lower() not in suffixes:
        raise UsageError(f"--out {out}: must end in {' or '.join(suffixes)}")
    if not out.parent.exists():
        raise UsageError(f"--out {out}: folder {out.parent} does not exist")
    return out


def sample_labels(
    model,
    diffusion,
    labels: torch.Tensor,
    *,
    guidance: float,
    steps: int,
    sampler: str,
    seed: int,
    eta: float = 0.0,
    spacing: str = "trailing",
    batch_size: int = 500,
    progress: bool = True,
    autocast: str | None = None,
) -> torch.Tensor:
    """Samples for ``labels`` in batches; batch k uses seed ``seed + k`` (B, C, H, W) in [-1, 1]."""
    check_sampling_args(sampler, steps, guidance, eta, diffusion.num_timesteps)
    out = []
    chunks = list(labels.split(batch_size))
    bar = tqdm(total=len(chunks) * steps, desc="sample", unit="step", disable=not progress, file=sys.stderr)
    for k, chunk in enumerate(chunks):
        x = None
        for step in sample_steps(
            model, diffusion, chunk, guidance=guidance, steps=steps, sampler=sampler, eta=eta,
            spacing=spacing, seed=seed + k, autocast=autocast,
        ):  # fmt: skip
            x = step.x_prev
            bar.update(1)
        out.append(x.clamp(-1, 1).cpu())
    bar.close()
    return torch.cat(out)


def sample_run(
    run: str | Path,
    out: str | Path,
    classes: str | None = None,
    n_per_class: int = 8,
    guidance: float | None = None,
    steps: int | None = None,
    sampler: str | None = None,
    eta: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    trust_pickle: bool = False,
) -> SampleResult:
    """``difflab sample``: check everything, sample, and write ``out`` (.png grid or .npz)."""
    out = check_out_path(out, (".png", ".npz"))
    if n_per_class < 1:
        raise UsageError(f"--n-per-class {n_per_class}: must be at least 1")
    model, diffusion, cfg = load_run(run, device=device, trust_pickle=trust_pickle)
    sc = cfg.sample
    guidance = sc.guidance if guidance is None else guidance
    steps, sampler = steps or sc.steps, sampler or sc.sampler
    eta = sc.eta if eta is None else eta
    check_sampling_args(sampler, steps, guidance, eta, diffusion.num_timesteps)
    cls = parse_classes(classes, cfg.model.num_classes)
    labels = torch.tensor(cls).repeat_interleave(n_per_class)
    t0 = time.perf_counter()
    images = sample_labels(
        model, diffusion, labels, guidance=guidance, steps=steps, sampler=sampler, eta=eta,
        spacing=sc.spacing, seed=seed, progress=progress,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    settings = {
        "run": str(run), "classes": cls, "n_per_class": n_per_class, "guidance": guidance,
        "steps": steps, "sampler": sampler, "eta": eta, "seed": seed, "spacing": sc.spacing,
    }  # fmt: skip
    arr = to_uint8(images)
    if out.suffix.lower() == ".npz":
        with atomic_path(out) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, images=arr, labels=labels.numpy().astype(np.int64))
    else:
        known = cfg.model.class_names
        names = [known[c] if c < len(known) else str(c) for c in cls]
        grid = labelled_grid(
            arr, nrow=len(cls), row_labels=names,
            title=f"{sampler} {steps} steps, guidance {guidance:g}, seed {seed}",
        )  # fmt: skip
        save_png(out, grid, settings)
    return SampleResult(images, labels, seconds, settings)
