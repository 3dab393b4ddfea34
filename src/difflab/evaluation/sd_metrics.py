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

**Prompt accuracy** (mini-SD models, whose folder names their dataset and classes): which
class a prompt asks for is read from its words (:func:`prompt_class`: a class name, its
alternatives in ``T-shirt/top``, a plural, a digit's number word; a prompt naming no class or
several has none and is not measured), and the dataset's reference classifier
(:mod:`difflab.evaluation.judge`, the one the DDPM evaluation uses) says whether an image shows
it (:class:`PromptJudge`). **Diversity** is the mean pairwise distance of the judge's features
over the seeds of one prompt and setting (:func:`~difflab.evaluation.metrics.diversity`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difflab.errors import UsageError
from difflab.sd import DEFAULT_CLIP_MODEL
from difflab.sd.mini import NUMBER_WORDS

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


# -- prompt accuracy ---------------------------------------------------------------------------
def class_aliases(name: str) -> set[str]:
    """The lower-case words that name class ``name`` in a prompt."""
    base = name.lower().replace("_", " ").strip()
    alts = {a.strip() for a in base.split("/") if a.strip()} | {base}
    out = alts | {a + "s" for a in alts if not a.isdigit()} | {a + "es" for a in alts if a.endswith(("s", "x", "ch", "sh"))}  # fmt: skip
    if base.isdigit() and int(base) < len(NUMBER_WORDS):
        out.add(NUMBER_WORDS[int(base)])
    return out


@dataclass(frozen=True)
class PromptClass:
    index: int | None  # the class the prompt asks for; None: not measured
    note: str | None = None  # why not


def prompt_class(prompt: str, class_names: Sequence[str]) -> PromptClass:
    """The one class of ``class_names`` that ``prompt`` names ("a handwritten digit 3", "the
    digit three", "a photo of a sneaker"); a name inside a longer one ("shirt" in "t-shirt")
    does not count. No class or several: ``index`` None and a note saying so."""
    text = str(prompt).lower()
    spans = []
    for i, name in enumerate(class_names):
        for alias in class_aliases(str(name)):
            pattern = rf"(?<![a-z0-9-]){re.escape(alias)}(?![a-z0-9-])"
            spans += [(m.start(), m.end(), i) for m in re.finditer(pattern, text)]
    inside = {s for s in spans for o in spans if o[0] <= s[0] and s[1] <= o[1] and o[1] - o[0] > s[1] - s[0]}  # fmt: skip
    found = sorted({i for s in spans if s not in inside for i in [s[2]]})
    if len(found) == 1:
        return PromptClass(found[0])
    if not found:
        listed = ", ".join(map(str, class_names))
        return PromptClass(None, f"names none of the classes ({listed}): prompt accuracy not measured")  # fmt: skip
    listed = ", ".join(str(class_names[i]) for i in found)
    return PromptClass(None, f"names several classes ({listed}): prompt accuracy not measured")


class PromptJudge:
    """The reference classifier of a mini-SD model's dataset, reading pipeline images."""

    def __init__(self, judge: Any, class_names: Sequence[str], dataset: str = "") -> None:
        self.judge, self.class_names, self.dataset = judge, tuple(map(str, class_names)), dataset
        names = [str(c) for c in judge.class_names]
        missing = [c for c in self.class_names if c not in names]
        if missing:
            raise UsageError(
                f"the {judge.dataset} reference classifier has no class {missing[0]!r}; "
                "the model's classes must be its dataset's"
            )
        self.to_judge = [names.index(c) for c in self.class_names]

    def _pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(H, W, 3) uint8 images -> floats (N, C, h, w) in [-1, 1] at the judge's size."""
        x = torch.as_tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if self.judge.channels == 1:
            x = (x * torch.as_tensor(LUMA, dtype=x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
        size = (self.judge.height or x.shape[2], self.judge.width or x.shape[3])
        if tuple(x.shape[2:]) != size:
            # by a whole factor: box averaging, the near-inverse of making a small image large
            # (real 8x8 digits taken to 16x16 and back were read 88 % right, 69 % with
            # antialiased bilinear); otherwise antialiased bilinear (mnist5k 28 -> 32 -> 28:
            # 97.8 %, box 97.1 %)
            whole = x.shape[2] % size[0] == 0 and x.shape[3] % size[1] == 0
            kw = {"mode": "area"} if whole else {"mode": "bilinear", "antialias": True}
            x = torch.nn.functional.interpolate(x, size=size, **kw)
        return x.clamp(-1, 1)

    def measure(self, images: Sequence[np.ndarray]) -> tuple[list[int], np.ndarray]:
        """The judged class of each image (an index into ``class_names``, -1 for another
        class of the judge) and its judge features (N, 128)."""
        x = self._pixels(images)
        back = {j: i for i, j in enumerate(self.to_judge)}
        judged = [back.get(int(j), -1) for j in self.judge.predict(x)]
        return judged, self.judge.features(x).numpy()


def load_prompt_judge(model: str | Path, device: str = "cpu") -> PromptJudge | None:
    """The :class:`PromptJudge` of a mini-SD folder (its ``mini_sd.json`` names the dataset
    and the classes); None for any other model. The judge is trained on first use, cached."""
    from difflab.evaluation.judge import get_judge
    from difflab.sd.mini import read_record

    path = Path(str(model)).expanduser()
    record = read_record(path) if path.is_dir() else None
    if not record or not record.get("dataset") or not record.get("class_names"):
        return None
    judge = get_judge(record["dataset"], device=device, progress=False)
    return PromptJudge(judge, record["class_names"], record["dataset"])


def feature_diversity(features: Any) -> float | None:
    """Mean pairwise distance of ``features`` (N, D); None for fewer than two."""
    f = np.asarray(features, dtype=np.float64)
    if len(f) < 2:
        return None
    from difflab.evaluation.metrics import diversity

    return diversity(f, np.zeros(len(f), dtype=np.int64))["mean"]
