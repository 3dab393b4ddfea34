"""Gradio pieces every tab shares: one-line errors, following a job, tables and small widgets.

:func:`friendly` turns any exception of a handler into one line in the page (``gr.Error``),
never a traceback; :func:`follow` and :func:`finished` let a handler stream a queued job's
progress and then its result; :func:`table`, :func:`loss_plot`, :func:`status_box`,
:func:`report_widgets` and :func:`run_choices` are the few widgets several tabs build alike.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any

from difflab.errors import UsageError
from difflab.ui.jobs import Job
from difflab.ui.lab import Lab, write_sweep_report

POLL_S = 0.25  # how often a following handler looks at its job
log = logging.getLogger("difflab.ui")


def friendly(fn: Callable) -> Callable:
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


def table(rows: list[dict], columns: list[str] | None = None):
    import pandas as pd

    df = pd.DataFrame(rows)
    if columns is not None:
        df = df.reindex(columns=columns) if len(df) else pd.DataFrame(columns=columns)
    return df.round(4)


def loss_plot(rows: list[dict]):
    import pandas as pd

    return pd.DataFrame({"step": [r["step"] for r in rows], "loss": [r["loss"] for r in rows]})


def status_box(**kw):
    import gradio as gr

    return gr.Textbox(label="Progress", interactive=False, elem_classes="status", **kw)


def run_choices(lab: Lab, current: str | None = None):
    """The run dropdowns' choices now, keeping ``current`` when it still exists."""
    import gradio as gr

    names = lab.run_names()
    value = current if current in names else (names[0] if names else None)
    return gr.update(choices=names, value=value)


def report_widgets(lab: Lab, name_box, sd: bool, api_name: str) -> None:
    """The report button of a sweep tab, the written file and a link that opens it."""
    import gradio as gr

    button, file, link = gr.Button("Write the HTML report"), gr.File(label="report.html"), gr.Markdown()  # fmt: skip

    @friendly
    def sweep_report(name):
        path = write_sweep_report(lab, name, sd=sd)
        return path, f"[Open the report in a new tab](/gradio_api/file={path})"

    button.click(sweep_report, name_box, [file, link], api_name=api_name)
