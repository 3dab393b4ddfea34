"""The lab's one list parser and its checks of single values: each message written once.

:func:`parse_list` turns ``"0,1,3"``, ``[0, 1, 3]`` or ``2`` into a tuple in the order given
and refuses, with one :class:`~difflab.errors.UsageError` line naming the option, an empty
item, a value that is not a (whole, finite) number, one below the smallest allowed and one
given twice. Beside it: whole numbers, finite numbers, seeds (0 to 2^63 - 1), choices,
sampling steps against a run's T, class lists, ``--t`` lists (integers or expressions of T),
sample-grid axes, SD sizes, guidance and prompt lists. :mod:`difflab.options` builds every
action's options from these; the layers below call them only as cheap guards.
"""

from __future__ import annotations

import math
import numbers
import re
from pathlib import Path
from typing import Any, get_args

from difflab.config import MAX_GUIDANCE, GuidanceMethod, SamplerName
from difflab.errors import UsageError

SAMPLERS: tuple[str, ...] = get_args(SamplerName)
GUIDANCE_METHODS: tuple[str, ...] = get_args(GuidanceMethod)
GRID_AXES = ("class", "sample", "guidance", "steps")
MAX_SEED = 2**63 - 1
SD_MAX_SIZE = 4096
_T_EXPR = re.compile(r"([0-9]+)?\*?T(?:/([0-9]+))?")


# -- values ---------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _shown(value: Any) -> str:
    """The user's input as a message shows it: text quoted, numbers and lists plain."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return ",".join(_fmt(v) for v in value)
    return _fmt(value)


def _number(item: Any, kind: type) -> int | float:
    """``item`` (text or a number) as ``kind``; ValueError when it is not one."""
    if isinstance(item, bool):
        raise ValueError
    if isinstance(item, str):
        return int(item.strip()) if kind is int else float(item.strip()) + 0.0
    if kind is int:
        if isinstance(item, numbers.Integral):
            return int(item)
        if isinstance(item, numbers.Real) and float(item).is_integer():
            return int(item)
        raise ValueError
    if isinstance(item, numbers.Real):
        return float(item) + 0.0  # -0.0 -> 0.0
    raise ValueError


def parse_list(
    value: Any,
    kind: type,
    option: str,
    example: str,
    minimum: float | None = None,
    maximum: float | None = None,
) -> tuple:
    """``"0,1,3"``, ``[0, 1, 3]`` or ``2`` -> a tuple of ``kind``, in the order given.

    Refused with one line naming ``option``: an empty item, a value that is not a number (a
    whole number for ``int``), NaN or infinity, a value outside ``minimum..maximum``, a value
    given twice.
    """
    what = {int: "whole numbers", float: "numbers", str: "names"}[kind]
    shown = _shown(value)
    if isinstance(value, str):
        items = value.split(",")
    else:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
    bad = UsageError(f"{option} {shown}: expected comma-separated {what} like {example}")
    out: list = []
    for item in items:
        if item is None or (isinstance(item, str) and not item.strip()):
            raise bad
        if kind is str:
            out.append(str(item).strip())
            continue
        try:
            v = _number(item, kind)
        except (TypeError, ValueError):
            raise bad from None
        if not math.isfinite(v):
            raise UsageError(f"{option} {shown}: {_fmt(v)} is not a finite number")
        if minimum is not None and v < minimum:
            raise UsageError(
                f"{option} {shown}: {_fmt(v)} is below the smallest allowed, {_fmt(minimum)}"
            )
        if maximum is not None and v > maximum:
            raise UsageError(
                f"{option} {shown}: {_fmt(v)} is above the largest allowed, {_fmt(maximum)}"
            )
        out.append(v)
    if not out:
        raise bad
    dup = next((v for i, v in enumerate(out) if v in out[:i]), None)
    if dup is not None:
        raise UsageError(f"{option} {shown}: {_fmt(dup)} is given twice")
    return tuple(out)


def check_int(
    value: Any, option: str, minimum: int | None = None, maximum: int | None = None,
    too_small: str | None = None,
) -> int:  # fmt: skip
    """A whole number in ``minimum..maximum`` (``too_small`` says why when it is below)."""
    try:
        v = _number(value, int)
    except (TypeError, ValueError, OverflowError):
        raise UsageError(f"{option} {_shown(value)}: expected a whole number") from None
    if minimum is not None and v < minimum:
        raise UsageError(f"{option} {v}: {too_small or f'must be a whole number >= {minimum}'}")
    if maximum is not None and v > maximum:
        raise UsageError(f"{option} {v}: must be at most {maximum:,}")
    return v


def check_count(value: Any, option: str, maximum: int | None = None) -> int:
    """A whole number >= 1 (and at most ``maximum``)."""
    return check_int(value, option, 1, maximum)


def check_float(
    value: Any, option: str, minimum: float | None = None, maximum: float | None = None
) -> float:
    """A finite number in ``minimum..maximum``."""
    try:
        v = _number(value, float)
    except (TypeError, ValueError):
        raise UsageError(f"{option} {_shown(value)}: expected a number") from None
    if not math.isfinite(v):
        raise UsageError(f"{option} {_fmt(v)}: must be a finite number")
    if minimum is not None and v < minimum or maximum is not None and v > maximum:
        rule = f"a number >= {_fmt(minimum)}" if maximum is None else f"between {_fmt(minimum)} and {_fmt(maximum)}"  # fmt: skip
        raise UsageError(f"{option} {_fmt(v)}: must be {rule}")
    return v


def check_seed(value: Any, option: str = "--seed") -> int:
    """A seed: a whole number from 0 to 2^63 - 1 (what ``torch.Generator`` takes)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= MAX_SEED:  # fmt: skip
        raise UsageError(f"{option} {_shown(value)}: must be a whole number from 0 to 2^63 - 1")
    return int(value)


