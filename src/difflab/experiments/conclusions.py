"""Sentences for a report's conclusions, generated from measured numbers only.

:func:`sweep_conclusions` reads a sweep's summary rows (seed means per sampler, steps and
guidance, as :func:`difflab.experiments.ddpm_sweep.summarise` makes them) and says which guidance gave the
best conditional accuracy, how accuracy moves with guidance, from how many steps the
Fréchet distance stops improving, where within-class diversity collapses (below
:data:`COLLAPSE` of the real test images' diversity), and whether too much guidance drives
the Fréchet distance back up (samples leave the data distribution: artifacts).
When the sweep's cells kept their per-sample correctness (``cells``), two settings are
compared paired, sample by sample (:mod:`difflab.experiments.comparisons`): accuracy with
McNemar's test, the Fréchet distance and KID with a paired bootstrap when the folder kept the
samples' features; the sentence says the difference ± half its 95 % interval, or that the two
cannot be told apart with this many samples and about how many would be needed. With a checkpoint axis (training steps), the best setting is
followed through training: how far accuracy and FD moved, paired between the first and last
checkpoints, and from which checkpoint on more training bought little.
:func:`eval_conclusions` summarises one ``eval.json``. Every number in a sentence is taken
from the input, so the conclusions change when the measurements do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from difflab.evaluation.stats import PairedDistance
from difflab.experiments.comparisons import compare_both, compare_sentence, paired_correct
from difflab.experiments.comparisons import pct as _pct
from difflab.experiments.comparisons import setting as _setting

COLLAPSE = 0.8  # diversity below this share of the real images' counts as collapsed
SATURATED = 0.05  # FD within this share of its best counts as "no longer improving"
OVERGUIDED = 0.10  # FD this much above its minimum at the largest guidance: over-guidance


def _pm(r: dict, metric: str, fmt) -> str:
    std = r.get(f"{metric}_std")
    return fmt(r[f"{metric}_mean"]) + ("" if std is None else f" ± {fmt(std)}")


def _ci(r: dict, metric: str, fmt) -> str:
    """`` (95 % CI low–high)`` from a summary row's interval columns, or ""."""
    low, high = r.get(f"{metric}_ci_low"), r.get(f"{metric}_ci_high")
    return "" if low is None or high is None else f" (95% CI {fmt(low)}–{fmt(high)})"


def _overlap(a: dict, b: dict, metric: str) -> bool | None:
    """Whether two summary rows' intervals of ``metric`` overlap (None: no intervals)."""
    ends = [r.get(f"{metric}_ci_{e}") for r in (a, b) for e in ("low", "high")]
    return None if None in ends else ends[0] <= ends[3] and ends[2] <= ends[1]


def _by_guidance(rows: list[dict], metric: str) -> dict[float, float]:
    """Seed means of ``metric`` averaged over step counts, per guidance."""
    out: dict[float, list[float]] = {}
    for r in rows:
        out.setdefault(r["guidance"], []).append(r[f"{metric}_mean"])
    return {g: float(np.mean(v)) for g, v in sorted(out.items())}


def sweep_conclusions(
    summary: list[dict], refs: dict[str, Any] | None = None, cells: list[dict] | None = None,
    distances: Callable[[dict, dict], dict[str, PairedDistance] | None] | None = None,
) -> list[str]:  # fmt: skip
    """Plain sentences about one sweep (per sampler when it has several); ``cells`` (the
    cell records, with per-sample ``correct``) make the comparisons paired, ``distances(a,
    b)`` (:func:`difflab.experiments.paired.distance_comparer`) adds paired FD and KID. With
    a checkpoint axis, the settings are compared at the last checkpoint and the best setting
    is followed through training."""
    refs = refs or {}
    samplers = list(dict.fromkeys(r["sampler"] for r in summary))
    last = max((r["checkpoint"] for r in summary if r.get("checkpoint") is not None), default=None)
    out = []
    for smp in samplers:
        rows = [r for r in summary if r["sampler"] == smp]
        tag = f" ({smp})" if len(samplers) > 1 else ""
        at_last = [r for r in rows if r.get("checkpoint") == last]
        out += _sampler_conclusions(at_last, refs, tag, cells, distances)
        if len({r.get("checkpoint") for r in rows}) > 1:
            out += _training_conclusions(rows, at_last, refs, tag, cells, distances)
    return out


