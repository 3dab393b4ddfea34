"""The Gradio app: tabs wired to :class:`difflab.ui.lab.Lab`, and the server's launch rules.

Tabs: Train, Sample, Processes, Sweep, Stable Diffusion, Runs, Models, plus a Jobs panel.
Heavy buttons queue a job (:mod:`difflab.ui.jobs`) and follow it, so a page shows progress
and can cancel; errors reach the page as one line (``gr.Error``), never as a traceback.
:func:`launch` binds 127.0.0.1 unless told otherwise, and then only with ``--auth`` (or an
explicit ``--no-auth``); the server serves files from the runs folder alone and caps uploads.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from difflab.errors import UsageError
from difflab.ui.jobs import Job
from difflab.ui.lab import Lab

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_UPLOAD = "20mb"
POLL_S = 0.25  # how often a following handler looks at its job
log = logging.getLogger("difflab.ui")

CSS = """
.status textarea, .status input {font-family: ui-monospace, monospace; font-size: 0.85em}
footer {display: none !important}
"""


def check_bind(host: str, auth: str | None, no_auth: bool) -> tuple[str, str] | None:
    """The (user, password) to require, or None; refuses a public bind without a decision."""
    pair = None
    if auth is not None:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise UsageError(f"--auth {auth!r}: expected USER:PASSWORD")
        pair = (user, password)
    if host not in LOOPBACK:
        if pair is None and not no_auth:
            raise UsageError(
                f"--host {host}: other machines could reach the lab; give --auth USER:PASSWORD "
                "(or --no-auth to allow anyone who can reach this port)"
            )
        print(
            f"warning: listening on {host}: the lab (and the runs folder) is reachable from "
            f"the network{'' if pair else ' without a password'}",
            file=sys.stderr,
        )
    return pair


def _friendly(fn: Callable) -> Callable:
    """Turn any exception of a handler into one line shown in the page (``gr.Error``)."""
    import gradio as gr

    def message(e: BaseException) -> str:
        if isinstance(e, (UsageError, ValueError)):
            return str(e)
        log.exception("UI handler %s failed", fn.__name__)
        first = (str(e).strip().splitlines() or [""])[0]
        return f"{type(e).__name__}: {first}" if first else type(e).__name__

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as e:
                raise gr.Error(message(e), print_exception=False) from None

        return gen

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as e:
            raise gr.Error(message(e), print_exception=False) from None

    return wrapper


def follow(job: Job) -> Iterator[Job]:
    """Yield ``job`` while it runs (every :data:`POLL_S`), then once more when it ended."""
    while not job.wait(POLL_S):
        yield job
    yield job


def finished(job: Job) -> Any:
    """The job's result, or one line (``gr.Error``) when it failed or was cancelled."""
    import gradio as gr

    if job.state == "failed":
        raise gr.Error(job.error or "failed", print_exception=False)
    if job.state == "cancelled":
        raise gr.Error(f"cancelled: {job.message}", print_exception=False)
    return job.result


def _table(rows: list[dict], columns: list[str] | None = None):
    import pandas as pd

    df = pd.DataFrame(rows)
    if columns is not None:
        df = df.reindex(columns=columns) if len(df) else pd.DataFrame(columns=columns)
    return df.round(4)


def loss_plot(rows: list[dict]):
    import pandas as pd

    return pd.DataFrame({"step": [r["step"] for r in rows], "loss": [r["loss"] for r in rows]})


