"""Recovers jobs that a crash left behind; every worker runs it, compare-and-set keeps it safe.

- A running job whose lease expired (its worker died) goes back to `queued`, or to
  `failed` with `worker_lost` once it has used all its attempts: a poison job must not loop.
- A queued job that was never published (the API died between commit and publish, or the
  broker was down) is published.
- When the broker holds fewer messages than there are queued jobs (Redis restarted empty,
  a message lost), queued jobs older than `republish_after` are published again. A spare
  duplicate message is harmless: the claim is a compare-and-set.
- A queued job that has waited in a model's queue (routing by affinity, shared/queueing/routing.py) longer
  than the deferral bound is published to the shared queue, where any worker may take it.

Everything the sweeper publishes goes to the shared `render` queue: a recovery path must not
depend on which workers hold which models.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Collection
from datetime import timedelta

from sqlalchemy import and_, func, select, update
from sqlalchemy.orm import Session

from shared.db.models import Job
from shared.jobs.events import publish_events, record_event
from shared.jobs.repository import utcnow
from shared.jobs.states import ErrorType, JobStatus
from shared.queueing.queues import QueueName
from shared.queueing.routing import MODEL_QUEUE_PREFIX

log = logging.getLogger(__name__)


def expire_leases(session: Session) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
    """Hand jobs with expired leases back to the queue; returns (ids to publish again, ids failed)."""
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
                published_at=now, route=QueueName.RENDER)
        .returning(Job.id)
    ).scalars().all()
    for job_id in failed:
        log.warning("job %s failed: worker lost on every attempt", job_id)
    for job_id in requeued:
        log.warning("job %s: lease expired, back to the queue", job_id)
    return list(requeued), list(failed)


def _claim_for_publish(session: Session, condition, limit: int) -> list[uuid.UUID]:
    candidates = select(Job.id).where(condition).order_by(Job.created_at).limit(limit).with_for_update(skip_locked=True)
    return list(
        session.execute(
            update(Job).where(Job.id.in_(candidates)).values(published_at=utcnow(), route=QueueName.RENDER)
            .returning(Job.id)
        )
        .scalars()
        .all()
    )


def claim_unpublished(session: Session, older_than_seconds: float = 5.0, limit: int = 100) -> list[uuid.UUID]:
    """Queued jobs never published within `older_than_seconds` of their creation; marks them published."""
    cutoff = utcnow() - timedelta(seconds=older_than_seconds)
    return _claim_for_publish(
        session, and_(Job.status == JobStatus.QUEUED, Job.published_at.is_(None), Job.created_at < cutoff), limit
    )


def claim_stale_queued(
    session: Session, broker_depth: int, republish_after: float, limit: int = 500
) -> list[uuid.UUID]:
    """Queued jobs whose message the broker seems to have lost; nothing when the broker holds enough messages."""
    queued = session.scalar(select(func.count()).select_from(Job).where(Job.status == JobStatus.QUEUED)) or 0
    if broker_depth >= queued:
        return []
    cutoff = utcnow() - timedelta(seconds=republish_after)
    return _claim_for_publish(
        session, and_(Job.status == JobStatus.QUEUED, Job.published_at < cutoff), min(limit, queued - broker_depth)
    )


def claim_deferred(
    session: Session, max_wait_seconds: float, limit: int = 500, keep: Collection[str] = ()
) -> list[uuid.UUID]:
    """Queued jobs published to a model's queue more than `max_wait_seconds` ago: the bound on affinity.
    Jobs for the models in `keep` (held by every worker: any worker that frees up takes them from their
    model's queue anyway) stay where they are, so a backlog does not get a spare message per job."""
    cutoff = utcnow() - timedelta(seconds=max_wait_seconds)
    condition = and_(
        Job.status == JobStatus.QUEUED,
        Job.route.startswith(MODEL_QUEUE_PREFIX, autoescape=True),
        Job.published_at < cutoff,
    )
    if keep:
        condition = and_(condition, Job.model_name.not_in(list(keep)))
    return _claim_for_publish(session, condition, limit)


def sweep(
    session: Session,
    publish: Callable[[uuid.UUID], None],
    broker_depth: Callable[[], int] | None = None,
    republish_after: float = 30.0,
    affinity_max_wait: float = 15.0,
    keep_deferred: Collection[str] = (),
) -> int:
    """One pass: commit the state changes first, then publish (commit, then publish). Every id goes to the
    shared render queue."""
    requeued, failed = expire_leases(session)
    deliveries = [d for job_id in failed for d in record_event(session, job_id)]
    ids = requeued + claim_unpublished(session) + claim_deferred(session, affinity_max_wait, keep=keep_deferred)
    session.commit()
    publish_events(deliveries)
    if broker_depth is not None:
        ids += claim_stale_queued(session, broker_depth(), republish_after)
        session.commit()
    for job_id in ids:
        publish(job_id)
    return len(ids)
