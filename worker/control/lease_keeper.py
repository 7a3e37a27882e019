"""Keeps the job in hand alive: renews its lease, writes its progress, notices a cancel request.

Cancel requests are polled twice a second (a running job stops within a step or so of the
request); the lease and progress are written every quarter lease (`shared.queueing.fleet`).
"""

from __future__ import annotations

import logging
import time
import uuid

from sqlalchemy.orm import Session, sessionmaker

from shared.jobs import lifecycle
from worker.control.job_control import JobControl
from worker.control.periodic import Periodic

log = logging.getLogger(__name__)
CANCEL_POLL_SECONDS = 0.5


class LeaseKeeper(Periodic):
    def __init__(self, control: JobControl, session_factory: sessionmaker[Session], worker: str,
                 lease_seconds: int, beat_seconds: float) -> None:
        super().__init__("lease-keeper", CANCEL_POLL_SECONDS)
        self.control = control
        self.session_factory = session_factory
        self.worker = worker
        self.lease_seconds = lease_seconds
        self.beat_seconds = beat_seconds
        self._next_beat = time.monotonic() + beat_seconds
        self._written: tuple[uuid.UUID | None, float] = (None, 0.0)  # the progress last written, and of which job

    def tick(self) -> None:
        try:
            self.check_cancel()
        finally:
            if time.monotonic() >= self._next_beat:
                self._next_beat = time.monotonic() + self.beat_seconds
                self.beat()

    def check_cancel(self) -> None:
        job_id = self.control.job_id
        if job_id is None or self.control.cancel_event.is_set():
            return
        with self.session_factory() as session:
            requested = lifecycle.cancel_requested(session, job_id)
        if requested and self.control.request_cancel(job_id):
            log.info("job %s: cancel requested", job_id)

    def beat(self) -> None:
        """Renew the lease and write progress when it moved (with its throttled webhook event)."""
        job_id, progress = self.control.job_id, self.control.progress
        if job_id is None:
            return
        with self.session_factory() as session:
            lifecycle.renew_lease(session, job_id, self.worker, self.lease_seconds)
            if (job_id, progress) != self._written and progress > 0:
                lifecycle.report_progress(session, job_id, self.worker, progress)
                self._written = (job_id, progress)
            lifecycle.commit(session)