def build_app(lab: Lab):
    """The Blocks app over ``lab``; every event also has an ``api_name`` for gradio_client."""
    import gradio as gr

    from difflab.config import PRESETS
    from difflab.ddpm.data import DATASET_NAMES
    from difflab.ddpm.sampling import SAMPLERS
    from difflab.sd.load import SCHEDULERS

    runs = lab.run_names

    def status_box(**kw):
        return gr.Textbox(label="Progress", interactive=False, elem_classes="status", **kw)

    def report_widgets():
        """The report button, the written file and a link that opens it."""
        return gr.Button("Write the HTML report"), gr.File(label="report.html"), gr.Markdown()

    def newest() -> str | None:
        names = runs()
        return names[0] if names else None

    def run_choices(current: str | None = None):
        names = runs()
        value = current if current in names else (names[0] if names else None)
        return gr.update(choices=names, value=value)

    with gr.Blocks(title="difflab", analytics_enabled=False) as app:
        gr.Markdown(
            f"## difflab · the diffusion lab\nRuns folder `{lab.runs}` · device `{lab.device}` · "
            "one heavy job runs at a time; the others wait in the queue (see *Jobs*)."
        )
        # -- Train ---------------------------------------------------------------------------
        with gr.Tab("Train", id="train"):
            with gr.Row():
                with gr.Column(scale=1):
                    t_name = gr.Textbox(label="Run name", value="ui-run")
                    t_dataset = gr.Dropdown(list(DATASET_NAMES), value="mnist5k", label="Dataset")
                    t_preset = gr.Dropdown(list(PRESETS), value="quick", label="Preset")
                    t_minutes = gr.Number(value=2.0, label="Minutes of training", minimum=0.05)
                    t_seed = gr.Number(value=0, label="Seed", precision=0, minimum=0)
                    t_resume = gr.Checkbox(label="Resume this run (keeps its settings)")
                    with gr.Row():
                        t_start = gr.Button("Start", variant="primary")
                        t_stop = gr.Button("Stop", variant="stop")
                with gr.Column(scale=2):
                    t_status = status_box()
                    t_plot = gr.LinePlot(x="step", y="loss", label="Training loss", height=320)
            timer = gr.Timer(2.0)

            @_friendly
            def start_training(name, dataset, preset, minutes, seed, resume):
                job = lab.start_training(name, dataset, preset, minutes, seed, resume)
                return job.status_line()

            def train_status():
                line, run = lab.training_status()
                rows = lab.loss_rows(run) if run is not None else []
                return line, loss_plot(rows)

            t_start.click(
                start_training, [t_name, t_dataset, t_preset, t_minutes, t_seed, t_resume],
                t_status, api_name="train",
            )  # fmt: skip
            t_stop.click(_friendly(lab.stop_training), t_name, t_status, api_name="stop_training")
            timer.tick(train_status, None, [t_status, t_plot], api_name=False, show_progress="hidden")  # fmt: skip

        # -- Sample --------------------------------------------------------------------------
        with gr.Tab("Sample", id="sample"):
            with gr.Row():
                with gr.Column(scale=1):
                    s_run = gr.Dropdown(
                        label="Run", choices=runs(), value=newest(), elem_id="sample-run"
                    )
                    s_refresh = gr.Button("↻ runs", size="sm")
                    s_classes = gr.Textbox(label="Classes (e.g. 0,3,7; empty = all)", value="")
                    s_n = gr.Number(value=4, label="Samples per class", precision=0, minimum=1)
                    s_guid = gr.Number(
                        value=2.0, label="Guidance s (0 uncond., 1 cond.)", minimum=0
                    )
                    s_steps = gr.Number(value=10, label="Steps", precision=0, minimum=1)
                    s_sampler = gr.Dropdown(list(SAMPLERS), value="dpm++", label="Sampler")
                    s_seed = gr.Number(value=0, label="Seed", precision=0, minimum=0)
                    with gr.Row():
                        s_go = gr.Button("Sample", variant="primary", elem_id="sample-go")
                        s_cancel = gr.Button("Cancel", variant="stop")
                with gr.Column(scale=2):
                    s_status = status_box(elem_id="sample-status")
                    s_image = gr.Image(label="Preview (predicted x̂₀), then the grid", type="filepath", elem_id="sample-image", height=420)  # fmt: skip
                    with gr.Row():
                        s_png = gr.File(label="PNG")
                        s_npz = gr.File(label="NPZ")
                    s_cmd = gr.Code(
                        label="The same with the command line", language="shell", wrap_lines=True
                    )
            s_job = gr.State(None)

            @_friendly
            def sample(run, classes, n, guidance, steps, sampler, seed):
                job = lab.start_sampling(run, classes, n, guidance, steps, sampler, seed)
                for j in follow(job):
                    if j.state == "running" or j.state == "queued":
                        yield j.status_line(), j.preview, None, None, "", j.id
                out = finished(job)
                yield job.status_line(), out["png"], out["png"], out["npz"], out["command"], job.id

            s_refresh.click(run_choices, s_run, s_run, api_name=False)
            s_go.click(
                sample, [s_run, s_classes, s_n, s_guid, s_steps, s_sampler, s_seed],
                [s_status, s_image, s_png, s_npz, s_cmd, s_job], api_name="sample",
            )  # fmt: skip
            s_cancel.click(lambda i: lab.jobs.cancel(i) and None, s_job, None, api_name=False)

        # -- Processes -----------------------------------------------------------------------
        with gr.Tab("Processes", id="processes"):
            gr.Markdown("**Forward process**: the same images and noise at step *t* (0 = data).")
            with gr.Row():
                f_source = gr.Dropdown(
                    list(DATASET_NAMES[:2]) + runs(), value="mnist5k",
                    label="Dataset, or a run (its dataset and schedule)",
                )  # fmt: skip
                f_t = gr.Slider(0, 1000, value=250, step=1, label="t")
            f_image = gr.Image(label="x_t", height=240)
            f_note = gr.Markdown()
            f_t.release(_friendly(lab.forward_view), [f_source, f_t], [f_image, f_note], api_name="forward")  # fmt: skip
            f_source.change(_friendly(lab.forward_view), [f_source, f_t], [f_image, f_note], api_name=False)  # fmt: skip

            gr.Markdown("**Reverse process**: x_t and the predicted x̂₀ along one trajectory.")
            with gr.Row():
                r_run = gr.Dropdown(label="Run", choices=runs(), value=newest())
                r_class = gr.Number(value=0, label="Class", precision=0, minimum=0)
                r_guid = gr.Number(value=2.0, label="Guidance", minimum=0)
                r_steps = gr.Number(value=50, label="Steps", precision=0, minimum=1)
                r_sampler = gr.Dropdown(list(SAMPLERS), value="ddim", label="Sampler")
                r_go = gr.Button("Run the reverse process", variant="primary")
            r_slider = gr.Slider(0, 50, value=0, step=1, label="Step (0 = pure noise)")
            with gr.Row():
                r_xt = gr.Image(label="x_t", height=220)
                r_x0 = gr.Image(label="predicted x̂₀", height=220)
            r_note = gr.Markdown()
            r_frames = gr.State([])

            @_friendly
            def reverse(run, cls, guidance, steps, sampler):
                job = lab.start_reverse(run, cls, guidance, steps, sampler)
                for j in follow(job):
                    if j.state in ("queued", "running"):
                        yield [], gr.update(), None, None, j.status_line()
                frames = finished(job)
                yield frames, gr.update(maximum=len(frames) - 1, value=0), frames[0]["x_t"], frames[0]["x0"], _frame_note(frames, 0)  # fmt: skip

            def show(frames, i):
                if not frames:
                    return None, None, ""
                i = int(min(max(i, 0), len(frames) - 1))
                return frames[i]["x_t"], frames[i]["x0"], _frame_note(frames, i)

            r_go.click(reverse, [r_run, r_class, r_guid, r_steps, r_sampler], [r_frames, r_slider, r_xt, r_x0, r_note], api_name="reverse")  # fmt: skip
            r_slider.change(show, [r_frames, r_slider], [r_xt, r_x0, r_note], api_name=False)

        # -- Sweep ---------------------------------------------------------------------------
        with gr.Tab("Sweep", id="sweep"):
            with gr.Row():
                with gr.Column(scale=1):
                    w_run = gr.Dropdown(label="Run", choices=runs(), value=newest())
                    w_name = gr.Textbox(label="Sweep name", value="ui-sweep")
                    w_guid = gr.Textbox(label="Guidance values", value="0,1,2,4")
                    w_steps = gr.Textbox(label="Step counts", value="5,10,25")
                    w_sampler = gr.Textbox(label="Samplers", value="ddim")
                    w_seeds = gr.Textbox(label="Seeds", value="0")
                    w_n = gr.Number(
                        value=5, label="Samples per class per cell", precision=0, minimum=2
                    )
                    with gr.Row():
                        w_go = gr.Button("Run sweep", variant="primary")
                        w_cancel = gr.Button("Cancel", variant="stop")
                    w_report, w_report_file, w_report_link = report_widgets()
                with gr.Column(scale=2):
                    w_status = status_box()
                    w_table = gr.Dataframe(
                        label="Summary (mean ± std over seeds)", interactive=False
                    )
                    w_grid = gr.Gallery(
                        object_fit="contain", label="Image grids", columns=1, height=420
                    )
                    w_plots = gr.Gallery(object_fit="contain", label="Plots", columns=1, height=420)
            w_job = gr.State(None)

            def sweep_view(name):
                res = lab.sweep_results(name)
                return _table(res["table"]), res["grids"], res["plots"]

            @_friendly
            def sweep(run, name, guidance, steps, sampler, seeds, n):
                job = lab.start_sweep(run, name, guidance, steps, sampler, seeds, n)
                for j in follow(job):
                    if j.state in ("queued", "running"):
                        yield j.status_line(), gr.update(), gr.update(), gr.update(), j.id
                finished(job)
                yield (job.status_line(), *sweep_view(Path(job.result).name), job.id)

            w_go.click(sweep, [w_run, w_name, w_guid, w_steps, w_sampler, w_seeds, w_n], [w_status, w_table, w_grid, w_plots, w_job], api_name="sweep")  # fmt: skip
            w_cancel.click(lambda i: lab.jobs.cancel(i) and None, w_job, None, api_name=False)

            def report_for(sd: bool) -> Callable:
                @_friendly
                def sweep_report(name):
                    path = lab.sweep_report(name, sd=sd)
                    return path, f"[Open the report in a new tab](/gradio_api/file={path})"

                return sweep_report

            sweep_report = report_for(sd=False)

            w_report.click(sweep_report, w_name, [w_report_file, w_report_link], api_name="sweep_report")  # fmt: skip

        # -- Stable Diffusion ----------------------------------------------------------------
        with gr.Tab("Stable Diffusion", id="sd"):
            models = [m.path for m in lab.model_entries()]
            with gr.Tab("Generate"):
                with gr.Row():
                    with gr.Column(scale=1):
                        d_prompt = gr.Textbox(label="Prompt", lines=2)
                        d_neg = gr.Textbox(label="Negative prompt")
                        d_guid = gr.Number(value=7.5, label="Guidance (CFG scale)", minimum=0)
                        d_steps = gr.Number(value=25, label="Steps", precision=0, minimum=1)
                        d_seed = gr.Number(value=0, label="Seed", precision=0, minimum=0)
                        d_n = gr.Number(value=1, label="Images", precision=0, minimum=1)
                        d_size = gr.Textbox(value="512x512", label="Size (WxH, multiples of 8)")
                        d_sched = gr.Dropdown([""] + list(SCHEDULERS), value="", label="Scheduler (empty: the model's)")  # fmt: skip
                        d_model = gr.Dropdown(models, value=models[0] if models else None, allow_custom_value=True, label="Model (Models tab, or a Hub id / path)")  # fmt: skip
                        d_safety = gr.Checkbox(value=True, label="Safety checker")
                        d_go = gr.Button("Generate", variant="primary")
                    with gr.Column(scale=2):
                        d_status = status_box()
                        d_gallery = gr.Gallery(object_fit="contain", label="Images (captions say what the safety checker did)", columns=2, height=480)  # fmt: skip
                        d_notes = gr.Markdown(elem_id="sd-notes")
                        d_settings = gr.JSON(label="Settings (also in each PNG's parameters)")

                @_friendly
                def sd_generate(prompt, neg, guidance, steps, seed, n, size, sched, model, safety):
                    job = lab.start_sd(
                        prompt, neg, guidance, steps, seed, n, size, sched, model, safety
                    )
                    for j in follow(job):
                        if j.state in ("queued", "running"):
                            yield j.status_line(), gr.update(), "", gr.update()
                    out = finished(job)
                    flagged = sum(i["flagged"] for i in out["images"])
                    line = job.status_line() + (f" · {flagged} FILTERED by the safety checker" if flagged else "")  # fmt: skip
                    notes = [f"- ⚠ **{i['caption'].split(':', 1)[0]}**:{i['caption'].split(':', 1)[1]}"
                             for i in out["images"] if i["flagged"] or i["black"]]  # fmt: skip
                    notes += [f"- note: {n}" for n in out["notes"]]
                    gallery = [(i["png"], i["caption"]) for i in out["images"]]
                    yield line, gallery, "\n".join(notes), out["settings"]

                d_go.click(sd_generate, [d_prompt, d_neg, d_guid, d_steps, d_seed, d_n, d_size, d_sched, d_model, d_safety], [d_status, d_gallery, d_notes, d_settings], api_name="sd_generate")  # fmt: skip
            with gr.Tab("Sweep"):
                with gr.Row():
                    with gr.Column(scale=1):
                        e_prompts = gr.Textbox(label="Prompts (one per line)", lines=3)
                        e_name = gr.Textbox(label="Sweep name", value="sd-sweep")
                        e_guid = gr.Textbox(label="Guidance values", value="1,3,7.5,12")
                        e_steps = gr.Textbox(label="Step counts", value="10,25")
                        e_seeds = gr.Textbox(label="Seeds", value="0")
                        e_size = gr.Textbox(value="512x512", label="Size")
                        e_model = gr.Dropdown(models, value=models[0] if models else None, allow_custom_value=True, label="Model")  # fmt: skip
                        e_clip = gr.Textbox(value="none", label="CLIP model for the score (Hub id or folder; none to skip)")  # fmt: skip
                        e_go = gr.Button("Run sweep", variant="primary")
                        e_report, e_report_file, e_report_link = report_widgets()
                    with gr.Column(scale=2):
                        e_status = status_box()
                        e_table = gr.Dataframe(label="Summary", interactive=False)
                        e_grids = gr.Gallery(object_fit="contain", label="Grids (rows guidance, columns steps)", columns=1, height=480)  # fmt: skip

                @_friendly
                def sd_sweep(prompts, name, guidance, steps, seeds, size, model, clip):
                    job = lab.start_sd_sweep(prompts, name, guidance, steps, seeds, size, None, model, clip)  # fmt: skip
                    for j in follow(job):
                        if j.state in ("queued", "running"):
                            yield j.status_line(), gr.update(), gr.update()
                    finished(job)
                    res = lab.sd_sweep_results(Path(job.result).name)
                    yield job.status_line(), _table(res["summary"]), res["grids"] + res["plots"]

                e_report.click(report_for(sd=True), e_name, [e_report_file, e_report_link], api_name="sd_sweep_report")  # fmt: skip
                e_go.click(sd_sweep, [e_prompts, e_name, e_guid, e_steps, e_seeds, e_size, e_model, e_clip], [e_status, e_table, e_grids], api_name="sd_sweep")  # fmt: skip

        # -- Runs ----------------------------------------------------------------------------
        with gr.Tab("Runs", id="runs"):
            columns = ["run", "dataset", "preset", "steps", "accuracy", "MB", "modified"]
            u_table = gr.Dataframe(label="Run folders", interactive=False)
            with gr.Row():
                u_run = gr.Dropdown(label="Run", choices=runs())
                u_refresh = gr.Button("↻ refresh", size="sm")
            with gr.Row():
                u_config = gr.JSON(label="config.json")
                u_eval = gr.JSON(label="eval.json")
            u_loss = gr.LinePlot(x="step", y="loss", label="Training loss", height=260)
            u_figs = gr.Gallery(object_fit="contain", label="Figures", columns=2, height=420)

            @_friendly
            def run_view(name):
                d = lab.run_details(name)
                return d["config"], d["eval"], loss_plot(d["loss"]), d["figures"]

            def refresh_runs(current):
                return _table(lab.runs_table(), columns), run_choices(current)

            u_refresh.click(refresh_runs, u_run, [u_table, u_run], api_name="runs")
            u_run.change(run_view, u_run, [u_config, u_eval, u_loss, u_figs], api_name="run_details")  # fmt: skip

        # -- Models --------------------------------------------------------------------------
        with gr.Tab("Models", id="models"):
            gr.Markdown(
                f"Stable Diffusion models in `{lab.models}` (diffusers folders and single "
                "`.safetensors` files) and pipelines already in the Hugging Face cache. Nothing "
                "is downloaded here."
            )
            m_table = gr.Dataframe(label="Models", interactive=False)
            m_refresh = gr.Button("↻ refresh", size="sm")
            with gr.Row():
                m_path = gr.Textbox(label="Import a local .safetensors file (path on the server)")
                m_import = gr.Button("Import")
            m_status = gr.Markdown()

            def models_table():
                rows = [
                    {"name": m.name, "type": m.kind, "size": _size(m.bytes), "--model": m.path}
                    for m in lab.model_entries()
                ]  # fmt: skip
                return _table(rows, ["name", "type", "size", "--model"])

            @_friendly
            def import_file(path):
                dest = lab.import_model(path)
                return f"Imported as `{dest}`.", models_table()

            m_refresh.click(models_table, None, m_table, api_name="models")
            m_import.click(import_file, m_path, [m_status, m_table], api_name="import_model")

        # -- Jobs ----------------------------------------------------------------------------
        with gr.Accordion("Jobs", open=False):
            j_table = gr.Dataframe(interactive=False)
            with gr.Row():
                j_id = gr.Number(label="Job #", precision=0)
                j_cancel = gr.Button("Cancel job", variant="stop")

            def jobs_table():
                rows = [
                    {"#": j.id, "kind": j.kind, "what": j.title, "state": j.state,
                     "progress": "" if j.progress is None else f"{j.progress:.0%}",
                     "message": j.error if j.state == "failed" else j.message,
                     "submitted": time.strftime("%H:%M:%S", time.localtime(j.submitted))}
                    for j in lab.jobs.jobs()
                ]  # fmt: skip
                return _table(rows, ["#", "kind", "what", "state", "progress", "message", "submitted"])  # fmt: skip

            j_cancel.click(lambda i: lab.jobs.cancel(int(i or 0)) and None, j_id, None, api_name="cancel_job")  # fmt: skip
            timer.tick(jobs_table, None, j_table, api_name=False, show_progress="hidden")

        def on_load():
            names = runs()
            pick = gr.update(choices=names, value=names[0] if names else None)
            sources = gr.update(choices=list(DATASET_NAMES[:2]) + names)
            table = _table(lab.runs_table(), columns)
            image, note = lab.forward_view("mnist5k", 250)
            details = run_view(names[0]) if names else (None, None, loss_plot([]), [])
            return (table, models_table(), pick, pick, pick, pick, sources, image, note, *details)

        app.load(on_load, None, [u_table, m_table, s_run, r_run, w_run, u_run, f_source, f_image, f_note, u_config, u_eval, u_loss, u_figs], api_name=False)  # fmt: skip
    return app


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _frame_note(frames: list[dict], i: int) -> str:
    t = frames[i]["t"]
    return f"step {i} of {len(frames) - 1}: " + ("the final sample x₀" if t == 0 else f"t = {t}")


