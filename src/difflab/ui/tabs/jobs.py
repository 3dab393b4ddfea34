"""The Jobs panel under the tabs: every job of the queue, its state and progress, and Cancel."""

from __future__ import annotations

import time

from difflab.ui.lab import Lab

COLUMNS = ["#", "kind", "what", "state", "progress", "message", "submitted"]


def job_rows(lab: Lab) -> list[dict]:
    return [
        {"#": j.id, "kind": j.kind, "what": j.title, "state": j.state,
         "progress": "" if j.progress is None else f"{j.progress:.0%}",
         "message": j.error if j.state == "failed" else j.message,
         "submitted": time.strftime("%H:%M:%S", time.localtime(j.submitted))}
        for j in lab.jobs.jobs()
    ]  # fmt: skip


def build(lab: Lab, page) -> None:
    import gradio as gr

    from difflab.ui.widgets import table

    with gr.Accordion("Jobs", open=False):
        jobs = gr.Dataframe(interactive=False)
        with gr.Row():
            job_id = gr.Number(label="Job #", precision=0)
            cancel = gr.Button("Cancel job", variant="stop")
        timer = gr.Timer(2.0)

    cancel.click(lambda i: lab.jobs.cancel(int(i or 0)) and None, job_id, None, api_name="cancel_job")  # fmt: skip
    timer.tick(lambda: table(job_rows(lab), COLUMNS), None, jobs, api_name=False, show_progress="hidden")  # fmt: skip
