"""The Gradio app: the tabs of :mod:`difflab.ui.tabs` on one page, and the server's launch rules.

:func:`build_app` assembles the tabs (Train, Sample, Processes, Sweep, Stable Diffusion, Runs,
Models) and the Jobs panel over one :class:`~difflab.ui.lab.Lab`; every heavy button queues a
job and follows it, and every error reaches the page as one line. :func:`launch` binds
127.0.0.1 unless told otherwise, and then only with ``--auth`` (or an explicit ``--no-auth``);
:func:`serve` serves files from the runs folder alone and caps uploads.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from difflab.errors import UsageError
from difflab.ui.lab import Lab

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_UPLOAD = "20mb"

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


def build_app(lab: Lab):
    """The Blocks app over ``lab``; every event also has an ``api_name`` for gradio_client."""
    import gradio as gr

    from difflab.ui.tabs import jobs, models, processes, runs, sample, sd, sweep, train

    with gr.Blocks(title="difflab", analytics_enabled=False) as page:
        gr.Markdown(
            f"## difflab · the diffusion lab\nRuns folder `{lab.runs}` · device `{lab.device}` · "
            "one heavy job runs at a time; the others wait in the queue (see *Jobs*)."
        )
        for tab in (train, sample, processes, sweep, sd, runs, models, jobs):
            tab.build(lab, page)
    return page


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
