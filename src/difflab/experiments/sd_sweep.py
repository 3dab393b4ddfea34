"""``difflab sd sweep``: resumable prompts x guidance x steps x seeds sweeps of Stable Diffusion.

:func:`sd_sweep` takes :class:`~difflab.options.SDSweepAxes` and
:class:`~difflab.options.SDPipelineSpec` (checked when built), checks the model and the LoRA
before any work, then makes each missing cell (one
prompt, guidance scale, step count and seed) with the stock pipeline: every cell of a seed
starts from the same initial latents (``latents=``, drawn as ``sd generate --seed`` draws
them), so cells differ only by the swept parameter; the prompt is encoded once and reused;
the seeds of a (prompt, steps, guidance) are batched into one pipeline call. Each cell is
measured (CLIP score and Laplacian-variance detail, :mod:`difflab.evaluation.sd_metrics`; seconds per
image; the safety flag and black-image diagnosis, :mod:`difflab.sd.safety`) and written as
``cells/KEY.png`` (A1111 ``parameters`` chunk) then ``cells/KEY.json`` (its record, written
last, atomically: it marks the cell finished). ``sd_sweep.json`` holds the sweep's identity
(model fingerprint, prompts, axes, size, scheduler, dtype, safety checker, CLIP model); a
killed sweep re-run with the same command computes only the missing cells, and different
settings or another model in the same folder are refused. ``metrics.csv`` / ``metrics.json``
/ ``summary.csv`` are rebuilt from the cell records (the folder, its lock and its records are
:mod:`difflab.experiments.core`'s); :mod:`difflab.figures.sd` draws one grid
per prompt and the CLIP-score-vs-guidance plot. Filtered and black cells get no CLIP score or
detail (a black square measures nothing) and are counted in ``nsfw_share`` instead. The
summary gives each measure's 95 % interval (``*_ci_low``/``*_ci_high``: bootstrap over the
images, within each prompt). Without ``size`` the sweep runs at the model's own size (read from
its configs, or measured on the loaded pipeline), which the identity records. For a mini-SD
model the identity names its dataset and each cell also gets prompt accuracy and judge
features, and the summary prompt accuracy and diversity over seeds
(:mod:`difflab.experiments.sd_alignment`).

A LoRA with ``lora_scales`` (``--lora FILE --lora-scales 0,0.5,1``) adds the LoRA's scale as
a fifth axis: the LoRA is loaded once and re-weighted per cell (scale 0 is the base model);
cell keys end in ``_loraS``, the tables get a ``lora_scale`` column and the figures one grid
per prompt and scale. A sweep without a LoRA keeps the keys, tables and identity it had.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from difflab import distributed
from difflab.errors import UsageError
from difflab.evaluation.sd_metrics import (
    laplacian_variance,
    load_prompt_judge,
    load_scorer,
    prompt_class,
)
from difflab.experiments.core import (
    CELLS_DIR,
    RESUME_HINT,
    SweepFolder,
    Tables,
    group_rows,
    mean_std,
)
from difflab.experiments.sd_alignment import (
    JUDGE_COLUMNS,
    JUDGE_SUMMARY,
    diversity_columns,
    interval_of,
    judge_fields,
)
from difflab.files import file_sha256
from difflab.options import SDPipelineSpec, SDSweepAxes
from difflab.sd.generate import encode, image_settings, run_pipeline, truncation_note
from difflab.sd.load import (
    configured_size,
    load_pipeline,
    model_fingerprint,
    pipeline_size,
    resolve_model,
)
from difflab.sd.lora import applied, parse_lora, set_scales
from difflab.sd.metadata import save_image
from difflab.sd.mini import read_record
from difflab.sd.safety import diagnose, to_uint8

IDENTITY_FILE = "sd_sweep.json"
FORMAT = 1
CSV_COLUMNS = (
    "prompt_index", "guidance", "steps", "seed", "clip_score", "detail", "seconds_per_image",
    "batch", "nsfw", "black", "nan_fraction", "png", "prompt", "note",
)  # fmt: skip
SUMMARY_COLUMNS = (
    "steps", "guidance", "images", "clip_score_mean", "clip_score_std", "clip_score_ci_low",
    "clip_score_ci_high", "detail_mean", "detail_std", "detail_ci_low", "detail_ci_high",
    "seconds_per_image_mean", "nsfw_count", "nsfw_share", "black_unflagged",
)  # fmt: skip


@dataclass(frozen=True)
class Cell:
    prompt_index: int
    guidance: float
    steps: int
    seed: int
    lora_scale: float | None = None  # None: the sweep has no LoRA

    @property
    def key(self) -> str:
        key = f"p{self.prompt_index:02d}_g{self.guidance:g}_steps{self.steps}_seed{self.seed}"
        return key if self.lora_scale is None else f"{key}_lora{self.lora_scale:g}"


@dataclass
class SDSweepResult:
    out: Path
    cells_total: int
    cells_run: int  # computed by this call (the others were already finished)
    pipeline_calls: int
    seconds: float
    rows: list[dict] = field(default_factory=list)
    summary: list[dict] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> int:
        return sum(bool(r.get("nsfw")) for r in self.rows)

    @property
    def black_unflagged(self) -> int:
        return sum(bool(r.get("black")) and not r.get("nsfw") for r in self.rows)


# -- identity -------------------------------------------------------------------------------
def sweep_identity(
    axes: SDSweepAxes, spec: SDPipelineSpec, own: tuple[int, int] | None = None
) -> dict[str, Any]:
    """The sweep's identity (no work done; ``lora``, ``lora_fingerprint`` and ``lora_scales``
    only when a LoRA is swept). Without ``axes.size`` the size is the model's own: ``own``
    (measured on the loaded pipeline), else read from its configs."""
    source = resolve_model(spec.model, spec.trust_pickle)
    lora, scales = axes.lora_axis(spec)
    lora_spec = None if lora is None else parse_lora(lora)
    size = axes.size or own or configured_size(source, spec.vae)
    if size is None:
        raise UsageError(
            f"--model {spec.model}: its own size cannot be read without loading it; pass --size"
        )
    width, height = size
    identity = {
        "format": FORMAT, "model": source.location, "model_fingerprint": model_fingerprint(source),
        "vae": spec.vae, "prompts": list(axes.prompts), "negative_prompt": axes.negative_prompt,
        "guidance": list(axes.guidance), "steps": list(axes.steps), "seeds": list(axes.seeds),
        "size": f"{width}x{height}", "scheduler": spec.scheduler, "dtype": spec.resolved_dtype,
        "safety_checker": spec.safety_checker, "clip_model": axes.clip_model,
    }  # fmt: skip
    record = read_record(source.location) if source.kind == "folder" else None
    if record and record.get("dataset") and record.get("class_names"):
        identity |= {"judge": record["dataset"], "class_names": list(record["class_names"])}
        identity |= {"mini_sd": {k: record.get(k) for k in ("dataset", "flagged_concept", "safety_checker")}}  # fmt: skip
    if lora_spec is not None:
        identity |= {
            "lora": str(lora_spec.path),
            "lora_fingerprint": {"name": lora_spec.name, "sha256": file_sha256(lora_spec.path)},
            "lora_scales": list(scales),
        }
    return identity


def check_folder(out: str | Path, identity: dict[str, Any]) -> bool:
    """True when ``out`` holds this very sweep (resume), False when it is new (or empty);
    refuses another sweep's folder with one line (reads only)."""
    return FOLDER.check(out, identity)


