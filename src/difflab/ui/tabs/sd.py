"""The Stable Diffusion tab: Generate (a few images of one prompt) and Sweep (resumable).

Generate calls :func:`difflab.sd.generate.generate` (``difflab sd generate``) into
``runs/sd/STAMP`` and captions every image with what the safety checker did, telling a
filtered image from a NaN black one; Sweep calls
:func:`difflab.experiments.sd_sweep.sd_sweep` (``difflab sd sweep``) into
``runs/sd/sweeps/NAME`` and shows its table, grids and CLIP-score curves.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from difflab.errors import UsageError
from difflab.ui.jobs import Job
from difflab.ui.lab import SD_OUT, Lab, number
from difflab.ui.paths import inside, list_models, safe_name


def sd_model(model: str) -> str:
    from difflab.sd.load import DEFAULT_MODEL

    return (model or "").strip() or DEFAULT_MODEL


def start_sd(
    lab: Lab, prompt: str, negative_prompt: str = "", guidance: float = 7.5, steps: int = 25,
    seed: int = 0, n: int = 1, size: str = "512x512", scheduler: str | None = None,
    model: str = "", safety_checker: bool = True,
) -> Job:  # fmt: skip
    from difflab.sd.generate import (
        check_count,
        check_guidance,
        check_prompt,
        check_seed,
        check_steps,
        parse_size,
    )  # fmt: skip
    from difflab.sd.load import check_scheduler

    check_prompt(prompt, unconditional=False)
    guidance = check_guidance(number(guidance, float, "guidance"))
    steps = check_steps(number(steps, int, "steps"))
    seed = check_seed(number(seed, int, "seed"))
    n = check_count(number(n, int, "images"), "images")
    parse_size(size)
    scheduler = check_scheduler(scheduler or None)
    out = lab.runs / SD_OUT / time.strftime("%Y%m%d-%H%M%S")
    kw = dict(
        negative_prompt=negative_prompt or "", guidance=guidance, steps=steps, seed=seed, n=n,
        size=size, scheduler=scheduler, model=sd_model(model), safety_checker=safety_checker,
    )  # fmt: skip
    return lab.jobs.submit("sd", prompt[:40], lambda job: _sd(lab, job, prompt, out, kw))


def caption(rec) -> str:
    """What the page says under one generated image (seed, and what the checker did)."""
    d = rec.diagnosis
    if d.nsfw:
        return (
            f"seed {rec.seed}: FILTERED by the safety checker (flagged as possibly "
            "unsafe content; the pipeline returns a black image in its place)"
        )
    return f"seed {rec.seed}: {d.note}" if d.note else f"seed {rec.seed}"


def _sd(lab: Lab, job: Job, prompt: str, out: Path, kw: dict) -> dict:
    from difflab.sd.generate import generate

    job.update(None, "loading the pipeline")
    out.mkdir(parents=True, exist_ok=True)
    r = generate(prompt, out, device=lab.device, progress=False, **kw)
    images = [
        {"png": str(rec.png), "caption": caption(rec), "flagged": bool(rec.diagnosis.nsfw),
         "black": rec.diagnosis.black}
        for rec in r.images
    ]  # fmt: skip
    job.update(1.0, f"{len(images)} image(s), {r.seconds_per_image:.1f} s each")
    return {"images": images, "settings": r.settings, "notes": r.notes, "folder": str(out)}


def start_sd_sweep(
    lab: Lab, prompts: str, name: str, guidance: str = "1,3,7.5", steps: str = "10,25",
    seeds: str = "0", size: str = "512x512", scheduler: str | None = None, model: str = "",
    clip_model: str = "none",
) -> Job:  # fmt: skip
    from difflab.experiments.sd_sweep import check_folder, parse_prompts, sweep_identity

    out = inside(lab.runs, f"{SD_OUT}/sweeps/{safe_name(name, 'sweep name')}", "sweep name")
    lines = [p.strip() for p in str(prompts).splitlines() if p.strip()]
    parse_prompts(lines)
    kw = dict(
        guidance=guidance, steps=steps, seeds=seeds, size=size, scheduler=scheduler or None,
        model=sd_model(model), clip_model=clip_model or None,
    )  # fmt: skip
    identity = sweep_identity(
        lines, guidance, steps, seeds, "", size, scheduler or None, kw["model"], lab.device,
        "auto", True, kw["clip_model"], False, None,
    )  # fmt: skip
    check_folder(out, identity)
    return lab.jobs.submit("sd-sweep", out.name, lambda job: _sd_sweep(lab, job, lines, out, kw))


def _sd_sweep(lab: Lab, job: Job, prompts: list[str], out: Path, kw: dict) -> str:
    from difflab.experiments.sd_sweep import sd_sweep

    def on_cell(done: int, total: int) -> None:
        job.update(done / total, f"{done}/{total} cells")

    out.parent.mkdir(parents=True, exist_ok=True)
    r = sd_sweep(
        prompts, out, device=lab.device, progress=False, should_stop=job.cancelled,
        on_cell=on_cell, **kw,
    )  # fmt: skip
    job.update(None, f"{len(r.rows)}/{r.cells_total} cells; {r.flagged} filtered by the safety checker")  # fmt: skip
    return str(out)


def sd_sweep_results(lab: Lab, name: str) -> dict[str, Any]:
    out = inside(lab.runs, f"{SD_OUT}/sweeps/{name}", "sweep")
    if not (out / "metrics.json").is_file():
        raise UsageError(f"sweep {name!r}: no finished cell yet")
    doc = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
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
    return suffix, "\n".join(notes)


def build(lab: Lab, page) -> None:
    import gradio as gr

    from difflab.sd.load import SCHEDULERS
    from difflab.ui.widgets import finished, follow, friendly, report_widgets, status_box, table

    models = [m.path for m in list_models(lab.models)]
    first = models[0] if models else None
    with gr.Tab("Stable Diffusion", id="sd"):
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=1):
                    prompt = gr.Textbox(label="Prompt", lines=2)
                    neg = gr.Textbox(label="Negative prompt")
                    guidance = gr.Number(value=7.5, label="Guidance (CFG scale)", minimum=0)
                    steps = gr.Number(value=25, label="Steps", precision=0, minimum=1)
                    seed = gr.Number(value=0, label="Seed", precision=0, minimum=0)
                    n = gr.Number(value=1, label="Images", precision=0, minimum=1)
                    size = gr.Textbox(value="512x512", label="Size (WxH, multiples of 8)")
                    sched = gr.Dropdown([""] + list(SCHEDULERS), value="", label="Scheduler (empty: the model's)")  # fmt: skip
                    model = gr.Dropdown(models, value=first, allow_custom_value=True, label="Model (Models tab, or a Hub id / path)")  # fmt: skip
                    safety = gr.Checkbox(value=True, label="Safety checker")
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
                    e_guid = gr.Textbox(label="Guidance values", value="1,3,7.5,12")
                    e_steps = gr.Textbox(label="Step counts", value="10,25")
                    e_seeds = gr.Textbox(label="Seeds", value="0")
                    e_size = gr.Textbox(value="512x512", label="Size")
                    e_model = gr.Dropdown(models, value=first, allow_custom_value=True, label="Model")  # fmt: skip
                    e_clip = gr.Textbox(value="none", label="CLIP model for the score (Hub id or folder; none to skip)")  # fmt: skip
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

    go.click(on_generate, [prompt, neg, guidance, steps, seed, n, size, sched, model, safety], [status, gallery, notes, settings], api_name="sd_generate")  # fmt: skip
    e_go.click(on_sweep, [e_prompts, e_name, e_guid, e_steps, e_seeds, e_size, e_model, e_clip], [e_status, e_table, e_grids], api_name="sd_sweep")  # fmt: skip
