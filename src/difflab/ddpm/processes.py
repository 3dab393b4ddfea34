"""The figures of a run folder: forward process, reverse process, before/after, loss and schedule.

The lab work behind ``difflab forward``, ``difflab reverse`` and ``difflab plot``: check every
option before any work, load the run or the data, noise real images with the run's schedule
(:meth:`~difflab.ddpm.diffusion.GaussianDiffusion.q_sample`, eq. 4) or run the one sampling
generator (:func:`~difflab.ddpm.sampling.sample_steps`), then hand images and labels to
:mod:`difflab.figures` to draw and write the files atomically with their settings.
:func:`reverse_figure` keeps every step of one trajectory, so the strip, the GIF and the MP4
show the same samples. :func:`plot_run` only reads the run folder (it samples nothing); the
before/after figure of a run started with ``--init-from`` is drawn when its training ends
(:func:`before_after_figure`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from difflab.checks import t_values
from difflab.config import DiffusionConfig, RunConfig
from difflab.ddpm.data import load_dataset
from difflab.ddpm.diffusion import SIGNAL_WARN_LEVEL, GaussianDiffusion
from difflab.ddpm.generate import check_out_path, sample_labels
from difflab.ddpm.runs import CONFIG, METRICS, check_run_dir, load_run, weights_metadata
from difflab.ddpm.sampling import sample_steps
from difflab.errors import UsageError
from difflab.figures import process as draw
from difflab.figures.images import Table, render_figure, save_png, to_uint8
from difflab.figures.runs import loss_figure, quality_figure, schedule_figure
from difflab.files import read_jsonl
from difflab.options import ForwardOptions, ReverseOptions

BEFORE_AFTER = "before_after.png"  # in RUN/figures
_TARGET = {"eps": "ε", "x0": "x₀", "v": "v"}


@dataclass
class FigureResult:
    path: Path
    settings: dict
    t: list[int]  # the paper t of each column, as drawn
    table: Table
    extra: list[Path] = field(default_factory=list)  # GIF / MP4 written beside the PNG
    frames: int = 0


def _abar(diffusion: GaussianDiffusion) -> np.ndarray:
    return diffusion.alphas_cumprod.detach().cpu().double().numpy()  # (T,)


def column_label(diffusion: GaussianDiffusion, t: int) -> str:
    """``"t = 500\\n√ᾱ = 0.278"``: a column header of the process figures."""
    return draw.column_label(_abar(diffusion), t)


def not_pure_noise_note(diffusion: GaussianDiffusion) -> str | None:
    """The warning under a figure whose schedule leaves real signal at t = T, else None."""
    s = diffusion.signal_at_T
    if s <= SIGNAL_WARN_LEVEL:
        return None
    return draw.not_pure_noise_text(diffusion.cfg.schedule, diffusion.cfg.timesteps, s)


# -- forward process ------------------------------------------------------------------------
def forward_process(
    diffusion: GaussianDiffusion, x0: torch.Tensor, ts: Sequence[int], noise: torch.Tensor
) -> torch.Tensor:
    """x_t for every paper t in ``ts`` with the same noise: (N, C, H, W) -> (N, len(ts), C, H, W)."""
    cols = []
    for t in ts:
        if t == 0:
            cols.append(x0)
        else:  # eq. 4 at 0-based index t - 1
            idx = torch.full((x0.shape[0],), t - 1, dtype=torch.long)
            cols.append(diffusion.q_sample(x0, idx, noise))
    return torch.stack(cols, 1)


def forward_figure(opts: ForwardOptions, out: str | Path) -> FigureResult:
    """``difflab forward``: real images noised with the run's (or the default) schedule.

    Rows are ``per_class`` images of every class (picked with ``seed``); columns are the
    chosen ``t`` in increasing order, titled with ``t`` and the signal level ``√ᾱ_t``. One
    noise draw per image is shared by all columns, so a row shows one image dissolving.
    """
    out = check_out_path(out, (".png",))
    run, dataset, data_dir, per_class, seed = (
        opts.run, opts.dataset, opts.data_dir, opts.per_class, opts.seed
    )  # fmt: skip
    if run is not None:
        cfg = RunConfig.load(check_run_dir(run, need_weights=False) / CONFIG)
        dcfg = cfg.diffusion
        dataset = dataset or cfg.train.dataset
        data_dir = data_dir or cfg.train.data_dir
    else:
        dcfg, dataset = DiffusionConfig(), dataset or "mnist5k"
    diffusion = GaussianDiffusion(dcfg, warn=False)
    ts = sorted(set(t_values(opts.t, diffusion.num_timesteps)))
    data = load_dataset(dataset, "train", data_dir)

    gen = torch.Generator().manual_seed(seed)
    idx, names = [], []
    for c, name in enumerate(data.class_names):
        members = (data.labels == c).nonzero().flatten()
        pick = members[torch.randperm(len(members), generator=gen)[:per_class]]
        idx += pick.tolist()
        names += [name] * len(pick)
    x0 = data.to_float(torch.tensor(idx))  # (N, C, H, W) in [-1, 1]
    noise = torch.randn(x0.shape, generator=gen)
    xt = forward_process(diffusion, x0, ts, noise)  # (N, K, C, H, W)

    title = f"Forward process q(xₜ | x₀)\n{data.name}, {dcfg.schedule} schedule, T = {dcfg.timesteps}, seed {seed}"
    table = draw.forward_table(
        xt, ts, _abar(diffusion), names, title, not_pure_noise_note(diffusion)
    )
    settings = {
        "figure": "forward", "dataset": data.name, "run": None if run is None else str(run), "t": ts,
        "per_class": per_class, "seed": seed, "images": idx, "schedule": dcfg.schedule, "T": dcfg.timesteps,
    }  # fmt: skip
    save_png(out, table.image, settings)
    return FigureResult(out, settings, ts, table)


# -- reverse process ------------------------------------------------------------------------
def reverse_figure(
    run: str | Path,
    opts: ReverseOptions,
    out: str | Path,
    gif: str | Path | None = None,
    mp4: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
    trust_pickle: bool = False,
) -> FigureResult:
    """``difflab reverse``: one trajectory per class, as x_t and predicted x_0 at chosen t.

    The default is DDPM with all T steps, so every requested t is exact; a sampler that skips
    steps shows the step whose x_t is nearest and titles the column with that step's t.
    The animation has one frame per step (its x_t and predicted x_0) plus a last frame with
    the final sample: ``steps + 1`` frames, evenly thinned to at most
    :data:`~difflab.figures.process.MAX_FRAMES` (always keeping the first and the last).
    """
    out = check_out_path(out, (".png",))
    gif = None if gif is None else check_out_path(gif, (".gif",), option="--gif")
    mp4 = None if mp4 is None else check_out_path(mp4, (".mp4",), option="--mp4")
    if mp4 is not None:
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise UsageError(
                f"--mp4 {mp4}: needs the imageio-ffmpeg package (or use --gif)"
            ) from None
    model, diffusion, cfg = load_run(run, device=device, trust_pickle=trust_pickle)
    opts = opts.for_run(cfg)  # the run's sampling defaults, checked against its T and classes
    sampler, steps, guidance, eta, seed = (
        opts.sampler,
        opts.steps,
        opts.guidance,
        opts.eta,
        opts.seed,
    )
    ts = sorted(set(t_values(opts.t, diffusion.num_timesteps)), reverse=True)
    cls = list(opts.classes)
    known = cfg.model.class_names
    names = [known[c] if c < len(known) else str(c) for c in cls]

    trajectory = []  # per step: x_t and x0_pred as (B, H, W, C) uint8
    bar = tqdm(total=steps, desc="reverse", unit="step", disable=not progress, file=sys.stderr)
    for step in sample_steps(
        model, diffusion, torch.tensor(cls), guidance=guidance, steps=steps, sampler=sampler,
        eta=eta, spacing=cfg.sample.spacing, seed=seed,
    ):  # fmt: skip
        trajectory.append(draw.pictures(step))
        bar.update(1)
    bar.close()

    abar = _abar(diffusion)
    how = f"{sampler}, {steps} steps, guidance s = {guidance:g}, seed {seed}"
    table, shown = draw.reverse_table(
        trajectory, ts, abar, names, f"Reverse process p(xₜ₋₁ | xₜ)\n{how}",
        not_pure_noise_note(diffusion),
    )  # fmt: skip
    settings = {
        "figure": "reverse", "run": str(run), "t": shown, "classes": cls, "seed": seed,
        "guidance": guidance, "sampler": sampler, "steps": steps, "eta": eta, "spacing": cfg.sample.spacing,
    }  # fmt: skip
    result = FigureResult(out, settings, shown, table)
    if gif is not None or mp4 is not None:
        frames = draw.reverse_frames(trajectory, abar, names)
        result.extra = draw.save_animation(frames, gif, mp4)
        result.frames = settings["frames"] = len(frames)
    save_png(out, table.image, settings)
    return result


# -- before and after fine-tuning -----------------------------------------------------------
def before_after_samples(
    run: Path, n_per_class: int = 3, seed: int = 0, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray, RunConfig, str]:
    """(before, after) uint8 samples (N, H, W, C) of the source run and of ``run``.

    Both use ``run``'s sampler, steps and guidance and the same seed, so each image has the
    same noise left and right (the seeding rule, :mod:`difflab.seeds`): each pair differs
    only by the weights. Classes the source run did not have are blank (white) in ``before``.
    """
    run = check_run_dir(run)
    cfg = RunConfig.load(run / CONFIG)
    source = cfg.train.init_from
    if not source:
        raise UsageError(f"{run}: was not started from another run (no train.init_from)")
    after_model, diffusion, cfg = load_run(run, device=device)
    before_model, before_diffusion, before_cfg = load_run(source, device=device)
    sc, k_new, k_old = cfg.sample, cfg.model.num_classes, before_cfg.model.num_classes
    labels = torch.arange(k_new).repeat_interleave(n_per_class)
    kw = dict(guidance=sc.guidance, steps=sc.steps, sampler=sc.sampler, seed=seed, eta=sc.eta,
              spacing=sc.spacing, progress=False)  # fmt: skip
    after = to_uint8(sample_labels(after_model, diffusion, labels, **kw))
    known = (labels < k_old).numpy()
    before = np.full_like(after, 255)
    if known.any():
        x = sample_labels(before_model, before_diffusion, labels[labels < k_old], **kw)
        before[known] = to_uint8(x)
    return before, after, cfg, str(source)


def before_after_figure(
    run: str | Path,
    out: str | Path | None = None,
    n_per_class: int = 3,
    seed: int = 0,
    device: str = "cpu",
) -> Path:
    """One row per class: the source run's samples on the left, ``run``'s on the right.

    ``out`` defaults to ``RUN/figures/before_after.png`` (the folder is created).
    """
    run = Path(run)
    if out is None:
        (run / "figures").mkdir(exist_ok=True)
        out = run / "figures" / BEFORE_AFTER
    before, after, cfg, source = before_after_samples(run, n_per_class, seed, device)
    sc, k_new = cfg.sample, cfg.model.num_classes
    shape = (k_new, n_per_class, *after.shape[1:])
    names = list(cfg.model.class_names)
    table = draw.before_after_table(
        before.reshape(shape), after.reshape(shape),
        row_labels=[names[c] if c < len(names) else str(c) for c in range(k_new)],
        titles=(f"before: {Path(source).name}", f"after: {run.name}"),
        title=f"{run.name}: before and after fine-tuning on {cfg.train.dataset}",
        note=f"{sc.sampler}, {sc.steps} steps, guidance {sc.guidance:g}, seed {seed}; same noise left and right",
    )  # fmt: skip
    out = Path(out)
    save_png(out, table.image, {"run": str(run), "init_from": source, "seed": seed})
    return out


# -- plots of a run -------------------------------------------------------------------------
@dataclass
class PlotResult:
    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # why a plot was not drawn


def run_loss_figure(rows: list[dict], cfg: RunConfig, name: str):
    """:func:`~difflab.figures.runs.loss_figure` of a run's ``metrics.jsonl`` rows, titled."""
    objective = cfg.diffusion.objective
    logged = [r for r in rows if isinstance(r.get("loss"), (int, float)) and "step" in r]
    last = max(logged, key=lambda r: r["step"]) if logged else None
    title = f"Training loss: {name} ({cfg.train.dataset}, {objective}-prediction)"
    if last is not None:
        title += f", last {last['loss']:.4f} at step {int(last['step'])}"
    return loss_figure(rows, title, _TARGET.get(objective, objective))