def all_cells(identity: dict[str, Any]) -> list[Cell]:
    i = identity
    return [
        Cell(p, g, st, seed, scale)
        for p, scale, st, g, seed in itertools.product(
            range(len(i["prompts"])), i.get("lora_scales") or [None], i["steps"], i["guidance"],
            i["seeds"],
        )
    ]  # fmt: skip


def _batches(todo: list[Cell], batch_size: int) -> list[list[Cell]]:
    """Cells sharing prompt, LoRA scale, steps and guidance (they differ only by seed), at
    most ``batch_size`` per pipeline call."""
    groups: dict[tuple, list[Cell]] = {}
    for c in todo:
        groups.setdefault((c.prompt_index, c.lora_scale, c.steps, c.guidance), []).append(c)
    return [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


# -- the sweep ------------------------------------------------------------------------------
def sd_sweep(
    axes: SDSweepAxes,
    out: str | Path,
    spec: SDPipelineSpec | None = None,
    progress: bool = True,
    plots: bool = True,
    should_stop: Callable[[], bool] | None = None,
    on_cell: Callable[[int, int], None] | None = None,
) -> SDSweepResult:
    """Run (or finish) the sweep of ``axes`` into ``out`` with the pipeline of ``spec``
    (default :class:`~difflab.options.SDPipelineSpec`); write tables, grids and plots.

    ``should_stop()`` is asked before each pipeline call (True: stop there, finished cells
    kept); ``on_cell(done, total)`` is called after each batch of finished cells. A LoRA of
    ``spec`` with ``axes.lora_scales``: the LoRA scale axis (module doc).
    """
    spec = SDPipelineSpec() if spec is None else spec
    device, batch_size = spec.device, spec.batch_size
    out = Path(out)
    state = distributed.process_state(device)  # several processes: split the cells
    main = state is None or state.is_main_process
    mine = spec
    if state is not None and str(device) != "cpu":
        device = str(state.device)  # this process's GPU (the identity keeps the dtype)
        mine = replace(spec, device=device)
    early = None
    if axes.size is None and configured_size(resolve_model(spec.model), spec.vae) is None:
        early = load_models(axes, mine)  # the model's own size needs the loaded model
    identity = sweep_identity(axes, spec, early and pipeline_size(early[1].pipe))
    lora = parse_lora(identity["lora"]) if "lora" in identity else None
    spec = mine
    if main:
        check_folder(out, identity)  # reads only: another sweep is refused before any loading
    cells = all_cells(identity)

    def share(left: list[Cell]) -> list[list[Cell]]:  # this process's pipeline calls
        batches = _batches(left, batch_size)
        return distributed.my_share(state, batches, lambda b: len(b) * b[0].steps)

    def load() -> tuple:
        return load_models(axes, spec)

    t0 = time.perf_counter()
    # the models load before the folder is touched: one that fails to load leaves no folder
    left = share([c for c in cells if FOLDER.load_cell(out, c) is None])
    models = early or (load() if left else None)
    with FOLDER.hold(out, identity, state):  # locked before anything in it is touched
        todo = [c for c in cells if FOLDER.load_cell(out, c) is None]
        distributed.barrier(state)  # every process has the same list before anyone writes
        batches = share(todo)
        if batches and models is None:  # cells went missing since the look above
            models = load()
        calls = 0
        if batches:
            calls = _make_cells(
                out, identity, cells, todo, batches, models, lora, progress and main, should_stop,
                on_cell, main,
            )  # fmt: skip
        distributed.barrier(state)  # every process's cells are on disk
        rows, summary = (FOLDER.write_tables if main else FOLDER.read_tables)(out, identity, cells)
        ran = len(rows) - (len(cells) - len(todo))  # fewer than len(todo) when stopped early
        notes = models[2] if models is not None else []
        result = SDSweepResult(
            out, len(cells), ran, calls, time.perf_counter() - t0, rows, summary, notes=notes
        )
        if plots and main:
            from difflab.figures.sd import write_sweep_figures
            from difflab.sd.safety import NAN_HINT

            result.figures = write_sweep_figures(out, identity, rows, summary, NAN_HINT)
    distributed.barrier(state)
    return result


def load_models(axes: SDSweepAxes, spec: SDPipelineSpec) -> tuple:
    """(CLIP scorer or None, the loaded pipeline, notes, prompt judge or None) of a sweep."""
    scorer = load_scorer(axes.clip_model, spec.device)  # first: fails fast when offline
    loaded = load_pipeline(spec)  # its LoRA is applied in _make_cells
    notes = list(loaded.notes)
    for i, p in enumerate(axes.prompts):
        note = truncation_note(loaded.pipe.tokenizer, p, f"--prompts #{i + 1}")
        notes += [note] if note else []
    judge = load_prompt_judge(spec.model, spec.device)
    if judge is not None:
        for i, p in enumerate(axes.prompts):
            asked = prompt_class(p, judge.class_names)
            notes += [] if asked.note is None else [f"--prompts #{i + 1} {asked.note}"]
    return scorer, loaded, notes, judge


def _make_cells(
    out, identity, cells, todo, batches, models, lora, progress, should_stop, on_cell, main
) -> int:
    """Make and measure ``batches`` (this process's share of ``todo``) into ``out``; returns
    the number of pipeline calls."""
    scorer, loaded, _, judge = models
    width, height = (int(v) for v in identity["size"].split("x"))
    embeds: dict[tuple, tuple] = {}
    calls = 0
    bar = tqdm(
        total=len(cells), initial=len(cells) - len(todo), desc="sd sweep", unit="cell",
        disable=not progress, file=sys.stderr, dynamic_ncols=True,
    )  # fmt: skip
    try:
        with applied(loaded.pipe, [lora] if lora else []) as adapters:
            for batch in batches:
                if should_stop is not None and should_stop():
                    break
                c0 = batch[0]
                prompt = identity["prompts"][c0.prompt_index]
                which = (c0.prompt_index, c0.lora_scale)  # a LoRA may adapt the CLIP too
                if which not in embeds:
                    if adapters:
                        set_scales(loaded.pipe, adapters, [c0.lora_scale])
                    embeds = {which: encode(loaded, prompt, identity["negative_prompt"])}
                t1 = time.perf_counter()
                images, flags = run_pipeline(
                    loaded, embeds[which], c0.guidance, c0.steps, [c.seed for c in batch],
                    width, height,
                )  # fmt: skip
                per_image = (time.perf_counter() - t1) / len(batch)
                calls += 1
                _write_cells(
                    out, identity, loaded, (scorer, judge), batch, images, flags, per_image, lora
                )
                bar.update(len(batch))
                if on_cell is not None:
                    on_cell(bar.n, len(cells))
                if main:
                    FOLDER.write_tables(out, identity, cells)
    except KeyboardInterrupt:
        bar.close()
        print("sd sweep stopped; the same command continues it", file=sys.stderr)
        raise
    bar.close()
    return calls


def _write_cells(out, identity, loaded, measures, batch, images, flags, per_image, lora) -> None:
    scorer, judge = measures
    prompt = identity["prompts"][batch[0].prompt_index]
    pixels = [to_uint8(img) for img in images]
    diags = [diagnose(img, flag) for img, flag in zip(images, flags, strict=True)]
    scores = scorer.score(pixels, [prompt] * len(batch)) if scorer is not None else None
    judged = None if judge is None else judge_fields(judge, prompt, pixels, diags)
    width, height = (int(v) for v in identity["size"].split("x"))
    for k, (cell, px, d) in enumerate(zip(batch, pixels, diags, strict=True)):
        loras = [] if lora is None else [lora.with_scale(cell.lora_scale)]
        text, settings = image_settings(
            loaded, prompt, identity["negative_prompt"], cell.guidance, cell.steps, cell.seed,
            width, height, loras,
        )  # fmt: skip
        measured = d.note is None  # a filtered or black square measures nothing
        scale = {} if cell.lora_scale is None else {"lora_scale": cell.lora_scale}
        row = {
            "key": cell.key, "prompt_index": cell.prompt_index, **scale, **settings,
            "clip_score": scores[k] if scores is not None and measured else None,
            "detail": laplacian_variance(px) if measured else None,
            "seconds_per_image": per_image, "batch": len(batch), **d.as_dict(),
            "png": f"{CELLS_DIR}/{cell.key}.png", **(judged[k] if judged else {}),
        }  # fmt: skip
        save_image(FOLDER.cell_paths(out, cell)[0], px, text, row)  # the record last


# -- tables ---------------------------------------------------------------------------------
def summarise(rows: list[dict]) -> list[dict]:
    """Per (steps, guidance, LoRA scale), across prompts and seeds: means, std, 95 % intervals
    (bootstrap over the images, within each prompt) and the filtered share; with a prompt
    judge (mini-SD) also prompt accuracy and the diversity over seeds."""
    groups = group_rows(rows, ("steps", "guidance", "lora_scale"))
    out = []
    for (st, g, scale), rs in sorted(groups.items(), key=lambda kv: (*kv[0][:2], kv[0][2] or 0)):
        clip_m, clip_s = mean_std([r["clip_score"] for r in rs])
        det_m, det_s = mean_std([r["detail"] for r in rs])
        nsfw = sum(bool(r["nsfw"]) for r in rs)
        row = {
            "steps": st, "guidance": g, "images": len(rs), "clip_score_mean": clip_m,
            "clip_score_std": clip_s, **interval_of(rs, "clip_score"), "detail_mean": det_m,
            "detail_std": det_s, **interval_of(rs, "detail"),
            "seconds_per_image_mean": mean_std([r["seconds_per_image"] for r in rs])[0],
            "nsfw_count": nsfw, "nsfw_share": nsfw / len(rs),
            "black_unflagged": sum(bool(r["black"]) and not r["nsfw"] for r in rs),
        }  # fmt: skip
        if any("prompt_correct" in r for r in rs):
            judged = [r["prompt_correct"] for r in rs if r.get("prompt_correct") is not None]
            row |= {"prompt_accuracy_mean": mean_std(judged)[0], **interval_of(rs, "prompt_correct", "prompt_accuracy")}  # fmt: skip
            row |= {"prompt_accuracy_images": len(judged), **diversity_columns(rs)}
        out.append(row | ({} if scale is None else {"lora_scale": scale}))
    return out


def _columns(identity: dict) -> tuple[str, ...]:
    cols = CSV_COLUMNS
    if "judge" in identity:
        cols = (*cols[:6], *JUDGE_COLUMNS, *cols[6:])
    if "lora_scales" not in identity:
        return cols
    return (*cols[:4], "lora_scale", *cols[4:])


def _summary_columns(identity: dict) -> tuple[str, ...]:
    cols = SUMMARY_COLUMNS
    if "judge" in identity:
        cols = (*cols[:9], *JUDGE_SUMMARY, *cols[9:])
    if "lora_scales" not in identity:
        return cols
    return (*cols[:2], "lora_scale", *cols[2:])


MEASURES = {
    "clip_score": "100 * max(cos(CLIP image, CLIP prompt), 0); higher = better aligned",
    "detail": "variance of the 4-neighbour Laplacian of the luma in [0, 1]; higher = "
    "more fine detail (compare at equal size)",
    "seconds_per_image": "pipeline wall time of the batch / images in it",
    "nsfw": "flagged by the safety checker (the image is black); no clip_score/detail",
    "prompt_accuracy": "mini-SD: share of images in which the dataset's reference classifier "
    "recognises the class the prompt names (prompts naming no class or several: not measured)",
    "diversity": "mini-SD: mean pairwise distance of the reference classifier's features over "
    "the seeds of a prompt, averaged over prompts; lower = more alike",
    "ci": "*_ci_low/*_ci_high: 95 % percentile bootstrap over the images, within each prompt",
}


def _another_model(old: dict, new: dict) -> str:
    return f"holds a sweep of another model ({old.get('model')}); {RESUME_HINT}"


def _other_lora(old: dict, new: dict) -> str:
    other = f"with the LoRA {old['lora']}" if old.get("lora") else "without a LoRA"
    return f"holds a sweep {other}; {RESUME_HINT}"


FOLDER = SweepFolder(
    IDENTITY_FILE, ".png",
    Tables(summarise, _columns, _summary_columns, lambda rows: {"measures": MEASURES}),
    first={"model_fingerprint": _another_model, "lora_fingerprint": _other_lora},
    unchecked=("model", "lora"),  # paths: the fingerprints stand for what they hold
)  # fmt: skip
