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


def _pct(v: float) -> str:
    return f"{v:.0%}"


def _with_ci(r: dict, metric: str, fmt) -> str:
    low, high = r.get(f"{metric}_ci_low"), r.get(f"{metric}_ci_high")
    ci = "" if low is None or high is None else f" (95% CI {fmt(low)}–{fmt(high)})"
    return fmt(r[f"{metric}_mean"]) + ci


def _tell(a: dict, b: dict, metric: str) -> str:
    """Whether the data can tell two settings apart: their 95 % intervals do not overlap."""
    ends = [r.get(f"{metric}_ci_{e}") for r in (a, b) for e in ("low", "high")]
    if None in ends:
        return "no intervals to tell whether the data can tell them apart"
    if ends[0] <= ends[3] and ends[2] <= ends[1]:
        return "the intervals overlap, so these seeds cannot tell the two apart; more seeds would"
    return "the intervals do not overlap: the data can tell the two apart"


def alignment_conclusions(summary: list[dict]) -> list[str]:
    """Sentences on prompt accuracy and diversity against guidance (mini-SD sweeps), per step
    count: the most accurate guidance, the change from the smallest to the largest guidance
    with whether the data can tell it, and whether alignment rose while diversity fell."""
    out: list[str] = []
    measured = [r for r in summary if r.get("prompt_accuracy_mean") is not None]
    for st in sorted({r["steps"] for r in measured}):
        rows = sorted((r for r in measured if r["steps"] == st), key=lambda r: r["guidance"])
        best = max(rows, key=lambda r: (round(r["prompt_accuracy_mean"], 6), -r["guidance"]))
        out.append(
            f"At {st} steps the highest prompt accuracy (the reference classifier recognises the "
            f"class the prompt names), {_with_ci(best, 'prompt_accuracy', _pct)}, came with "
            f"guidance {best['guidance']:g}."
        )
        if len(rows) < 2:
            continue
        lo, hi = rows[0], rows[-1]
        d_acc = hi["prompt_accuracy_mean"] - lo["prompt_accuracy_mean"]
        move = "rose" if d_acc > 0 else "fell" if d_acc < 0 else "stayed"
        out.append(
            f"From guidance {lo['guidance']:g} to {hi['guidance']:g} prompt accuracy {move} from "
            f"{_with_ci(lo, 'prompt_accuracy', _pct)} to {_with_ci(hi, 'prompt_accuracy', _pct)}; "
            f"{_tell(lo, hi, 'prompt_accuracy')}."
        )
        if lo.get("diversity_mean") is None or hi.get("diversity_mean") is None:
            continue
        f2 = lambda v: f"{v:.2f}"  # noqa: E731
        d_div = hi["diversity_mean"] - lo["diversity_mean"]
        out.append(
            f"Diversity over the seeds (judge-feature distance) {'fell' if d_div < 0 else 'rose'} "
            f"from {_with_ci(lo, 'diversity', f2)} to {_with_ci(hi, 'diversity', f2)}; "
            f"{_tell(lo, hi, 'diversity')}."
        )
        told = all("do not overlap" in _tell(lo, hi, m) for m in ("prompt_accuracy", "diversity"))
        if d_acc > 0 and d_div < 0:
            out.append(
                f"At {st} steps alignment rose and diversity fell with guidance, as classifier-free "
                "guidance trades variety for fidelity"
                + (
                    " (both changes clear of their intervals)."
                    if told
                    else "; not every change is clear of its interval."
                )  # fmt: skip
            )
    return out


def ci_text(r: dict, m: str, fmt: str) -> str:
    """``mean [low, high]`` of a summary row's metric and its 95 % interval ("–": none)."""
    if r.get(f"{m}_mean") is None:
        return "–"
    low, high = r.get(f"{m}_ci_low"), r.get(f"{m}_ci_high")
    ci = "" if low is None or high is None else f" [{low:{fmt}}, {high:{fmt}}]"
    return f"{r[f'{m}_mean']:{fmt}}{ci}"


def mini_sd_note(ident: dict) -> str:
    """What a mini-SD sweep's reader must know: the model, the judge, the stand-in checker."""
    mini = ident["mini_sd"]
    concept = mini.get("flagged_concept")
    checker = (
        f"Its safety checker is a lab stand-in, not Stable Diffusion's NSFW checker: SD's checker "
        f"class with a concept embedding trained to flag the class {concept!r} of {mini.get('dataset')}, "
        "so the black squares show how the real one behaves, not what it screens for."
        if concept else "It has no safety checker."
    )  # fmt: skip
    return (
        f"This model is mini-SD, a small Stable Diffusion trained by difflab sd mini on "
        f"{mini.get('dataset')}. Prompt accuracy is measured by the {ident.get('judge')} reference "
        f"classifier (the class the prompt names against the class it sees); prompts naming no "
        f"class or several are not measured. {checker}"
    )
