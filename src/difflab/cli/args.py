"""What every command group shares: the one-line-error parser, common arguments, and the
step from parsed arguments to an options object.

A command's parser is made with ``argument_default=SUPPRESS``: an option the user did not
give is absent from the parsed arguments, so :func:`build` leaves it to the options class,
the one place that holds its default (the help texts quote it from there too).
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from typing import Any

from difflab.devices import SAMPLING_PRECISIONS


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def command(sub: Any, name: str, help: str, run: Any) -> Parser:
    """A sub-command whose absent options stay absent; ``run(args)`` carries it out."""
    p = sub.add_parser(name, help=help, argument_default=argparse.SUPPRESS)
    p.set_defaults(handler=run)
    return p


def default(cls: type, name: str) -> str:
    """The default of field ``name`` of an options class, as typed on the command line."""
    value = {f.name: f.default for f in fields(cls)}[name]
    if value is MISSING or value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def build(cls: type, args: argparse.Namespace, **dests: str) -> Any:
    """An options object from the options given (the others keep the class's defaults);
    ``dests`` names the argparse dest of a field where the two differ."""
    given = vars(args)
    values = {f.name: given[d] for f in fields(cls) if (d := dests.get(f.name, f.name)) in given}
    return cls(**values)


def add_device(p: argparse.ArgumentParser, help: str = "auto, cpu, cuda, cuda:N or mps") -> None:
    p.add_argument("--device", default="auto", help=help)


def add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precision",
        help=f"network precision while sampling: {', '.join(SAMPLING_PRECISIONS[1:])} (bf16 "
        "autocast) or auto (the default: bf16 on CUDA; on a CPU whichever measured faster on "
        "it, once, kept in ~/.cache/difflab; $DIFFLAB_CPU_PRECISION pins it; fp32 on MPS)",
    )


def add_guidance_shape(p: argparse.ArgumentParser, several: str = "") -> None:
    """Where and how guidance acts (difflab.ddpm.guidance; default: the run's)."""
    p.add_argument("--guidance-interval", metavar="LO:HI",
                   help=f"guide only where the noise level sigma is in [LO, HI] (Kynkaenniemi et "
                   f"al. 2024), conditional elsewhere; none: at every step{several}")  # fmt: skip
    p.add_argument("--guidance-schedule", help=f"weight of s - 1 over the steps: constant, "
                   f"linear or cosine (rising towards t = 0, mean 1){several}")  # fmt: skip
    p.add_argument("--guidance-rescale", help=f"phi in [0, 1] of rescaled guidance (Lin et al. "
                   f"2024, diffusers' guidance_rescale); 0: off{several}")  # fmt: skip
    p.add_argument("--guidance-method", help=f"cfg, or cfg++ (Chung et al. 2024; --sampler ddim "
                   f"only): DDIM steps through the guided x_0 but re-noises with the "
                   f"unconditional eps{several}")  # fmt: skip


def add_trust_pickle(p: argparse.ArgumentParser, what: str = "a pickle checkpoint") -> None:
    p.add_argument("--trust-pickle", action="store_true", default=False,
                   help=f"allow {what} (unsafe)")  # fmt: skip
