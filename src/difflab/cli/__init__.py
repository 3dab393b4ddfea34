"""The command line: parse, build an options object, call one library function, print.

One module per command group: :mod:`~difflab.cli.ddpm` (train, sample, eval, forward,
reverse, plot), :mod:`~difflab.cli.experiments` (sweep, report, demo),
:mod:`~difflab.cli.sd` (sd generate, sweep, finetune) and :mod:`~difflab.cli.ui`; the
parser and :func:`main` (one-line errors, exit codes) are :mod:`~difflab.cli.main`, what
they share :mod:`~difflab.cli.args`. The defaults and checks of every option live in
:mod:`difflab.options`.
"""

from difflab.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
