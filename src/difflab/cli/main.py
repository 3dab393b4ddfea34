"""The parser of every command and ``main``: bad input becomes one line, exit code 2.

Command groups live beside this module (:mod:`~difflab.cli.ddpm`,
:mod:`~difflab.cli.experiments`, :mod:`~difflab.cli.sd`, :mod:`~difflab.cli.ui`); each
registers its commands with the function that carries one out. A
:class:`~difflab.errors.UsageError` is printed as ``difflab COMMAND: error: ...`` on stderr
with exit code 2 (a traceback only with ``--debug``); a diverged training run exits with 1
and says which checkpoint was kept; Ctrl-C exits with 130.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Sequence

from difflab import __version__
from difflab.cli import ddpm, distill, experiments, sd, ui
from difflab.cli.args import Parser
from difflab.errors import UsageError


def build_parser() -> Parser:
    parser = Parser(prog="difflab", description="A lab bench for diffusion models.")
    parser.add_argument("--version", action="version", version=f"difflab {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for group in (ddpm, distill, experiments, sd, ui):
        group.add(sub)
    return parser


UNWRITABLE = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM)


def check_texts(args) -> None:
    """Every text given on the command line is UTF-8 (bytes that are not reach Python as lone
    surrogates, which no PNG chunk, JSON file or tokenizer takes): one line naming the option."""
    from difflab.checks import check_text

    for key, value in vars(args).items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, str):
                check_text(
                    item,
                    "--" + key.replace("_", "-") if key not in ("run", "inputs") else key.upper(),
                )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (already printed)
        return int(e.code or 0)
    try:
        check_texts(args)
        args.handler(args)
        return 0
    except UsageError as e:
        if args.debug:
            raise
        print(f"difflab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"difflab {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a read-only or forbidden folder: the files are atomic
        if args.debug or e.errno not in UNWRITABLE:
            raise
        where = f" {e.filename}" if e.filename else ""
        print(f"difflab {args.command}: error: cannot write{where}: {e.strerror}; nothing was "
              "left half-written", file=sys.stderr)  # fmt: skip
        return 2
    except Exception as e:  # a known failure mode gets its message, not a traceback
        from difflab.runfolder import TrainingDiverged, TrainingInterrupted

        if isinstance(e, TrainingInterrupted):  # a checkpoint was written: say where
            print(f"difflab {args.command}: {e}", file=sys.stderr)
            return e.exit_code

        if isinstance(e, TrainingDiverged) and not args.debug:
            print(f"difflab {args.command}: {e}", file=sys.stderr)
            return 1
        raise