def check_choice(value: Any, choices: tuple[str, ...], option: str, what: str = "") -> str:
    if value not in choices:
        unknown = f"unknown {what}; " if what else ""
        raise UsageError(f"{option} {value!r}: {unknown}choose one of {', '.join(choices)}")
    return value


def check_steps(steps: Any, T: int | None = None, option: str = "--steps") -> int:
    """Sampling steps: a whole number from 1 to the run's T."""
    steps = check_int(steps, option, 1)
    if T is not None and steps > T:
        raise UsageError(f"{option} {steps}: must be at most the run's T = {T}")
    return steps


def check_trajectory(sampler: str, steps: int, guidance: float, eta: float, T: int) -> None:
    """The settings of one sampling trajectory (the guard of ``sample_steps``)."""
    check_choice(sampler, SAMPLERS, "--sampler", "sampler")
    check_steps(steps, T)
    check_float(guidance, "--guidance", 0, MAX_GUIDANCE)
    check_float(eta, "--eta", 0, 1)


def check_guidance_method(
    method: Any, sampler: str | None, option: str = "--guidance-method",
    sampler_option: str = "--sampler",
) -> str:  # fmt: skip
    """cfg or cfg++; cfg++ (Chung et al. 2024) is defined for the ddim sampler only (None:
    the sampler is not known yet)."""
    check_choice(method, GUIDANCE_METHODS, option, "guidance method")
    if method == "cfg++" and sampler is not None and sampler != "ddim":
        raise UsageError(
            f"{option} cfg++: CFG++ is defined for DDIM only; it needs {sampler_option} ddim, "
            f"not {sampler}"
        )
    return method


