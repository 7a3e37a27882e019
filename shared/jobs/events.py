"""Job events for webhooks, recorded in the same transaction as the state change they describe.

Callers record inside the transaction (`record_event`), commit, and only then publish
(`publish_events`): commit, then publish, as for jobs themselves.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable

from sqlalchemy.orm import Session

from shared.db.models import Job
from shared.webhooks.outbox import enqueue_job_event, event_for_status, publish_deliveries

log = logging.getLogger(__name__)


def record_event(session: Session, job_id: uuid.UUID, event: str | None = None) -> list[int]:
    """Delivery ids for the job's webhook (none when it has none or does not want this event)."""
    job = session.get(Job, job_id)  # webhook_url never changes; enqueue_job_event re-reads the row locked
    if job is None or not job.webhook_url:
        return []
    return enqueue_job_event(session, job, event or event_for_status(job.status))


def publish_events(ids: Iterable[int]) -> None:
    ids = list(ids)
    if ids:
        publish_deliveries(ids)
