"""The Sweep tab: a resumable DDPM sweep of a run over guidance x steps x samplers x seeds.

The job calls :func:`difflab.experiments.ddpm_sweep.sweep_run` (``difflab sweep``) into
``runs/sweeps/NAME``; cancelling stops between cells, so the finished cells stay and the same
settings resume the folder. The tab shows the summary table, the grids and the plots, and
writes the HTML report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from difflab.errors import UsageError
from difflab.ui.jobs import Job
from difflab.ui.lab import SWEEPS, Lab, number
from difflab.ui.paths import inside, safe_name


def start_sweep(
    lab: Lab, run: str, name: str, guidance: str = "0,1,2,4", steps: str = "5,10,25",
    sampler: str = "ddim", seeds: str = "0", n_per_class: int = 5,
) -> Job:  # fmt: skip
    from difflab.experiments.ddpm_sweep import prepare_folder, sweep_identity

    path = lab.run_path(run)
    out = inside(lab.runs, f"{SWEEPS}/{safe_name(name, 'sweep name')}", "sweep name")
    n = number(n_per_class, int, "samples per class", 2)
    identity = sweep_identity(path, guidance, steps, sampler, seeds, n, device=lab.device)
    out.parent.mkdir(parents=True, exist_ok=True)
    prepare_folder(out, identity)  # refuses another sweep's folder before queueing
    return lab.jobs.submit(
        "sweep", out.name,
        lambda job: _sweep(lab, job, path, out, guidance, steps, sampler, seeds, n),
    )  # fmt: skip


def _sweep(lab: Lab, job: Job, path, out, guidance, steps, sampler, seeds, n) -> str:
    from difflab.experiments.ddpm_sweep import sweep_run

    def on_cell(done: int, total: int) -> None:
        job.update(done / total, f"{done}/{total} cells")

    r = sweep_run(
        path, out, guidance=guidance, steps=steps, sampler=sampler, seeds=seeds,
        n_per_class=n, device=lab.device, progress=False, should_stop=job.cancelled,
        on_cell=on_cell,
    )  # fmt: skip
    job.update(None, f"{len(r.rows)}/{r.cells_total} cells done ({r.cells_run} computed now)")
    return str(out)


def sweep_results(lab: Lab, name: str) -> dict[str, Any]:
    """Summary rows, grid and plot files of a DDPM sweep folder."""
    from difflab.experiments.report import mean_std_text

    out = inside(lab.runs, f"{SWEEPS}/{name}", "sweep")
    if not (out / "metrics.json").is_file():
        raise UsageError(f"sweep {name!r}: no finished cell yet")
    doc = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    figs = sorted((out / "figures").glob("*.png")) if (out / "figures").is_dir() else []
    fmt = {"accuracy": ".1%", "fd": ".2f", "kid": ".4f", "diversity": ".2f", "seconds": ".1f"}
    rows = [
        {"sampler": r["sampler"], "steps": r["steps"], "guidance": r["guidance"],
         **{m: mean_std_text(r, m, f) for m, f in fmt.items()}}
        for r in sorted(doc["summary"], key=lambda r: (r["sampler"], r["steps"], r["guidance"]))
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
                guidance = gr.Textbox(label="Guidance values", value="0,1,2,4")
                steps = gr.Textbox(label="Step counts", value="5,10,25")
                sampler = gr.Textbox(label="Samplers", value="ddim")
                seeds = gr.Textbox(label="Seeds", value="0")
                n = gr.Number(value=5, label="Samples per class per cell", precision=0, minimum=2)
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
    def on_sweep(run, name, guidance, steps, sampler, seeds, n):
        job = start_sweep(lab, run, name, guidance, steps, sampler, seeds, n)
        for j in follow(job):
            if j.state in ("queued", "running"):
                yield j.status_line(), gr.update(), gr.update(), gr.update(), j.id
        finished(job)
        res = sweep_results(lab, Path(job.result).name)
        yield job.status_line(), table(res["table"]), res["grids"], res["plots"], job.id

    go.click(on_sweep, [run, name, guidance, steps, sampler, seeds, n], [status, summary, grids, plots, job_id], api_name="sweep")  # fmt: skip
    cancel.click(lambda i: lab.jobs.cancel(i) and None, job_id, None, api_name=False)
    page.load(lambda: run_choices(lab), None, run, api_name=False)
