"""The Sample tab: a labelled grid from a run, with a live preview of x̂₀ while it samples.

The widgets' defaults are :class:`difflab.options.SampleOptions`'s (empty: the run's own
value, as ``difflab sample`` without the option); the job calls
:func:`difflab.ddpm.generate.sample_run`, the function behind ``difflab sample``, writes the
PNG grid and the NPZ arrays into the run's ``samples/`` folder, and shows the command line
that gives the same images.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from difflab.checks import SAMPLERS
from difflab.errors import UsageError
from difflab.options import SampleOptions
from difflab.ui import limits
from difflab.ui.jobs import Job
from difflab.ui.lab import Lab, as_text, blank, preview_grid

DEFAULTS = SampleOptions()  # what `difflab sample RUN --out FILE` does
RUNS_OWN = "the run's"  # the sampler dropdown's entry for None
RUNS_VALUE = "empty: the run's own value"  # what an empty box means


def sample_options(classes, n_per_class, guidance, steps, sampler, seed) -> SampleOptions:
    """The page's values as the options of ``difflab sample`` (empty: the run's value)."""
    sampler = None if sampler in (RUNS_OWN, "") else sampler
    return SampleOptions(
        classes=blank(classes), n_per_class=n_per_class, guidance=blank(guidance),
        steps=blank(steps), sampler=sampler, seed=seed,
    )  # fmt: skip


def start_sampling(
    lab: Lab,
    run: str,
    classes: str = "",
    n_per_class: int | None = DEFAULTS.n_per_class,
    guidance: float | None = None,
    steps: int | None = None,
    sampler: str | None = None,
    seed: int = DEFAULTS.seed,
) -> Job:
    """Queue sampling from a run: a live preview of x̂₀, then a PNG grid and an NPZ."""
    path = lab.run_path(run)
    opts = sample_options(classes, n_per_class, guidance, steps, sampler, seed)
    opts = opts.for_run(lab.run_config(path))
    if len(opts.guidance) > 1 or len(opts.steps) > 1:
        raise UsageError(
            "guidance, steps: the Sample tab takes one value of each; a grid over several is "
            "a sweep (Sweep tab) or `difflab sample --guidance 0,1,3`"
        )
    n, g, s = opts.n_per_class, opts.guidance[0], opts.steps[0]
    total = n * len(opts.classes)
    limits.at_most(total, limits.SAMPLES, "samples in all (classes x samples per class)")
    png = path / "samples" / f"ui-{time.strftime('%Y%m%d-%H%M%S')}-seed{opts.seed}.png"
    cls_text = ",".join(map(str, opts.classes))
    command = shlex.join([
        "difflab", "sample", str(path), "--classes", cls_text, "--n-per-class", str(n),
        "--guidance", f"{g:g}", "--steps", str(s), "--sampler", opts.sampler,
        "--seed", str(opts.seed), "--out", str(png),
    ])  # fmt: skip
    return lab.jobs.submit(
        "sample", f"{run} s={g:g} {s} steps",
        lambda job: _sample(lab, job, path, opts, png, command, total),
    )  # fmt: skip


def _sample(
    lab: Lab, job: Job, run: Path, opts: SampleOptions, png: Path, command: str, total: int
) -> dict:
    from difflab.ddpm.generate import sample_run, save_npz

    png.parent.mkdir(parents=True, exist_ok=True)
    nrow, batches = opts.n_per_class, -(-total // 500)
    seen = [0]

    def on_step(step) -> None:
        job.check()
        seen[0] += 1
        job.update(
            seen[0] / (batches * step.num_steps),
            f"step {step.index + 1}/{step.num_steps} (t = {step.t})",
            preview_grid(step.x0_pred[:64], nrow=min(nrow, 8) if nrow > 1 else 10),
        )

    result = sample_run(run, opts, png, device=lab.device, progress=False, on_step=on_step)
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
                n = gr.Number(value=DEFAULTS.n_per_class, label="Samples per class", precision=0, minimum=1)  # fmt: skip
                guidance = gr.Textbox(value=as_text(DEFAULTS.guidance), label="Guidance s (0 uncond., 1 cond.)", placeholder=RUNS_VALUE)  # fmt: skip
                steps = gr.Textbox(value=as_text(DEFAULTS.steps), label="Steps", placeholder=RUNS_VALUE)  # fmt: skip
                sampler = gr.Dropdown([RUNS_OWN, *SAMPLERS], value=DEFAULTS.sampler or RUNS_OWN, label="Sampler")  # fmt: skip
                seed = gr.Number(value=DEFAULTS.seed, label="Seed", precision=0, minimum=0)
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
