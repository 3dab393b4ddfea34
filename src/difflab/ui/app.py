"""The Gradio app: the tabs of :mod:`difflab.ui.tabs` on one page, and the server's launch.

:func:`build_app` assembles the tabs (Train, Sample, Processes, Sweep, Stable Diffusion, Runs,
Models) and the Jobs panel over one :class:`~difflab.ui.lab.Lab`; every heavy button queues a
job and follows it, and every error reaches the page as one line. :func:`launch` checks the
command line's choices (:mod:`difflab.ui.server`: bind and login, the runs folder) before
anything is announced; :func:`serve` serves files from the runs folder alone (training
state, locks and hidden files never), answers only the Host names it was started for, caps
uploads and keeps Gradio's upload cache in a private folder outside the runs folder, where
nothing is served inline and old files are deleted (:data:`DELETE_CACHE`).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

from difflab.errors import UsageError
from difflab.ui import server
from difflab.ui.lab import Lab

MAX_UPLOAD = "20mb"
DELETE_CACHE = (3600, 24 * 3600)  # every hour, delete cached files older than a day
_cache: list[Path] = []  # this process's private upload cache, made once

CSS = """
.status textarea, .status input {font-family: ui-monospace, monospace; font-size: 0.85em}
footer {display: none !important}
"""


def build_app(lab: Lab, delete_cache: tuple[int, int] | None = DELETE_CACHE):
    """The Blocks app over ``lab``; every event also has an ``api_name`` for gradio_client."""
    import gradio as gr

    from difflab.ui.tabs import jobs, models, processes, runs, sample, sd, sweep, train

    with gr.Blocks(title="difflab", analytics_enabled=False, delete_cache=delete_cache) as page:
        gr.Markdown(
            f"## difflab · the diffusion lab\nRuns folder `{lab.runs}` · device `{lab.device}` · "
            "one heavy job runs at a time; the others wait in the queue (see *Jobs*)."
        )
        for tab in (train, sample, processes, sweep, sd, runs, models, jobs):
            tab.build(lab, page)
    return page


def upload_cache(runs: Path) -> Path:
    """Where Gradio keeps uploads and copies of shown files: never inside the runs folder.

    ``GRADIO_TEMP_DIR`` when it is set and outside ``runs``, else a private folder of this
    process (removed at exit). Files there are served as attachments unless they are images."""
    env = os.environ.get("GRADIO_TEMP_DIR")
    if env:
        path = Path(env).expanduser().resolve()
        if path != runs and runs not in path.parents:
            return path
    if not _cache:
        _cache.append(Path(tempfile.mkdtemp(prefix="difflab-ui-cache-")))
        atexit.register(shutil.rmtree, _cache[0], True)
    return _cache[0]


def launch(
    runs_dir: str | Path = "runs",
    models_dir: str | Path = "models",
    host: str = "127.0.0.1",
    port: int = 7860,
    auth: str | None = None,
    no_auth: bool = False,
    device: str = "auto",
    block: bool = True,
    auth_file: str | Path | None = None,
    allowed_hosts: list[str] | tuple[str, ...] = (),
    allow_any_model: bool = False,
    allow_unsafe_runs_dir: bool = False,
):
    """``difflab ui``: check the bind rules and the runs folder, then build and serve the app."""
    pair = server.read_auth(auth, auth_file)
    warning = server.check_bind(host, pair, no_auth)
    if not 0 < int(port) < 65536:
        raise UsageError(f"--port {port}: must be between 1 and 65535")
    for name in allowed_hosts:
        if not name.strip() or any(c in name for c in "/ @"):
            raise UsageError(f"--allowed-host {name!r}: expected a host name like lab.example.org")  # fmt: skip
    runs = Path(runs_dir).expanduser().resolve()
    server.check_runs_dir(runs, str(runs_dir), allow_unsafe_runs_dir)
    try:
        runs.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--runs-dir {runs_dir}: cannot create it ({e.strerror})") from None
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    lab = Lab(runs, models_dir, device, allow_any_model=allow_any_model)
    if warning:
        print(warning, file=sys.stderr)
    if block:
        print(f"difflab ui: http://{host}:{port}  (runs folder {runs}; Ctrl+C stops)")
    return serve(lab, host, int(port), pair, block, allowed_hosts=tuple(allowed_hosts))


def serve(
    lab: Lab, host: str, port: int, auth: tuple[str, str] | None = None, block: bool = True,
    allowed_hosts: tuple[str, ...] = (), delete_cache: tuple[int, int] | None = DELETE_CACHE,
):  # fmt: skip
    """Serve the app over ``lab`` (see the module doc for what it serves and to whom)."""
    from starlette.middleware import Middleware

    os.environ["GRADIO_TEMP_DIR"] = str(upload_cache(lab.runs))  # read when the app is built
    app = build_app(lab, delete_cache)
    app.queue(default_concurrency_limit=8)
    guard = Middleware(
        server.Guard, hosts=server.allowed_hosts(host, allowed_hosts),
        any_ip=host in server.WILDCARD, runs=lab.runs,
    )  # fmt: skip
    app.launch(
        server_name=host, server_port=port, auth=auth, allowed_paths=[str(lab.runs)],
        max_file_size=MAX_UPLOAD, prevent_thread_lock=not block, quiet=not block,
        show_error=True, ssr_mode=False, css=CSS, app_kwargs={"middleware": [guard]},
    )  # fmt: skip
    return app
