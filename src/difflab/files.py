"""Atomic file writes: the one place in difflab that puts files on disk.

Every file is written to a temporary name in the destination folder (``.NAME.XXXXXXXX.tmpSUFFIX``,
:data:`TEMP_GLOB`), flushed to the disk, renamed over the target, and the folder is flushed
too, so a killed process or a power cut leaves either the old file or the new one, never half
of one; a temporary file that a SIGKILL left behind is removed by :func:`remove_stale_temp_files`
when the folder is next opened. Also folder locks, JSON lines and file hashes.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from difflab.errors import UsageError

LOCK_FILE = ".lock"
TEMP_GLOB = ".*.tmp*"  # the names atomic_path gives its temporary files


def cache_base() -> Path:
    """difflab's own cache folder: ``$DIFFLAB_CACHE``, else ``~/.cache/difflab``."""
    env = os.environ.get("DIFFLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "difflab"


def _fsync_folder(folder: Path) -> None:
    """Flush ``folder``'s entries (a rename in it) to the disk; a no-op where folders cannot
    be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse to fsync a folder; the rename still happened
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success."""
    path = Path(path)
    suffix = path.suffix if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp_path
        # mkstemp creates 0600 (and some writers create the file anew): the usual permissions
        os.chmod(tmp_path, 0o666 & ~umask)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_folder(path.parent)  # the rename itself reaches the disk
    except OSError as e:
        if e.filename is None or str(e.filename) == str(tmp_path):
            e.filename = str(path)  # name the file the user asked for, not its temporary name
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write(path: str | Path, writer: Callable[[Path], Any]) -> None:
    """Call ``writer(tmp_path)`` and rename the result over ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line; a torn last line (from a kill) is skipped by :func:`read_jsonl`."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def read_text(path: str | Path) -> str:
    """A UTF-8 text file; a missing, unreadable or non-UTF-8 one is one line naming it."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a folder, expected a file") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None


def read_json(path: str | Path, kind: type = dict) -> Any:
    """A JSON file holding a ``kind`` (an object by default); anything else is one line naming it."""
    path = Path(path)
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, kind):
        raise UsageError(f"{path}: expected a JSON {kind.__name__}, got {type(data).__name__}")
    return data


def read_jsonl(path: str | Path) -> list[dict]:
    """One JSON object per line. A torn last line (a kill mid-append) is skipped; a bad line
    anywhere else, or bytes that are not UTF-8, is one line naming the file and the line."""
    p = Path(path)
    if not p.exists():
        return []
    lines = p.read_bytes().splitlines()
    rows = []
    for i, raw in enumerate(lines):
        try:
            row = json.loads(raw.decode("utf-8"))
            if not isinstance(row, dict):
                raise ValueError("not an object")
            rows.append(row)
        except (UnicodeDecodeError, ValueError):
            if i == len(lines) - 1:
                continue
            raise UsageError(f"{p}: line {i + 1} is not a JSON object") from None
    return rows


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Remove the temporary files that a killed :func:`atomic_path` left in ``folder``.

    Call it only while no other process writes into ``folder`` (under its lock, or when a
    resumable folder is opened): a live writer's temporary file has the same name pattern.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.glob(TEMP_GLOB) if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def csv_text(rows: list[dict], columns: list[str] | tuple[str, ...]) -> str:
    """Rows as CSV text with the given columns; missing and None values become empty cells."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return buf.getvalue()


@contextmanager
def folder_lock(folder: str | Path, option: str = "--out") -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (a ``.lock`` file in it) while writing into it.

    A second process that tries to write into the same folder is refused at once with one
    line naming the holder's pid, instead of interleaving its cells with the first one's.
    The lock goes with the process: a killed writer leaves no stale lock behind.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    folder = Path(folder)
    with open(folder / LOCK_FILE, "a+", encoding="utf-8") as f:
        unlockable = None  # a file system without locks (some network file systems)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            raise UsageError(
                f"{option} {folder}: another process (pid {pid}) is writing into this folder; "
                f"wait for it to finish or choose another {option}"
            ) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            unlockable = errno.errorcode[e.errno]
        if unlockable:
            import warnings

            warnings.warn(
                f"{folder}: this file system has no locks ({unlockable}); writing without "
                "one: do not start a second writer into this folder",
                stacklevel=3,
            )
            yield
            return
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
