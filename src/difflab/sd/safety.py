"""Telling the two kinds of black image apart, per image, and saying so.

The SD safety checker replaces an image it flags with a black one and reports it in
``nsfw_content_detected``: that is a *filtered* image (``nsfw: true``). A black image the
checker did *not* flag has another cause, almost always NaN from the VAE decoder in fp16
(its activations overflow the fp16 range); diffusers turns NaN into 0 = black when it makes
the PNG. :func:`diagnose` looks at the decoded pixels (before any conversion) and the flag
and returns what happened, with the fix, so neither case is ever shown as a plain black
square without an explanation. :func:`to_uint8` makes the PNG pixels (NaN -> 0, as diffusers).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

BLACK_MAX = 2 / 255  # every channel of every pixel at or below this counts as black
NAN_HINT = (
    "re-run with --dtype fp32 (or bf16, which has fp32's range), or swap the VAE with --vae "
    "(e.g. the fine-tuned stabilityai/sd-vae-ft-mse, or a local copy of it)"
)
FILTERED = "filtered by the safety checker (it returns a black image)"


@dataclass(frozen=True)
class Diagnosis:
    nsfw: bool | None  # None: no safety checker ran
    black: bool  # every pixel ~0 (or NaN)
    nan_fraction: float  # share of NaN/inf values in the decoded image
    note: str | None  # one line for the user; None for an ordinary image

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def diagnose(image: np.ndarray, nsfw: bool | None) -> Diagnosis:
    """``image``: (H, W, 3) floats in [0, 1] as the pipeline returned them (``output_type="np"``)."""
    bad = ~np.isfinite(image)
    nan_fraction = float(bad.mean())
    black = bool(np.all(np.where(bad, 0.0, image) <= BLACK_MAX))
    note = None
    who = "NOT flagged by the safety checker" if nsfw is not None else "(no safety checker ran)"
    if nsfw:
        note = FILTERED
    elif nan_fraction > 0:
        note = (
            f"{'black' if black else 'broken'} image {who}: the VAE decoded NaN for "
            f"{nan_fraction:.0%} of the pixels (fp16 overflow); {NAN_HINT}"
        )
    elif black:
        note = (
            f"black image {who}: every pixel is ~0 (NaN from an fp16 VAE is the usual cause); "
            f"{NAN_HINT}"
        )
    return Diagnosis(None if nsfw is None else bool(nsfw), black, nan_fraction, note)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) floats in [0, 1] -> uint8; NaN becomes 0 (black), as in diffusers' PIL output."""
    x = np.nan_to_num(image.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return (np.clip(x, 0.0, 1.0) * 255).round().astype(np.uint8)
