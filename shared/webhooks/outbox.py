"""The producer side of webhooks: a delivery row per event, written with the job change it reports.

`enqueue_job_event` runs inside the transaction that changes the job, so an event exists exactly
when its state change commits (docs/architecture.md, rule 1), with the job as `GET /v1/jobs/{id}` showed it at
that moment. `publish_deliveries` runs after the commit (rule 2) and only nudges the webhook
queue; if that message is lost, the webhook worker's poller finds the row anyway.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta

from kombu.exceptions import KombuError
from redis.exceptions import RedisError
from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from shared.clock import utcnow
from shared.db.models import Job
from shared.jobs.schemas import WEBHOOK_EVENT_NAMES
from shared.jobs.states import JobStatus
from shared.jobs.views import job_view
from shared.queueing.queues import QueueName, TaskName, get_producer
from shared.settings import get_settings
from shared.storage.base import ObjectStore
from shared.storage.object_store import get_object_store
from shared.webhooks.models import DeliveryStatus, WebhookDelivery, WebhookGoneEndpoint

log = logging.getLogger(__name__)

WEBHOOK_EVENTS = WEBHOOK_EVENT_NAMES
TERMINAL_EVENTS = ("succeeded", "failed", "canceled")
DEFAULT_EVENTS = TERMINAL_EVENTS
PROGRESS_EVENT = "progress"
_STATUS_EVENTS = {
    JobStatus.QUEUED: "queued",
    JobStatus.RUNNING: "started",
    JobStatus.SUCCEEDED: "succeeded",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELED: "canceled",
}
# webhook-ids of state events derive from (job, event, status_seq): enqueuing the same change twice is a no-op.
_ID_NAMESPACE = uuid.UUID("6f1c2d8e-5b7a-4c1e-9d3f-2a8b7c6d5e4f")


class NothingToRedeliver(LookupError):
    """A redelivery was asked for but there is no event to send again; the message says why."""


def event_for_status(status: str) -> str:
    """The webhook event a job status change reports (`running` is announced as `started`)."""
    return _STATUS_EVENTS[JobStatus(status)]


def check_webhook_events(events: Iterable[str] | None) -> list[str] | None:
    """Validate a job's `webhook_events` at submit; None keeps the default (the terminal events)."""
    if events is None:
        return None
    chosen = list(dict.fromkeys(events))
    unknown = [e for e in chosen if e not in WEBHOOK_EVENTS]
    if unknown:
        raise ValueError(f"unknown webhook event(s) {unknown}; allowed: {', '.join(WEBHOOK_EVENTS)}")
    if not chosen:
        raise ValueError(f"webhook_events must name at least one event of: {', '.join(WEBHOOK_EVENTS)}")
    return chosen


def subscribed_events(job: Job) -> tuple[str, ...]:
    return tuple(job.webhook_events) if job.webhook_events is not None else DEFAULT_EVENTS


def url_hash(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


def is_gone(session: Session, owner: str, url: str) -> bool:
    """True once `url` answered 410 Gone to one of `owner`'s deliveries (until a manual redelivery)."""
    return session.get(WebhookGoneEndpoint, (owner, url_hash(url))) is not None


def enqueue_job_event(
    session: Session, job: Job, event: str, *, store: ObjectStore | None = None, now: datetime | None = None
) -> list[int]:
    """Record `event` for `job` in the caller's transaction; returns the delivery ids to publish after commit.

    Call it right after the job's state change (the job row is re-read, so Core UPDATEs done earlier
    in the transaction are seen). Returns [] when the job has no webhook, does not want this event,
    the event was already recorded, a `progress` event comes within the throttle window, or the
    URL answered 410 Gone earlier (state events are then recorded as `stopped`, visible in the listing).
    """
    if event not in WEBHOOK_EVENTS:
        raise ValueError(f"unknown webhook event {event!r}; allowed: {', '.join(WEBHOOK_EVENTS)}")
    if not job.webhook_url or event not in subscribed_events(job):
        return []
    delivery_id = _create_delivery(session, job, event, store=store, now=now or utcnow())
    return [delivery_id] if delivery_id is not None else []


def _state_event_id(job: Job, event: str) -> str:
    return f"msg_{uuid.uuid5(_ID_NAMESPACE, f'{job.id}:{event}:{job.status_seq}').hex}"


def _create_delivery(
    session: Session, job: Job, event: str, *, store: ObjectStore | None, now: datetime, throttle: bool = True
) -> int | None:
    session.flush()
    # The row lock serialises one job's events, so sequence numbers and the throttle are race-free.
    session.refresh(job, with_for_update=True)
    assert job.webhook_url is not None
    progress = event == PROGRESS_EVENT
    if progress and throttle:
        last = session.scalar(
            select(func.max(WebhookDelivery.created_at)).where(
                WebhookDelivery.job_id == job.id, WebhookDelivery.event == PROGRESS_EVENT
            )
        )
        if last is not None and now - last < timedelta(seconds=get_settings().webhooks.progress_interval_seconds):
            return None
    gone = is_gone(session, job.owner, job.webhook_url)
    if gone and progress:
        return None
    sequence = session.scalar(
        select(func.coalesce(func.max(WebhookDelivery.sequence), 0) + 1).where(WebhookDelivery.job_id == job.id)
    )
    expires = get_settings().services.url_expires_seconds
    view = job_view(job, store or get_object_store(), expires).model_dump(mode="json")
    webhook_id = f"msg_{uuid.uuid4().hex}" if progress else _state_event_id(job, event)
    values = {
        "webhook_id": webhook_id,
        "job_id": job.id,
        "owner": job.owner,
        "api_key_id": job.api_key_id,
        "event": event,
        "sequence": sequence,
        "url": job.webhook_url,
        "payload": {**view, "event": event, "sequence": sequence},
        "created_at": now,
        "attempt_count": 0,
        "retry_step": 0,
    }
    if gone:
        values |= {"status": DeliveryStatus.STOPPED, "finished_at": now,
                   "last_error": f"not sent: {job.webhook_url} answered 410 Gone earlier; redeliver to resume"}
    else:
        values |= {"status": DeliveryStatus.PENDING, "next_attempt_at": now, "dispatched_at": now}
    inserted = session.execute(
        insert(WebhookDelivery).values(**values).on_conflict_do_nothing().returning(WebhookDelivery.id)
    ).scalar_one_or_none()
    return inserted if inserted is not None and not gone else None


def publish_deliveries(ids: Iterable[int]) -> int:
    """Nudge the webhook queue about committed deliveries; returns how many messages went out.

    Call only after the commit. A broker failure is logged, not raised: the row is durable and the
    webhook worker's poller dispatches it within `RENDERFARM_WEBHOOK_REDISPATCH_SECONDS`.
    """
    sent = 0
    for delivery_id in ids:
        try:
            get_producer().send_task(
                TaskName.DELIVER_WEBHOOK, args=[int(delivery_id)], queue=QueueName.WEBHOOKS, retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.5, "interval_max": 1},
            )
            sent += 1
        except (KombuError, RedisError, OSError):
            log.warning("could not publish webhook delivery %s; the poller will send it", delivery_id, exc_info=True)
    return sent


