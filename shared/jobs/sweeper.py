"""Recovers jobs that a crash left behind; every worker runs it, compare-and-set keeps it safe.

- A running job whose lease expired (its worker died) goes back to `queued`, or to
  `failed` with `worker_lost` once it has used all its attempts: a poison job must not loop.
- A queued job that was never published (the API died between commit and publish, or the
  broker was down) is published.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from shared.db.models import Job
from shared.jobs.repository import utcnow
from shared.jobs.states import ErrorType, JobStatus

log = logging.getLogger(__name__)


def expire_leases(session: Session) -> list[uuid.UUID]:
    """Hand jobs with expired leases back to the queue; returns the ids to publish again."""
    now = utcnow()
    expired = and_(Job.status == JobStatus.RUNNING, Job.lease_until < now)
    failed = session.execute(
        update(Job)
        .where(expired, Job.attempt >= Job.max_attempts)
        .values(status=JobStatus.FAILED, status_seq=Job.status_seq + 1, finished_at=now, lease_owner=None,
                lease_until=None, error_type=ErrorType.WORKER_LOST,
                error_message="the worker rendering this job was lost on every attempt")
        .returning(Job.id)
    ).scalars().all()
    requeued = session.execute(
        update(Job)
        .where(expired, Job.attempt < Job.max_attempts)
        .values(status=JobStatus.QUEUED, status_seq=Job.status_seq + 1, lease_owner=None, lease_until=None,
                published_at=now)
        .returning(Job.id)
    ).scalars().all()
    for job_id in failed:
        log.warning("job %s failed: worker lost on every attempt", job_id)
    for job_id in requeued:
        log.warning("job %s: lease expired, back to the queue", job_id)
    return list(requeued)


def claim_unpublished(session: Session, older_than_seconds: float = 5.0, limit: int = 100) -> list[uuid.UUID]:
    """Queued jobs never published within `older_than_seconds` of their creation; marks them published."""
    now = utcnow()
    candidates = (
        select(Job.id)
        .where(Job.status == JobStatus.QUEUED, Job.published_at.is_(None),
               or_(Job.created_at < now - timedelta(seconds=older_than_seconds)))
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return list(
        session.execute(
            update(Job).where(Job.id.in_(candidates)).values(published_at=now).returning(Job.id)
        ).scalars().all()
    )


def sweep(session: Session, publish: Callable[[uuid.UUID], None]) -> int:
    """One pass: commit the state changes first, then publish (commit, then publish)."""
    ids = expire_leases(session) + claim_unpublished(session)
    session.commit()
    for job_id in ids:
        publish(job_id)
    return len(ids)
