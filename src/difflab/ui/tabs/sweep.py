"""The Sweep tab: a resumable DDPM sweep of a run over guidance x steps x samplers x seeds
(x the run's checkpoints: the training steps it kept, or all of them with its final weights).

The axes and their defaults are :class:`difflab.options.DDPMSweepAxes` (``difflab sweep``'s);
one sweep has at most :data:`~difflab.ui.limits.SWEEP_CELLS` cells from the page. The job
calls :func:`difflab.experiments.ddpm_sweep.sweep_run` into ``runs/sweeps/NAME`` (one job per
folder at a time); cancelling stops between cells, so the finished cells stay and the same
settings resume the folder. The tab shows the summary table, the grids and the plots, and
writes the HTML report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from difflab.options import DDPMSweepAxes
from difflab.ui import limits
from difflab.ui.jobs import Job
from difflab.ui.lab import SWEEPS, Lab, as_text
from difflab.ui.paths import finished_sweep, inside, safe_name

AXES = DDPMSweepAxes()  # what `difflab sweep RUN --out DIR` sweeps


def sweep_axes(guidance, steps, samplers, seeds, n_per_class, checkpoints="") -> DDPMSweepAxes:
    """The page's values as the axes of ``difflab sweep``, within the page's caps (blank
    checkpoints: the final weights only, as without ``--checkpoints``)."""
    axes = DDPMSweepAxes(
        guidance=guidance, steps=steps, samplers=samplers, seeds=seeds, n_per_class=n_per_class,
        checkpoints=None if not str(checkpoints or "").strip() else checkpoints,
    )  # fmt: skip
    _cap_cells(axes, 1 if axes.checkpoints in (None, "all") else len(axes.checkpoints))
    limits.at_most(axes.n_per_class, limits.SWEEP_N, "samples per class per cell")
    return axes


def _cap_cells(axes: DDPMSweepAxes, checkpoints: int) -> None:
    cells = (
        len(axes.guidance) * len(axes.steps) * len(axes.samplers) * len(axes.seeds) * checkpoints
    )
    axes_named = "guidance x steps x samplers x seeds" + " x checkpoints" * (axes.checkpoints is not None)  # fmt: skip
    limits.at_most(cells, limits.SWEEP_CELLS, f"cells ({axes_named})")


def start_sweep(
    lab: Lab, run: str, name: str, guidance: str = as_text(AXES.guidance),
    steps: str = as_text(AXES.steps), sampler: str = as_text(AXES.samplers),
    seeds: str = as_text(AXES.seeds), n_per_class: int = AXES.n_per_class, checkpoints: str = "",
) -> Job:  # fmt: skip
    from difflab.experiments.ddpm_sweep import check_folder, sweep_identity

    path = lab.run_path(run)
    out = inside(lab.runs, f"{SWEEPS}/{safe_name(name, 'sweep name')}", "sweep name")
    axes = sweep_axes(guidance, steps, sampler, seeds, n_per_class, checkpoints)
    axes = axes.for_run(lab.run_config(path))
    identity = sweep_identity(path, axes, device=lab.device)
    _cap_cells(axes, len(identity.get("checkpoints", [None])))  # "all": as many as the run kept
    out.parent.mkdir(parents=True, exist_ok=True)
    check_folder(out, identity)  # refuses another sweep's folder before queueing (reads only)
    work = lambda job: _sweep(lab, job, path, out, axes)  # noqa: E731
    return lab.jobs.submit("sweep", out.name, work, key=f"sweep {out.name!r}")


def _sweep(lab: Lab, job: Job, path, out, axes: DDPMSweepAxes) -> str:
    from difflab.experiments.ddpm_sweep import sweep_run

    def on_cell(done: int, total: int) -> None:
        job.update(done / total, f"{done}/{total} cells")

    r = sweep_run(
        path, axes, out, device=lab.device, progress=False, should_stop=job.cancelled,
        on_cell=on_cell,
    )  # fmt: skip
    job.update(None, f"{len(r.rows)}/{r.cells_total} cells done ({r.cells_run} computed now)")
    return str(out)


def sweep_results(lab: Lab, name: str) -> dict[str, Any]:
    """Summary rows, grid and plot files of a DDPM sweep folder."""
    from difflab.experiments.report import mean_std_text

    out, doc = finished_sweep(lab.runs, SWEEPS, name)
    figs = sorted((out / "figures").glob("*.png")) if (out / "figures").is_dir() else []
    fmt = {"accuracy": ".1%", "fd": ".2f", "kid": ".4f", "diversity": ".2f", "seconds": ".1f"}
    rows = [
        {**{k: r[k] for k in ("checkpoint", "images_seen") if k in r}, "sampler": r["sampler"],
         "steps": r["steps"], "guidance": r["guidance"], **{m: mean_std_text(r, m, f) for m, f in fmt.items()}}
        for r in sorted(doc["summary"], key=lambda r: (r.get("checkpoint") or 0, r["sampler"], r["steps"], r["guidance"]))
    ]  # fmt: skip
    return {
        "summary": doc["summary"],
        "table": rows,
        "complete": doc["complete"],
        "grids": [str(p) for p in figs if p.name.startswith("grid")],
        "plots": [str(p) for p in figs if not p.name.startswith("grid")],
        "folder": str(out),
    }


def build(lab: Lab, page) -> None:
    import gradio as gr

    from difflab.ui.widgets import (
        finished,
        follow,
        friendly,
        report_widgets,
        run_choices,
        status_box,
        table,
    )  # fmt: skip

    with gr.Tab("Sweep", id="sweep"):
        with gr.Row():
            with gr.Column(scale=1):
                run = gr.Dropdown(label="Run", choices=lab.run_names(), value=lab.newest_run())
                name = gr.Textbox(label="Sweep name", value="ui-sweep")
                guidance = gr.Textbox(label="Guidance values", value=as_text(AXES.guidance))
                steps = gr.Textbox(label="Step counts", value=as_text(AXES.steps))
                sampler = gr.Textbox(label="Samplers", value=as_text(AXES.samplers))
                seeds = gr.Textbox(label="Seeds", value=as_text(AXES.seeds))
                n = gr.Number(value=AXES.n_per_class, label="Samples per class per cell", precision=0, minimum=2, maximum=limits.SWEEP_N)  # fmt: skip
                checkpoints = gr.Textbox(label="Checkpoints (training steps kept by --snapshot-every, or all; blank: final weights)", value="")  # fmt: skip
                with gr.Row():
                    go = gr.Button("Run sweep", variant="primary")
                    cancel = gr.Button("Cancel", variant="stop")
                report_widgets(lab, name, sd=False, api_name="sweep_report")
            with gr.Column(scale=2):
                status = status_box()
                summary = gr.Dataframe(label="Summary (mean ± std over seeds)", interactive=False)
                grids = gr.Gallery(object_fit="contain", label="Image grids", columns=1, height=420)
                plots = gr.Gallery(object_fit="contain", label="Plots", columns=1, height=420)
        job_id = gr.State(None)

    @friendly
    def on_sweep(run, name, guidance, steps, sampler, seeds, n, checkpoints):
        job = start_sweep(lab, run, name, guidance, steps, sampler, seeds, n, checkpoints)
        for j in follow(job):
            if j.state in ("queued", "running"):
                yield j.status_line(), gr.update(), gr.update(), gr.update(), j.id
        finished(job)
        res = sweep_results(lab, Path(job.result).name)
        yield job.status_line(), table(res["table"]), res["grids"], res["plots"], job.id

    go.click(on_sweep, [run, name, guidance, steps, sampler, seeds, n, checkpoints], [status, summary, grids, plots, job_id], api_name="sweep")  # fmt: skip
    cancel.click(lambda i: lab.jobs.cancel(i) and None, job_id, None, api_name=False)
    page.load(lambda: run_choices(lab), None, run, api_name=False)
