"""PNG metadata in the AUTOMATIC1111 ``parameters`` format, and the JSON sidecar beside it.

A1111, ComfyUI, InvokeAI and most image viewers read a PNG ``tEXt`` chunk named
``parameters`` holding the prompt, then ``Negative prompt: ...`` (omitted when empty), then one
line of ``Key: value`` pairs (``Steps``, ``Sampler``, ``CFG scale``, ``Seed``, ``Size``,
``Model``, ...). A value containing a comma, colon or quote is written as a JSON string, as
A1111 does. :func:`format_parameters` writes that text, :func:`parse_parameters` reads it
back, and :func:`save_image` writes the PNG and its ``.json`` sidecar atomically (the PNG
first, the sidecar last).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from difflab.files import atomic_path, write_json

NEGATIVE = "Negative prompt: "
# One "Key: value" pair of the last line; a value is a JSON string or runs to the next comma.
_PAIR = re.compile(r'\s*([A-Za-z][\w /-]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _value(v: Any) -> str:
    text = f"{v:g}" if isinstance(v, float) else str(v)
    return json.dumps(text, ensure_ascii=False) if re.search(r'[,:"\n]', text) else text


def format_parameters(prompt: str, negative_prompt: str, fields: dict[str, Any]) -> str:
    """The A1111 ``parameters`` text: prompt, optional negative prompt, ``Key: value`` line."""
    lines = [prompt]
    if negative_prompt:
        lines.append(NEGATIVE + negative_prompt)
    lines.append(", ".join(f"{k}: {_value(v)}" for k, v in fields.items()))
    return "\n".join(lines)


def parse_parameters(text: str) -> dict[str, Any]:
    """Inverse of :func:`format_parameters`: ``prompt``, ``negative_prompt`` and each field
    as a string (quoted values unquoted)."""
    lines = text.split("\n")
    last = lines.pop() if lines and _PAIR.match(lines[-1]) and "Steps:" in lines[-1] else ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith(NEGATIVE) and not in_negative:
            in_negative, line = True, line[len(NEGATIVE) :]
        (negative if in_negative else prompt).append(line)
    out: dict[str, Any] = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}
    for key, value in _PAIR.findall(last):
        value = value.strip()
        out[key.strip()] = json.loads(value) if value.startswith('"') else value
    return out


def save_image(
    png: str | Path, image: np.ndarray, parameters: str, sidecar: dict[str, Any]
) -> Path:
    """Write ``image`` (H, W, 3) uint8 as ``png`` with the ``parameters`` chunk, then
    ``png`` with suffix ``.json`` holding ``sidecar``; both atomically. Returns the sidecar."""
    png = Path(png)
    info = PngInfo()
    info.add_text("parameters", parameters)
    with atomic_path(png) as tmp:
        Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
    side = png.with_suffix(".json")
    write_json(side, sidecar)
    return side


def read_parameters(png: str | Path) -> dict[str, Any]:
    """The parsed ``parameters`` chunk of a PNG ({} when it has none)."""
    with Image.open(png) as im:
        text = getattr(im, "text", {}).get("parameters")
    return parse_parameters(text) if text else {}
