"""The Processes tab: the forward process at any step t, and one reverse trajectory to scrub.

The forward view noises one test image per class with the forward figure's own maths
(:func:`difflab.figures.process.forward_process`); the reverse job keeps x_t and the
predicted x̂₀ of every step of the one sampling generator, for a slider to step through.
"""

from __future__ import annotations

import numpy as np
import torch

from difflab.config import RunConfig
from difflab.ddpm.data import DATASET_NAMES
from difflab.ddpm.sampling import SAMPLERS
from difflab.errors import UsageError
from difflab.ui.jobs import Job
from difflab.ui.lab import Lab, number, preview_grid

FORWARD_SOURCES = list(DATASET_NAMES[:2])  # datasets offered beside the runs


def forward_view(lab: Lab, source: str, t: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """x_t of one test image per class at paper step ``t`` (0 = data, T = the last step)."""
    from difflab.ddpm.data import load_dataset
    from difflab.ddpm.diffusion import GaussianDiffusion
    from difflab.figures.process import column_label, forward_process

    if source in DATASET_NAMES:
        cfg, dataset = RunConfig(), source
    else:
        cfg = lab.run_config(lab.run_path(source))
        dataset = cfg.train.dataset
    diffusion = GaussianDiffusion(cfg.diffusion, warn=False)
    T = diffusion.num_timesteps
    t = number(t, int, "t", 0)
    if t > T:
        raise UsageError(f"t {t}: must be between 0 and T = {T}")
    data = load_dataset(dataset, "test", cfg.train.data_dir)
    idx = [int((data.labels == c).nonzero()[0]) for c in data.labels.unique()[:10]]
    x0 = data.images[idx].float() / 127.5 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    xt = forward_process(diffusion, x0, [t], noise)[:, 0]  # the forward figure's maths
    return preview_grid(xt, nrow=len(idx)), f"{dataset}, T = {T}: {column_label(diffusion, t)}"


def start_reverse(
    lab: Lab, run: str, cls: int = 0, guidance: float = 2.0, steps: int = 50,
    sampler: str = "ddim", seed: int = 0,
) -> Job:  # fmt: skip
    """Queue one reverse trajectory per sample: x_t and x̂₀ at every step."""
    from difflab.ddpm.sampling import check_sampling_args

    path = lab.run_path(run)
    cfg = lab.run_config(path)
    cls = number(cls, int, "class", 0)
    if cls >= cfg.model.num_classes:
        raise UsageError(f"class {cls}: this run has classes 0..{cfg.model.num_classes - 1}")
    guidance, steps = number(guidance, float, "guidance", 0), number(steps, int, "steps", 1)
    seed = number(seed, int, "seed", 0)
    check_sampling_args(sampler, steps, guidance, cfg.sample.eta, cfg.diffusion.timesteps)
    return lab.jobs.submit(
        "reverse", f"{run} class {cls}",
        lambda job: _reverse(lab, job, path, cls, guidance, steps, sampler, seed),
    )  # fmt: skip


def _reverse(lab: Lab, job: Job, path, cls, guidance, steps, sampler, seed) -> list[dict]:
    from difflab.ddpm.runs import load_run
    from difflab.ddpm.sampling import sample_steps

    model, diffusion, cfg = load_run(path, device=lab.device)
    labels = torch.full((8,), cls, dtype=torch.long)
    frames = []
    for step in sample_steps(
        model, diffusion, labels, guidance=guidance, steps=steps, sampler=sampler,
        eta=cfg.sample.eta, spacing=cfg.sample.spacing, seed=seed,
    ):  # fmt: skip
        job.check()
        frames.append({
            "t": step.t + 1, "x_t": preview_grid(step.x_t, 8), "x0": preview_grid(step.x0_pred, 8)
        })  # fmt: skip
        job.update((step.index + 1) / step.num_steps, f"step {step.index + 1}/{step.num_steps}")
    final = preview_grid(step.x_prev, 8)  # clamped to [-1, 1] like every preview
    frames.append({"t": 0, "x_t": final, "x0": final})
    return frames


def frame_note(frames: list[dict], i: int) -> str:
    t = frames[i]["t"]
    return f"step {i} of {len(frames) - 1}: " + ("the final sample x₀" if t == 0 else f"t = {t}")


def build(lab: Lab, page) -> None:
    import gradio as gr

    from difflab.ui.widgets import finished, follow, friendly, run_choices

    with gr.Tab("Processes", id="processes"):
        gr.Markdown("**Forward process**: the same images and noise at step *t* (0 = data).")
        with gr.Row():
            source = gr.Dropdown(
                FORWARD_SOURCES + lab.run_names(), value="mnist5k",
                label="Dataset, or a run (its dataset and schedule)",
            )  # fmt: skip
            t = gr.Slider(0, 1000, value=250, step=1, label="t")
        f_image = gr.Image(label="x_t", height=240)
        f_note = gr.Markdown()

        gr.Markdown("**Reverse process**: x_t and the predicted x̂₀ along one trajectory.")
        with gr.Row():
            run = gr.Dropdown(label="Run", choices=lab.run_names(), value=lab.newest_run())
            cls = gr.Number(value=0, label="Class", precision=0, minimum=0)
            guidance = gr.Number(value=2.0, label="Guidance", minimum=0)
            steps = gr.Number(value=50, label="Steps", precision=0, minimum=1)
            sampler = gr.Dropdown(list(SAMPLERS), value="ddim", label="Sampler")
            go = gr.Button("Run the reverse process", variant="primary")
        slider = gr.Slider(0, 50, value=0, step=1, label="Step (0 = pure noise)")
        with gr.Row():
            x_t = gr.Image(label="x_t", height=220)
            x0 = gr.Image(label="predicted x̂₀", height=220)
        r_note = gr.Markdown()
        frames = gr.State([])

    forward = friendly(lambda source, t: forward_view(lab, source, t))

    @friendly
    def on_reverse(run, cls, guidance, steps, sampler):
        job = start_reverse(lab, run, cls, guidance, steps, sampler)
        for j in follow(job):
            if j.state in ("queued", "running"):
                yield [], gr.update(), None, None, j.status_line()
        got = finished(job)
        yield got, gr.update(maximum=len(got) - 1, value=0), got[0]["x_t"], got[0]["x0"], frame_note(got, 0)  # fmt: skip

    def show(frames, i):
        if not frames:
            return None, None, ""
        i = int(min(max(i, 0), len(frames) - 1))
        return frames[i]["x_t"], frames[i]["x0"], frame_note(frames, i)

    def on_load():
        sources = gr.update(choices=FORWARD_SOURCES + lab.run_names())
        return (sources, run_choices(lab), *forward_view(lab, "mnist5k", 250))

    t.release(forward, [source, t], [f_image, f_note], api_name="forward")
    source.change(forward, [source, t], [f_image, f_note], api_name=False)
    go.click(on_reverse, [run, cls, guidance, steps, sampler], [frames, slider, x_t, x0, r_note], api_name="reverse")  # fmt: skip
    slider.change(show, [frames, slider], [x_t, x0, r_note], api_name=False)
    page.load(on_load, None, [source, run, f_image, f_note], api_name=False)
