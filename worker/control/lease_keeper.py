"""Keeps the batch in hand alive: renews its jobs' leases, writes their progress, notices cancel requests.

Cancel requests are polled twice a second for every job of the batch in one query (a job stops within
a step or so of its request, and leaves the batch); the leases and progress are written every quarter
lease (`shared.queueing.fleet`), in one transaction for the batch.
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
        self._written: dict[uuid.UUID, float] = {}  # the progress last written, per job

    def tick(self) -> None:
        try:
            self.check_cancel()
        finally:
            if time.monotonic() >= self._next_beat:
                self._next_beat = time.monotonic() + self.beat_seconds
                self.beat()

    def check_cancel(self) -> None:
        pending = self.control.pending_cancel_checks()
        if not pending:
            return
        with self.session_factory() as session:
            requested = lifecycle.cancels_requested(session, pending)
        for job_id in requested:
            if self.control.request_cancel(job_id):
                log.info("job %s: cancel requested", job_id)

    def beat(self) -> None:
        """Renew the batch's leases and write the progress that moved (with its throttled webhook events)."""
        job_ids = self.control.job_ids
        if not job_ids:
            return
        progress = {job_id: self.control.progress.get(job_id, 0.0) for job_id in job_ids}
        with self.session_factory() as session:
            lifecycle.renew_leases(session, job_ids, self.worker, self.lease_seconds)
            for job_id, value in progress.items():
                if value > 0 and self._written.get(job_id) != value:
                    lifecycle.report_progress(session, job_id, self.worker, value)
            lifecycle.commit(session)
        self._written = {job_id: value for job_id, value in progress.items() if value > 0}
