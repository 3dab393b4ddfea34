"""``difflab sd sweep``: resumable prompts x guidance x steps x seeds sweeps of Stable Diffusion.

:func:`sd_sweep` checks every option before any work, then makes each missing cell (one
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
/ ``summary.csv`` are rebuilt from the cell records; :mod:`difflab.figures.sd` draws one grid
per prompt and the CLIP-score-vs-guidance plot. Filtered and black cells get no CLIP score or
detail (a black square measures nothing) and are counted in ``nsfw_share`` instead.

``lora`` with ``lora_scales`` (``--lora FILE --lora-scales 0,0.5,1``) adds the LoRA's scale as
a fifth axis: the LoRA is loaded once and re-weighted per cell (scale 0 is the base model);
cell keys end in ``_loraS``, the tables get a ``lora_scale`` column and the figures one grid
per prompt and scale. A sweep without a LoRA keeps the keys, tables and identity it had.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from difflab import distributed
from difflab.errors import UsageError
from difflab.evaluation.sd_metrics import DEFAULT_CLIP_MODEL, laplacian_variance, load_scorer
from difflab.experiments.ddpm_sweep import RESUME_HINT, parse_list, read_identity
from difflab.files import csv_text, folder_lock, write_json, write_text
from difflab.sd.generate import (
    check_count,
    check_guidance,
    encode,
    image_settings,
    parse_size,
    run_pipeline,
    truncation_note,
)
from difflab.sd.load import (
    DEFAULT_MODEL,
    check_scheduler,
    load_pipeline,
    model_fingerprint,
    resolve_dtype,
    resolve_model,
)
from difflab.sd.lora import (
    LoraSpec,
    applied,
    check_compile,
    parse_lora,
    set_scales,
    split_scale,
)
from difflab.sd.metadata import save_image
from difflab.sd.safety import diagnose, to_uint8

IDENTITY_FILE = "sd_sweep.json"
CELLS_DIR = "cells"
FORMAT = 1
CSV_COLUMNS = (
    "prompt_index", "guidance", "steps", "seed", "clip_score", "detail", "seconds_per_image",
    "batch", "nsfw", "black", "nan_fraction", "png", "prompt", "note",
)  # fmt: skip
SUMMARY_COLUMNS = (
    "steps", "guidance", "images", "clip_score_mean", "clip_score_std", "detail_mean",
    "detail_std", "seconds_per_image_mean", "nsfw_count", "nsfw_share", "black_unflagged",
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


# -- input ----------------------------------------------------------------------------------
def parse_prompts(prompts: str | list[str] | tuple[str, ...]) -> list[str]:
    """One prompt per argument, or a single text file with one prompt per line (blank lines
    and lines starting with ``#`` skipped)."""
    items = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(items) == 1 and Path(items[0]).suffix.lower() in (".txt", ".prompts"):
        path = Path(items[0])
        if not path.is_file():
            raise UsageError(f"--prompts {path}: no such file")
        lines = path.read_text(encoding="utf-8").splitlines()
        items = [s for s in (x.strip() for x in lines) if s and not s.startswith("#")]
        if not items:
            raise UsageError(f"--prompts {path}: holds no prompt (one per line)")
    items = [str(p).strip() for p in items]
    if not items or any(not p for p in items):
        raise UsageError("--prompts: a prompt is empty; give text, or a file with one per line")
    dup = next((p for p in items if items.count(p) > 1), None)
    if dup is not None:
        raise UsageError(f"--prompts: {dup!r} is given twice")
    return items


def parse_sweep_lora(lora: Any, lora_scales: Any) -> tuple[LoraSpec | None, list[float] | None]:
    """``--lora FILE[:SCALE]`` (at most one) and ``--lora-scales`` -> the LoRA and its
    scales: ``--lora-scales`` when given, else the file's scale."""
    items = [lora] if isinstance(lora, (str, Path)) else list(lora or [])
    if not items:
        if lora_scales is not None:
            raise UsageError("--lora-scales needs --lora FILE: the LoRA whose scale is swept")
        return None, None
    if len(items) > 1:
        raise UsageError("--lora: sd sweep takes one LoRA; sweep its scale with --lora-scales")
    spec = parse_lora(items[0])
    if lora_scales is None:
        return spec, [spec.scale]
    if split_scale(items[0])[1] is not None:
        raise UsageError(
            f"--lora {items[0]}: give the scales in --lora-scales or after the file, not both"
        )
    return spec, parse_list(lora_scales, float, "--lora-scales", "0,0.5,1")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sweep_identity(
    prompts: Any, guidance: Any, steps: Any, seeds: Any, negative_prompt: str, size: Any,
    scheduler: str | None, model: Any, device: str, dtype: str, safety_checker: bool,
    clip_model: str | None, trust_pickle: bool, vae: Any, lora: Any = None,
    lora_scales: Any = None,
) -> dict[str, Any]:  # fmt: skip
    """Check every option (no work done) and return the sweep's identity (``lora``,
    ``lora_fingerprint`` and ``lora_scales`` only when a LoRA is swept)."""
    prompt_list = parse_prompts(prompts)
    g_list = parse_list(guidance, float, "--guidance", "1,3,7.5", minimum=0)
    for g in g_list:
        check_guidance(g)
    s_list = parse_list(steps, int, "--steps", "10,25,50", minimum=1)
    seed_list = parse_list(seeds, int, "--seeds", "0,1,2", minimum=0)
    width, height = parse_size(size)
    source = resolve_model(model, trust_pickle)
    spec, scales = parse_sweep_lora(lora, lora_scales)
    clip = None if clip_model is None or str(clip_model).lower() == "none" else str(clip_model)
    identity = {
        "format": FORMAT, "model": source.location, "model_fingerprint": model_fingerprint(source),
        "vae": None if vae is None else str(vae), "prompts": prompt_list,
        "negative_prompt": negative_prompt or "", "guidance": g_list, "steps": s_list,
        "seeds": seed_list, "size": f"{width}x{height}", "scheduler": check_scheduler(scheduler),
        "dtype": resolve_dtype(dtype, device), "safety_checker": bool(safety_checker),
        "clip_model": clip,
    }  # fmt: skip
    if spec is not None:
        identity |= {
            "lora": str(spec.path),
            "lora_fingerprint": {"name": spec.name, "sha256": _file_sha256(spec.path)},
            "lora_scales": scales,
        }
    return identity


def check_folder(out: Path, identity: dict[str, Any]) -> bool:
    """True when ``out`` holds this very sweep (resume); False when it is new (or empty)."""
    where, hint = f"--out {out}", RESUME_HINT
    old = read_identity(out, IDENTITY_FILE)
    if old is None:
        return False
    if old.get("model_fingerprint") != identity["model_fingerprint"]:
        raise UsageError(f"{where}: holds a sweep of another model ({old.get('model')}); {hint}")
    if old.get("lora_fingerprint") != identity.get("lora_fingerprint"):
        other = f"with the LoRA {old['lora']}" if old.get("lora") else "without a LoRA"
        raise UsageError(f"{where}: holds a sweep {other}; {hint}")
    for key, value in identity.items():
        if key not in ("model", "model_fingerprint", "lora") and old.get(key) != value:
            option = "--" + key.replace("_", "-")
            raise UsageError(
                f"{where}: holds a sweep with {option} {_show(old.get(key))}, not {_show(value)}; {hint}"
            )
    return True


def _show(v: Any) -> str:
    if isinstance(v, list):
        return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
    return json.dumps(v) if isinstance(v, (str, type(None), bool)) else str(v)


def all_cells(identity: dict[str, Any]) -> list[Cell]:
    i = identity
    return [
        Cell(p, g, st, seed, scale)
        for p, scale, st, g, seed in itertools.product(
            range(len(i["prompts"])), i.get("lora_scales") or [None], i["steps"], i["guidance"],
            i["seeds"],
        )
    ]  # fmt: skip


def load_cell(out: Path, cell: Cell) -> dict | None:
    """The finished cell's record, or None when it is missing, torn or not this cell's."""
    path = out / CELLS_DIR / f"{cell.key}.json"
    if not (path.is_file() and path.with_suffix(".png").is_file()):
        return None
    try:
        row = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    same = (
        row.get("prompt_index"), row.get("guidance"), row.get("steps"), row.get("seed"),
        row.get("lora_scale"),
    )  # fmt: skip
    mine = (cell.prompt_index, cell.guidance, cell.steps, cell.seed, cell.lora_scale)
    return row if same == mine else None


def _batches(todo: list[Cell], batch_size: int) -> list[list[Cell]]:
    """Cells sharing prompt, LoRA scale, steps and guidance (they differ only by seed), at
    most ``batch_size`` per pipeline call."""
    groups: dict[tuple, list[Cell]] = {}
    for c in todo:
        groups.setdefault((c.prompt_index, c.lora_scale, c.steps, c.guidance), []).append(c)
    return [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


# -- the sweep ------------------------------------------------------------------------------
def sd_sweep(
    prompts: str | list[str],
    out: str | Path,
    guidance: Any = "1,3,7.5,12,20",
    steps: Any = "10,25,50",
    seeds: Any = "0,1,2",
    negative_prompt: str = "",
    size: str | tuple[int, int] = "512x512",
    scheduler: str | None = None,
    model: str | Path = DEFAULT_MODEL,
    device: str = "cpu",
    dtype: str = "auto",
    clip_model: str | None = DEFAULT_CLIP_MODEL,
    safety_checker: bool = True,
    trust_pickle: bool = False,
    model_config: str | Path | None = None,
    vae: str | Path | None = None,
    batch_size: int = 4,
    compile: bool = False,
    progress: bool = True,
    plots: bool = True,
    should_stop: Callable[[], bool] | None = None,
    on_cell: Callable[[int, int], None] | None = None,
    lora: str | Sequence[str] | None = None,
    lora_scales: Any = None,
) -> SDSweepResult:
    """Run (or finish) the sweep into ``out``; write tables, grids and plots (module doc).

    ``should_stop()`` is asked before each pipeline call (True: stop there, finished cells
    kept); ``on_cell(done, total)`` is called after each batch of finished cells. ``lora``
    and ``lora_scales``: the LoRA scale axis (module doc).
    """
    check_count(batch_size, "--batch-size")
    identity = sweep_identity(
        prompts, guidance, steps, seeds, negative_prompt, size, scheduler, model, device, dtype,
        safety_checker, clip_model, trust_pickle, vae, lora, lora_scales,
    )  # fmt: skip
    spec = parse_lora(identity["lora"]) if "lora" in identity else None
    check_compile([spec] if spec else [], compile)
    out = Path(out)
    state = distributed.process_state(device)  # several processes: split the cells
    main = state is None or state.is_main_process
    if state is not None and str(device) != "cpu":
        device = str(state.device)  # this process's GPU (the identity keeps the option)
    resuming = check_folder(out, identity) if main else True
    if main and resuming:  # before any process writes: temporary files of a killed write
        for stale in (out / CELLS_DIR).glob(".*.tmp*"):
            stale.unlink(missing_ok=True)
    distributed.barrier(state)
    cells = all_cells(identity)
    todo = [c for c in cells if load_cell(out, c) is None] if resuming else cells
    distributed.barrier(state)  # every process has the same list before anyone writes
    batches = _batches(todo, batch_size)
    batches = distributed.my_share(state, batches, lambda b: len(b) * b[0].steps)
    width, height = parse_size(identity["size"])
    notes: list[str] = []
    calls, t0 = 0, time.perf_counter()
    if batches:
        scorer = load_scorer(identity["clip_model"], device)  # first: fails fast when offline
        loaded = load_pipeline(
            model, device, identity["dtype"], scheduler, safety_checker, trust_pickle,
            model_config, vae, compile,
        )  # fmt: skip
        notes += loaded.notes
        for i, p in enumerate(identity["prompts"]):
            note = truncation_note(loaded.pipe.tokenizer, p, f"--prompts #{i + 1}")
            notes += [note] if note else []
        (out / CELLS_DIR).mkdir(parents=True, exist_ok=True)
        if not resuming:
            write_json(out / IDENTITY_FILE, identity)
        with folder_lock(out) if main else nullcontext():
            embeds: dict[tuple, tuple] = {}
            bar = tqdm(
                total=len(cells), initial=len(cells) - len(todo), desc="sd sweep", unit="cell",
                disable=not (progress and main), file=sys.stderr, dynamic_ncols=True,
            )  # fmt: skip
            try:
                with applied(loaded.pipe, [spec] if spec else []) as adapters:
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
                            loaded, embeds[which], c0.guidance, c0.steps,
                            [c.seed for c in batch], width, height,
                        )  # fmt: skip
                        per_image = (time.perf_counter() - t1) / len(batch)
                        calls += 1
                        _write_cells(
                            out, identity, loaded, scorer, batch, images, flags, per_image, spec
                        )
                        bar.update(len(batch))
                        if on_cell is not None:
                            on_cell(bar.n, len(cells))
                        if main:
                            write_tables(out, identity, cells)
            except KeyboardInterrupt:
                bar.close()
                print("sd sweep stopped; the same command continues it", file=sys.stderr)
                raise
            bar.close()
    distributed.barrier(state)  # every process's cells are on disk
    rows, summary = (write_tables if main else read_tables)(out, identity, cells)
    ran = len(rows) - (len(cells) - len(todo))  # fewer than len(todo) when stopped early
    result = SDSweepResult(
        out, len(cells), ran, calls, time.perf_counter() - t0, rows, summary, notes=notes
    )
    if plots and main:
        from difflab.figures.sd import write_sweep_figures
        from difflab.sd.safety import NAN_HINT

        result.figures = write_sweep_figures(out, identity, rows, summary, NAN_HINT)
    distributed.barrier(state)
    return result


def _write_cells(out, identity, loaded, scorer, batch, images, flags, per_image, lora) -> None:
    prompt = identity["prompts"][batch[0].prompt_index]
    pixels = [to_uint8(img) for img in images]
    diags = [diagnose(img, flag) for img, flag in zip(images, flags, strict=True)]
    scores = scorer.score(pixels, [prompt] * len(batch)) if scorer is not None else None
    width, height = parse_size(identity["size"])
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
            "png": f"{CELLS_DIR}/{cell.key}.png",
        }  # fmt: skip
        save_image(out / CELLS_DIR / f"{cell.key}.png", px, text, row)  # the JSON last


