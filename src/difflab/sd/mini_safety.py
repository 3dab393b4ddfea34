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

from difflab.runfolder import step_generator

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


def build_lab_checker(
    x: torch.Tensor, flagged: torch.Tensor, cfg: Any, seed: int, phase: Any, tokenizer: Any
) -> tuple[Any, Any, float]:
    """Train the checker to flag the images where ``flagged`` is true; returns the checker,
    its feature extractor and its accuracy on ``x`` (balanced over the two kinds)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    torch.manual_seed(seed)
    extractor = feature_extractor()
    checker = StableDiffusionSafetyChecker(checker_config(tokenizer))
    inputs = clip_inputs(extractor, x)
    target = flagged.float()
    pos = max(float(target.sum()), 1.0)
    pos_weight = torch.tensor((len(target) - pos) / pos)
    c = torch.nn.Parameter(torch.randn(checker.concept_embeds.shape[1]) * 0.1)
    b = torch.nn.Parameter(torch.tensor(0.5))
    params = [*checker.vision_model.parameters(), *checker.visual_projection.parameters(), c, b]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    checker.train()
    for step in phase:
        g = step_generator(seed, step)
        idx = torch.randint(len(inputs), (cfg.batch_size,), generator=g)
        cos = F.cosine_similarity(image_embeds(checker, inputs[idx]), c[None], dim=-1)
        loss = F.binary_cross_entropy_with_logits(
            LOGIT_SCALE * (cos - b), target[idx], pos_weight=pos_weight
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        phase.log(loss.item())
    checker.eval().requires_grad_(False)
    with torch.no_grad():
        checker.concept_embeds.copy_(c.detach().expand_as(checker.concept_embeds))
        checker.concept_embeds_weights.fill_(float(b))
        checker.special_care_embeds.copy_(c.detach().expand_as(checker.special_care_embeds))
        checker.special_care_embeds_weights.fill_(NEVER)
    return checker, extractor, checker_accuracy(checker, inputs, flagged)


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
