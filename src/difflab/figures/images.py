"""Drawing primitives: image conversion, labelled image tables, animations and plot canvases.

Everything that turns tensors into pictures lives here; the other modules of
:mod:`difflab.figures` build the lab's figures from these parts. :func:`draw_table` is the one
grid: it lays out one or more panels of image tiles with row labels, multi-line column
headers, titles and a footnote, sizing every column to its text so labels never overlap, and
reports where it put each tile and each text; callers arrange their cells as (rows, columns)
arrays and hand them over. PNGs are
written atomically with a ``parameters`` text chunk (the settings that made them, as JSON) so
a figure can be traced back to the command that produced it; GIFs and MP4s are written
atomically too. Text uses DejaVu Sans (shipped with matplotlib), which has the Greek and
math glyphs (``√ᾱ``, ``x̂₀``) that Pillow's built-in font lacks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from difflab.files import atomic_path

NOTE_COLOUR = "#a00000"  # footnotes that warn (e.g. "x_T is not pure noise")
Box = tuple[int, int, int, int]  # (left, top, right, bottom), right/bottom exclusive


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) floats in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


@lru_cache(maxsize=16)
def font(size: int = 14, bold: bool = False) -> ImageFont.ImageFont:
    """DejaVu Sans at ``size`` px (Pillow's default font if matplotlib's copy is missing)."""
    try:
        import matplotlib

        name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
        return ImageFont.truetype(
            os.path.join(matplotlib.get_data_path(), "fonts", "ttf", name), size
        )
    except (ImportError, OSError):
        pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def auto_scale(h: int, w: int, target: int = 96) -> int:
    """Integer nearest-neighbour zoom that brings an h x w image near ``target`` px."""
    return max(1, round(target / max(h, w)))


def save_png(
    path: str | Path, image: Image.Image | np.ndarray, settings: dict[str, Any] | None = None
) -> None:
    """Write ``image`` atomically with the settings as a ``parameters`` text chunk."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(
            image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image
        )
    info = PngInfo()
    if settings:
        info.add_text("parameters", json.dumps(settings, default=str))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def png_settings(path: str | Path) -> dict[str, Any]:
    with Image.open(path) as im:
        text = im.text.get("parameters") if hasattr(im, "text") else None
    return json.loads(text) if text else {}


# -- image tables ---------------------------------------------------------------------------
@dataclass
class Panel:
    """One block of tiles: ``images`` (R, K, H, W, C) uint8 under K column labels."""

    images: np.ndarray
    col_labels: Sequence[str] = ()  # "\n" starts a new line
    title: str | None = None


@dataclass
class Table:
    image: Image.Image
    tiles: dict[tuple[int, int, int], Box] = field(default_factory=dict)  # (panel, row, col) -> box
    texts: list[Box] = field(default_factory=list)  # every text drawn, for overlap checks


def _text_w(s: str, fnt: ImageFont.ImageFont) -> int:
    box = fnt.getbbox(str(s))
    return int(box[2] - box[0])


def _line_h(fnt: ImageFont.ImageFont) -> int:
    try:
        ascent, descent = fnt.getmetrics()
        return ascent + descent + 2
    except AttributeError:  # bitmap font
        return int(fnt.getbbox("Ag")[3]) + 4


def _lines(text: str | None) -> list[str]:
    return [] if not text else str(text).split("\n")


def _wrap(text: str | None, fnt: ImageFont.ImageFont, max_w: int) -> list[str]:
    """Break ``text`` into lines no wider than ``max_w`` px (a long word gets a line of its own)."""
    out = []
    for para in _lines(text):
        line = ""
        for word in para.split(" "):
            trial = f"{line} {word}" if line else word
            if line and _text_w(trial, fnt) > max_w:
                out.append(line)
                trial = word
            line = trial
        out.append(line)
    return out