def launch(
    runs_dir: str | Path = "runs",
    models_dir: str | Path = "models",
    host: str = "127.0.0.1",
    port: int = 7860,
    auth: str | None = None,
    no_auth: bool = False,
    device: str = "auto",
    block: bool = True,
):
    """``difflab ui``: check the bind rules, then build and serve the app."""
    pair = check_bind(host, auth, no_auth)
    if not 0 < int(port) < 65536:
        raise UsageError(f"--port {port}: must be between 1 and 65535")
    runs = Path(runs_dir).expanduser().resolve()
    try:
        runs.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--runs-dir {runs_dir}: cannot create it ({e.strerror})") from None
    # Gradio's own copies of shown files live inside the runs folder too, so that nothing
    # outside it is ever served.
    os.environ.setdefault("GRADIO_TEMP_DIR", str(runs / ".ui-cache"))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    lab = Lab(runs, models_dir, device)
    if block:
        print(f"difflab ui: http://{host}:{port}  (runs folder {runs}; Ctrl+C stops)")
    return serve(lab, host, int(port), pair, block)


def serve(lab: Lab, host: str, port: int, auth: tuple[str, str] | None = None, block: bool = True):
    """Serve the app over ``lab``: files only from its runs folder, uploads capped."""
    app = build_app(lab)
    app.queue(default_concurrency_limit=8)
    app.launch(
        server_name=host, server_port=port, auth=auth, allowed_paths=[str(lab.runs)],
        max_file_size=MAX_UPLOAD, prevent_thread_lock=not block, quiet=not block,
        show_error=True, ssr_mode=False, css=CSS,
    )  # fmt: skip
    return app
