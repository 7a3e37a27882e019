"""The sender side of webhooks: one HTTP attempt per call, and the scan for due retries.

An attempt claims its delivery with a compare-and-set lease (docs/architecture.md, rule 4) and commits before it
sends, so no transaction stays open across a slow receiver and two workers never send the same
attempt; a worker that dies mid-attempt only delays the retry until the lease runs out. Retries
are rows with `next_attempt_at`, found by `dispatch_due`, never Celery ETAs held in the broker.
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any

import httpx
from sqlalchemy import delete, or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from shared.clock import utcnow
from shared.db.models import ApiKey, JobImage
from shared.settings import WebhookSettings, get_settings
from shared.storage.base import ObjectStore
from shared.storage.object_store import get_object_store
from shared.webhooks.models import DeliveryStatus, WebhookAttempt, WebhookDelivery, WebhookGoneEndpoint
from shared.webhooks.outbox import PROGRESS_EVENT, is_gone, url_hash
from shared.webhooks.signing import get_or_create_secret, signed_headers
from shared.webhooks.ssrf import WebhookUrlError, check_webhook_url

log = logging.getLogger(__name__)

USER_AGENT = "renderfarm-webhooks/0.1"
_EXCERPT_BYTES = 512
_RETRY_AFTER_CODES = (429, 503)


class DeliveryOutcome(StrEnum):
    DELIVERED = "delivered"
    RETRY_SCHEDULED = "retry_scheduled"
    FAILED = "failed"  # no more attempts
    STOPPED = "stopped"  # the URL answered 410 Gone (now or earlier)
    SKIPPED = "skipped"  # not due, finished, or another worker holds it: nothing was sent


@dataclass(frozen=True)
class HttpResult:
    status_code: int | None
    error: str | None
    retry_after: float | None
    duration_ms: int

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def attempt_delivery(
    session: Session, delivery_id: int, *, now: datetime | None = None, store: ObjectStore | None = None,
    config: WebhookSettings | None = None,
) -> DeliveryOutcome:
    """Make one attempt at a due delivery and record it; commits as it goes."""
    cfg = config or get_settings().webhooks
    started = now or utcnow()
    token = uuid.uuid4()
    claimed = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == DeliveryStatus.PENDING,
            WebhookDelivery.next_attempt_at <= started,
            or_(WebhookDelivery.locked_until.is_(None), WebhookDelivery.locked_until < started),
        )
        .values(locked_until=started + timedelta(seconds=cfg.lease_seconds), lock_token=token, dispatched_at=None)
        .returning(WebhookDelivery.id)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    session.commit()
    if claimed is None:
        return DeliveryOutcome.SKIPPED
    delivery = session.get_one(WebhookDelivery, delivery_id, populate_existing=True)
    if is_gone(session, delivery.owner, delivery.url):
        _finish(session, delivery, token, DeliveryStatus.STOPPED, f"not sent: {delivery.url} answered 410 Gone earlier")
        return DeliveryOutcome.STOPPED
    result = _send(session, delivery, store, cfg)
    return _record(session, delivery, token, result, started, cfg)


def _send(session: Session, delivery: WebhookDelivery, store: ObjectStore | None, cfg: WebhookSettings) -> HttpResult:
    try:
        secret = _signing_secret(session, delivery)
        body = _request_body(session, delivery, store or get_object_store())
        session.commit()  # the secret may have just been created
    except Exception as exc:  # recorded as a failed attempt, so a persistent fault ends with the schedule
        log.exception("webhook delivery %s: could not prepare the request", delivery.id)
        session.rollback()
        return HttpResult(None, f"internal error preparing the request: {type(exc).__name__}: {exc}", None, 0)
    if secret is None:
        return HttpResult(None, f"owner {delivery.owner!r} has no API key to sign deliveries with", None, 0)
    return post_signed(delivery.url, body, signed_headers(secret, delivery.webhook_id, body), cfg)


def post_signed(url: str, body: str, headers: dict[str, str], cfg: WebhookSettings) -> HttpResult:
    """POST to a checked address of `url` (never to a fresh DNS answer), without following redirects."""
    clock = time.monotonic()

    def elapsed_ms() -> int:
        return int((time.monotonic() - clock) * 1000)

    try:
        target = check_webhook_url(url, allow_hosts=cfg.allow_hosts, only_hosts=cfg.only_hosts)
    except WebhookUrlError as exc:
        return HttpResult(None, str(exc), None, elapsed_ms())
    request_headers = {
        **headers, "Host": target.host_header, "Content-Type": "application/json", "User-Agent": USER_AGENT,
    }
    extensions = {"sni_hostname": target.sni_hostname} if target.scheme == "https" and target.sni_hostname else {}
    errors = []
    with httpx.Client(timeout=cfg.timeout_seconds, follow_redirects=False, trust_env=False) as client:
        for address in target.addresses:
            try:
                with client.stream(
                    "POST", target.pinned_url(address), content=body.encode(), headers=request_headers,
                    extensions=extensions,
                ) as response:
                    return _result_of(response, elapsed_ms())
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                errors.append(f"{address}: {exc or type(exc).__name__}")  # try the host's next address
            except httpx.TimeoutException:
                return HttpResult(None, f"no answer within {cfg.timeout_seconds:g}s", None, elapsed_ms())
            except httpx.HTTPError as exc:
                return HttpResult(None, f"{type(exc).__name__}: {exc}", None, elapsed_ms())
    return HttpResult(None, "could not connect: " + "; ".join(errors), None, elapsed_ms())


def dispatch_due(session: Session, *, now: datetime | None = None, limit: int = 100) -> list[int]:
    """Mark up to `limit` due, unclaimed deliveries as dispatched and return their ids (publish after commit).

    SKIP LOCKED lets several pollers scan at once without waiting on each other or taking the same rows.
    A row dispatched recently is left alone unless its message evidently got lost.
    """
    now = now or utcnow()
    resend_before = now - timedelta(seconds=get_settings().webhooks.redispatch_after_seconds)
    due = (
        select(WebhookDelivery.id)
        .where(
            WebhookDelivery.status == DeliveryStatus.PENDING,
            WebhookDelivery.next_attempt_at <= now,
            or_(WebhookDelivery.locked_until.is_(None), WebhookDelivery.locked_until < now),
            or_(WebhookDelivery.dispatched_at.is_(None), WebhookDelivery.dispatched_at < resend_before),
        )
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    ids = session.scalars(
        update(WebhookDelivery)
        .where(WebhookDelivery.id.in_(due.scalar_subquery()))
        .values(dispatched_at=now)
        .returning(WebhookDelivery.id)
        .execution_options(synchronize_session=False)
    ).all()
    return list(ids)


def prune_deliveries(session: Session, *, now: datetime | None = None) -> int:
    """Delete finished deliveries past their keeping time, so frequent progress events do not pile up."""
    now = now or utcnow()
    finished = WebhookDelivery.finished_at.is_not(None)
    old_progress = (WebhookDelivery.event == PROGRESS_EVENT) & (WebhookDelivery.finished_at < now - timedelta(days=1))
    old_any = WebhookDelivery.finished_at < now - timedelta(days=get_settings().webhooks.keep_days)
    result = session.execute(
        delete(WebhookDelivery).where(finished, WebhookDelivery.status != DeliveryStatus.PENDING,
                                      old_progress | old_any).execution_options(synchronize_session=False)
    )
    return result.rowcount


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or HTTP-date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - (now or utcnow())).total_seconds(), 0.0)


def next_delay(result: HttpResult, step: int, cfg: WebhookSettings) -> float | None:
    """Seconds until the next attempt after failed attempt number `step` (0-based), or None: give up."""
    if step >= len(cfg.retry_schedule):
        return None
    if result.status_code in _RETRY_AFTER_CODES and result.retry_after is not None:
        return min(result.retry_after, cfg.max_retry_after_seconds)
    base = cfg.retry_schedule[step]
    return base * random.uniform(1 - cfg.jitter, 1 + cfg.jitter)


def _result_of(response: httpx.Response, duration_ms: int) -> HttpResult:
    code = response.status_code
    if 200 <= code < 300:
        return HttpResult(code, None, None, duration_ms)
    if 300 <= code < 400:
        where = response.headers.get("location", "?")
        return HttpResult(code, f"HTTP {code}: redirect to {where} not followed; point webhook_url at the final URL",
                          None, duration_ms)
    excerpt = b""
    for chunk in response.iter_bytes():
        excerpt += chunk
        if len(excerpt) >= _EXCERPT_BYTES:
            break
    text = excerpt[:_EXCERPT_BYTES].decode("utf-8", "replace").strip()
    error = f"HTTP {code}" + (f": {text}" if text else "")
    return HttpResult(code, error, parse_retry_after(response.headers.get("retry-after")), duration_ms)


def _signing_secret(session: Session, delivery: WebhookDelivery) -> str | None:
    """The submitting key's secret; if that key was deleted, the owner's oldest live key signs instead."""
    key = session.get(ApiKey, delivery.api_key_id) if delivery.api_key_id is not None else None
    if key is None:
        key = session.scalar(
            select(ApiKey).where(ApiKey.owner == delivery.owner, ApiKey.revoked_at.is_(None)).order_by(ApiKey.id)
        )
    return get_or_create_secret(session, key) if key is not None else None


def _request_body(session: Session, delivery: WebhookDelivery, store: ObjectStore) -> str:
    """The payload recorded at the event, with image URLs signed afresh: a retry days later must not carry
    URLs that expired an hour after the event (the images themselves never change)."""
    payload: dict[str, Any] = dict(delivery.payload)
    if payload.get("images"):
        keys = dict(
            session.execute(select(JobImage.index, JobImage.key).where(JobImage.job_id == delivery.job_id)).all()
        )
        expires = get_settings().services.url_expires_seconds
        payload["images"] = [
            {**image, "url": store.url(keys[image["index"]], expires)} if image.get("index") in keys else image
            for image in payload["images"]
        ]
    return json.dumps(payload, separators=(",", ":"))


def _record(
    session: Session, delivery: WebhookDelivery, token: uuid.UUID, result: HttpResult, started: datetime,
    cfg: WebhookSettings,
) -> DeliveryOutcome:
    finished = started + timedelta(milliseconds=result.duration_ms)
    session.add(
        WebhookAttempt(
            delivery_id=delivery.id, attempt=delivery.attempt_count + 1, started_at=started,
            duration_ms=result.duration_ms, status_code=result.status_code, error=result.error,
        )
    )
    values: dict[str, Any] = {
        "attempt_count": WebhookDelivery.attempt_count + 1, "last_status_code": result.status_code,
        "last_error": result.error, "locked_until": None, "lock_token": None,
    }
    delay = None
    if result.ok:
        outcome, values["status"] = DeliveryOutcome.DELIVERED, DeliveryStatus.DELIVERED
    elif result.status_code == 410:
        outcome, values["status"] = DeliveryOutcome.STOPPED, DeliveryStatus.STOPPED
        _stop_url(session, delivery, finished)
    elif delivery.event == PROGRESS_EVENT:  # best effort: a later event supersedes it anyway
        outcome, values["status"] = DeliveryOutcome.FAILED, DeliveryStatus.FAILED
    else:
        delay = next_delay(result, delivery.retry_step, cfg)
        if delay is None:
            outcome, values["status"] = DeliveryOutcome.FAILED, DeliveryStatus.FAILED
        else:
            outcome = DeliveryOutcome.RETRY_SCHEDULED
            values |= {"retry_step": WebhookDelivery.retry_step + 1,
                       "next_attempt_at": finished + timedelta(seconds=delay)}
    if delay is None:
        values |= {"next_attempt_at": None, "finished_at": finished}
    updated = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery.id, WebhookDelivery.lock_token == token)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if updated.rowcount == 0:
        log.warning("webhook delivery %s: attempt outlived its lease; its result is kept only as an attempt",
                    delivery.id)
    session.commit()
    log.info("webhook delivery %s (%s, %s) attempt %s: %s", delivery.id, delivery.event, delivery.webhook_id,
             delivery.attempt_count + 1, result.error or result.status_code)
    return outcome


def _finish(session: Session, delivery: WebhookDelivery, token: uuid.UUID, status: DeliveryStatus, error: str) -> None:
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery.id, WebhookDelivery.lock_token == token)
        .values(status=status, last_error=error, next_attempt_at=None, finished_at=utcnow(), locked_until=None,
                lock_token=None)
        .execution_options(synchronize_session=False)
    )
    session.commit()


def _stop_url(session: Session, delivery: WebhookDelivery, now: datetime) -> None:
    """410 Gone: remember the URL for this owner and stop every other pending delivery to it."""
    session.execute(
        insert(WebhookGoneEndpoint)
        .values(owner=delivery.owner, url_hash=url_hash(delivery.url), url=delivery.url, delivery_id=delivery.id,
                gone_at=now)
        .on_conflict_do_update(index_elements=["owner", "url_hash"], set_={"gone_at": now, "delivery_id": delivery.id})
    )
    session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.owner == delivery.owner, WebhookDelivery.url == delivery.url,
            WebhookDelivery.status == DeliveryStatus.PENDING, WebhookDelivery.id != delivery.id,
        )
        .values(status=DeliveryStatus.STOPPED, next_attempt_at=None, finished_at=now,
                last_error=f"stopped: {delivery.url} answered 410 Gone to delivery {delivery.id}")
        .execution_options(synchronize_session=False)
    )