def run_quality_figure(rows: list[dict], evals: list[dict], cfg: RunConfig, run: Path):
    """:func:`~difflab.figures.runs.quality_figure` of a run's loss and evaluation rows."""
    best = run / "best.safetensors"  # train --keep-best
    best_step = weights_metadata(best).get("step") if best.is_file() else None
    title = f"Quality during training: {run.name} ({cfg.train.dataset})"
    target = _TARGET.get(cfg.diffusion.objective, cfg.diffusion.objective)
    return quality_figure(rows, evals, cfg.train.batch_size, title, target, best_step)


def run_schedule_figure(diffusion: GaussianDiffusion):
    """:func:`~difflab.figures.runs.schedule_figure` of a schedule, the other kind beside it."""
    c = diffusion.cfg
    other_kind = "cosine" if c.schedule == "linear" else "linear"
    other_cfg = replace(c, schedule=other_kind, beta_start=1e-4, beta_end=0.02)
    other = _abar(GaussianDiffusion(other_cfg, warn=False))
    return schedule_figure(_abar(diffusion), c.schedule, (other_kind, other), SIGNAL_WARN_LEVEL)


def plot_run(run: str | Path, out_dir: str | Path | None = None) -> PlotResult:
    """``difflab plot RUN``: write ``loss.png`` and ``schedule.png`` into ``out_dir``, and
    ``quality.png`` when the run evaluated itself while training (``train --eval-every``).

    ``out_dir`` defaults to ``RUN/figures`` (created); a given folder must exist. A run with
    no logged loss yet gets only the schedule plot, and the result says why. Nothing is
    sampled: a run folder alone (even without weights) is enough.
    """
    run = check_run_dir(run, need_weights=False)
    cfg = RunConfig.load(run / CONFIG)
    if out_dir is None:
        out_dir = run / "figures"
        out_dir.mkdir(exist_ok=True)
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise UsageError(f"--out {out_dir}: folder does not exist")
    logged = read_jsonl(run / METRICS)
    rows = [r for r in logged if isinstance(r.get("loss"), (int, float)) and "step" in r]
    rows = [r for r in rows if np.isfinite(r["loss"]) and r["loss"] > 0]
    result = PlotResult()
    settings = {"run": str(run), "schedule": cfg.diffusion.schedule, "T": cfg.diffusion.timesteps}
    if rows:
        path = out_dir / "loss.png"
        figure = render_figure(run_loss_figure(rows, cfg, run.name))
        save_png(path, figure, {"figure": "loss", **settings})
        result.written.append(path)
    else:
        result.skipped.append(f"loss.png: {run / METRICS} has no logged loss yet")
    evals = [r for r in logged if isinstance(r.get("eval"), dict) and "step" in r]
    if evals:  # train --eval-every: quality beside the loss (figures/quality.png)
        path = out_dir / "quality.png"
        save_png(path, render_figure(run_quality_figure(rows, evals, cfg, run)), {"figure": "quality", **settings})  # fmt: skip
        result.written.append(path)
    path = out_dir / "schedule.png"
    diffusion = GaussianDiffusion(cfg.diffusion, warn=False)
    save_png(
        path, render_figure(run_schedule_figure(diffusion)), {"figure": "schedule", **settings}
    )
    result.written.append(path)
    return result