def check_interval(value: Any, option: str) -> tuple[float, float]:
    """A guidance interval [sigma_lo, sigma_hi]: two finite noise levels, 0 <= lo <= hi."""
    rule = "two finite noise levels LO:HI with 0 <= LO <= HI, e.g. 0.28:5.42"
    shown = _shown(value)
    parts = value.split(":") if isinstance(value, str) else value
    if not isinstance(parts, (list, tuple)) or len(parts) != 2:
        raise UsageError(f"{option} {shown}: expected {rule}")
    try:
        lo, hi = (_number(v, float) for v in parts)
    except (TypeError, ValueError):
        raise UsageError(f"{option} {shown}: expected {rule}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise UsageError(f"{option} {_fmt(lo)}:{_fmt(hi)}: not finite; expected {rule}")
    if lo < 0 or lo > hi:
        what = "LO is negative" if lo < 0 else "LO is above HI"
        raise UsageError(f"{option} {_fmt(lo)}:{_fmt(hi)}: {what}; expected {rule}")
    return lo, hi


def parse_interval(value: Any, option: str = "--guidance-interval") -> tuple[float, float] | None:
    """``"0.28:5.42"`` or (0.28, 5.42) -> the interval; None or ``"none"`` -> None (everywhere)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    return check_interval(value, option)


def parse_intervals(value: Any, option: str = "--guidance-interval") -> tuple:
    """``"none,0.28:5.42"`` or [None, (0.28, 5.42)] -> a tuple of intervals (None first, then
    sorted), each checked by :func:`parse_interval`; one given twice is refused."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out = [parse_interval(v, option) for v in items]
    if not out:
        raise UsageError(f"{option}: no interval given; e.g. none,0.28:5.42")
    dup = next((v for i, v in enumerate(out) if v in out[:i]), False)
    if dup is not False:
        twice = "none" if dup is None else f"{_fmt(dup[0])}:{_fmt(dup[1])}"
        raise UsageError(f"{option} {_shown(value)}: {twice} is given twice")
    return tuple(sorted(out, key=lambda v: (v is not None, v or ())))


def parse_classes(value: Any) -> tuple[int, ...] | None:
    """``"0,3,7"`` -> (0, 3, 7); None, ``""`` or ``"all"`` -> None (every class)."""
    if value is None or (isinstance(value, str) and value.strip() in ("", "all")):
        return None
    return parse_list(value, int, "--classes", "0,3,7", minimum=0)


def check_classes(classes: tuple[int, ...], num_classes: int) -> None:
    bad = [c for c in classes if c >= num_classes]
    if bad:
        raise UsageError(
            f"--classes: {bad[0]} is out of range; this run has classes 0..{num_classes - 1}"
        )


def parse_t(value: Any) -> tuple[str, ...]:
    """``"T, T/2,1"`` -> its items with spaces removed (``("T", "T/2", "1")``); what they
    mean, and whether they are allowed, depends on T: :func:`t_values`."""
    tokens = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    return tuple(tok.replace(" ", "") for tok in tokens)


def t_values(tokens: tuple[str, ...], T: int, option: str = "--t") -> list[int]:
    """The paper t (0..T) of each item, in the order given (duplicates kept: a figure shows
    each t once): integers, or expressions like ``T``, ``T/2``, ``3T/4`` (rounded half up)."""
    hint = f"use integers 0..{T} or expressions like T, T/2, 3T/4"
    if not tokens or all(not tok for tok in tokens):
        raise UsageError(f"{option} {','.join(tokens)!r}: no value given; {hint}")
    values = []
    for tok in tokens:
        m = _T_EXPR.fullmatch(tok)
        if re.fullmatch(r"[0-9]+", tok):
            v = int(tok)
        elif m:
            a, b = int(m[1] or 1), int(m[2] or 1)
            if b == 0:
                raise UsageError(f"{option} {tok!r}: division by zero; {hint}")
            v = (a * T + b // 2) // b  # a*T/b rounded half up
        else:
            raise UsageError(f"{option} {tok!r}: not a step; {hint}")
        if v > T:
            raise UsageError(f"{option} {tok!r}: {v} is beyond T = {T}; {hint}")
        values.append(v)
    return values


def parse_t_list(value: Any, T: int, option: str = "--t") -> list[int]:
    """``"T,T/2,T/4,1,0"`` -> paper t values in 0..T (:func:`t_values`)."""
    return t_values(parse_t(value), T, option)


def grid_axes(rows: str, cols: str | None, sizes: dict[str, int]) -> tuple[list[str], str]:
    """Row axes of a sample grid (the chosen one, then class/sample when they vary) and the
    column axis (by default the swept option, else the samples of a class)."""
    check_choice(rows, GRID_AXES, "--rows")
    if cols is None:
        swept = [a for a in ("guidance", "steps") if sizes[a] > 1 and a != rows]
        if len(swept) > 1:
            raise UsageError(
                "--guidance and --steps both have several values: put one on --rows, the other on --cols"
            )
        cols = swept[0] if swept else "sample" if rows != "sample" else "class"
    check_choice(cols, GRID_AXES, "--cols")
    if cols == rows:
        raise UsageError(f"--cols {cols}: must differ from --rows {rows}")
    for axis in ("guidance", "steps"):
        if sizes[axis] > 1 and axis not in (rows, cols):
            raise UsageError(f"--{axis}: several values need --rows {axis} or --cols {axis}")
    return [rows, *(a for a in ("class", "sample") if a not in (rows, cols) and sizes[a] > 1)], cols


# -- Stable Diffusion -----------------------------------------------------------------------
def split_scale(text: str | Path) -> tuple[str, float | None]:
    """``FILE[:SCALE]`` -> (FILE, SCALE or None when no scale is given)."""
    text = str(text).strip()
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:  # a colon inside the path (C:\...), no scale
            pass
    return text, None


def parse_size(size: Any) -> tuple[int, int]:
    """``"512x768"`` (W x H), ``512`` or (W, H) -> (width, height), positive multiples of 8."""
    if isinstance(size, (tuple, list)) and len(size) == 2:
        w, h = (check_int(v, "--size") for v in size)
    else:
        m = re.fullmatch(r"\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*", str(size))
        if not m:
            raise UsageError(f"--size {_shown(size)}: expected WIDTHxHEIGHT like 512x512")
        w, h = int(m[1]), int(m[2] or m[1])
    if w < 8 or h < 8 or w % 8 or h % 8:
        raise UsageError(f"--size {w}x{h}: width and height must be multiples of 8 (e.g. 512x512)")
    if max(w, h) > SD_MAX_SIZE:
        raise UsageError(f"--size {w}x{h}: width and height must be at most {SD_MAX_SIZE}")
    return w, h


def check_sd_guidance(g: Any, option: str = "--guidance") -> float:
    """0 (unconditional), 1 (conditional) or more: the stock pipeline skips guidance below 1."""
    g = check_float(g, option, 0)
    if 0 < g < 1:
        raise UsageError(
            f"{option} {g:g}: diffusers' StableDiffusionPipeline skips guidance below 1; "
            "use 0 (unconditional), 1 (conditional, no guidance) or more than 1"
        )
    return g


def check_text(value: Any, option: str) -> str:
    """Text a tokenizer, a PNG chunk and a JSON file can all hold: no bytes that were not
    UTF-8 on the command line (Python keeps them as lone surrogates) and no NUL."""
    text = "" if value is None else str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{option}: holds bytes that are not UTF-8 text") from None
    if "\x00" in text:
        raise UsageError(f"{option}: holds a NUL character")
    return text


def parse_prompts(prompts: Any) -> tuple[str, ...]:
    """One prompt per item, or a single text file with one prompt per line (blank lines and
    lines starting with ``#`` skipped); an empty prompt or one given twice is refused."""
    items = [prompts] if isinstance(prompts, (str, Path)) else list(prompts or ())
    if len(items) == 1 and Path(items[0]).suffix.lower() in (".txt", ".prompts"):
        path = Path(items[0])
        if not path.is_file():
            raise UsageError(f"--prompts {path}: no such file")
        from difflab.files import read_text

        lines = read_text(path).splitlines()
        items = [s for s in (x.strip() for x in lines) if s and not s.startswith("#")]
        if not items:
            raise UsageError(f"--prompts {path}: holds no prompt (one per line)")
    items = [check_text(p, "--prompts").strip() for p in items]
    if not items or any(not p for p in items):
        raise UsageError("--prompts: a prompt is empty; give text, or a file with one per line")
    dup = next((p for i, p in enumerate(items) if p in items[:i]), None)
    if dup is not None:
        raise UsageError(f"--prompts: {dup!r} is given twice")
    return tuple(items)


# -- building options objects (difflab.options, difflab.sd_options) ----------------------
def set_fields(obj: Any, **values: Any) -> None:
    for name, value in values.items():
        object.__setattr__(obj, name, value)


def maybe(value: Any, check, *args) -> Any:
    return None if value is None else check(value, *args)


class Checked:
    """Options are built checked: the constructor (and ``dataclasses.replace``) runs
    ``check()``, which parses every field into the value it holds or raises one line."""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        raise NotImplementedError
