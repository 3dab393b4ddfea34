"""Figures: image conversion, labelled grids, and PNG files that carry their settings.

Everything that turns tensors into pictures lives here. PNGs are written atomically with a
``parameters`` text chunk (the settings that made them, as JSON) so a figure can be traced
back to the command that produced it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from difflab.files import atomic_path


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) floats in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def font(size: int = 14) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def save_png(path: str | Path, image: Image.Image | np.ndarray, settings: dict[str, Any] | None = None) -> None:
    """Write ``image`` atomically with the settings as a ``parameters`` text chunk."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image)
    info = PngInfo()
    if settings:
        info.add_text("parameters", json.dumps(settings, default=str))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def png_settings(path: str | Path) -> dict[str, Any]:
    with Image.open(path) as im:
        text = im.text.get("parameters") if hasattr(im, "text") else None
    return json.loads(text) if text else {}


def labelled_grid(
    images: np.ndarray,
    nrow: int,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
    scale: int | None = None,
    pad: int = 2,
) -> Image.Image:
    """Tile (N, H, W, C) uint8 images into ``nrow`` rows with text labels on the left and top.

    ``scale`` enlarges small images with nearest-neighbour so 28x28 digits stay crisp.
    """
    n, h, w, c = images.shape
    ncol = int(np.ceil(n / nrow))
    if scale is None:
        scale = max(1, 64 // max(h, w))
    h, w = h * scale, w * scale
    fnt = font(max(12, min(18, h // 3)))
    left = 0 if not row_labels else max(_text_w(s, fnt) for s in row_labels) + 10
    top = 0 if not col_labels else fnt.size + 10
    head = 0 if not title else fnt.size + 12
    width = left + ncol * (w + pad) + pad
    height = head + top + nrow * (h + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((width // 2, 4), title, fill="black", font=fnt, anchor="ma")
    for i in range(n):
        r, col = divmod(i, ncol)
        tile = Image.fromarray(images[i].squeeze(-1) if c == 1 else images[i]).convert("RGB")
        tile = tile.resize((w, h), Image.NEAREST)
        canvas.paste(tile, (left + pad + col * (w + pad), head + top + pad + r * (h + pad)))
    for r, label in enumerate(row_labels or []):
        y = head + top + pad + r * (h + pad) + h // 2
        draw.text((left - 6, y), str(label), fill="black", font=fnt, anchor="rm")
    for col, label in enumerate(col_labels or []):
        x = left + pad + col * (w + pad) + w // 2
        draw.text((x, head + top - 4), str(label), fill="black", font=fnt, anchor="md")
    return canvas


def _text_w(s: str, fnt: ImageFont.ImageFont) -> int:
    box = fnt.getbbox(str(s))
    return int(box[2] - box[0])
