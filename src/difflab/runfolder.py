"""Resumable training folders: what DDPM training and Stable Diffusion fine-tuning share.

A training folder holds ``config.json`` (every option), a weights file (``model.safetensors``
for a DDPM run, the LoRA file for a fine-tuning run), ``train_state.pt`` (everything an exact
resume needs, read back with ``torch.load(weights_only=True)``) and ``metrics.jsonl``. This
module owns those names, the random streams that make a resume exact (each step's draws come
from a generator seeded with ``(seed, step)``, each epoch's data order from ``(seed, epoch)``),
the checkpoint protocol (the weights are written first, then the train state that records
their SHA-256: the state, renamed last, marks the checkpoint, so a kill between the two
writes is seen on resume and the weights are rewritten from the state), the checks on
``--resume`` (a damaged state file, options that may not change), the clean-up of temporary
files a SIGKILL left behind, the progress bar, and a graceful stop on SIGINT/SIGTERM: the
loop finishes its step, writes a checkpoint and raises :class:`TrainingInterrupted`.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from difflab.errors import UsageError
from difflab.files import (
    LOCK_FILE,
    atomic_path,
    file_sha256,
    folder_lock,
    read_jsonl,
    remove_stale_temp_files,
    write_text,
)

CONFIG = "config.json"
TRAIN_STATE = "train_state.pt"
METRICS = "metrics.jsonl"
WEIGHTS_SHA256 = "weights_sha256"  # the key of the train state that pairs it with its weights
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the folder keeps its last good checkpoint."""


class TrainingInterrupted(Exception):
    """SIGINT (Ctrl-C) or SIGTERM stopped training after a checkpoint was written.

    ``exit_code`` is the shell's ``128 + signal`` (130 for SIGINT, 143 for SIGTERM); the
    message says where the checkpoint is and how to resume.
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


# -- random streams ------------------------------------------------------------------------
def step_generator(seed: int, step: int, device: str | torch.device = "cpu") -> torch.Generator:
    """The generator of step ``step``'s random draws (timesteps, noise, label dropout), on ``device``.

    On a GPU the draws are made there (no per-step host-to-device copy of the noise), so a seed
    gives the same run on the same kind of device, not the same numbers as on the CPU.
    """
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) % (2**63))


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator of epoch ``epoch``'s data order (one permutation per epoch)."""
    return torch.Generator().manual_seed((seed * 7919 + epoch) % (2**63))


def ema_decay(decay: float, step: int, warmup: bool = True) -> float:
    """The EMA decay at ``step``: ``min(decay, (1 + step) / (10 + step))`` with warm-up, so the
    average does not start as a long memory of the random initial weights."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


# -- the folder ----------------------------------------------------------------------------
def clean_folder(folder: str | Path, subfolders: Iterable[str] = ()) -> list[Path]:
    """Remove the temporary files a killed write left in ``folder`` (and its ``subfolders``)."""
    folder = Path(folder)
    stale = remove_stale_temp_files(folder)
    for name in subfolders:
        stale += remove_stale_temp_files(folder / name)
    return stale


@contextmanager
def held(out: str | Path, create: bool, lock: bool = True) -> Iterator[None]:
    """The run folder ``out`` held by one writer: created when ``create`` (its parent must
    exist), then locked (:func:`~difflab.files.folder_lock`), so a second training of the
    same run is refused with one line. A folder created here that is refused or fails
    before anything was written into it is removed again."""
    import shutil

    out = Path(out)
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: folder {out.parent} does not exist")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file, not a folder")
    fresh = not out.exists()
    if create:
        out.mkdir(exist_ok=True)
    try:
        with folder_lock(out) if lock and out.is_dir() else nullcontext():
            yield
    finally:
        if lock and fresh and out.is_dir() and {p.name for p in out.iterdir()} <= {LOCK_FILE}:
            shutil.rmtree(out, ignore_errors=True)


def save_checkpoint(
    folder: str | Path, weights: str, write_weights: Callable[[Path], None], state: dict[str, Any]
) -> None:
    """Write the weights file (``write_weights(path)``, atomic), then the train state that
    records the weights' SHA-256 (atomic, last: it marks the checkpoint)."""
    folder = Path(folder)
    write_weights(folder / weights)
    state = {**state, WEIGHTS_SHA256: file_sha256(folder / weights)}
    with atomic_path(folder / TRAIN_STATE) as tmp:
        torch.save(state, tmp)


