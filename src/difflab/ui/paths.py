"""Paths a browser sends, kept inside the runs folder; what may be served; run and model lists.

:func:`inside` is the only way the UI turns a name from the browser into a path: the name is
URL-decoded (repeatedly, so ``%252e%252e`` cannot sneak past), resolved with symlinks
followed, and refused unless it lies in the root, whether it was spelled ``../x``,
``%2e%2e/x``, ``/etc/passwd`` or ``C:\\x``. :func:`may_serve` says which files of the runs
folder the server hands out (never training state, pickles, locks or hidden files);
:func:`confine_model` keeps a model typed in the page inside the models folder and the
Hugging Face cache. :func:`run_summary` lists a broken run folder as broken, in one line.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from difflab.ddpm.runs import CONFIG, TRAIN_STATE, WEIGHTS
from difflab.errors import UsageError
from difflab.files import LOCK_FILE, atomic_path, read_json

NOT_SERVED = {TRAIN_STATE, LOCK_FILE}  # never handed to a browser, wherever they lie
NOT_SERVED_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle", ".lock", ".tmp")


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


def may_serve(path: Path, runs: Path) -> bool:
    """False for a file of ``runs`` that must not reach a browser: training state, pickles,
    lock and temporary files, and anything hidden (a part starting with ``.``: ``.git``,
    ``.lock``). Files outside ``runs`` are the web framework's own rules' business."""
    runs = runs.resolve()
    for p in (path, path.resolve()):
        try:
            parts = p.relative_to(runs).parts
        except ValueError:
            continue
        if any(part.startswith(".") for part in parts) or p.name in NOT_SERVED:
            return False
        if p.name.lower().endswith(NOT_SERVED_SUFFIXES):
            return False
    return True


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
    return sorted(set(runs), key=_mtime, reverse=True)


def _mtime(run: Path) -> float:
    try:
        return (run / WEIGHTS).stat().st_mtime
    except OSError:  # removed meanwhile
        return 0.0


def run_summary(root: Path, run: Path) -> dict:
    """One row of the Runs table: name, dataset, preset, steps, accuracy, size, date.

    A folder whose files cannot be read (bad JSON, not UTF-8) is a row saying so in one
    line (``broken: ...`` under dataset), never an error that hides the other runs."""
    row = {"run": str(run.relative_to(root))}
    try:
        cfg = read_json(run / CONFIG)
        train = cfg.get("train")
        ev = run / "eval.json"
        acc = read_json(ev).get("accuracy") if ev.is_file() else None
        row |= {
            "dataset": train.get("dataset") if isinstance(train, dict) else None,
            "preset": cfg.get("preset"),
            "steps": _last_step(run / "metrics.jsonl"),
            "accuracy": round(acc, 4) if isinstance(acc, (int, float)) else None,
        }
    except UsageError as e:
        row["dataset"] = f"broken: {str(e).replace(str(run) + '/', '')}"
    row["MB"] = round(folder_size(run) / 2**20, 1)
    row["modified"] = time.strftime("%Y-%m-%d %H:%M", time.localtime(_mtime(run)))
    return row


def _last_step(metrics: Path) -> int | None:
    if not metrics.is_file():
        return None
    text = metrics.read_bytes().decode("utf-8", errors="replace")
    for ln in reversed([ln for ln in text.splitlines() if ln.strip()]):
        try:
            row = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            return row.get("step")
    return None


def folder_size(path: Path) -> int:
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:  # a file removed meanwhile
        return 0


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


def _hf_cache() -> Path | None:
    try:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE).resolve()
    except Exception:
        return None


def _cached_snapshot(repo_id: str, marker: str) -> Path | None:
    """The local snapshot folder of a Hub repo whose ``marker`` file is cached, else None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, marker)
    except Exception:  # not a valid repo id
        return None
    return Path(found).parent if isinstance(found, str) else None


def confine_model(
    text: str, models_dir: str | Path, allow_any: bool = False, what: str = "model",
    marker: str = "model_index.json",
) -> str:  # fmt: skip
    """A model typed in the page, as a path inside ``models_dir`` or the Hugging Face cache.

    A name or path in the models folder is that path; a Hub id whose snapshot (with
    ``marker``) is in the cache is that local snapshot folder, so nothing is downloaded.
    Anything else is refused with one line, unless the server allows any model."""
    text = str(text or "").strip()
    if allow_any or not text:
        return text
    models = Path(models_dir).resolve()
    roots = [r for r in (models, _hf_cache()) if r is not None]
    candidates = [models / text]
    if Path(text).is_absolute() or text.startswith((".", "~")) or Path(text).exists():
        candidates.append(Path(text).expanduser())
    for candidate in candidates:
        if candidate.exists():
            path = candidate.resolve()
            if any(path == r or r in path.parents for r in roots):
                return str(path)
            break
    else:
        from difflab.sd.load import MOVED

        for repo in (text, MOVED.get(text)):
            snapshot = _cached_snapshot(repo, marker) if repo else None
            if snapshot is not None:
                return str(snapshot)
    raise UsageError(
        f"{what} {text!r}: the web UI loads models from {models} and the Hugging Face cache "
        "only (see the Models tab); start it with --allow-any-model to allow any path or Hub id"
    )


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


def finished_sweep(runs: Path, where: str, name: str) -> tuple[Path, dict]:
    """The folder and ``metrics.json`` of the sweep ``name`` under ``runs/where``, once it
    has a finished cell."""
    out = inside(runs, f"{where}/{name}", "sweep")
    if not (out / "metrics.json").is_file():
        raise UsageError(f"sweep {name!r}: no finished cell yet")
    return out, read_json(out / "metrics.json")