def _training_conclusions(rows, at_last, refs, tag, cells, distances) -> list[str]:
    """The best setting of the last checkpoint, followed from the first checkpoint to the last."""
    best = max(at_last, key=lambda r: (round(r["accuracy_mean"], 6), -r["guidance"], -r["steps"]))
    line = sorted((r for r in rows if _setting(r)[:3] == _setting(best)[:3]), key=lambda r: r["checkpoint"])  # fmt: skip
    first, end = line[0], line[-1]
    final = refs.get("final_checkpoint")  # the step of the run's final weights

    def name(r: dict) -> str:
        which = "final weights, " if r["checkpoint"] == final else ""
        return f"step {r['checkpoint']} ({which}{r['images_seen']:,} images seen)"

    how = f"s = {best['guidance']:g} at {best['steps']} steps"
    text = (
        f"Over training{tag} ({how}), accuracy goes from {_pct(first['accuracy_mean'])} at "
        f"{name(first)} to {_pct(end['accuracy_mean'])} at {name(end)}, and the Fréchet distance "
        f"from {first['fd_mean']:.2f} to {end['fd_mean']:.2f}"
    )
    floor = refs.get("fd_floor")
    if floor:
        text += f" ({first['fd_mean'] / floor:.1f}× to {end['fd_mean'] / floor:.1f}× the floor)"
    out = [text + "."]
    pair = paired_correct(cells, first, end)
    if pair is not None:
        out.append(f"From the first checkpoint to the last{tag}: {compare_both(name(first), name(end), pair, first, end, distances)}.")  # fmt: skip
    if len(line) > 2 and (pair := paired_correct(cells, line[-2], end)) is not None:
        said = compare_both(name(line[-2]), name(end), pair, line[-2], end, distances)
        out.append(f"Between the last two checkpoints{tag}: {said}.")
    if all(r.get("fd_ci_low") is not None for r in line):
        enough = next(r for r in line if _overlap(r, end, "fd"))
        out.append(
            f"The Fréchet distance{tag} is still improving at the last checkpoint: more training should help."
            if enough is end
            else f"From {name(enough)} on, the Fréchet distance's 95% interval overlaps that of the "
            f"last checkpoint{tag}: more training bought little beyond that."
        )  # fmt: skip
    return out


def _name(r: dict, steps: bool = True) -> str:
    return f"s = {r['guidance']:g}" + (f" at {r['steps']} steps" if steps else "")


