"""Paths a browser sends, kept inside the runs folder; the run and model listings.

:func:`inside` is the only way the UI turns a name from the browser into a path: the name is
URL-decoded (repeatedly, so ``%252e%252e`` cannot sneak past), resolved with symlinks
followed, and refused unless it lies in the root, whether it was spelled ``../x``,
``%2e%2e/x``, ``/etc/passwd`` or ``C:\\x``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from difflab.ddpm.runs import CONFIG, WEIGHTS
from difflab.errors import UsageError
from difflab.files import atomic_path


def inside(root: str | Path, name: str | Path, what: str = "path") -> Path:
    """``root / name`` resolved, or a UsageError when it would leave ``root``."""
    root = Path(root).resolve()
    text = str(name).strip()
    for _ in range(5):  # undo URL encoding, also when applied twice
        decoded = unquote(text)
        if decoded == text:
            break
        text = decoded
    if not text or "\x00" in text:
        raise UsageError(f"{what} {name!r}: empty or invalid")
    if len(text) > 1 and text[1] == ":":
        raise UsageError(f"{what} {name!r}: a drive path; give a path inside {root}")
    candidate = Path(text.replace("\\", "/"))
    path = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if path != root and root not in path.parents:
        raise UsageError(f"{what} {name!r}: outside the runs folder {root}; refused")
    return path


def safe_name(text: str, what: str) -> str:
    """A new folder name: letters, digits, ``-``, ``_`` and ``.``, not starting with a dot."""
    name = str(text).strip()
    if not name or name.startswith(".") or not all(c.isalnum() or c in "-_." for c in name):
        raise UsageError(
            f"{what} {text!r}: use letters, digits, '-', '_' and '.', not starting with '.'"
        )
    return name


def list_runs(root: str | Path) -> list[Path]:
    """Run folders (with ``config.json`` and weights) under ``root``, newest first (2 levels)."""
    root = Path(root)
    found = [p.parent for p in root.glob(f"*/{CONFIG}")] + [
        p.parent for p in root.glob(f"*/*/{CONFIG}")
    ]
    runs = [p for p in found if (p / WEIGHTS).is_file() and not p.name.startswith(".")]
    return sorted(set(runs), key=lambda p: (p / WEIGHTS).stat().st_mtime, reverse=True)


def run_summary(root: Path, run: Path) -> dict:
    """One row of the Runs table: name, dataset, preset, steps, accuracy, size, date."""
    cfg = json.loads((run / CONFIG).read_text(encoding="utf-8"))
    ev = run / "eval.json"
    acc = None
    if ev.is_file():
        acc = json.loads(ev.read_text(encoding="utf-8")).get("accuracy")
    steps = None
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        lines = [ln for ln in metrics.read_text(encoding="utf-8").splitlines() if ln.strip()]
        for ln in reversed(lines):
            try:
                steps = json.loads(ln).get("step")
                break
            except json.JSONDecodeError:
                continue
    return {
        "run": str(run.relative_to(root)),
        "dataset": cfg.get("train", {}).get("dataset"),
        "preset": cfg.get("preset"),
        "steps": steps,
        "accuracy": None if acc is None else round(acc, 4),
        "MB": round(folder_size(run) / 2**20, 1),
        "modified": time.strftime(
            "%Y-%m-%d %H:%M", time.localtime((run / WEIGHTS).stat().st_mtime)
        ),
    }


def folder_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- models -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: str  # "diffusers folder", "single file", "Hugging Face cache"
    path: str  # what --model takes
    bytes: int


def list_models(models_dir: str | Path, hf_cache: bool = True) -> list[ModelEntry]:
    """Diffusers folders and ``.safetensors`` files in ``models_dir``, plus cached pipelines."""
    out = []
    models_dir = Path(models_dir)
    if models_dir.is_dir():
        for p in sorted(models_dir.iterdir()):
            if p.is_dir() and (p / "model_index.json").is_file():
                out.append(ModelEntry(p.name, "diffusers folder", str(p), folder_size(p)))
            elif p.is_file() and p.suffix == ".safetensors":
                out.append(ModelEntry(p.name, "single file", str(p), p.stat().st_size))
    if hf_cache:
        out += _hf_cached_pipelines()
    return out


def _hf_cached_pipelines() -> list[ModelEntry]:
    """Pipelines already in the Hugging Face cache (repos holding ``model_index.json``)."""
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir()
    except Exception:  # no cache yet, or unreadable: nothing to list
        return []
    out = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        if any(f.file_name == "model_index.json" for r in repo.revisions for f in r.files):
            out.append(
                ModelEntry(repo.repo_id, "Hugging Face cache", repo.repo_id, repo.size_on_disk)
            )
    return out


def import_model(source: str | Path, models_dir: str | Path) -> Path:
    """Copy a local ``.safetensors`` checkpoint into ``models_dir`` (checked, atomically)."""
    src = Path(str(source).strip()).expanduser()
    where = f"import {str(source)!r}"
    if src.suffix.lower() != ".safetensors":
        raise UsageError(f"{where}: only .safetensors files are imported (no pickles)")
    if not src.is_file():
        raise UsageError(f"{where}: no such file")
    try:
        from safetensors import safe_open

        with safe_open(str(src), framework="pt") as f:
            if not list(f.keys()):
                raise UsageError(f"{where}: the file holds no tensors")
    except UsageError:
        raise
    except Exception:
        raise UsageError(f"{where}: not a readable safetensors file") from None
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    dest = models_dir / src.name
    if dest.exists():
        raise UsageError(f"{where}: {dest} already exists; rename the file or remove the old one")
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
    return dest