# -- tables ---------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if not len(v):
        return None, None
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None)


def summarise(rows: list[dict]) -> list[dict]:
    """Per (steps, guidance, LoRA scale), across prompts and seeds: means, std and the
    filtered share."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["steps"], r["guidance"], r.get("lora_scale")), []).append(r)
    out = []
    for (st, g, scale), rs in sorted(groups.items(), key=lambda kv: (*kv[0][:2], kv[0][2] or 0)):
        clip_m, clip_s = _mean_std([r["clip_score"] for r in rs])
        det_m, det_s = _mean_std([r["detail"] for r in rs])
        nsfw = sum(bool(r["nsfw"]) for r in rs)
        out.append({
            "steps": st, "guidance": g, "images": len(rs), "clip_score_mean": clip_m,
            "clip_score_std": clip_s, "detail_mean": det_m, "detail_std": det_s,
            "seconds_per_image_mean": _mean_std([r["seconds_per_image"] for r in rs])[0],
            "nsfw_count": nsfw, "nsfw_share": nsfw / len(rs),
            "black_unflagged": sum(bool(r["black"]) and not r["nsfw"] for r in rs),
        } | ({} if scale is None else {"lora_scale": scale}))  # fmt: skip
    return out


def read_tables(out: Path, identity: dict, cells: list[Cell]) -> tuple[list[dict], list[dict]]:
    """The finished cells' records and their summary (writes nothing)."""
    rows = [r for r in (load_cell(out, c) for c in cells) if r is not None]
    return rows, summarise(rows)


