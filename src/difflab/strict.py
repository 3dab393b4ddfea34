"""Strict construction of frozen dataclasses from JSON-like data (``config.json``, ``--set``).

:func:`build_dataclass` builds a dataclass from a dict, refusing unknown keys and values of
the wrong type by name; nested dataclasses, ``Literal`` choices, optional values and tuples
are followed through the type hints. Range checks stay with each dataclass (its
``__post_init__``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import fields
from typing import Any, Literal, get_args, get_origin

from difflab.errors import UsageError

__all__ = ["build_dataclass", "coerce"]


def build_dataclass(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise UsageError(
            f"{where}: expected an object for {cls.__name__}, got {type(data).__name__}"
        )
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UsageError(
            f"{where}: unknown key {unknown[0]!r} in {cls.__name__} (allowed: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        kwargs[f.name] = coerce(hints[f.name], data[f.name], f"{where}: {f.name}")
    return cls(**kwargs)


def coerce(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise UsageError(
                f"{where}: {value!r} is not allowed; choose one of {', '.join(map(str, allowed))}"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(arg, value, where)
            except UsageError as e:
                errors.append(str(e))
        raise UsageError(errors[0] if errors else f"{where}: wrong type")
    if origin is tuple:
        (inner, *_rest) = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(coerce(inner, v, where) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UsageError(f"{where}: expected text, got {value!r}")
        return value
    return value
