"""The Sample tab: a labelled grid from a run, with a live preview of x̂₀ while it samples.

The job calls :func:`difflab.ddpm.generate.sample_run`, the function behind ``difflab
sample``, writes the PNG grid and the NPZ arrays into the run's ``samples/`` folder, and
shows the command line that gives the same images.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from difflab.ddpm.sampling import SAMPLERS
from difflab.errors import UsageError
from difflab.ui.jobs import Job
from difflab.ui.lab import Lab, number, preview_grid

MAX_SAMPLES = 2000  # images in all per sampling job


def start_sampling(
    lab: Lab,
    run: str,
    classes: str = "",
    n_per_class: int = 4,
    guidance: float = 2.0,
    steps: int = 10,
    sampler: str = "dpm++",
    seed: int = 0,
) -> Job:
    """Queue sampling from a run: a live preview of x̂₀, then a PNG grid and an NPZ."""
    from difflab.ddpm.generate import parse_classes
    from difflab.ddpm.sampling import check_sampling_args

    path = lab.run_path(run)
    cfg = lab.run_config(path)
    cls = parse_classes(classes or None, cfg.model.num_classes)
    n = number(n_per_class, int, "samples per class", 1)
    if n * len(cls) > MAX_SAMPLES:
        raise UsageError(f"samples per class {n}: at most 2,000 samples in all from the UI")
    guidance = number(guidance, float, "guidance", 0)
    steps = number(steps, int, "steps", 1)
    seed = number(seed, int, "seed", 0)
    if sampler not in SAMPLERS:
        raise UsageError(f"sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    check_sampling_args(sampler, steps, guidance, cfg.sample.eta, cfg.diffusion.timesteps)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    png = path / "samples" / f"ui-{stamp}-seed{seed}.png"
    cls_text = ",".join(map(str, cls))
    command = shlex.join([
        "difflab", "sample", str(path), "--classes", cls_text, "--n-per-class", str(n),
        "--guidance", f"{guidance:g}", "--steps", str(steps), "--sampler", sampler,
        "--seed", str(seed), "--out", str(png),
    ])  # fmt: skip
    args = dict(classes=cls_text, n_per_class=n, guidance=guidance, steps=steps, sampler=sampler, seed=seed)  # fmt: skip
    return lab.jobs.submit(
        "sample", f"{run} s={guidance:g} {steps} steps",
        lambda job: _sample(lab, job, path, png, command, len(cls) * n, n, args),
    )  # fmt: skip


def _sample(
    lab: Lab, job: Job, run: Path, png: Path, command: str, total: int, nrow: int, args: dict
) -> dict:
    from difflab.ddpm.generate import sample_run, save_npz

    png.parent.mkdir(parents=True, exist_ok=True)
    batches = -(-total // 500)
    seen = [0]

    def on_step(step) -> None:
        job.check()
        seen[0] += 1
        job.update(
            seen[0] / (batches * step.num_steps),
            f"step {step.index + 1}/{step.num_steps} (t = {step.t})",
            preview_grid(step.x0_pred[:64], nrow=min(nrow, 8) if nrow > 1 else 10),
        )

    result = sample_run(run, png, device=lab.device, progress=False, on_step=on_step, **args)
    npz = png.with_suffix(".npz")
    save_npz(npz, result.images, result.labels)
    job.update(1.0, f"{total} samples in {result.seconds:.1f} s")
    return {"png": str(png), "npz": str(npz), "command": command, "seconds": result.seconds}


def build(lab: Lab, page) -> None:
    import gradio as gr

    from difflab.ui.widgets import finished, follow, friendly, run_choices, status_box

    with gr.Tab("Sample", id="sample"):
        with gr.Row():
            with gr.Column(scale=1):
                run = gr.Dropdown(label="Run", choices=lab.run_names(), value=lab.newest_run(), elem_id="sample-run")  # fmt: skip
                refresh = gr.Button("↻ runs", size="sm")
                classes = gr.Textbox(label="Classes (e.g. 0,3,7; empty = all)", value="")
                n = gr.Number(value=4, label="Samples per class", precision=0, minimum=1)
                guidance = gr.Number(value=2.0, label="Guidance s (0 uncond., 1 cond.)", minimum=0)
                steps = gr.Number(value=10, label="Steps", precision=0, minimum=1)
                sampler = gr.Dropdown(list(SAMPLERS), value="dpm++", label="Sampler")
                seed = gr.Number(value=0, label="Seed", precision=0, minimum=0)
                with gr.Row():
                    go = gr.Button("Sample", variant="primary", elem_id="sample-go")
                    cancel = gr.Button("Cancel", variant="stop")
            with gr.Column(scale=2):
                status = status_box(elem_id="sample-status")
                image = gr.Image(label="Preview (predicted x̂₀), then the grid", type="filepath", elem_id="sample-image", height=420)  # fmt: skip
                with gr.Row():
                    png = gr.File(label="PNG")
                    npz = gr.File(label="NPZ")
                cmd = gr.Code(label="The same with the command line", language="shell", wrap_lines=True)  # fmt: skip
        job_id = gr.State(None)

    @friendly
    def on_sample(run, classes, n, guidance, steps, sampler, seed):
        job = start_sampling(lab, run, classes, n, guidance, steps, sampler, seed)
        for j in follow(job):
            if j.state in ("queued", "running"):
                yield j.status_line(), j.preview, None, None, "", j.id
        out = finished(job)
        yield job.status_line(), out["png"], out["png"], out["npz"], out["command"], job.id

    refresh.click(lambda current: run_choices(lab, current), run, run, api_name=False)
    go.click(
        on_sample, [run, classes, n, guidance, steps, sampler, seed],
        [status, image, png, npz, cmd, job_id], api_name="sample",
    )  # fmt: skip
    cancel.click(lambda i: lab.jobs.cancel(i) and None, job_id, None, api_name=False)
    page.load(lambda: run_choices(lab), None, run, api_name=False)
