"""The job in hand, as the runner, the engine and the control threads share it.

The engine's step callback only touches memory here (progress, the cancel flag); the lease keeper
writes progress to Postgres and reads cancel requests from it, off the denoising path.
"""

from __future__ import annotations

import threading
import time
import uuid


class JobCanceled(Exception):
    """Raised from the step callback when the job's cancel was requested."""


class JobTimedOut(Exception):
    """Raised from the step callback when the job ran past its time limit."""

    def __init__(self, limit: float) -> None:
        super().__init__(f"the job ran past its time limit of {limit:g} s and was stopped")
        self.limit = limit


class JobControl:
    def __init__(self) -> None:
        self.job_id: uuid.UUID | None = None
        self.progress: float = 0.0
        self.jobs_done = 0
        self.cancel_event = threading.Event()
        self.time_limit: float | None = None
        self._deadline = float("inf")

    def begin(self, job_id: uuid.UUID, time_limit: float | None = None) -> None:
        """Take a job; `time_limit` seconds from now its next step raises JobTimedOut."""
        self.cancel_event.clear()
        self.progress = 0.0
        self.time_limit = time_limit
        self._deadline = time.monotonic() + time_limit if time_limit is not None else float("inf")
        self.job_id = job_id

    def end(self) -> None:
        self.job_id = None
        self.cancel_event.clear()
        self.jobs_done += 1

    def on_step(self, done: int, total: int) -> None:
        """The engine's step callback: record progress; stop here if a cancel was requested or the time
        limit passed (a check of memory and the clock, nothing more)."""
        self.progress = done / total
        if self.cancel_event.is_set():
            raise JobCanceled()
        if self.time_limit is not None and time.monotonic() > self._deadline:
            raise JobTimedOut(self.time_limit)

    def request_cancel(self, job_id: uuid.UUID) -> bool:
        """Ask the job to stop at its next step, if it is still the job in hand."""
        if self.job_id != job_id:
            return False
        self.cancel_event.set()
        return True
