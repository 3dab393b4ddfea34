"""The Runs tab: every run folder in a table, and one run's config, eval, loss and figures.

The table lists run folders two levels deep, newest first (:func:`difflab.ui.paths.list_runs`);
a folder whose files cannot be read is a row that says ``broken: ...`` in one line, never an
error that hides the others or the page. Choosing a run shows its ``config.json``,
``eval.json``, training loss and ``figures/``.
"""

from __future__ import annotations

from typing import Any

from difflab.ddpm.runs import CONFIG
from difflab.errors import UsageError
from difflab.files import read_json
from difflab.ui.lab import Lab, loss_rows
from difflab.ui.paths import list_runs, run_summary

COLUMNS = ["run", "dataset", "preset", "steps", "accuracy", "MB", "modified"]


def runs_table(lab: Lab) -> list[dict]:
    return [run_summary(lab.runs, p) for p in list_runs(lab.runs)]


def run_details(lab: Lab, name: str) -> dict[str, Any]:
    """Config, eval results, loss rows and figure files of one run."""
    run = lab.run_path(name)
    ev = run / "eval.json"
    return {
        "config": read_json(run / CONFIG),
        "eval": read_json(ev) if ev.is_file() else None,
        "loss": loss_rows(run),
        "figures": sorted(str(p) for p in (run / "figures").glob("*.png")),
    }


def build(lab: Lab, page) -> None:
    import gradio as gr

    from difflab.ui.widgets import friendly, loss_plot, run_choices, table

    with gr.Tab("Runs", id="runs"):
        runs = gr.Dataframe(label="Run folders", interactive=False)
        with gr.Row():
            run = gr.Dropdown(label="Run", choices=lab.run_names())
            refresh = gr.Button("↻ refresh", size="sm")
        with gr.Row():
            config = gr.JSON(label="config.json")
            evaluation = gr.JSON(label="eval.json")
        loss = gr.LinePlot(x="step", y="loss", label="Training loss", height=260)
        figures = gr.Gallery(object_fit="contain", label="Figures", columns=2, height=420)

    @friendly
    def run_view(name):
        d = run_details(lab, name)
        return d["config"], d["eval"], loss_plot(d["loss"]), d["figures"]

    def refresh_runs(current):
        return table(runs_table(lab), COLUMNS), run_choices(lab, current)

    def on_load():
        name, details = lab.newest_run(), (None, None, loss_plot([]), [])
        try:
            d = run_details(lab, name) if name else None
        except UsageError:  # a broken newest run: the table says so, the page loads
            d = None
        if d is not None:
            details = (d["config"], d["eval"], loss_plot(d["loss"]), d["figures"])
        return (table(runs_table(lab), COLUMNS), run_choices(lab), *details)

    refresh.click(refresh_runs, run, [runs, run], api_name="runs")
    run.change(run_view, run, [config, evaluation, loss, figures], api_name="run_details")
    page.load(on_load, None, [runs, run, config, evaluation, loss, figures], api_name=False)
