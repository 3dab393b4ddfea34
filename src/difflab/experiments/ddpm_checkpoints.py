"""The checkpoint axis of a DDPM sweep: which of a run's weights the cells are sampled from.

``difflab sweep RUN --checkpoints all|STEP,...`` sweeps the EMA weights a run kept at chosen
training steps (``train --snapshot-every``: ``RUN/snapshots/step-0001000.safetensors``,
:func:`difflab.ddpm.runs.snapshot_path`) beside its final weights (``model.safetensors``,
labelled by the training step they were written at, from their metadata or
``train_state.pt``), so quality against training compute is one more axis. :func:`resolve`
turns the option into {step: weights file}: ``all`` is every kept snapshot and the final
weights (for a run that kept none, its final weights only, with a note on stderr); a step the run did
not keep is refused with one line listing the kept ones. :func:`identity` pins the chosen
steps and the SHA-256 of each file, so a re-trained snapshot is never mixed into a resumed
sweep. A checkpoint's ``images_seen`` is its step times the run's (global) batch size.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from difflab.ddpm.runs import (
    WEIGHTS,
    load_train_state,
    snapshot_path,
    snapshot_steps,
    weights_metadata,
)
from difflab.errors import UsageError
from difflab.experiments.core import show
from difflab.files import file_sha256


def final_step(run: Path) -> int | None:
    """The training step of the run's final weights: their metadata, else ``train_state.pt``."""
    try:
        step = weights_metadata(run / WEIGHTS).get("step")
    except Exception:  # weights without metadata, or unreadable: load_run says why later
        step = None
    if not isinstance(step, int) and (run / "train_state.pt").is_file():
        try:
            step = int(load_train_state(run, "--checkpoints")["step"])
        except (UsageError, KeyError, TypeError, ValueError):
            step = None
    return step if isinstance(step, int) else None


def resolve(run: Path, checkpoints: tuple[int, ...] | str) -> dict[int, str]:
    """{training step: weights file relative to ``run``}, ascending, for ``--checkpoints``."""
    kept = {s: snapshot_path(run, s).relative_to(run).as_posix() for s in snapshot_steps(run)}
    final = final_step(run)
    if final is not None:
        kept[final] = WEIGHTS  # the final weights stand for a snapshot of the same step
    kept = dict(sorted(kept.items()))
    listing = ", ".join(map(str, kept)) or "none"
    if checkpoints == "all":
        if final is None:
            raise UsageError(
                f"--checkpoints all: cannot tell at which step {run / WEIGHTS} was written (no "
                "step in its metadata, no train_state.pt); give the snapshot steps instead"
            )
        if not snapshot_steps(run):
            print(
                f"note: --checkpoints all: {run} kept no snapshots (train with --snapshot-every "
                f"N to keep some); sweeping its final weights (step {final}) only",
                file=sys.stderr,
            )
        return kept
    missing = [s for s in checkpoints if s not in kept]
    if missing:
        raise UsageError(
            f"--checkpoints {show(list(checkpoints))}: {run} kept no weights of step {missing[0]} "
            f"(kept: {listing}; train with --snapshot-every N to keep more)"
        )
    return {s: kept[s] for s in checkpoints}


def identity(run: Path, checkpoints: tuple[int, ...] | str | None) -> dict[str, Any]:
    """The identity keys of the axis (none without it): the steps, files and their hashes."""
    if checkpoints is None:
        return {}
    files = resolve(run, checkpoints)
    return {
        "checkpoints": list(files),
        "checkpoint_files": {str(s): f for s, f in files.items()},
        "checkpoint_sha256": {str(s): file_sha256(run / f) for s, f in files.items()},
    }


def snapshot_step(identity: dict, checkpoint: int | None) -> int | None:
    """``load_run``'s ``step`` for a cell's checkpoint (None: the final weights)."""
    if checkpoint is None:
        return None
    return None if identity["checkpoint_files"][str(checkpoint)] == WEIGHTS else checkpoint


def changed(key: str) -> str | None:
    """The message for a changed identity key of this axis (None: not one of its keys)."""
    if key in ("checkpoint_files", "checkpoint_sha256"):
        return (
            "the run's checkpoints changed since this sweep started (a snapshot or the final "
            "weights were re-trained or replaced); choose another --out"
        )
    return None


def columns(checkpoint: int | None, batch_size: int) -> dict[str, int]:
    """A cell row's ``checkpoint`` and ``images_seen`` (empty without the axis)."""
    if checkpoint is None:
        return {}
    return {"checkpoint": checkpoint, "images_seen": checkpoint * batch_size}