def _sampler_conclusions(
    rows: list[dict], refs: dict, tag: str, cells: list[dict] | None = None, distances=None
) -> list[str]:
    out = []
    # highest accuracy; ties go to the smaller guidance, then to fewer steps
    order = sorted(rows, key=lambda r: (round(r["accuracy_mean"], 6), -r["guidance"], -r["steps"]))
    best = order[-1]
    g_best, st_best = best["guidance"], best["steps"]
    text = (
        f"The best conditional accuracy{tag}, {_pm(best, 'accuracy', _pct)}, came with guidance "
        f"s = {g_best:g} at {st_best} steps."
    )
    if best.get("accuracy_ci_low") is not None:
        text += f" Its 95% interval is {_pct(best['accuracy_ci_low'])}–{_pct(best['accuracy_ci_high'])}."
    several = len({r["steps"] for r in rows}) > 1
    runner_up = order[-2] if len(order) > 1 else None
    pair = paired_correct(cells, runner_up, best) if runner_up is not None else None
    if pair is not None:
        said = compare_both(
            _name(runner_up, several), _name(best, several), pair, runner_up, best, distances
        )
        text += f" Against the runner-up: {said}."
    out.append(text)
    at_steps = sorted((r for r in rows if r["steps"] == st_best), key=lambda r: r["guidance"])
    if len(at_steps) > 1:
        lo, hi = at_steps[0], at_steps[-1]
        chance = (
            f" (unconditional; chance is {_pct(1 / refs['num_classes'])})"
            if lo["guidance"] == 0 and refs.get("num_classes")
            else ""
        )
        text = (
            f"At {st_best} steps, accuracy goes from {_pct(lo['accuracy_mean'])} at s = "
            f"{lo['guidance']:g}{chance} to {_pct(best['accuracy_mean'])} at s = {g_best:g}"
        )
        if hi["guidance"] > g_best and hi["accuracy_mean"] < best["accuracy_mean"] - 0.02:
            text += f", and back down to {_pct(hi['accuracy_mean'])} at s = {hi['guidance']:g}"
        spread = max(r["accuracy_mean"] for r in at_steps) - min(
            r["accuracy_mean"] for r in at_steps
        )
        pair = paired_correct(cells, lo, best) if lo is not best else None
        if pair is not None and lo is runner_up:
            pass  # said above
        elif pair is not None:
            name = lambda r: _name(r, steps=False)  # noqa: E731
            said = compare_sentence(name(lo) + chance, name(best), *pair)
            out.append(f"At {st_best} steps, {said}.")
        else:
            strength = "strongly" if spread >= 0.15 else "moderately" if spread >= 0.05 else "hardly"  # fmt: skip
            out.append(text + f": accuracy depends {strength} on guidance.")
    steps = sorted({r["steps"] for r in rows})
    if len(steps) > 1:
        per_best = {r["steps"]: r["guidance"] for r in _best_per_steps(rows)}
        if len(set(per_best.values())) > 1:
            listed = "; ".join(f"{st} steps: s = {g:g}" for st, g in sorted(per_best.items()))
            out.append(f"The most accurate guidance depends on the step count ({listed}).")
        line = sorted((r for r in rows if r["guidance"] == g_best), key=lambda r: r["steps"])
        fd = [r["fd_mean"] for r in line]
        enough = next(
            r["steps"] for r, v in zip(line, fd, strict=True) if v <= min(fd) * (1 + SATURATED)
        )
        first, last = line[0], line[-1]
        acc = [r["accuracy_mean"] for r in line]
        change = max(max(acc) - min(acc), 0.3 * (max(fd) / max(min(fd), 1e-12) - 1))
        strength = (
            "strongly" if change >= 0.15 else "moderately" if change >= 0.05 else "only slightly"
        )
        pair = paired_correct(cells, first, last)
        f2 = lambda v: f"{v:.2f}"  # noqa: E731
        fd_text = (
            f"the Fréchet distance from {first['fd_mean']:.2f}{_ci(first, 'fd', f2)} to "
            f"{last['fd_mean']:.2f}{_ci(last, 'fd', f2)}"
        )
        overlap = _overlap(first, last, "fd")
        if overlap is not None:
            fd_text += " (the intervals overlap)" if overlap else " (the intervals do not overlap)"
        if pair is not None:
            steps_of = lambda r: f"{r['steps']} steps"  # noqa: E731
            text = (
                f"At s = {g_best:g}, {compare_both(steps_of(first), steps_of(last), pair, first, last, distances)}; "
                f"going from {first['steps']} to {last['steps']} steps moves {fd_text}, while the "
                f"time per cell grows from {first['seconds_mean']:.1f} s to {last['seconds_mean']:.1f} s."
            )
        else:
            text = (
                f"At s = {g_best:g}, going from {first['steps']} to {last['steps']} steps moves accuracy "
                f"from {_pct(first['accuracy_mean'])} to {_pct(last['accuracy_mean'])} and {fd_text} "
                f"(quality depends {strength} on the step count), while the time per cell grows from "
                f"{first['seconds_mean']:.1f} s to {last['seconds_mean']:.1f} s."
            )
        if all(r.get("fd_ci_low") is not None for r in line):
            top = min(line, key=lambda r: r["fd_mean"])
            enough = next(r["steps"] for r in line if _overlap(r, top, "fd"))
        if enough < last["steps"]:
            text += (
                f" From {enough} steps on, the Fréchet distance's 95% interval overlaps that of its "
                "best: more steps buy little beyond that."
                if line[0].get("fd_ci_low") is not None
                else f" The Fréchet distance is within {SATURATED:.0%} of its best from {enough} "
                "steps on: more steps buy little beyond that."
            )
        else:
            text += " The Fréchet distance is still improving at the largest step count."
        out.append(text)
    out += _guidance_side_effects(rows, refs, tag)
    return out


