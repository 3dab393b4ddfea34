"""``difflab ui``: the lab's web UI (Gradio), on this machine only unless told otherwise."""

from __future__ import annotations

import argparse

from difflab.cli.args import add_device, command
from difflab.errors import UsageError


def add(sub) -> None:
    p = command(sub, "ui", "open the lab's web UI (Gradio)", _ui)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")  # fmt: skip
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--runs-dir", default="runs", help="run folders; the only files the UI serves")
    p.add_argument("--models-dir", default="models",
                   help="Stable Diffusion models: diffusers folders and .safetensors files")  # fmt: skip
    p.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                   help="require a login (needed off loopback); also --auth-file or DIFFLAB_UI_AUTH")  # fmt: skip
    p.add_argument("--auth-file", default=None, metavar="FILE",
                   help="a file holding one line USER:PASSWORD")  # fmt: skip
    p.add_argument("--no-auth", action="store_true", default=False,
                   help="allow a non-loopback --host without a login (anyone on the network)")  # fmt: skip
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="another Host name to answer (besides localhost and --host); repeatable")  # fmt: skip
    p.add_argument("--allow-any-model", action="store_true", default=False,
                   help="let the page load any server path or Hub id (default: --models-dir and the HF cache)")  # fmt: skip
    p.add_argument("--allow-unsafe-runs-dir", action="store_true", default=False,
                   help="serve a --runs-dir that is /, your home folder or holds .git/.ssh")  # fmt: skip
    add_device(p)


def _ui(args: argparse.Namespace) -> None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UsageError("difflab ui needs Gradio: pip install 'difflab[ui]'") from None
    from difflab.ui.app import launch

    launch(
        args.runs_dir, args.models_dir, host=args.host, port=args.port, auth=args.auth,
        no_auth=args.no_auth, device=args.device, auth_file=args.auth_file,
        allowed_hosts=args.allowed_host, allow_any_model=args.allow_any_model,
        allow_unsafe_runs_dir=args.allow_unsafe_runs_dir,
    )  # fmt: skip
