"""The resumable sweep folder: what the DDPM and SD sweeps share, so that each keeps only its cells.

A sweep folder holds an identity file (``sweep.json``, ``sd_sweep.json``: what makes a folder
"the same sweep", i.e. the model's fingerprint, the axes and every setting that changes a
cell), per finished cell its own file (``cells/KEY.npz`` or ``.png``, written first) and its
record ``cells/KEY.json`` (written last, atomically: it marks the cell finished), and the
tables ``metrics.csv``, ``metrics.json`` and ``summary.csv``, rebuilt from the records.
:class:`SweepFolder` describes one kind of such folder. :meth:`SweepFolder.hold` takes the
folder's lock before anything in the folder is touched, then removes the temporary files of a
killed write and writes the identity, so a second process into the same folder is refused
with nothing changed; another sweep's folder is refused with one line naming the first
setting that differs (:meth:`SweepFolder.differs`). A torn record or one of another cell
counts as missing: the cell is made again. :func:`summarise` gives mean ± std over seeds and 95 % intervals,
:meth:`SweepFolder.write_tables` the three tables, :func:`difflab.files.file_sha256` the hash of a file
that an identity pins.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from difflab import distributed
from difflab.errors import UsageError
from difflab.files import (
    LOCK_FILE,
    TEMP_GLOB,
    csv_text,
    folder_lock,
    write_json,
    write_text,
)

RESUME_HINT = "re-run the command that started it to resume, or choose another --out"
CELLS_DIR = "cells"


def show(value: Any) -> str:
    """A setting as it is typed on the command line: lists comma-separated, numbers as ``%g``,
    ``none`` for None, text quoted only when it is empty or holds a space or a comma."""
    if isinstance(value, (list, tuple)):
        return ",".join(show(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        return "none"
    if isinstance(value, str) and (not value or any(c.isspace() or c == "," for c in value)):
        return json.dumps(value)
    return str(value)


# -- tables ---------------------------------------------------------------------------------
def group_rows(rows: list[dict], by: Sequence[str]) -> dict[tuple, list[dict]]:
    """Rows by their values of ``by``, groups in the order they first appear."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in by), []).append(r)
    return groups


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1) of the values that are not None; the
    deviation is None for one value, both are None for none."""
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if not len(v):
        return None, None
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None)


def interval_columns(ci95: Mapping[str, Sequence[float]] | None) -> dict[str, float]:
    """``METRIC_ci_low`` / ``METRIC_ci_high`` columns of a ``ci95`` mapping (empty for None)."""
    out: dict[str, float] = {}
    for m, (low, high) in (ci95 or {}).items():
        out[f"{m}_ci_low"], out[f"{m}_ci_high"] = low, high
    return out


def summarise(
    rows: list[dict], by: Sequence[str], metrics: Sequence[str], count: str = "seeds",
    intervals: Sequence[str] = (),
) -> list[dict]:  # fmt: skip
    """Per value of ``by``: how many rows (``count``) and ``METRIC_mean`` / ``METRIC_std``,
    and for the ``intervals`` metrics ``METRIC_ci_low`` / ``METRIC_ci_high``: the one row's
    own interval (a bootstrap over its samples), or Student's t over the rows (seeds)."""
    from difflab.evaluation.stats import seed_interval

    out = []
    for key, rs in group_rows(rows, by).items():
        entry = dict(zip(by, key, strict=True)) | {count: len(rs)}
        for m in metrics:
            entry[f"{m}_mean"], entry[f"{m}_std"] = mean_std([r.get(m) for r in rs])
        for m in intervals:
            ci = (
                [rs[0].get(f"{m}_ci_low"), rs[0].get(f"{m}_ci_high")]
                if len(rs) == 1
                else seed_interval([r.get(m) for r in rs])
            )
            if ci is not None and None not in ci:
                entry |= interval_columns({m: ci})
        out.append(entry)
    return out


