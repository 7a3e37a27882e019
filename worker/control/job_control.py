"""The batch in hand, as the runner, the engine and the control threads share it.

A batch is the jobs one claim took together (one job, or several with one batch key). The engine's step
callback only touches memory here (each job's progress, the cancel requests); the lease keeper writes
progress to Postgres and reads cancel requests from it, off the denoising path.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence


class JobCanceled(Exception):
    """Raised from the step callback when the job's cancel was requested."""


class JobTimedOut(Exception):
    """Raised from the step callback when the job ran past its time limit."""

    def __init__(self, limit: float) -> None:
        super().__init__(f"the job ran past its time limit of {limit:g} s and was stopped")
        self.limit = limit


class JobControl:
    def __init__(self) -> None:
        self.job_ids: tuple[uuid.UUID, ...] = ()
        self.progress: dict[uuid.UUID, float] = {}
        self.jobs_done = 0
        self.images_done = 0  # images recorded by this process (its images/s, with busy_seconds)
        self.busy_seconds = 0.0
        self._began = 0.0
        self.time_limit: float | None = None
        self._canceled: set[uuid.UUID] = set()
        self._lock = threading.Lock()
        self._deadline = float("inf")

    @property
    def job_id(self) -> uuid.UUID | None:
        """The batch's first job (the one its message named), None between batches."""
        return self.job_ids[0] if self.job_ids else None

    def begin(self, job_ids: Sequence[uuid.UUID], time_limit: float | None = None) -> None:
        """Take a batch; `time_limit` seconds from now each job's next step raises JobTimedOut."""
        with self._lock:
            self._canceled = set()
            self.progress = {job_id: 0.0 for job_id in job_ids}
            self.time_limit = time_limit
            self._deadline = time.monotonic() + time_limit if time_limit is not None else float("inf")
            self.job_ids = tuple(job_ids)
            self._began = time.monotonic()

    def add(self, job_ids: Sequence[uuid.UUID]) -> None:
        """Jobs that joined the batch after it began (claimed during the batch window)."""
        with self._lock:
            self.job_ids = (*self.job_ids, *job_ids)
            self.progress.update({job_id: 0.0 for job_id in job_ids})

    def end(self) -> None:
        with self._lock:
            self.jobs_done += len(self.job_ids)
            self.busy_seconds += time.monotonic() - self._began
            self.job_ids = ()
            self._canceled = set()

    def on_step(self, job_id: uuid.UUID, done: int, total: int) -> None:
        """The engine's step callback for one job of the batch: record its progress; stop it here if its
        cancel was requested or the time limit passed (a check of memory and the clock, nothing more)."""
        self.progress[job_id] = done / total
        if job_id in self._canceled:
            raise JobCanceled()
        if self.time_limit is not None and time.monotonic() > self._deadline:
            raise JobTimedOut(self.time_limit)

    def request_cancel(self, job_id: uuid.UUID) -> bool:
        """Ask a job of the batch to stop at its next step (the others go on); False if it is not in hand."""
        with self._lock:
            if job_id not in self.job_ids:
                return False
            self._canceled.add(job_id)
            return True

    def cancel_requested(self, job_id: uuid.UUID) -> bool:
        return job_id in self._canceled

    def pending_cancel_checks(self) -> list[uuid.UUID]:
        """Jobs in hand whose cancel has not been requested yet."""
        return [job_id for job_id in self.job_ids if job_id not in self._canceled]
