"""Prompt alignment of Stable Diffusion images measured offline: prompt accuracy and diversity.

For a mini-SD model (its folder names its dataset and classes) the reference classifier of
the dataset (:class:`~difflab.evaluation.sd_metrics.PromptJudge`) reads every image:
:func:`judge_fields` gives each image the class its prompt asks for, the class the classifier
sees, whether they agree and the classifier's features; :func:`interval_of` and
:func:`diversity_columns` turn a group of such records (one sweep setting, or one ``sd
generate`` call) into means with 95 % bootstrap intervals (resampled within each prompt,
:mod:`difflab.evaluation.stats`); :func:`measure_generation` does it for the images of ``sd
generate`` and adds the fields to their sidecars. CLIP score stays
:mod:`difflab.evaluation.sd_metrics`'s, beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from difflab.evaluation.sd_metrics import PromptJudge, feature_diversity, prompt_class
from difflab.evaluation.stats import bootstrap_interval, diversity_interval

JUDGE_COLUMNS = ("prompt_class", "judged_class", "prompt_correct")
JUDGE_SUMMARY = (
    "prompt_accuracy_mean", "prompt_accuracy_ci_low", "prompt_accuracy_ci_high",
    "prompt_accuracy_images", "diversity_mean", "diversity_ci_low", "diversity_ci_high",
)  # fmt: skip


def judge_fields(judge: PromptJudge, prompt: str, pixels: list, diags: list) -> list[dict]:
    """Per image: the class the prompt asks for, the class the reference classifier sees,
    whether they agree (None: the prompt names no single class, or the image is black) and
    the judge features (for the diversity over seeds)."""
    asked = prompt_class(prompt, judge.class_names)
    names = judge.class_names
    seen, feats = judge.measure(pixels)
    out = []
    for d, j, f in zip(diags, seen, feats, strict=True):
        ok = d.note is None and asked.index is not None
        out.append({
            "prompt_class": None if asked.index is None else names[asked.index],
            "judged_class": names[j] if j >= 0 else None,
            "prompt_correct": (float(j == asked.index) if ok else None),
            "judge_features": [round(float(v), 4) for v in f] if d.note is None else None,
        })  # fmt: skip
    return out


def interval_of(rs: list[dict], key: str, name: str | None = None) -> dict[str, float | None]:
    """``NAME_ci_low`` / ``NAME_ci_high``: the 95 % bootstrap interval of the mean of ``key``
    over the images that have it, resampled within each prompt (None below two images)."""
    name = name or key
    have = [r for r in rs if r.get(key) is not None]
    if len(have) < 2:
        return {f"{name}_ci_low": None, f"{name}_ci_high": None}
    low, high = bootstrap_interval([r[key] for r in have], labels=[r["prompt_index"] for r in have])
    return {f"{name}_ci_low": low, f"{name}_ci_high": high}


def diversity_columns(rs: list[dict]) -> dict[str, float | None]:
    """Mean pairwise judge-feature distance over the seeds of each prompt, averaged over the
    prompts, with its 95 % interval (seeds resampled within each prompt)."""
    have = [r for r in rs if r.get("judge_features") is not None]
    none = {"diversity_mean": None, "diversity_ci_low": None, "diversity_ci_high": None}
    if len(have) < 2:
        return none
    feats = np.array([r["judge_features"] for r in have], dtype=np.float64)
    groups = np.array([r["prompt_index"] for r in have])
    per = [feature_diversity(feats[groups == k]) for k in np.unique(groups)]
    per = [d for d in per if d is not None]
    if not per:
        return none
    measured = float(np.mean(per))
    ci = diversity_interval(feats, groups, measured) or [None, None]
    return {"diversity_mean": measured, "diversity_ci_low": ci[0], "diversity_ci_high": ci[1]}


def measure_generation(result: Any, judge: PromptJudge, prompt: str) -> dict[str, Any]:
    """Prompt accuracy (with its interval) and diversity of the images of one ``sd generate``
    call (a :class:`~difflab.sd.generate.GenerateResult`); the per-image fields go into each
    sidecar. A prompt naming no single class: ``prompt_accuracy`` None, ``note`` says why."""
    from PIL import Image

    from difflab.files import read_json, write_json

    pixels = [np.asarray(Image.open(r.png).convert("RGB")) for r in result.images]
    fields = judge_fields(judge, prompt, pixels, [r.diagnosis for r in result.images])
    rows = []
    for r, f in zip(result.images, fields, strict=True):
        sidecar = read_json(r.sidecar)
        write_json(r.sidecar, sidecar | {k: v for k, v in f.items() if k != "judge_features"})
        rows.append(f | {"prompt_index": 0})
    asked = prompt_class(prompt, judge.class_names)
    judged = [f["prompt_correct"] for f in rows if f["prompt_correct"] is not None]
    return {
        "dataset": judge.dataset, "prompt_class": rows[0]["prompt_class"] if rows else None,
        "note": asked.note, "images": len(judged),
        "prompt_accuracy": float(np.mean(judged)) if judged else None,
        **interval_of(rows, "prompt_correct", "prompt_accuracy"), **diversity_columns(rows),
        "judged_classes": [f["judged_class"] for f in rows],
    }  # fmt: skip


def generate_measured(
    opts: Any, out: str | Path, spec: Any = None, judge: PromptJudge | None = None, **kw: Any
) -> tuple[Any, dict[str, Any] | None]:
    """``difflab sd generate`` (:func:`difflab.sd.generate.generate`, ``kw`` passed on) and,
    for a mini-SD model, its prompt accuracy (:func:`measure_generation`); None otherwise.
    ``judge``: the model's prompt judge when the caller has it loaded already."""
    from difflab.evaluation.sd_metrics import load_prompt_judge
    from difflab.options import SDPipelineSpec
    from difflab.sd.generate import generate

    spec = SDPipelineSpec() if spec is None else spec
    judge = judge or load_prompt_judge(spec.model, spec.device)  # before the work: fails fast
    result = generate(opts, out, spec, **kw)
    return result, None if judge is None else measure_generation(result, judge, opts.prompt)


def accuracy_text(m: dict[str, Any]) -> str:
    """One line on a :func:`measure_generation` result."""
    if m["prompt_accuracy"] is None:
        return f"prompt accuracy not measured: the prompt {m['note']}"
    low, high = m.get("prompt_accuracy_ci_low"), m.get("prompt_accuracy_ci_high")
    ci = "" if low is None else f", 95% CI {low:.0%}–{high:.0%}"
    right = round(m["prompt_accuracy"] * m["images"])
    text = (
        f"prompt accuracy {m['prompt_accuracy']:.0%} ({right} of {m['images']}{ci}): the "
        f"{m['dataset']} reference classifier recognises {m['prompt_class']!r} in {right} of "
        f"{m['images']} image(s)"
    )
    if m.get("diversity_mean") is not None:
        text += f"; diversity over the seeds {m['diversity_mean']:.2f}"
    return text