def _best_per_steps(rows: list[dict]) -> list[dict]:
    best: dict[int, dict] = {}
    for r in sorted(rows, key=lambda r: r["guidance"]):
        if r["steps"] not in best or r["accuracy_mean"] > best[r["steps"]]["accuracy_mean"] + 1e-9:
            best[r["steps"]] = r
    return list(best.values())


def _guidance_side_effects(rows: list[dict], refs: dict, tag: str) -> list[str]:
    """Diversity collapse and over-guidance, from means over the step counts."""
    div, fd = _by_guidance(rows, "diversity"), _by_guidance(rows, "fd")
    gs = list(div)
    if len(gs) < 2:
        return []
    out = []
    real = refs.get("diversity")
    ref = real if real else div[gs[0]]
    ref_of = "the real test images' diversity" if real else f"the diversity at s = {gs[0]:g}"
    collapsed = [g for g in gs if div[g] < COLLAPSE * ref]
    trend = (
        f"Within-class diversity{tag} goes from {div[gs[0]]:.2f} at s = {gs[0]:g} to "
        f"{div[gs[-1]]:.2f} at s = {gs[-1]:g}"
        + (f" (real test images: {real:.2f})" if real else "")
    )
    if collapsed:
        g = collapsed[0]
        out.append(
            f"{trend}; it collapses from s = {g:g} on ({div[g]:.2f}, {div[g] / ref:.0%} of "
            f"{ref_of}, below the {COLLAPSE:.0%} mark)."
        )
    else:
        low = min(gs, key=lambda g: div[g])
        out.append(
            f"{trend}; it does not collapse in this range: its lowest value, {div[low]:.2f} at "
            f"s = {low:g}, is {div[low] / ref:.0%} of {ref_of}."
        )
    g_min = min(gs, key=lambda g: fd[g])
    top = gs[-1]
    if top > g_min and fd[top] > fd[g_min] * (1 + OVERGUIDED):
        out.append(
            f"The Fréchet distance{tag} (mean over step counts) is lowest at s = {g_min:g} "
            f"({fd[g_min]:.2f}) and rises to {fd[top]:.2f} at s = {top:g} "
            f"(+{fd[top] / fd[g_min] - 1:.0%}): too much guidance pushes the samples away from "
            "the real images, the artifacts of over-guidance."
        )
    else:
        out.append(
            f"The Fréchet distance{tag} (mean over step counts) is lowest at s = {g_min:g} "
            f"({fd[g_min]:.2f}); up to s = {top:g} it shows no clear sign of over-guidance."
        )
    return out


def eval_conclusions(ev: dict[str, Any]) -> list[str]:
    """Sentences about one ``eval.json``."""
    s = ev.get("settings", {})
    ci = ev.get("ci95") or {}
    span = lambda m, f: f" (95% CI {f(ci[m][0])}–{f(ci[m][1])})" if m in ci else ""  # noqa: E731
    how = f"{s.get('sampler')}, {s.get('steps')} steps, guidance s = {s.get('guidance', 0):g}"
    text = f"At the run's evaluation settings ({how}), the reference classifier recognises {_pct(ev['accuracy'])} of the samples"  # fmt: skip
    if ev.get("judge_test_accuracy") is not None:
        text += f" (on real test images it scores {_pct(ev['judge_test_accuracy'])})"
    if "accuracy" in ci:
        text += f"; the 95% interval of this share is {_pct(ci['accuracy'][0])}–{_pct(ci['accuracy'][1])}"
    out = [text + "."]
    names = ev.get("class_names") or [str(i) for i in range(len(ev["accuracy_per_class"]))]
    per = [(a, n) for a, n in zip(ev["accuracy_per_class"], names, strict=False) if a is not None]
    if per:
        worst, best = min(per), max(per)
        if best[0] - worst[0] >= 0.1:
            out.append(
                f"The hardest class is {worst[1]} ({_pct(worst[0])}), the easiest {best[1]} ({_pct(best[0])})."
            )
    if ev.get("fd_floor"):
        f2 = lambda v: f"{v:.2f}"  # noqa: E731
        out.append(
            f"Its Fréchet distance is {ev['fd']:.2f}{span('fd', f2)}, {ev['fd'] / ev['fd_floor']:.1f}× the "
            f"real-vs-real floor of {ev['fd_floor']:.2f}."
        )
    if "copy_rate" in ev:
        out.append(
            f"{_pct(ev['copy_rate'])} of the samples are near-copies of training images (closer to "
            f"their nearest training image than {_pct(ev.get('copy_quantile', 0.01))} of held-out "
            "test images are): "
            + ("the model draws new images." if ev["copy_rate"] <= 2 * ev.get("copy_quantile", 0.01)
               else "more than real unseen images, a sign of memorisation.")
        )  # fmt: skip
    return out


