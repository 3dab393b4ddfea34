"""The Processes tab: the forward process at chosen steps t, and reverse trajectories to scrub.

Both start from the options of the command line (:class:`difflab.options.ForwardOptions`,
:class:`~difflab.options.ReverseOptions`: ``difflab forward`` / ``difflab reverse`` with no
options). The forward view noises one test image per class with the forward figure's own
maths (:func:`difflab.figures.process.forward_process`), one column per t; the reverse job
runs one trajectory per class through the one sampling generator and keeps x_t and the
predicted x̂₀ of at most :data:`difflab.ui.limits.REVERSE_FRAMES` evenly spaced steps (the
first and the last always), small, for a slider to step through.
"""

from __future__ import annotations

import numpy as np
import torch

from difflab.checks import SAMPLERS, t_values
from difflab.config import RunConfig
from difflab.ddpm.data import DATASET_NAMES
from difflab.options import ForwardOptions, ReverseOptions
from difflab.ui import limits
from difflab.ui.jobs import Job
from difflab.ui.lab import Lab, as_text, blank, enlarge, preview_grid

FORWARD_SOURCES = list(DATASET_NAMES[:2])  # datasets offered beside the runs
FORWARD = ForwardOptions()  # what `difflab forward --out FILE` shows
REVERSE = ReverseOptions()  # what `difflab reverse RUN --out FILE` runs
DEFAULT_SOURCE = FORWARD.dataset or "mnist5k"  # the figure's dataset without a run


def forward_options(source: str, t, seed: int = FORWARD.seed) -> ForwardOptions:
    """A dataset name or a run (its dataset and schedule) and the steps t to show."""
    t = as_text(t)
    if source in DATASET_NAMES:
        return ForwardOptions(dataset=source, t=t, seed=seed)
    return ForwardOptions(run=source, t=t, seed=seed)


def forward_view(lab: Lab, source: str, t, seed: int = 0) -> tuple[np.ndarray, str]:
    """x_t of one test image per class (rows) at each paper step of ``t`` (columns)."""
    from difflab.ddpm.data import load_dataset
    from difflab.ddpm.diffusion import GaussianDiffusion
    from difflab.ddpm.processes import column_label, forward_process

    opts = forward_options(source, t, seed)
    if opts.run is None:
        cfg, dataset = RunConfig(), opts.dataset
    else:
        cfg = lab.run_config(lab.run_path(opts.run))
        dataset = cfg.train.dataset
    diffusion = GaussianDiffusion(cfg.diffusion, warn=False)
    T = diffusion.num_timesteps
    ts = sorted(set(t_values(opts.t, T)))
    data = load_dataset(dataset, "test", cfg.train.data_dir)
    idx = [int((data.labels == c).nonzero()[0]) for c in data.labels.unique()[:10]]
    x0 = data.images[idx].float() / 127.5 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(opts.seed))
    xt = forward_process(diffusion, x0, ts, noise)  # (N, K, C, H, W): the forward figure's maths
    if len(ts) == 1:
        return preview_grid(xt[:, 0], nrow=len(idx)), f"{dataset}, T = {T}: {column_label(diffusion, ts[0])}"  # fmt: skip
    note = f"{dataset}, T = {T}: one row per class, columns t = {', '.join(map(str, ts))}"
    return preview_grid(xt.flatten(0, 1), nrow=len(ts)), note


def reverse_options(classes, guidance, steps, sampler, seed=REVERSE.seed) -> ReverseOptions:
    """The page's values as the options of ``difflab reverse`` (empty: the run's value)."""
    return ReverseOptions(
        classes=blank(classes), guidance=blank(guidance), steps=blank(steps), sampler=sampler,
        seed=seed,
    )  # fmt: skip


def start_reverse(
    lab: Lab, run: str, classes="", guidance: float | None = None, steps: int | None = None,
    sampler: str = REVERSE.sampler, seed: int = REVERSE.seed,
) -> Job:  # fmt: skip
    """Queue one reverse trajectory per class: x_t and x̂₀ along the steps."""
    path = lab.run_path(run)
    opts = reverse_options(classes, guidance, steps, sampler, seed).for_run(lab.run_config(path))
    what = ",".join(map(str, opts.classes)) if len(opts.classes) < 4 else "all classes"
    return lab.jobs.submit("reverse", f"{run} {what}", lambda job: _reverse(lab, job, path, opts))