def write_tables(out: Path, identity: dict, cells: list[Cell]) -> tuple[list[dict], list[dict]]:
    """Rebuild ``metrics.csv``, ``metrics.json`` and ``summary.csv`` from the cell records."""
    rows, summary = read_tables(out, identity, cells)
    doc = {
        "sweep": identity, "complete": len(rows) == len(cells), "cells_done": len(rows),
        "cells_total": len(cells),
        "measures": {
            "clip_score": "100 * max(cos(CLIP image, CLIP prompt), 0); higher = better aligned",
            "detail": "variance of the 4-neighbour Laplacian of the luma in [0, 1]; higher = "
            "more fine detail (compare at equal size)",
            "seconds_per_image": "pipeline wall time of the batch / images in it",
            "nsfw": "flagged by the safety checker (the image is black); no clip_score/detail",
        },
        "cells": rows, "summary": summary,
    }  # fmt: skip
    write_json(out / "metrics.json", doc)
    columns, summary_columns = CSV_COLUMNS, SUMMARY_COLUMNS
    if "lora_scales" in identity:
        columns = (*CSV_COLUMNS[:4], "lora_scale", *CSV_COLUMNS[4:])
        summary_columns = (*SUMMARY_COLUMNS[:2], "lora_scale", *SUMMARY_COLUMNS[2:])
    write_text(out / "metrics.csv", csv_text(rows, columns))
    write_text(out / "summary.csv", csv_text(summary, summary_columns))
    return rows, summary