def sd_sweep_conclusions(summary: list[dict], identity: dict | None = None) -> list[str]:
    """Plain sentences about a Stable Diffusion sweep's summary (per steps and guidance).

    For a mini-SD model (``identity["mini_sd"]``) first prompt accuracy and diversity against
    guidance (:func:`~difflab.experiments.sd_alignment.alignment_conclusions`). Which guidance
    aligned the images best with their prompts (CLIP score) at each step
    count, how the detail measure moves from the smallest to the largest guidance, how many
    images the safety checker filtered at which guidance, and black images it did not flag.
    """
    from difflab.experiments.sd_alignment import alignment_conclusions

    mini = (identity or {}).get("mini_sd")
    out: list[str] = alignment_conclusions(summary)
    measured = [r for r in summary if r.get("clip_score_mean") is not None]
    for st in sorted({r["steps"] for r in measured}):
        rows = sorted((r for r in measured if r["steps"] == st), key=lambda r: r["guidance"])
        best = max(rows, key=lambda r: (round(r["clip_score_mean"], 6), -r["guidance"]))
        lo, hi = rows[0], rows[-1]
        sentence = (
            f"At {st} steps the best prompt alignment, CLIP score "
            f"{_pm(best, 'clip_score', lambda v: f'{v:.1f}')}, came with guidance {best['guidance']:g}"
        )
        if len(rows) > 1:
            sentence += (
                f" (guidance {lo['guidance']:g}: {lo['clip_score_mean']:.1f}; "
                f"{hi['guidance']:g}: {hi['clip_score_mean']:.1f})"
            )
        out.append(sentence + ".")
        if len(rows) > 1 and lo["detail_mean"] and hi["detail_mean"] is not None:
            ratio = hi["detail_mean"] / lo["detail_mean"]
            trend = "more fine detail than" if ratio > 1.1 else "less fine detail than"
            if 1 / 1.1 <= ratio <= 1.1:
                trend = "about the same fine detail as"
            out.append(
                f"At {st} steps guidance {hi['guidance']:g} gave {trend} guidance "
                f"{lo['guidance']:g} (Laplacian variance {hi['detail_mean']:.4f} against "
                f"{lo['detail_mean']:.4f}, {ratio:.2f}×)."
            )
    flagged: dict[float, list[int]] = {}
    for r in summary:
        n = flagged.setdefault(r["guidance"], [0, 0])
        n[0] += r["nsfw_count"]
        n[1] += r["images"]
    total = sum(f for f, _ in flagged.values())
    checker = "safety checker"
    if isinstance(mini, dict) and mini.get("flagged_concept"):
        checker = f"lab stand-in safety checker (it flags the class {mini['flagged_concept']!r})"
    if total:
        where = ", ".join(f"{f} of {n} at guidance {g:g}" for g, (f, n) in flagged.items() if f)
        out.append(
            f"The {checker} filtered {total} image(s) (returned as black squares): {where}. "
            "They have no CLIP score or detail and are left out of the means."
        )
    else:
        out.append(f"The {checker} filtered no image in this sweep.")
    black = sum(r.get("black_unflagged", 0) for r in summary)
    if black:
        out.append(
            f"{black} image(s) came out black without being flagged: numerical trouble (NaN), "
            "not the safety checker; try --dtype fp32 or an fp16-fixed VAE."
        )
    return out