def _reverse(lab: Lab, job: Job, path, opts: ReverseOptions) -> list[dict]:
    from difflab.ddpm.runs import load_run
    from difflab.ddpm.sampling import sample_steps
    from difflab.figures.process import frame_indices

    model, diffusion, cfg = load_run(path, device=lab.device)
    labels = torch.tensor(opts.classes, dtype=torch.long)
    keep = set(frame_indices(opts.steps + 1, limits.REVERSE_FRAMES))
    nrow, frames = len(opts.classes), []
    for step in sample_steps(
        model, diffusion, labels, guidance=opts.guidance, steps=opts.steps, sampler=opts.sampler,
        eta=opts.eta, spacing=cfg.sample.spacing, seed=opts.seed,
    ):  # fmt: skip
        job.check()
        if step.index in keep:  # small grids; enlarged when shown
            frames.append({
                "index": step.index, "of": step.num_steps, "t": step.t + 1,
                "x_t": preview_grid(step.x_t, nrow, False), "x0": preview_grid(step.x0_pred, nrow, False),
            })  # fmt: skip
        job.update((step.index + 1) / step.num_steps, f"step {step.index + 1}/{step.num_steps}")
    final = preview_grid(step.x_prev, nrow, False)  # clamped to [-1, 1] like every preview
    frames.append({"index": step.num_steps, "of": step.num_steps, "t": 0, "x_t": final, "x0": final})  # fmt: skip
    return frames


def frame_note(frames: list[dict], i: int) -> str:
    f = frames[i]
    return f"step {f['index']} of {f['of']}: " + ("the final sample x₀" if f["t"] == 0 else f"t = {f['t']}")  # fmt: skip


def build(lab: Lab, page) -> None:
    import gradio as gr

    from difflab.ui.widgets import finished, follow, friendly, run_choices

    with gr.Tab("Processes", id="processes"):
        gr.Markdown("**Forward process**: the same images and noise at step *t* (0 = data).")
        with gr.Row():
            source = gr.Dropdown(
                FORWARD_SOURCES + lab.run_names(), value=DEFAULT_SOURCE,
                label="Dataset, or a run (its dataset and schedule)",
            )  # fmt: skip
            t_text = gr.Textbox(value=as_text(FORWARD.t), label="t (integers or T, T/2, 3T/4)")  # fmt: skip
            t = gr.Slider(0, 1000, value=250, step=1, label="or one t")
        f_image = gr.Image(label="x_t", height=240)
        f_note = gr.Markdown()

        gr.Markdown("**Reverse process**: x_t and the predicted x̂₀ along one trajectory.")
        with gr.Row():
            run = gr.Dropdown(label="Run", choices=lab.run_names(), value=lab.newest_run())
            classes = gr.Textbox(value="", label="Classes (empty: all)")
            guidance = gr.Textbox(value=as_text(REVERSE.guidance), label="Guidance", placeholder="empty: the run's")  # fmt: skip
            steps = gr.Textbox(value=as_text(REVERSE.steps), label="Steps", placeholder="empty: all T for ddpm, else the run's")  # fmt: skip
            sampler = gr.Dropdown(list(SAMPLERS), value=REVERSE.sampler, label="Sampler")
            go = gr.Button("Run the reverse process", variant="primary")
        slider = gr.Slider(0, 50, value=0, step=1, label="Step (0 = pure noise)")
        with gr.Row():
            x_t = gr.Image(label="x_t", height=220)
            x0 = gr.Image(label="predicted x̂₀", height=220)
        r_note = gr.Markdown()
        frames = gr.State([])

    forward = friendly(lambda source, t: forward_view(lab, source, t))

    @friendly
    def on_reverse(run, classes, guidance, steps, sampler):
        job = start_reverse(lab, run, classes, guidance, steps, sampler)
        for j in follow(job):
            if j.state in ("queued", "running"):
                yield [], gr.update(), None, None, j.status_line()
        got = finished(job)
        yield got, gr.update(maximum=len(got) - 1, value=0), *show(got, 0)

    def show(frames, i):
        if not frames:
            return None, None, ""
        i = int(min(max(i, 0), len(frames) - 1))
        return enlarge(frames[i]["x_t"]), enlarge(frames[i]["x0"]), frame_note(frames, i)

    def on_load():
        sources = gr.update(choices=FORWARD_SOURCES + lab.run_names())
        return (sources, run_choices(lab), *forward_view(lab, DEFAULT_SOURCE, FORWARD.t))

    t.release(forward, [source, t], [f_image, f_note], api_name="forward")
    t.release(lambda v: str(int(v)), t, t_text, api_name=False, show_progress="hidden")
    t_text.submit(forward, [source, t_text], [f_image, f_note], api_name="forward_t")
    source.change(forward, [source, t_text], [f_image, f_note], api_name=False)
    go.click(on_reverse, [run, classes, guidance, steps, sampler], [frames, slider, x_t, x0, r_note], api_name="reverse")  # fmt: skip
    slider.change(show, [frames, slider], [x_t, x0, r_note], api_name=False)
    page.load(on_load, None, [source, run, f_image, f_note], api_name=False)