def list_deliveries(session: Session, job_id: uuid.UUID) -> list[WebhookDelivery]:
    """A job's deliveries in event order, each with its attempts."""
    rows = session.scalars(
        select(WebhookDelivery).where(WebhookDelivery.job_id == job_id).order_by(WebhookDelivery.sequence)
    )
    return list(rows)


def redeliver(
    session: Session, job: Job, delivery_id: int | None = None, *, store: ObjectStore | None = None,
    now: datetime | None = None,
) -> WebhookDelivery:
    """Arm a delivery again (same webhook-id, retry schedule from the start) in the caller's transaction.

    Without `delivery_id` the job's latest terminal event is sent again, recorded first if the job
    did not subscribe to it. A manual redelivery also lifts a 410 stop on the URL: the owner says it is back.
    """
    now = now or utcnow()
    if delivery_id is not None:
        delivery = session.scalar(
            select(WebhookDelivery).where(WebhookDelivery.id == delivery_id, WebhookDelivery.job_id == job.id)
        )
        if delivery is None:
            raise LookupError(f"job {job.id} has no webhook delivery {delivery_id}")
    else:
        delivery = session.scalar(
            select(WebhookDelivery)
            .where(WebhookDelivery.job_id == job.id, WebhookDelivery.event.in_(TERMINAL_EVENTS))
            .order_by(WebhookDelivery.sequence.desc())
            .limit(1)
        )
        if delivery is None:
            delivery = _record_terminal_event(session, job, store=store, now=now)
    session.execute(
        delete(WebhookGoneEndpoint).where(
            WebhookGoneEndpoint.owner == delivery.owner, WebhookGoneEndpoint.url_hash == url_hash(delivery.url)
        )
    )
    delivery.status = DeliveryStatus.PENDING
    delivery.retry_step = 0
    delivery.next_attempt_at = now
    delivery.dispatched_at = now
    delivery.finished_at = None
    session.flush()
    return delivery


def _record_terminal_event(session: Session, job: Job, *, store: ObjectStore | None, now: datetime) -> WebhookDelivery:
    if not job.webhook_url:
        raise NothingToRedeliver(f"job {job.id} has no webhook_url")
    if not JobStatus(job.status).is_terminal:
        raise NothingToRedeliver(
            f"job {job.id} is still {job.status}: it has no terminal event yet; give a delivery_id to resend another"
        )
    # Clear a 410 stop first so the event is recorded as pending, not stopped.
    session.execute(
        delete(WebhookGoneEndpoint).where(
            WebhookGoneEndpoint.owner == job.owner, WebhookGoneEndpoint.url_hash == url_hash(job.webhook_url)
        )
    )
    event = event_for_status(job.status)
    created = _create_delivery(session, job, event, store=store, now=now, throttle=False)
    delivery = session.scalar(select(WebhookDelivery).where(WebhookDelivery.webhook_id == _state_event_id(job, event)))
    if created is None and delivery is None:
        raise NothingToRedeliver(f"job {job.id}: its {event} event could not be recorded")
    assert delivery is not None
    return delivery