@dataclass(frozen=True)
class Tables:
    """How one kind of sweep turns its cell records into ``metrics.csv``, ``metrics.json`` and
    ``summary.csv``; the columns may depend on the identity (an optional axis adds one)."""

    summarise: Callable[[list[dict]], list[dict]]
    columns: Callable[[dict], Sequence[str]]
    summary_columns: Callable[[dict], Sequence[str]]
    about: Callable[[list[dict]], dict] = lambda rows: {}  # metrics.json's notes on the measures


# -- the folder -----------------------------------------------------------------------------
def read_identity(out: Path, name: str) -> dict[str, Any] | None:
    """The identity file ``name`` of the sweep folder ``out``, or None for a new sweep (reads only).

    A file where the folder should be, a folder holding anything but the lock and temporary
    files and no identity, and an unreadable identity are refused with one line each.
    """
    where = f"--out {out}"
    if out.exists() and not out.is_dir():
        raise UsageError(f"{where}: is a file, not a folder")
    path = out / name
    if not path.exists():
        if out.is_dir() and any(not _ours(p.name) for p in out.iterdir()):
            raise UsageError(
                f"{where}: folder is not empty and holds no {name}; choose another --out"
            )
        return None
    try:
        identity = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        identity = None
    if not isinstance(identity, dict):
        raise UsageError(f"{where}: {name} is unreadable; choose another --out")
    return identity


def _ours(name: str) -> bool:
    """The lock, or a temporary file of a write killed before the identity was written."""
    return name == LOCK_FILE or fnmatch.fnmatch(name, TEMP_GLOB)


def remove_temporary(out: Path) -> None:
    """Delete the temporary files that killed writes left anywhere in ``out``."""
    for p in out.rglob(TEMP_GLOB):
        if p.is_file():
            p.unlink(missing_ok=True)