def load_train_state(folder: str | Path, option: str = "--resume") -> dict[str, Any]:
    """``train_state.pt`` of ``folder``; a missing, truncated or damaged file is one line."""
    path = Path(folder) / TRAIN_STATE
    if not path.is_file():
        raise UsageError(f"{option}: {path} not found; nothing to resume")
    try:
        with warnings.catch_warnings():  # torch's notes on what it is about to refuse
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip (RuntimeError), EOFError, UnpicklingError, ...
        why = next(iter(str(e).strip().splitlines()), type(e).__name__)[:160]
        raise UsageError(
            f"{option}: {path} is damaged or truncated ({why}); it cannot be resumed: "
            "restore the file or start the run again in another folder"
        ) from None
    if not isinstance(state, dict) or "step" not in state:
        raise UsageError(f"{option}: {path} is not a difflab train state")
    return state


def weights_match(state: dict[str, Any], path: str | Path) -> bool:
    """Whether the weights file ``path`` is the one written with ``state``'s checkpoint.

    False when a kill came between the two writes (the weights are of a later step) or the file
    is missing or damaged. A state from before the hash was recorded matches any weights file.
    """
    path = Path(path)
    if not path.is_file():
        return False
    recorded = state.get(WEIGHTS_SHA256)
    return recorded is None or file_sha256(path) == recorded


def mismatch_note(folder: str | Path, weights: str, step: int) -> str:
    return (
        f"{Path(folder) / weights} is not the one saved with {TRAIN_STATE} (step {step}): the "
        "run was stopped between the two writes, or the file is damaged; resuming from the "
        f"train state and writing the weights of step {step} again"
    )


def trim_metrics(folder: str | Path, step: int) -> None:
    """Drop the ``metrics.jsonl`` lines logged after ``step`` (the checkpoint resumed from)."""
    path = Path(folder) / METRICS
    rows = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def show(value: Any) -> str:
    """An option's value as a message shows it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "not set"
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def check_same_options(
    saved: dict[str, Any],
    mine: dict[str, Any],
    names: Iterable[str],
    folder: str | Path,
    may_change: str,
) -> None:
    """Refuse a resume whose option ``names`` differ from the ones the run was started with."""
    for name in names:
        if saved.get(name) != mine.get(name):
            option = "--" + name.replace("_", "-")
            raise UsageError(
                f"--resume: {option} is {show(mine.get(name))} here but "
                f"{show(saved.get(name))} in the run in {folder}; resume with the run's "
                f"options (only {may_change} may change) or choose another --out"
            )


def accelerator(mixed_precision: str, cpu: bool, **options: Any) -> Any:
    """An ``accelerate.Accelerator`` (``options``: more of its keyword arguments, e.g. a
    tracker's ``log_with`` and ``project_dir``). accelerate keeps one mixed-precision setting
    per process; a single-process caller (the tests, the UI) may start runs with different
    settings, so a conflicting state left by an earlier run is cleared first."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    state = AcceleratorState._shared_state
    single = PartialState._shared_state.get("num_processes", 1) == 1
    if (
        single
        and state
        and (state.get("_mixed_precision"), state.get("_cpu")) != (mixed_precision, cpu)
    ):
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu, **options)


# -- progress and signals ------------------------------------------------------------------
def progress_bar(total: int, initial: int, desc: str, unit: str, enabled: bool) -> Any:
    """The training progress bar, on stderr."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, unit=unit, desc=desc, disable=not enabled,
        file=sys.stderr, dynamic_ncols=True,
    )  # fmt: skip


@dataclass
class StopRequest:
    """Set by :func:`stop_on_signals` when SIGINT or SIGTERM arrives."""

    signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    def interrupted(self, step: int, folder: str | Path, resume: str) -> TrainingInterrupted:
        name = signal.Signals(self.signum).name
        return TrainingInterrupted(
            self.signum,
            f"stopped by {name} at step {step}; checkpoint saved in {folder}; resume with: "
            + resume,
        )


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """While training, turn the first SIGINT/SIGTERM into a request to stop after the step.

    The loop checks the request, writes a checkpoint and stops; a second signal acts as usual
    (Ctrl-C raises KeyboardInterrupt, SIGTERM ends the process; the files are atomic). Off the
    main thread (the web UI's worker) signals cannot be caught: nothing is installed.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)

    def handler(signum: int, _frame: Any) -> None:
        request.signum = signum
        restore()

    for s in SIGNALS:
        signal.signal(s, handler)
    try:
        yield request
    finally:
        restore()
