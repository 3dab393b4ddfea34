"""The lab report: one self-contained HTML file and its Markdown twin, from run and sweep folders.

:func:`write_report` (``difflab report RUN|DIR ... --out report.html``) builds one list of
blocks (headings, paragraphs, tables, images) and renders it twice: ``report.html`` with
every image inlined as a base64 ``data:`` URI (it opens offline, and can be mailed or handed
in as one file), and ``report.md`` beside it whose images are PNG files in ``report_files/``.
A run contributes its configuration, training curve, noise schedule, forward and reverse
figures, sample grids and ``eval.json``; a sweep contributes its summary table (mean ± std
over seeds), heat-maps, line plots and image grid. The conclusions are sentences generated
from these numbers by :mod:`difflab.experiments.conclusions`. Every input is checked before any work.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from difflab import __version__
from difflab.config import RunConfig
from difflab.ddpm.runs import CONFIG, METRICS
from difflab.errors import UsageError
from difflab.experiments.conclusions import (
    eval_conclusions,
    sd_sweep_conclusions,
    sweep_conclusions,
)
from difflab.experiments.ddpm_sweep import SWEEP_FILE
from difflab.experiments.paired import distance_comparer
from difflab.experiments.report_render import Block, render_html, render_markdown
from difflab.experiments.sd_alignment import ci_text, mini_sd_note
from difflab.experiments.sd_sweep import IDENTITY_FILE as SD_SWEEP_FILE
from difflab.files import atomic_path, read_json, read_jsonl, write_text

RUN_FIGURES = (  # (file in RUN/figures, heading, what to run when it is missing)
    ("forward.png", "Forward process", "difflab forward --run RUN --out RUN/figures/forward.png"),
    ("reverse.png", "Reverse process", "difflab reverse RUN --out RUN/figures/reverse.png"),
    ("samples.png", "Samples of every class", "difflab sample RUN --out RUN/figures/samples.png"),
    ("guidance.png", "Samples against guidance",
     "difflab sample RUN --guidance 0,1,3 --cols guidance --out RUN/figures/guidance.png"),
    ("nearest_train.png", "Samples beside their nearest training images", "difflab eval RUN"),
)  # fmt: skip


@dataclass
class ReportResult:
    html: Path
    markdown: Path
    images: list[Path]
    conclusions: list[str]


def _png(path: Path) -> bytes:
    return path.read_bytes()


def _figure_png(fig) -> bytes:
    from difflab.figures.images import render_figure

    buf = io.BytesIO()
    render_figure(fig).save(buf, format="PNG")
    return buf.getvalue()


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            shown = ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else v
            out.append((f"{prefix}{k}", "" if shown is None else str(shown)))
    return out


# -- inputs ---------------------------------------------------------------------------------
def classify(inputs: Sequence[str | Path]) -> tuple[list[Path], list[Path], list[Path]]:
    """Run, sweep and SD sweep folders among ``inputs`` (a DDPM sweep brings its run along)."""
    if not inputs:
        raise UsageError("report: give at least one run folder or sweep folder")
    runs, sweeps, sd_sweeps = [], [], []
    for item in map(Path, inputs):
        if (item / SD_SWEEP_FILE).is_file():
            if not (item / "metrics.json").is_file():
                raise UsageError(f"{item}: this sweep has no finished cell yet (no metrics.json)")
            sd_sweeps.append(item)
        elif (item / SWEEP_FILE).is_file():
            if not (item / "metrics.json").is_file():
                raise UsageError(f"{item}: this sweep has no finished cell yet (no metrics.json)")
            sweeps.append(item)
        elif (item / CONFIG).is_file():
            runs.append(item)
        else:
            raise UsageError(
                f"{item}: neither a run folder (no {CONFIG}) nor a sweep folder "
                f"(no {SWEEP_FILE} or {SD_SWEEP_FILE})"
            )
    for sw in sweeps:
        run = Path(read_json(sw / SWEEP_FILE).get("run", ""))
        if (run / CONFIG).is_file() and all(r.resolve() != run.resolve() for r in runs):
            runs.append(run)
    return runs, sweeps, sd_sweeps


def read_sweep(folder: Path) -> dict:
    """The ``metrics.json`` of a sweep folder: identity, cell rows and the summary."""
    return read_json(folder / "metrics.json")


# -- sections -------------------------------------------------------------------------------
def run_blocks(run: Path, slug: str) -> tuple[list[Block], list[str]]:
    from difflab.ddpm.processes import run_loss_figure, run_schedule_figure

    cfg = RunConfig.load(run / CONFIG)
    figs = run / "figures"
    rows = [r for r in read_jsonl(run / METRICS) if isinstance(r.get("loss"), (int, float))]
    blocks = [Block("h2", f"Run: {run.name}")]
    about = f"Folder {run}; dataset {cfg.train.dataset}, preset {cfg.preset}, {cfg.model.height}×{cfg.model.width}×{cfg.model.in_channels} images, {cfg.model.num_classes} classes."
    if rows:
        last = rows[-1]
        about += f" Trained {last['step']} steps ({last.get('epoch', 0):.1f} epochs) in {last.get('elapsed_s', 0):.0f} s; last logged loss {last['loss']:.4f}."
    blocks.append(Block("p", about))
    blocks.append(Block("h3", "Configuration"))
    table = [["section", "options"]]
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            table.append([section, " · ".join(f"{k} = {v}" for k, v in _flatten(values))])
        else:
            table.append([section, str(values)])
    blocks.append(Block("table", rows=table))
    blocks.append(Block("h3", "Training curve"))
    if (figs / "loss.png").is_file():
        blocks.append(
            Block("image", "training loss", png=_png(figs / "loss.png"), name=f"{slug}_loss.png")
        )
    elif rows and all("step" in r for r in rows):
        png = _figure_png(run_loss_figure(rows, cfg, run.name))
        blocks.append(Block("image", "training loss", png=png, name=f"{slug}_loss.png"))
    else:
        blocks.append(Block("note", f"No training loss logged yet ({run / METRICS})."))
    blocks.append(Block("h3", "Noise schedule"))
    if (figs / "schedule.png").is_file():
        png = _png(figs / "schedule.png")
    else:
        from difflab.ddpm.diffusion import GaussianDiffusion

        png = _figure_png(run_schedule_figure(GaussianDiffusion(cfg.diffusion, warn=False)))
    blocks.append(Block("image", "noise schedule", png=png, name=f"{slug}_schedule.png"))
    figures = list(RUN_FIGURES)
    if cfg.train.init_from:
        figures.append(("before_after.png", f"Before and after: fine-tuned from {cfg.train.init_from}", f"drawn when training ends (difflab train --init-from {cfg.train.init_from} --out RUN)"))  # fmt: skip
    for file, heading, command in figures:
        blocks.append(Block("h3", heading))
        if (figs / file).is_file():
            blocks.append(Block("image", heading, png=_png(figs / file), name=f"{slug}_{file}"))
        else:
            blocks.append(Block("note", f"Not made yet: {command.replace('RUN', str(run))}"))
    conclusions = []
    if (run / "eval.json").is_file():
        ev = read_json(run / "eval.json")
        blocks += eval_blocks(ev)
        conclusions = eval_conclusions(ev)
    else:
        blocks += [
            Block("h3", "Evaluation"),
            Block("note", f"Not measured yet: difflab eval {run}"),
        ]
    return blocks, conclusions


def _span(ev: dict, metric: str, fmt: str) -> str:
    ci = (ev.get("ci95") or {}).get(metric)
    return f", 95% CI [{format(ci[0], fmt)}, {format(ci[1], fmt)}]" if ci else ""


def eval_blocks(ev: dict) -> list[Block]:
    s = ev["settings"]
    rows = [
        ["measure", "value"],
        ["samples", f"{ev['n']} ({s['n_per_class']} per class; {s['sampler']}, {s['steps']} steps, guidance {s['guidance']:g}, seed {s['seed']}{'; bf16' if s.get('precision') == 'bf16' else ''})"],
        ["conditional accuracy", f"{ev['accuracy']:.1%}{_span(ev, 'accuracy', '.1%')}"],
        ["judge's accuracy on real test images", "" if ev.get("judge_test_accuracy") is None else f"{ev['judge_test_accuracy']:.1%}"],
        ["Fréchet distance (judge features)", f"{ev['fd']:.3f}{_span(ev, 'fd', '.3f')}"],
        ["real-vs-real floor (train vs test)", f"{ev['fd_floor']:.3f} (ratio {ev['fd_ratio']:.1f}×)"],
    ]  # fmt: skip
    if "kid" in ev:
        rows.append(["KID (judge features)", f"{ev['kid']:.4f} ± {ev['kid_std']:.4f}{_span(ev, 'kid', '.4f')}"])  # fmt: skip
    rows += [
        ["within-class diversity", f"{ev['diversity']:.3f}{_span(ev, 'diversity', '.3f')} (real test images {ev['diversity_real']:.3f})"],
        *([["near-copies of training images", f"{ev['copy_rate']:.1%} (threshold {ev['copy_threshold']:.3f})"]] if "copy_rate" in ev else []),
        ["sampling speed", f"{ev['samples_per_s']:.1f} samples/s"],
    ]  # fmt: skip
    names = ev.get("class_names") or [str(i) for i in range(len(ev["accuracy_per_class"]))]
    per = [["class", *names], ["accuracy", *("–" if a is None else f"{a:.0%}" for a in ev["accuracy_per_class"])]]  # fmt: skip
    return [
        Block("h3", "Evaluation"),
        Block("table", rows=rows),
        Block("p", "Accuracy per class:"),
        Block("table", rows=per),
        Block("note", "FD, KID and diversity are measured on the reference classifier's features: they rank models of the same dataset but are not comparable with published Inception FID/KID."),
    ]  # fmt: skip


def mean_std_text(r: dict, m: str, fmt: str) -> str:
    std = r.get(f"{m}_std")
    return format(r[f"{m}_mean"], fmt) + ("" if std is None else f" ± {format(std, fmt)}")


def sweep_blocks(sweep: Path, slug: str) -> tuple[list[Block], list[str]]:
    doc = read_sweep(sweep)
    ident, summary = doc["sweep"], doc["summary"]
    seeds = ident["seeds"]
    blocks = [Block("h2", f"Sweep: {sweep.name}")]
    text = (
        f"Folder {sweep}; run {ident['run']}; samplers {', '.join(ident['samplers'])}; steps "
        f"{', '.join(map(str, ident['steps']))}; guidance {', '.join(f'{g:g}' for g in ident['guidance'])}; "
        f"seeds {', '.join(map(str, seeds))}; {ident['n_per_class']} samples per class per cell"
        f"{'; checkpoints (training steps) ' + ', '.join(map(str, ident['checkpoints'])) if 'checkpoints' in ident else ''}"
        f"{'; network in bf16' if ident.get('precision') == 'bf16' else ''}. "
        "All cells of a seed start from the same noise, so they differ only by the swept settings."
    )
    if not doc["complete"]:
        text += f" Incomplete: {doc['cells_done']} of {doc['cells_total']} cells are done."
    blocks.append(Block("p", text))
    spread = "mean ± std over seeds" if len(seeds) > 1 else "one seed"
    along = "checkpoints" in ident  # the checkpoint axis: training step and images seen first
    final = next((int(k) for k, f in ident.get("checkpoint_files", {}).items() if f == "model.safetensors"), None)  # fmt: skip
    header = ["checkpoint", "images seen"] * along + ["sampler", "steps", "guidance", "accuracy", "FD", "KID", "diversity", "s / cell"]  # fmt: skip
    table = [header] + [
        ([f"{r['checkpoint']}{' (final)' * (r['checkpoint'] == final)}", f"{r['images_seen']:,}"] if along else []) + [r["sampler"], str(r["steps"]), f"{r['guidance']:g}", mean_std_text(r, "accuracy", ".1%"),
         mean_std_text(r, "fd", ".2f"), mean_std_text(r, "kid", ".4f"), mean_std_text(r, "diversity", ".2f"), mean_std_text(r, "seconds", ".1f")]
        for r in sorted(summary, key=lambda r: (r.get("checkpoint") or 0, r["sampler"], r["steps"], r["guidance"]))
    ]  # fmt: skip
    blocks += [Block("h3", f"Results ({spread})"), Block("table", rows=table)]
    refs = [
        f"judge on real test images: {doc['judge_test_accuracy']:.1%}" if doc.get("judge_test_accuracy") else "",
        f"real-vs-real FD floor: {doc['fd_floor']:.2f}" if doc.get("fd_floor") else "",
        f"diversity of real test images: {doc['diversity_real']:.2f}" if doc.get("diversity_real") else "",
    ]  # fmt: skip
    if any(refs):
        blocks.append(Block("note", "References: " + "; ".join(r for r in refs if r) + "."))
    figs = sweep / "figures"
    for smp in ident["samplers"]:
        for stem, heading in (
            ("heatmaps", "Heat-maps"), ("vs_guidance", "Metrics against guidance"),
            ("vs_steps", "Metrics against steps"), ("grid", "Samples: rows guidance, panels steps"),
            ("vs_checkpoint", "Quality against training compute (images seen)"),
        ):  # fmt: skip
            path = figs / f"{stem}_{smp}.png"
            if path.is_file():
                blocks.append(Block("h3", f"{heading} ({smp})"))
                blocks.append(Block("image", heading, png=_png(path), name=f"{slug}_{path.name}"))
    refs_num = {"diversity": doc.get("diversity_real"), "num_classes": ident.get("num_classes"), "fd_floor": doc.get("fd_floor"), "final_checkpoint": final}  # fmt: skip
    distances = distance_comparer(sweep, doc.get("cells") or [])
    return blocks, sweep_conclusions(
        summary, refs_num, doc.get("cells"), distances
    ) if summary else []


def sd_sweep_blocks(sweep: Path, slug: str) -> tuple[list[Block], list[str]]:
    """A Stable Diffusion sweep: settings, the summary table, curves, one grid per prompt."""
    doc = read_sweep(sweep)
    ident, summary = doc["sweep"], doc["summary"]
    blocks = [Block("h2", f"Stable Diffusion sweep: {sweep.name}")]
    text = (
        f"Folder {sweep}; model {ident['model']}; scheduler {ident.get('scheduler') or 'the model default'}; "
        f"size {ident['size']}; dtype {ident['dtype']}; steps {', '.join(map(str, ident['steps']))}; "
        f"guidance {', '.join(f'{g:g}' for g in ident['guidance'])}; seeds {', '.join(map(str, ident['seeds']))}; "
        f"safety checker {'on' if ident.get('safety_checker', True) else 'off'}. Every cell of a seed starts "
        "from the same initial latents, so cells differ only by the swept settings."
    )  # fmt: skip
    if not doc["complete"]:
        text += f" Incomplete: {doc['cells_done']} of {doc['cells_total']} cells are done."
    blocks.append(Block("p", text))
    prompts = [f"Prompt {i + 1}: {p or '(unconditional)'}" for i, p in enumerate(ident["prompts"])]
    blocks += [Block("h3", "Prompts"), Block("list", "prompts", items=prompts)]
    if ident.get("negative_prompt"):
        blocks.append(Block("note", f"Negative prompt: {ident['negative_prompt']}"))

    def pm(r: dict, m: str, fmt: str) -> str:
        return "–" if r.get(f"{m}_mean") is None else mean_std_text(r, m, fmt)

    if ident.get("mini_sd"):
        blocks.append(Block("note", mini_sd_note(ident)))
    judged = any(r.get("prompt_accuracy_mean") is not None for r in summary)
    header = ["steps", "guidance", "images", *(["prompt accuracy", "diversity"] if judged else []), "CLIP score", "detail", "s / image", "filtered", "black, not flagged"]  # fmt: skip
    table = [header] + [
        [str(r["steps"]), f"{r['guidance']:g}", str(r["images"]),
         *([ci_text(r, "prompt_accuracy", ".0%"), ci_text(r, "diversity", ".2f")] if judged else []),
         pm(r, "clip_score", ".1f"), pm(r, "detail", ".4f"), f"{r['seconds_per_image_mean']:.2f}",
         f"{r['nsfw_count']} ({r['nsfw_share']:.0%})", str(r.get("black_unflagged", 0))]
        for r in sorted(summary, key=lambda r: (r["steps"], r["guidance"]))
    ]  # fmt: skip
    blocks += [
        Block(
            "h3",
            "Results (mean ± std over prompts and seeds" + ("; mean [95% CI])" if judged else ")"),
        ),  # fmt: skip
        Block("table", rows=table),
    ]
    measures = doc.get("measures", {})
    if measures:
        blocks.append(Block("note", "Measures: " + "; ".join(f"{k}: {v}" for k, v in measures.items()) + "."))  # fmt: skip
    curves = sweep / "clip_vs_guidance.png"
    if curves.is_file():
        blocks.append(Block("h3", "CLIP score and detail against guidance"))
        blocks.append(Block("image", "CLIP score against guidance", png=_png(curves), name=f"{slug}_{curves.name}"))  # fmt: skip
    for i, prompt in enumerate(ident["prompts"]):
        grid = sweep / f"grid_p{i:02d}.png"
        if grid.is_file():
            blocks.append(Block("h3", f"Prompt {i + 1}: rows guidance, columns steps"))
            blocks.append(Block("image", prompt or "unconditional", png=_png(grid), name=f"{slug}_{grid.name}"))  # fmt: skip
    return blocks, sd_sweep_conclusions(summary, ident) if summary else []


MARK = "Made by difflab "  # the note every report starts with, in both twins


def _replaceable(path: Path) -> bool:
    """Whether ``path`` is absent or an earlier report's (a file holding the mark near its
    top, or a folder of PNG files): a report never overwrites anything else."""
    if path.is_dir():
        return all(p.is_file() and p.suffix == ".png" for p in path.iterdir())
    if not path.exists():
        return True
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return MARK.encode() in f.read(8192)


def write_report(
    inputs: Sequence[str | Path], out: str | Path = "report.html", title: str | None = None
) -> ReportResult:
    """``difflab report``: write ``out`` (.html, self-contained) and its ``.md`` twin."""
    out = Path(out)
    if out.suffix.lower() != ".html":
        raise UsageError(f"--out {out}: must end in .html")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: folder {out.parent} does not exist")
    md_path, files_dir = out.with_suffix(".md"), out.parent / f"{out.stem}_files"
    for path in (out, md_path, files_dir):
        if not _replaceable(path):
            raise UsageError(
                f"--out {out}: {path} exists and was not written by difflab report; "
                "choose another --out (nothing was changed)"
            )
    runs, sweeps, sd_sweeps = classify(inputs)
    title = title or "Diffusion lab report: " + ", ".join(
        p.name for p in [*runs, *sweeps, *sd_sweeps]
    )
    blocks = [
        Block("h1", title),
        Block("note", f"{MARK}{__version__} on {time.strftime('%Y-%m-%d %H:%M')}."),
    ]
    conclusions: list[str] = []
    for i, run in enumerate(runs):
        b, c = run_blocks(run, f"run{i}")
        blocks += b
        conclusions += c
    for i, sweep in enumerate(sweeps):
        b, c = sweep_blocks(sweep, f"sweep{i}")
        blocks += b
        conclusions += c
    for i, sweep in enumerate(sd_sweeps):
        b, c = sd_sweep_blocks(sweep, f"sdsweep{i}")
        blocks += b
        conclusions += c
    blocks.append(Block("h2", "Conclusions"))
    if conclusions:
        blocks.append(Block("list", "conclusions", items=conclusions))
    else:
        blocks.append(
            Block("note", "No measurements yet: run difflab eval or difflab sweep first.")
        )
    files_dir.mkdir(exist_ok=True)
    images = []
    for b in blocks:
        if b.kind == "image":
            path = files_dir / b.name
            with atomic_path(path) as tmp:
                tmp.write_bytes(b.png)
            images.append(path)
    write_text(md_path, render_markdown(blocks, files_dir.name))
    write_text(out, render_html(blocks, title))
    return ReportResult(out, md_path, images, conclusions)
