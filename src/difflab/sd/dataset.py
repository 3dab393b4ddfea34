"""The image folder that ``difflab sd finetune --data`` trains on.

:func:`load_image_folder` reads every ``.png``/``.jpg``/``.jpeg``/``.webp``/``.bmp`` under the
folder (sub-folders included, hidden files skipped, sorted by path). A caption comes from
``metadata.jsonl`` at the top of the folder (one ``{"file_name": ..., "text": ...}`` per line,
as Hugging Face's ``imagefolder``), else from a ``.txt`` file beside the image with the same
stem; an image with neither uses the instance prompt. Each image is turned upright (EXIF),
converted to RGB (transparency composited on white) and resized and center-cropped to a
square of the training resolution. Files that cannot be decoded are skipped; a note names
them, and other notes count the images converted, resized and left without a caption. A
folder that is missing or holds no readable image is a :class:`~difflab.errors.UsageError`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from difflab.errors import UsageError
from difflab.files import read_text

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA = "metadata.jsonl"


@dataclass
class ImageFolder:
    """Images ready for training: ``pixels`` (N, 3, R, R) uint8, one caption per image."""

    root: Path
    files: list[str]  # paths relative to root, POSIX style, sorted
    captions: list[str]
    pixels: torch.Tensor
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)


def _names(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _read_metadata(root: Path, where: str) -> dict[str, str]:
    path = root / METADATA
    if not path.is_file():
        return {}
    captions = {}
    for i, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, text = row["file_name"], row["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UsageError(
                f'{where}: {METADATA} line {i} is not {{"file_name": ..., "text": ...}}'
            ) from None
        captions[Path(str(name)).as_posix()] = str(text).strip()
    return captions


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, "white"), im).convert("RGB")
    return im.convert("RGB")


def load_image_folder(
    folder: str | Path, resolution: int, instance_prompt: str | None
) -> ImageFolder:
    """Read, caption and preprocess the images of ``folder`` (see module doc)."""
    root = Path(folder).expanduser()
    where = f"--data {folder}"
    if not root.exists():
        raise UsageError(f"{where}: no such folder")
    if not root.is_dir():
        raise UsageError(f"{where}: is a file; pass the folder that holds the images")
    paths = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not paths:
        raise UsageError(f"{where}: holds no images ({', '.join(IMAGE_SUFFIXES)})")
    metadata = _read_metadata(root, where)
    files, captions, arrays, unreadable, uncaptioned = [], [], [], [], []
    modes, resized = Counter(), []
    for path in paths:
        rel = path.relative_to(root).as_posix()
        try:
            with Image.open(path) as opened:
                im = ImageOps.exif_transpose(opened)  # a decoded, upright copy
        except (OSError, ValueError, Image.DecompressionBombError):
            unreadable.append(rel)
            continue
        if im.mode != "RGB":
            modes[im.mode] += 1
            im = _to_rgb(im)
        if im.size != (resolution, resolution):
            resized.append(f"{im.width}x{im.height}")
            im = ImageOps.fit(im, (resolution, resolution), Image.BICUBIC)
        txt = path.with_suffix(".txt")
        caption = metadata.get(rel) or (
            txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""
        )
        if not caption:
            uncaptioned.append(rel)
            caption = instance_prompt or ""
        files.append(rel)
        captions.append(caption)
        arrays.append(np.asarray(im, dtype=np.uint8))
    if not files:
        raise UsageError(
            f"{where}: none of its {len(paths)} images can be read ({_names(unreadable)})"
        )
    if uncaptioned and not (instance_prompt and instance_prompt.strip()):
        raise UsageError(
            f"--instance-prompt is missing: {len(uncaptioned)} of {len(files)} images have no "
            f"caption ({METADATA} or a .txt beside the image): {_names(uncaptioned)}"
        )
    notes = []
    if unreadable:
        notes.append(f"skipped {len(unreadable)} unreadable file(s): {_names(unreadable)}")
    if modes:
        kinds = ", ".join(f"{m}: {n}" for m, n in sorted(modes.items()))
        notes.append(f"converted {sum(modes.values())} image(s) to RGB ({kinds})")
    if resized:
        sizes = ", ".join(f"{s} ({n})" for s, n in sorted(Counter(resized).items()))
        notes.append(
            f"resized and center-cropped {len(resized)} image(s) to {resolution}x{resolution} "
            f"(from {sizes})"
        )
    if uncaptioned:
        notes.append(
            f"{len(uncaptioned)} of {len(files)} images have no caption and use "
            f"--instance-prompt {instance_prompt!r}"
        )
    missing = sorted(set(metadata) - set(files) - set(unreadable))
    if missing:
        notes.append(
            f"{METADATA} names {len(missing)} file(s) not in the folder: {_names(missing)}"
        )
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return ImageFolder(root.resolve(), files, captions, pixels, notes)