def draw_table(
    panels: Sequence[Panel],
    row_labels: Sequence[str] | None = None,
    title: str | None = None,
    note: str | None = None,
    scale: int | None = None,
    pad: int = 2,
    gap: int = 28,
    font_size: int = 14,
) -> Table:
    """Lay out ``panels`` side by side; all share the rows and their ``row_labels``.

    Each column is as wide as its tile or its widest header line, whichever is more, so
    headers like ``"t = 1000\\n√ᾱ = 0.006"`` never run into each other. ``title`` (bold) and
    ``note`` (a warning colour, below the tiles) may have several lines; the title's first
    line is bold, the others are subtitles. ``scale`` enlarges
    the tiles with nearest-neighbour (default: to about 96 px).
    """
    if not panels:
        raise ValueError("draw_table needs at least one panel")
    rows, _, h, w, _ = panels[0].images.shape
    if any(p.images.shape[0] != rows or p.images.shape[2:4] != (h, w) for p in panels):
        raise ValueError("all panels need the same number of rows and the same image size")
    scale = auto_scale(h, w) if scale is None else scale
    th, tw = h * scale, w * scale
    fnt, bold = font(font_size), font(font_size + 2, bold=True)
    lh, blh, margin = _line_h(fnt), _line_h(bold), 8

    header_lines = max([len(_lines(s)) for p in panels for s in p.col_labels] or [0])
    header_h = header_lines * lh + (4 if header_lines else 0)
    ptitle_h = blh + 4 if any(p.title for p in panels) else 0
    widths = []  # per panel: column width
    for p in panels:
        k = p.images.shape[1]
        cw = max([tw] + [_text_w(line, fnt) + 10 for s in p.col_labels for line in _lines(s)])
        if p.title:  # a panel title wider than its columns widens them
            cw = max(cw, -(-(_text_w(p.title, bold) + 8 - (k - 1) * pad) // k))
        widths.append(cw)
    left = margin + (max(_text_w(s, fnt) for s in row_labels) + 10 if row_labels else 0)
    body_w = sum(
        p.images.shape[1] * cw + (p.images.shape[1] - 1) * pad
        for p, cw in zip(panels, widths, strict=True)
    )
    body_w += gap * (len(panels) - 1)
    title_lines = _lines(title)
    note_lines = _wrap(note, fnt, max(left + body_w, 360) - margin)
    title_fonts = [bold] + [fnt] * (len(title_lines) - 1)  # a bold first line, then subtitles
    text_w = max(
        [_text_w(s, f) for s, f in zip(title_lines, title_fonts, strict=True)]
        + [_text_w(s, fnt) for s in note_lines]
        + [0]
    )
    width = max(left + body_w + margin, text_w + 4 * margin)
    left += (width - (left + body_w + margin)) // 2  # centre the body under a wide title
    title_h = blh + (len(title_lines) - 1) * lh + 8 if title_lines else 0
    note_h = len(note_lines) * lh + (10 if note_lines else 0)
    top = margin + title_h + ptitle_h + header_h
    height = top + rows * th + (rows - 1) * pad + note_h + margin

    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    table = Table(canvas)

    def text(
        xy: tuple[int, int], s: str, f: ImageFont.ImageFont, anchor: str, fill: str = "black"
    ) -> None:
        draw.text(xy, s, fill=fill, font=f, anchor=anchor)
        table.texts.append(tuple(int(v) for v in draw.textbbox(xy, s, font=f, anchor=anchor)))

    for i, (line, f) in enumerate(zip(title_lines, title_fonts, strict=True)):
        text((width // 2, margin + (i > 0) * (blh + (i - 1) * lh)), line, f, "ma")
    x0 = left
    for pi, (p, cw) in enumerate(zip(panels, widths, strict=True)):
        k = p.images.shape[1]
        pw = k * cw + (k - 1) * pad
        if p.title:
            text((x0 + pw // 2, margin + title_h), p.title, bold, "ma")
        for c, label in enumerate(p.col_labels):
            lines = _lines(label)
            for j, line in enumerate(lines):
                y = top - 4 - (len(lines) - j) * lh
                text((x0 + c * (cw + pad) + cw // 2, y), line, fnt, "ma")
        for r in range(rows):
            for c in range(k):
                tile = p.images[r, c]
                img = Image.fromarray(tile.squeeze(-1) if tile.shape[-1] == 1 else tile).convert(
                    "RGB"
                )
                x, y = x0 + c * (cw + pad) + (cw - tw) // 2, top + r * (th + pad)
                canvas.paste(img.resize((tw, th), Image.NEAREST), (x, y))
                table.tiles[(pi, r, c)] = (x, y, x + tw, y + th)
        x0 += pw + gap
    for r, label in enumerate(row_labels or []):
        if label:
            text((left - 10, top + r * (th + pad) + th // 2), str(label), fnt, "rm")
    for i, line in enumerate(note_lines):
        text((margin, height - margin - note_h + 10 + i * lh), line, fnt, "la", NOTE_COLOUR)
    return table


def pad_to_same_size(frames: Sequence[Image.Image], multiple: int = 1) -> list[Image.Image]:
    """Paste every frame top-left on a white canvas of the largest size (rounded up)."""
    w = max(f.width for f in frames)
    h = max(f.height for f in frames)
    w, h = -(-w // multiple) * multiple, -(-h // multiple) * multiple
    out = []
    for f in frames:
        if f.size == (w, h):
            out.append(f.convert("RGB"))
            continue
        canvas = Image.new("RGB", (w, h), "white")
        canvas.paste(f, (0, 0))
        out.append(canvas)
    return out


# -- animations -----------------------------------------------------------------------------
def save_gif(
    path: str | Path, frames: Sequence[Image.Image], duration_ms: int | Sequence[int] = 80
) -> None:
    """An endlessly looping GIF, one image per frame, written atomically."""
    frames = pad_to_same_size(frames)
    with atomic_path(path) as tmp:
        frames[0].save(
            tmp, format="GIF", save_all=True, append_images=frames[1:],
            duration=list(duration_ms) if not isinstance(duration_ms, int) else duration_ms,
            loop=0, disposal=1, optimize=False,
        )  # fmt: skip


def save_mp4(
    path: str | Path, frames: Sequence[Image.Image], fps: float = 20.0, hold_last_s: float = 1.5
) -> None:
    """An H.264 MP4 (yuv420p, plays everywhere) through imageio-ffmpeg, written atomically."""
    import imageio.v2 as imageio

    frames = pad_to_same_size(frames, multiple=16)  # H.264 wants macro-block-sized frames
    frames += [frames[-1]] * int(round(hold_last_s * fps))
    with atomic_path(path) as tmp:
        writer = imageio.get_writer(
            tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=8,
            pixelformat="yuv420p", macro_block_size=16, ffmpeg_log_level="error",
        )  # fmt: skip
        try:
            for f in frames:
                writer.append_data(np.asarray(f))
        finally:
            writer.close()


# -- matplotlib -----------------------------------------------------------------------------
def new_figure(width_in: float, height_in: float, dpi: int = 100):
    """A matplotlib Figure on an explicit Agg canvas (no pyplot, no global backend state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def render_figure(fig) -> Image.Image:
    """Draw a :func:`new_figure` to an RGB image (deterministic for the same figure)."""
    fig.canvas.draw()
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB")
