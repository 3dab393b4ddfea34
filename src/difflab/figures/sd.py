"""Figures of Stable Diffusion sweeps and LoRA fine-tuning runs.

``grid_pNN.png`` shows a prompt's cells with rows = guidance scale and columns = step count,
one panel per seed (each panel starts from that seed's latents). A cell the safety checker
flagged is drawn as its black tile with a red frame and the words "filtered by safety
checker"; a black cell it did not flag gets an orange frame and "black, NOT flagged"; the
note under the grid counts both and gives the fix for the second. ``clip_vs_guidance.png``
plots, against the guidance scale with one line per step count (mean ± std over prompts and
seeds): the CLIP score, the detail measure, and the share of images filtered by the checker.
A sweep with a LoRA scale axis gets one grid per prompt and scale (``grid_pNN_loraS.png``) and
one line per step count and scale.

For ``difflab sd finetune``: :func:`validation_grid` labels a row of validation images (one
per fixed seed) with the step and prompt; its loss curve is
:func:`difflab.figures.runs.loss_figure`, the one DDPM training draws. What the note says
about unflagged black images (``black_hint``) comes from the caller (:mod:`difflab.sd.safety`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from difflab.figures.images import (
    Panel,
    auto_scale,
    draw_table,
    font,
    new_figure,
    render_figure,
    save_png,
)

FILTERED_LABEL = "filtered by\nsafety checker"
BLACK_LABEL = "black, NOT\nflagged (NaN?)"
RED, ORANGE = (220, 0, 0), (255, 140, 0)


def _size(identity: dict) -> tuple[int, int]:
    w, h = (int(v) for v in identity["size"].split("x"))
    return w, h


def tile(out: Path, row: dict | None, tw: int, th: int) -> np.ndarray:
    """The cell's image at (th, tw), labelled when filtered, black or missing."""
    if row is None:
        img, label, colour = Image.new("RGB", (tw, th), (200, 200, 200)), "missing", (80, 80, 80)
    else:
        with Image.open(out / row["png"]) as im:
            im = im.convert("RGB")
            up = im.width < tw
            img = im.resize((tw, th), Image.NEAREST if up else Image.LANCZOS)
        label, colour = (
            (FILTERED_LABEL, RED) if row.get("nsfw")
            else (BLACK_LABEL, ORANGE) if row.get("black") or row.get("note")
            else (None, None)
        )  # fmt: skip
    if label:
        draw = ImageDraw.Draw(img)
        draw.rectangle((0, 0, tw - 1, th - 1), outline=colour, width=max(2, tw // 40))
        fnt = font(max(10, tw // 11), bold=True)
        draw.multiline_text(
            (tw // 2, th // 2), label, fill=colour, font=fnt, anchor="mm", align="center"
        )
    return np.asarray(img)


def prompt_grid(
    out: Path,
    identity: dict,
    rows: list[dict],
    prompt_index: int,
    lora_scale: float | None = None,
    black_hint: str | None = None,
) -> Any:
    """A :class:`~difflab.figures.images.Table` of one prompt's cells at one LoRA scale (module doc).

    ``black_hint`` follows the count of black images the safety checker did not flag.
    """
    g_list, s_list, seeds = identity["guidance"], identity["steps"], identity["seeds"]
    w, h = _size(identity)
    side = min(256, max(128, w, h))  # tiles 128..256 px on their long side
    tw, th = round(w * side / max(w, h)), round(h * side / max(w, h))
    cells = {
        (r["guidance"], r["steps"], r["seed"]): r
        for r in rows
        if r["prompt_index"] == prompt_index and r.get("lora_scale") == lora_scale
    }
    panels = []
    for seed in seeds:
        arr = np.zeros((len(g_list), len(s_list), th, tw, 3), dtype=np.uint8)
        for i, g in enumerate(g_list):
            for j, st in enumerate(s_list):
                arr[i, j] = tile(out, cells.get((g, st, seed)), tw, th)
        title = f"seed {seed}" if len(seeds) > 1 else None
        panels.append(Panel(arr, [f"{st} steps" for st in s_list], title))
    mine = list(cells.values())
    n_flag = sum(bool(r.get("nsfw")) for r in mine)
    n_black = sum(bool(r.get("black")) and not r.get("nsfw") for r in mine)
    notes = []
    if n_flag:
        notes.append(
            f"{n_flag} of {len(mine)} images filtered by the safety checker (returned black, "
            "marked in red)."
        )
    if n_black:
        hint = f": {black_hint}" if black_hint else ""
        notes.append(f"{n_black} black images NOT flagged (orange){hint}.")
    prompt = identity["prompts"][prompt_index]
    short = prompt if len(prompt) <= 90 else prompt[:89] + "…"
    sampler = next((r["sampler"] for r in mine if r.get("sampler")), identity["scheduler"])
    sub = f"{Path(identity['model']).name} · {identity['size']} · {sampler or 'model scheduler'}"
    seed_note = f" · seed {seeds[0]}" if len(seeds) == 1 else ""
    if lora_scale is not None:
        sub += f" · LoRA {identity['lora_fingerprint']['name']} × {lora_scale:g}"
    return draw_table(
        panels,
        row_labels=[f"guidance {g:g}" for g in g_list],
        title=f"“{short}”\n{sub}{seed_note} · rows: guidance, columns: steps",
        note=" ".join(notes) or None,
        scale=1,
    )


def curves(identity: dict, summary: list[dict]) -> Image.Image:
    """CLIP score, detail and filtered share against guidance, one line per step count."""
    fig = new_figure(13, 3.8)
    axes = fig.subplots(1, 3)
    n = len(identity["prompts"]) * len(identity["seeds"])
    panels = (
        ("clip_score", "CLIP score (prompt alignment)"),
        ("detail", "detail: variance of Laplacian"),
        ("nsfw_share", "share filtered by safety checker"),
    )
    scales = identity.get("lora_scales") or [None]
    lines = [(st, sc) for sc in scales for st in identity["steps"]]
    for ax, (metric, label) in zip(axes, panels, strict=True):
        for st, sc in lines:
            rs = sorted(
                (r for r in summary if r["steps"] == st and r.get("lora_scale") == sc),
                key=lambda r: r["guidance"],
            )
            key = metric if metric == "nsfw_share" else f"{metric}_mean"
            pts = [
                (r["guidance"], r[key], r.get(f"{metric}_std")) for r in rs if r[key] is not None
            ]
            if not pts:
                continue
            x, y, e = zip(*pts, strict=True)
            err = None if metric == "nsfw_share" else [v or 0.0 for v in e]
            name = f"{st} steps" + ("" if sc is None else f", LoRA × {sc:g}")
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
        if not ax.lines:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("guidance scale s")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    if axes[0].lines:
        axes[0].legend(fontsize=8)
    axes[2].set_ylim(-0.05, 1.05)
    fig.suptitle(
        f"{Path(identity['model']).name}: mean ± std over {len(identity['prompts'])} prompt(s) "
        f"× {len(identity['seeds'])} seed(s) = {n} images per point (filtered/black ones excluded)",
        fontsize=10,
    )
    return render_figure(fig)


def write_sweep_figures(
    out: Path, identity: dict, rows: list[dict], summary: list[dict], black_hint: str | None = None
) -> list[Path]:
    """Write every grid and the curves into ``out``; returns their paths."""
    paths = []
    for i in range(len(identity["prompts"])):
        for scale in identity.get("lora_scales") or [None]:
            lora = "" if scale is None else f"_lora{scale:g}"
            path = out / f"grid_p{i:02d}{lora}.png"
            table = prompt_grid(out, identity, rows, i, scale, black_hint)
            settings = {"prompt": identity["prompts"][i]}
            save_png(path, table.image, settings | ({} if scale is None else {"lora_scale": scale}))
            paths.append(path)
    path = out / "clip_vs_guidance.png"
    save_png(path, curves(identity, summary), {"sweep": str(out)})
    return paths + [path]


# -- LoRA fine-tuning ------------------------------------------------------------------------
def validation_grid(
    images: np.ndarray, flags: list[bool | None], seeds: list[int], step: int, prompt: str
) -> Image.Image:
    """One row of validation images (N, H, W, 3) uint8, a column per seed, titled."""
    labels = [f"seed {s}" + ("\nfiltered" if f else "") for s, f in zip(seeds, flags, strict=True)]
    short = prompt if len(prompt) <= 90 else prompt[:89] + "…"
    h, w = images.shape[1:3]
    table = draw_table(
        [Panel(images[None], labels)], title=f"step {step}\n“{short}”", scale=auto_scale(h, w, 128)
    )
    return table.image
