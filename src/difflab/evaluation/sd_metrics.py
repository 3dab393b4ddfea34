"""Per-image measures of a Stable Diffusion sweep: prompt alignment (CLIP score) and detail.

**CLIP score** (Hessel et al. 2021, as in ``torchmetrics.multimodal.CLIPScore``):
``100 * max(cos(E_image, E_text), 0)`` with the projected CLIP embeddings of the image and its
prompt; higher means the image matches the prompt better. It is computed with ``transformers``'
``CLIPModel`` directly because torchmetrics 1.9's ``CLIPScore`` breaks on transformers 5 (its
``get_*_features`` now return output objects); the test suite checks the two agree. The CLIP
model is configurable (default ``openai/clip-vit-large-patch14``, torchmetrics' default); the
prompt is cut to the model's context length (77 tokens for CLIP).

**Detail** is the variance of the Laplacian (Pech-Pacheco et al. 2000, the usual focus /
sharpness measure): the luma ``Y = 0.299 R + 0.587 G + 0.114 B`` in [0, 1], filtered with the
4-neighbour kernel ``[[0, 1, 0], [1, -4, 1], [0, 1, 0]]`` over the interior pixels, and the
variance of the result. Flat or blurry images score near 0, fine texture and sharp edges score
high (a one-pixel 0/1 checkerboard scores 16). It depends on the image size, so compare it
only between images of the same size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from difflab.errors import UsageError
from difflab.sd import DEFAULT_CLIP_MODEL

LUMA = np.array([0.299, 0.587, 0.114])


def laplacian_variance(image: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of the luma of ``image`` (H, W, 3) uint8."""
    y = image.astype(np.float64) @ LUMA / 255.0  # (H, W) in [0, 1]
    lap = y[:-2, 1:-1] + y[2:, 1:-1] + y[1:-1, :-2] + y[1:-1, 2:] - 4 * y[1:-1, 1:-1]
    return float(lap.var()) if lap.size else 0.0


class ClipScorer:
    """CLIP score of images against their prompts with one loaded CLIP model."""

    def __init__(self, model: str = DEFAULT_CLIP_MODEL, device: str = "cpu") -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.name, self.device = str(model), device
        from difflab.sd.load import quiet_loading

        try:
            with quiet_loading():
                model = CLIPModel.from_pretrained(self.name, use_safetensors=True)
                self.model = model.to(device).eval()
                self.processor = CLIPProcessor.from_pretrained(self.name)
        except (OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise UsageError(
                f"--clip-model {self.name}: cannot load it (offline or not found: {first}); "
                f"download it where the Hub is reachable (`hf download {self.name} --local-dir "
                "DIR`) and pass --clip-model DIR, or --clip-model none to skip the CLIP score"
            ) from None
        self.max_tokens = int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[float]:
        """One score per (image (H, W, 3) uint8, prompt) pair."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        inputs = self.processor(
            text=list(prompts), images=list(images), return_tensors="pt", padding=True,
            truncation=True, max_length=self.max_tokens,
        )  # fmt: skip
        out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        img = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)  # (N, D)
        txt = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)  # (N, D)
        return (100 * (img * txt).sum(-1)).clamp(min=0).cpu().tolist()


def load_scorer(model: str | None, device: str) -> Any:
    """A :class:`ClipScorer`, or None for ``--clip-model none``."""
    if model is None or str(model).lower() == "none":
        return None
    return ClipScorer(model, device)
