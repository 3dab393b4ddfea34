"""The lab safety checker of mini-SD: SD's own checker class, taught one chosen concept.

Stable Diffusion's ``StableDiffusionSafetyChecker`` embeds the image with a CLIP vision tower
and a projection, takes the cosine similarity to each of its concept embeddings and flags the
image when ``cos - threshold > 0`` for any concept; a flagged image is replaced by a black one
and reported in ``has_nsfw_concept``. The stand-in here is that same class with a tiny CLIP
vision tower, trained (logistic loss on ``scale * (cos(embed(x), c) - b)``) to recognise one
class of the dataset: every concept embedding is set to the learned ``c`` and every
threshold to ``b``; the three "special care" concepts never fire (threshold 10 > any cosine).
So the pipeline, ``from_pretrained`` and difflab's flagged-vs-NaN diagnosis see exactly the
real checker's behaviour, on a concept the lab chose. It is a stand-in: it knows nothing of
unsafe content.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

CHECKER_SIZE = 32  # the feature extractor's square input
LOGIT_SCALE = 10.0
NEVER = 10.0  # a threshold above every cosine similarity


def feature_extractor() -> Any:
    """The ``CLIPImageProcessor`` the pipeline runs on its output before the checker."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": CHECKER_SIZE},
        crop_size={"height": CHECKER_SIZE, "width": CHECKER_SIZE},
    )


def checker_config(tokenizer: Any) -> Any:
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=32, **ids,
    )  # fmt: skip
    # the text tower is unused by the checker; CLIPConfig needs one
    vision = CLIPVisionConfig(
        image_size=CHECKER_SIZE, patch_size=4, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
    )  # fmt: skip
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32)


def clip_inputs(extractor: Any, x: torch.Tensor) -> torch.Tensor:
    """(N, 3, R, R) in [-1, 1] -> the checker's ``clip_input``, as the pipeline makes it
    (uint8 pixels through the feature extractor)."""
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arrays = list(pixels.permute(0, 2, 3, 1).numpy())
    return extractor(images=arrays, return_tensors="pt").pixel_values


def image_embeds(checker: Any, clip_input: torch.Tensor) -> torch.Tensor:
    """The checker's own image embedding (as in its forward)."""
    return checker.visual_projection(checker.vision_model(clip_input)[1])


class Concept(torch.nn.Module):
    """The concept embedding ``c`` and threshold ``b`` being learned."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.c = torch.nn.Parameter(torch.randn(dim) * 0.1)
        self.b = torch.nn.Parameter(torch.tensor(0.5))


def new_checker(tokenizer: Any) -> tuple[Any, Concept]:
    """A fresh checker (on the current torch seed) and the concept it will learn."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    checker = StableDiffusionSafetyChecker(checker_config(tokenizer))
    return checker, Concept(checker.concept_embeds.shape[1])


def checker_loss(
    checker: Any, concept: Concept, inputs: torch.Tensor, flagged: torch.Tensor, cfg: Any,
    g: torch.Generator,
) -> torch.Tensor:  # fmt: skip
    """Logistic loss of ``scale * (cos(embed(x), c) - b)`` on one batch, the flagged class
    weighted up to balance the two kinds."""
    target = flagged.float()
    pos = max(float(target.sum()), 1.0)
    pos_weight = torch.tensor((len(target) - pos) / pos)
    idx = torch.randint(len(inputs), (cfg.batch_size,), generator=g)
    cos = F.cosine_similarity(image_embeds(checker, inputs[idx]), concept.c[None], dim=-1)
    return F.binary_cross_entropy_with_logits(
        LOGIT_SCALE * (cos - concept.b), target[idx], pos_weight=pos_weight
    )


@torch.no_grad()
def finish_checker(checker: Any, concept: Concept) -> Any:
    """Write the learned concept into the checker's own embeddings and thresholds."""
    checker.eval().requires_grad_(False)
    c = concept.c.detach()
    checker.concept_embeds.copy_(c.expand_as(checker.concept_embeds))
    checker.concept_embeds_weights.fill_(float(concept.b))
    checker.special_care_embeds.copy_(c.expand_as(checker.special_care_embeds))
    checker.special_care_embeds_weights.fill_(NEVER)
    return checker


@torch.no_grad()
def flags(checker: Any, clip_input: torch.Tensor, batch: int = 256) -> np.ndarray:
    """What the checker's rule ``round(cos - threshold, 3) > 0`` says for each input."""
    out = []
    for i in range(0, len(clip_input), batch):
        e = F.normalize(image_embeds(checker, clip_input[i : i + batch]), dim=-1)
        cos = e @ F.normalize(checker.concept_embeds[:1], dim=-1).T  # (B, 1)
        out.append(((cos - checker.concept_embeds_weights[:1]) * 1000).round() > 0)
    return torch.cat(out)[:, 0].numpy()


def checker_accuracy(checker: Any, clip_input: torch.Tensor, flagged: torch.Tensor) -> float:
    said, truth = flags(checker, clip_input), flagged.numpy().astype(bool)
    parts = [float((said[truth == k] == k).mean()) for k in (True, False) if (truth == k).any()]
    return float(np.mean(parts))