@dataclass(frozen=True)
class SweepFolder:
    """One kind of resumable sweep folder: its identity file, how two identities compare, the
    suffix of a cell's own file and its tables.

    Two identities are compared key by key: first the keys of ``first`` (each with its own
    message: another model, changed weights), then every other key of the new identity, a
    missing key meaning its value in ``implied``. ``presentation`` keys may change without
    touching any cell (the new identity is then written); ``unchecked`` keys are not compared
    (a path when a fingerprint stands for what it holds). A changed key is named by its
    option in ``options`` (``--KEY`` by default), or by ``changed(key, old, new)`` when given
    for keys that no option sets.
    """

    identity_file: str
    cell_suffix: str  # a cell's own file beside its record: ".npz", ".png"
    tables: Tables
    options: Mapping[str, str] = field(default_factory=dict)
    first: Mapping[str, Callable[[dict, dict], str]] = field(default_factory=dict)
    implied: Mapping[str, Any] = field(default_factory=dict)
    presentation: tuple[str, ...] = ()
    unchecked: tuple[str, ...] = ()
    changed: Callable[[str, str, str], str] | None = None

    # -- identity --------------------------------------------------------------------------
    def differs(self, old: dict, new: dict) -> str | None:
        """What makes ``old`` another sweep than ``new``, as the rest of one line; None when
        it is the same sweep (presentation keys aside)."""
        for key, message in self.first.items():
            if old.get(key) != new.get(key):
                return message(old, new)
        old, new = {**self.implied, **old}, {**self.implied, **new}
        for key, value in new.items():
            if key in self.presentation or key in self.unchecked or old.get(key) == value:
                continue
            if key not in self.options and self.changed is not None:
                return self.changed(key, show(old.get(key)), show(value))
            option = self.options.get(key, "--" + key.replace("_", "-"))
            return f"holds a sweep with {option} {show(old.get(key))}, not {show(value)}; {RESUME_HINT}"  # fmt: skip
        return None

    def check(self, out: str | Path, identity: dict) -> bool:
        """True when ``out`` holds this very sweep (resume), False when it is new; refuses
        anything else with one line. Reads only: the UI calls it before queueing a sweep."""
        out = Path(out)
        old = read_identity(out, self.identity_file)
        if old is None:
            return False
        why = self.differs(old, identity)
        if why is not None:
            raise UsageError(f"--out {out}: {why}")
        return True

    @contextmanager
    def hold(self, out: str | Path, identity: dict, state=None) -> Iterator[None]:
        """Hold ``out`` for this sweep while the body runs.

        Process 0 (or the only process) checks the folder without writing anything, creates
        it and takes its lock (the first write into it: a second writer is refused here with
        nothing in the folder changed), checks again now that no one else writes, removes
        the temporary files of killed writes, writes the identity (a new sweep, or only the
        presentation changed) and makes ``cells/``. The other processes wait until the folder
        is ready and never lock; process 0 holds the lock until the body is done.
        """
        out = Path(out)
        if state is not None and not state.is_main_process:
            distributed.barrier(state)  # process 0 has the folder ready
            yield
            return
        self.check(out, identity)  # another sweep or a stranger's folder: not even a lock file
        out.mkdir(parents=True, exist_ok=True)
        with folder_lock(out):
            old = read_identity(out, self.identity_file)  # may have changed before the lock
            if old is not None and (why := self.differs(old, identity)) is not None:
                raise UsageError(f"--out {out}: {why}")
            remove_temporary(out)
            if old is None or any(old.get(k) != identity.get(k) for k in self.presentation):
                write_json(out / self.identity_file, identity)
            (out / CELLS_DIR).mkdir(exist_ok=True)
            distributed.barrier(state)
            yield

    # -- cell records ----------------------------------------------------------------------
    def cell_paths(self, out: Path, cell) -> tuple[Path, Path]:
        """(the cell's own file, its record) for a dataclass ``cell`` with a ``key``."""
        return out / CELLS_DIR / f"{cell.key}{self.cell_suffix}", out / CELLS_DIR / f"{cell.key}.json"  # fmt: skip

    def load_cell(self, out: Path, cell) -> dict | None:
        """The finished cell's record, or None when it is missing, torn or another cell's
        (its fields are the cell dataclass's fields; a missing field reads as None)."""
        data, record = self.cell_paths(out, cell)
        if not (record.is_file() and data.is_file()):
            return None
        try:
            row = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # torn: half a JSON text, or half a UTF-8 character
            return None
        if not isinstance(row, dict):
            return None
        mine = dataclasses.asdict(cell)
        return row if all(row.get(k) == v for k, v in mine.items()) else None

    def write_cell(self, out: Path, cell, row: dict, write_data: Callable[[Path], None]) -> None:
        """``write_data(path)`` writes the cell's own file (atomically), then the record."""
        data, record = self.cell_paths(out, cell)
        write_data(data)
        write_json(record, row)  # last: marks the cell finished

    def read_tables(self, out: Path, identity: dict, cells: list) -> tuple[list[dict], list[dict]]:
        """The finished cells' records and their summary, from the cell files (writes nothing)."""
        rows = [r for r in (self.load_cell(out, c) for c in cells) if r is not None]
        return rows, self.tables.summarise(rows)

    def write_tables(self, out: Path, identity: dict, cells: list) -> tuple[list[dict], list[dict]]:
        """Rebuild ``metrics.csv``, ``metrics.json`` and ``summary.csv`` from the cell records."""
        rows, summary = self.read_tables(out, identity, cells)
        doc = {
            "sweep": identity, "complete": len(rows) == len(cells), "cells_done": len(rows),
            "cells_total": len(cells), **self.tables.about(rows), "cells": rows, "summary": summary,
        }  # fmt: skip
        write_json(out / "metrics.json", doc)
        write_text(out / "metrics.csv", csv_text(rows, self.tables.columns(identity)))
        write_text(out / "summary.csv", csv_text(summary, self.tables.summary_columns(identity)))
        return rows, summary
