"""The Stable Diffusion tab: Generate (a few images of one prompt) and Sweep (resumable).

The widgets' defaults are :class:`difflab.options.SDGeneration`'s and
:class:`~difflab.options.SDSweepAxes`'s (``difflab sd generate`` / ``sd sweep``'s), within
the page's caps (:mod:`difflab.ui.limits`). A model (and the CLIP model of a sweep) typed in
the page is confined to the models folder and the Hugging Face cache unless the server allows
any (:meth:`difflab.ui.lab.Lab.model`). Generate calls :func:`difflab.sd.generate.generate`
into ``runs/sd/STAMP`` (through :func:`difflab.experiments.sd_alignment.generate_measured`:
a mini-SD model's prompt accuracy is shown above the notes), checking for Cancel before every image and after every denoising
step, and captions every image with what the safety checker did, telling a filtered image
from a NaN black one; Sweep calls :func:`difflab.experiments.sd_sweep.sd_sweep` into
``runs/sd/sweeps/NAME`` and shows its table (with prompt accuracy and diversity for mini-SD),
grids and CLIP-score curves. An empty size box means the model's own size (its placeholder
says which, read from the chosen model's configs).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from difflab.errors import UsageError
from difflab.options import SD_SCHEDULERS, SDGeneration, SDPipelineSpec, SDSweepAxes
from difflab.ui import limits
from difflab.ui.jobs import Job
from difflab.ui.lab import SD_OUT, Lab, as_text, blank
from difflab.ui.paths import finished_sweep, inside, list_models, safe_name

GENERATION = SDGeneration(prompt="a prompt")  # `difflab sd generate`'s defaults
PIPELINE = SDPipelineSpec(device="cpu")
AXES = SDSweepAxes(prompts=("a prompt",))  # `difflab sd sweep`'s defaults
CLIP_MARKER = "config.json"  # a cached transformers model holds this


def size_text(size: tuple[int, int] | None) -> str:
    return "" if size is None else f"{size[0]}x{size[1]}"


def own_size(model: str) -> tuple[int, int] | None:
    """The model's own size (its UNet's sample size x its VAE's scale factor) when its
    configs can be read without loading it; None otherwise."""
    from difflab.sd.load import configured_size, resolve_model

    try:
        return configured_size(resolve_model(model))
    except UsageError:
        return None


def size_hint(lab: Lab, model: str) -> str:
    """The placeholder of the size box: what an empty box makes for ``model`` (one the page
    may read: :meth:`~difflab.ui.lab.Lab.model`)."""
    try:
        size = own_size(lab.model(model)) if blank(model) else None
    except UsageError:
        size = None
    return f"{size_text(size)} (the model's own)" if size else "empty: the model's own size"


def check_size(size: tuple[int, int] | None) -> None:
    if size is None:
        return
    if max(size) > limits.SD_SIDE:
        raise UsageError(
            f"size {size_text(size)}: the web UI takes at most {limits.SD_SIDE:,} pixels a "
            "side; use the command line for more"
        )


def generation(prompt, negative_prompt, guidance, steps, seed, n, size) -> SDGeneration:
    """The page's values as the options of ``difflab sd generate``, within the page's caps."""
    gen = SDGeneration(
        prompt=prompt, negative_prompt=negative_prompt, guidance=guidance, steps=steps,
        seed=seed, n=n, size=size,
    )  # fmt: skip
    limits.at_most(gen.n, limits.SD_IMAGES, "images")
    limits.at_most(gen.steps, limits.SD_STEPS, "steps")
    check_size(gen.size)
    return gen


def start_sd(
    lab: Lab, prompt: str, negative_prompt: str = "", guidance: float | None = GENERATION.guidance,
    steps: int = GENERATION.steps, seed: int = GENERATION.seed, n: int = GENERATION.n,
    size: str = size_text(GENERATION.size), scheduler: str | None = None, model: str = "",
    safety_checker: bool = PIPELINE.safety_checker,
) -> Job:  # fmt: skip
    gen = generation(prompt, negative_prompt, guidance, steps, seed, n, size)
    spec = SDPipelineSpec(
        model=lab.model(blank(model) or PIPELINE.model), device=lab.device,
        scheduler=blank(scheduler), safety_checker=safety_checker,
    )  # fmt: skip
    if gen.size is None:  # the model's own size, within the page's caps too
        check_size(own_size(spec.model))
    out = lab.runs / SD_OUT / time.strftime("%Y%m%d-%H%M%S")
    return lab.jobs.submit("sd", gen.prompt[:40], lambda job: _sd(lab, job, gen, spec, out))


def caption(rec) -> str:
    """What the page says under one generated image (seed, and what the checker did)."""
    d = rec.diagnosis
    if d.nsfw:
        return (
            f"seed {rec.seed}: FILTERED by the safety checker (flagged as possibly "
            "unsafe content; the pipeline returns a black image in its place)"
        )
    return f"seed {rec.seed}: {d.note}" if d.note else f"seed {rec.seed}"


def _sd(lab: Lab, job: Job, gen: SDGeneration, spec: SDPipelineSpec, out: Path) -> dict:
    from difflab.experiments.sd_alignment import accuracy_text, generate_measured

    def on_step(done: int, total: int) -> None:
        job.check()  # Cancel stops before the next image or denoising step
        job.update(done / total, f"step {done}/{total}")

    job.update(None, "loading the pipeline")
    out.mkdir(parents=True, exist_ok=True)
    r, judged = generate_measured(gen, out, spec, progress=False, on_step=on_step)
    images = [
        {"png": str(rec.png), "caption": caption(rec), "flagged": bool(rec.diagnosis.nsfw),
         "black": rec.diagnosis.black}
        for rec in r.images
    ]  # fmt: skip
    job.update(1.0, f"{len(images)} image(s), {r.seconds_per_image:.1f} s each")
    accuracy = None if judged is None else accuracy_text(judged)
    settings = r.settings | ({} if judged is None else {"prompt_accuracy": judged["prompt_accuracy"]})  # fmt: skip
    return {"images": images, "settings": settings, "notes": r.notes, "folder": str(out), "prompt_accuracy": accuracy}  # fmt: skip


def sweep_axes(prompts: str, guidance, steps, seeds, size, clip_model) -> SDSweepAxes:
    """The page's values as the axes of ``difflab sd sweep``, within the page's caps."""
    lines = [p.strip() for p in str(prompts).splitlines() if p.strip()]
    if len(lines) == 1 and Path(lines[0]).suffix.lower() in (".txt", ".prompts"):
        raise UsageError(
            f"prompts {lines[0]!r}: the web UI takes the prompts themselves, one per line, not a file"
        )
    axes = SDSweepAxes(
        prompts=tuple(lines), guidance=guidance, steps=steps, seeds=seeds, size=size,
        clip_model=clip_model,
    )  # fmt: skip
    cells = len(axes.prompts) * len(axes.guidance) * len(axes.steps) * len(axes.seeds)
    limits.at_most(cells, limits.SD_SWEEP_CELLS, "cells (prompts x guidance x steps x seeds)")
    limits.at_most(max(axes.steps), limits.SD_STEPS, "steps")
    check_size(axes.size)
    return axes


def start_sd_sweep(
    lab: Lab, prompts: str, name: str, guidance: str = as_text(AXES.guidance),
    steps: str = as_text(AXES.steps), seeds: str = as_text(AXES.seeds),
    size: str = size_text(AXES.size), scheduler: str | None = None, model: str = "",
    clip_model: str | None = AXES.clip_model,
) -> Job:  # fmt: skip
    from difflab.experiments.sd_sweep import check_folder, sweep_identity

    out = inside(lab.runs, f"{SD_OUT}/sweeps/{safe_name(name, 'sweep name')}", "sweep name")
    axes = sweep_axes(prompts, guidance, steps, seeds, size, clip_model)
    if axes.clip_model is not None:  # the CLIP score's model: confined like the pipeline's
        axes = replace(axes, clip_model=lab.model(axes.clip_model, "CLIP model", CLIP_MARKER))
    spec = SDPipelineSpec(
        model=lab.model(blank(model) or PIPELINE.model), device=lab.device,
        scheduler=blank(scheduler),
    )  # fmt: skip
    check_folder(out, sweep_identity(axes, spec))
    work = lambda job: _sd_sweep(lab, job, axes, spec, out)  # noqa: E731
    return lab.jobs.submit("sd-sweep", out.name, work, key=f"SD sweep {out.name!r}")


def _sd_sweep(lab: Lab, job: Job, axes: SDSweepAxes, spec: SDPipelineSpec, out: Path) -> str:
    from difflab.experiments.sd_sweep import sd_sweep

    def on_cell(done: int, total: int) -> None:
        job.update(done / total, f"{done}/{total} cells")

    out.parent.mkdir(parents=True, exist_ok=True)
    r = sd_sweep(
        axes, out, spec, progress=False, should_stop=job.cancelled, on_cell=on_cell
    )  # fmt: skip
    job.update(None, f"{len(r.rows)}/{r.cells_total} cells; {r.flagged} filtered by the safety checker")  # fmt: skip
    return str(out)


def sd_sweep_results(lab: Lab, name: str) -> dict[str, Any]:
    out, doc = finished_sweep(lab.runs, f"{SD_OUT}/sweeps", name)
    return {
        "summary": doc["summary"],
        "grids": [str(p) for p in sorted(out.glob("grid_p*.png"))],
        "plots": [str(p) for p in sorted(out.glob("clip_vs_guidance.png"))],
        "folder": str(out),
    }


def generate_notes(out: dict) -> tuple[str, str]:
    """The status suffix and the Markdown notes of a finished generation."""
    flagged = sum(i["flagged"] for i in out["images"])
    suffix = f" · {flagged} FILTERED by the safety checker" if flagged else ""
    notes = [
        f"- ⚠ **{i['caption'].split(':', 1)[0]}**:{i['caption'].split(':', 1)[1]}"
        for i in out["images"] if i["flagged"] or i["black"]
    ]  # fmt: skip
    notes += [f"- note: {n}" for n in out["notes"]]
    if out.get("prompt_accuracy"):
        notes.insert(0, f"- {out['prompt_accuracy']}")
    return suffix, "\n".join(notes)


def build(lab: Lab, page) -> None:
    import gradio as gr

    from difflab.ui.widgets import finished, follow, friendly, report_widgets, status_box, table

    models = [m.path for m in list_models(lab.models)]
    first = PIPELINE.model if PIPELINE.model in models or not models else models[0]
    with gr.Tab("Stable Diffusion", id="sd"):
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=1):
                    prompt = gr.Textbox(label="Prompt", lines=2)
                    neg = gr.Textbox(label="Negative prompt")
                    guidance = gr.Number(value=GENERATION.guidance, label="Guidance (CFG scale; empty: the model's, 7.5 for SD)", minimum=0)  # fmt: skip
                    steps = gr.Number(value=GENERATION.steps, label="Steps", precision=0, minimum=1, maximum=limits.SD_STEPS)  # fmt: skip
                    seed = gr.Number(value=GENERATION.seed, label="Seed", precision=0, minimum=0)
                    n = gr.Number(value=GENERATION.n, label="Images", precision=0, minimum=1, maximum=limits.SD_IMAGES)  # fmt: skip
                    size = gr.Textbox(value=size_text(GENERATION.size), label="Size (WxH, multiples of 8; empty: the model's own)", placeholder=size_hint(lab, first))  # fmt: skip
                    sched = gr.Dropdown(["", *SD_SCHEDULERS], value=PIPELINE.scheduler or "", label="Scheduler (empty: the model's)")  # fmt: skip
                    model = gr.Dropdown(models, value=first, allow_custom_value=True, label="Model (Models tab, or a Hub id / path)")  # fmt: skip
                    safety = gr.Checkbox(value=PIPELINE.safety_checker, label="Safety checker")
                    go = gr.Button("Generate", variant="primary")
                with gr.Column(scale=2):
                    status = status_box()
                    gallery = gr.Gallery(object_fit="contain", label="Images (captions say what the safety checker did)", columns=2, height=480)  # fmt: skip
                    notes = gr.Markdown(elem_id="sd-notes")
                    settings = gr.JSON(label="Settings (also in each PNG's parameters)")
        with gr.Tab("Sweep"):
            with gr.Row():
                with gr.Column(scale=1):
                    e_prompts = gr.Textbox(label="Prompts (one per line)", lines=3)
                    e_name = gr.Textbox(label="Sweep name", value="sd-sweep")
                    e_guid = gr.Textbox(label="Guidance values", value=as_text(AXES.guidance))
                    e_steps = gr.Textbox(label="Step counts", value=as_text(AXES.steps))
                    e_seeds = gr.Textbox(label="Seeds", value=as_text(AXES.seeds))
                    e_size = gr.Textbox(value=size_text(AXES.size), label="Size (empty: the model's own)", placeholder=size_hint(lab, first))  # fmt: skip
                    e_model = gr.Dropdown(models, value=first, allow_custom_value=True, label="Model")  # fmt: skip
                    e_clip = gr.Textbox(value=AXES.clip_model or "none", label="CLIP model for the score (Hub id or folder; none to skip)")  # fmt: skip
                    e_go = gr.Button("Run sweep", variant="primary")
                    report_widgets(lab, e_name, sd=True, api_name="sd_sweep_report")
                with gr.Column(scale=2):
                    e_status = status_box()
                    e_table = gr.Dataframe(label="Summary", interactive=False)
                    e_grids = gr.Gallery(object_fit="contain", label="Grids (rows guidance, columns steps)", columns=1, height=480)  # fmt: skip

    @friendly
    def on_generate(prompt, neg, guidance, steps, seed, n, size, sched, model, safety):
        job = start_sd(lab, prompt, neg, guidance, steps, seed, n, size, sched, model, safety)
        for j in follow(job):
            if j.state in ("queued", "running"):
                yield j.status_line(), gr.update(), "", gr.update()
        out = finished(job)
        suffix, text = generate_notes(out)
        gallery = [(i["png"], i["caption"]) for i in out["images"]]
        yield job.status_line() + suffix, gallery, text, out["settings"]

    @friendly
    def on_sweep(prompts, name, guidance, steps, seeds, size, model, clip):
        job = start_sd_sweep(lab, prompts, name, guidance, steps, seeds, size, None, model, clip)
        for j in follow(job):
            if j.state in ("queued", "running"):
                yield j.status_line(), gr.update(), gr.update()
        finished(job)
        res = sd_sweep_results(lab, Path(job.result).name)
        yield job.status_line(), table(res["summary"]), res["grids"] + res["plots"]

    model.change(
        lambda m: gr.update(placeholder=size_hint(lab, m)), [model], [size], api_name=False
    )
    e_model.change(lambda m: gr.update(placeholder=size_hint(lab, m)), [e_model], [e_size], api_name=False)  # fmt: skip
    go.click(on_generate, [prompt, neg, guidance, steps, seed, n, size, sched, model, safety], [status, gallery, notes, settings], api_name="sd_generate")  # fmt: skip
    e_go.click(on_sweep, [e_prompts, e_name, e_guid, e_steps, e_seeds, e_size, e_model, e_clip], [e_status, e_table, e_grids], api_name="sd_sweep")  # fmt: skip
