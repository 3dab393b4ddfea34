"""Heavy work (training, sampling, sweeps, Stable Diffusion) as jobs on one background worker.

One worker thread takes jobs in the order they were submitted, so the device never runs two
of them at once; a job outlives the browser tab that started it. A job reports progress
(a fraction and a line of text, and for sampling a preview image), can be cancelled (the work
checks :meth:`Job.cancelled` at safe points: between training steps, sampler steps and sweep
cells, so a cancelled job leaves a consistent folder), and ends ``done``, ``failed`` with one
line of error (a :class:`~difflab.errors.UsageError` as is, anything else with its type
name; the traceback goes to the server's log, not to the browser) or ``cancelled``.
A job may carry a key (a run folder, a sweep folder): while one job of a key is queued or
running, another of the same key is refused, checked and queued under one lock. Memory is
bounded: a finished job keeps only its result (what the page shows), not its work or preview,
and the queue forgets all but the latest :data:`KEEP` finished jobs.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from difflab.errors import UsageError

log = logging.getLogger("difflab.ui")

FINISHED = ("done", "failed", "cancelled")  # a job is queued, running, or one of these
KEEP = 20  # finished jobs the queue remembers


class Cancelled(Exception):
    """Raised inside a job's work when its cancel button was pressed."""


@dataclass
class Job:
    id: int
    kind: str  # train, sample, reverse, sweep, sd, sd-sweep
    title: str
    work: Callable[[Job], Any] | None
    state: str = "queued"
    progress: float | None = None  # 0..1 when known
    message: str = "waiting for the device"
    preview: Any = None  # latest preview image (sampling)
    result: Any = None
    error: str | None = None
    key: str | None = None  # at most one queued or running job per key
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        self._cancel.set()

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check(self) -> None:
        """Raise :class:`Cancelled` when cancelled: call it at the work's safe points."""
        if self._cancel.is_set():
            raise Cancelled

    def update(
        self, progress: float | None = None, message: str | None = None, preview: Any = None
    ) -> None:
        if progress is not None:
            self.progress = max(0.0, min(1.0, float(progress)))
        if message is not None:
            self.message = message
        if preview is not None:
            self.preview = preview

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def status_line(self) -> str:
        pct = f" {self.progress:.0%}" if self.progress is not None else ""
        text = self.error if self.state == "failed" else self.message
        return f"#{self.id} {self.kind} · {self.title} · {self.state}{pct} · {text}"


class JobQueue:
    """A FIFO of :class:`Job` run one at a time by a daemon thread."""

    def __init__(self, keep: int = KEEP) -> None:
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._queue: queue.Queue[Job] = queue.Queue()
        self._lock = threading.Lock()
        self._keep = keep
        self._worker = threading.Thread(target=self._run, name="difflab-jobs", daemon=True)
        self._worker.start()

    def submit(
        self, kind: str, title: str, work: Callable[[Job], Any], key: str | None = None
    ) -> Job:
        """Queue ``work``; refused (one line) while a job of the same ``key`` is not finished."""
        with self._lock:
            busy = [j for j in self._jobs.values() if key is not None and j.key == key]
            busy = [j for j in busy if j.state not in FINISHED]
            if busy:
                j = busy[0]
                raise UsageError(f"{key}: a {j.kind} job of it (#{j.id}) is already {j.state}")
            job = Job(next(self._ids), kind, title, work, key=key)
            self._jobs[job.id] = job
            self._forget()
            ahead = sum(1 for j in self._jobs.values() if j.id < job.id and j.state not in FINISHED)
            job.message = f"waiting for the device ({ahead} job(s) ahead)" if ahead else "starting"
            self._queue.put(job)
        return job

    def _forget(self) -> None:
        """Drop all but the latest ``keep`` finished jobs (call it holding the lock)."""
        finished = [j for j in self._jobs.values() if j.state in FINISHED]
        for old in finished[: max(0, len(finished) - self._keep)]:
            del self._jobs[old.id]

    def get(self, job_id: int) -> Job | None:
        return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.id, reverse=True)

    def active(self, kind: str | None = None) -> list[Job]:
        return [
            j for j in self.jobs() if j.state in ("queued", "running") and kind in (None, j.kind)
        ]

    def cancel(self, job_id: int) -> bool:
        job = self._jobs.get(job_id)
        if job is None or job.state in FINISHED:
            return False
        job.cancel()
        return True

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job.cancelled():
                job.state, job.message, job.finished = (
                    "cancelled",
                    "cancelled before it started",
                    time.time(),
                )
                job.work = None
                job._done.set()
                continue
            job.state, job.started = "running", time.time()
            try:
                job.result = job.work(job)  # type: ignore[misc]
                job.state = "cancelled" if job.cancelled() else "done"
                if job.state == "cancelled":
                    job.message = "cancelled; " + job.message
            except Cancelled:
                job.state, job.message = "cancelled", "cancelled; " + job.message
            except UsageError as e:
                job.state, job.error = "failed", str(e)
            except Exception as e:  # the browser gets one line, the log the traceback
                log.exception("job #%s (%s) failed", job.id, job.kind)
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                job.state, job.error = "failed", f"{type(e).__name__}: {first}".rstrip(": ")
            finally:
                job.work, job.preview = None, None  # a finished job keeps only its result
                job.finished = time.time()
                with self._lock:
                    self._forget()
                job._done.set()
