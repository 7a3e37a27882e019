"""Submitting a job, shared by `POST /v1/jobs` and the WebUI API (`/sdapi/v1/txt2img|img2img`).

Order matters and is the same for every caller: every check first (nothing is stored for bad
input), the Idempotency-Key reservation, the input images written, the row and its `queued`
event committed together, and only then the broker message (commit, then publish).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy.orm import Session

from api.submission import idempotency
from api.submission.inputs import stage_inputs
from api.submission.params import JobPlan, plan_job
from shared.db.models import ApiKey, Job
from shared.errors import FieldError
from shared.jobs import lifecycle, repository
from shared.jobs.schemas import Txt2ImgRequest
from shared.queueing.routing import get_router
from shared.settings import Settings
from shared.storage.base import ObjectStore
from shared.webhooks.outbox import check_webhook_events
from shared.webhooks.ssrf import WebhookUrlError, check_webhook_url

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Submitted:
    job: Job
    plan: JobPlan
    replayed: bool  # an earlier request with the same Idempotency-Key made this job


def check_webhook(body: Txt2ImgRequest) -> list[str] | None:
    """The SSRF guard runs at submit (and again at delivery): private and loopback targets are refused."""
    if body.webhook_url is not None:
        try:
            check_webhook_url(body.webhook_url)
        except WebhookUrlError as exc:
            raise FieldError(("body", "webhook_url"), str(exc)) from exc
    try:
        return check_webhook_events(body.webhook_events)
    except ValueError as exc:
        raise FieldError(("body", "webhook_events"), str(exc)) from exc


def submit_job(
    session: Session,
    key: ApiKey,
    body: Txt2ImgRequest,
    settings: Settings,
    store: ObjectStore,
    *,
    idempotency_key: str | None = None,
    mark_published: lifecycle.MarkPublished | None = None,
    skipped_loras: list[str] | None = None,
) -> Submitted:
    """Create and enqueue a job; raises FieldError (nothing stored) on bad input and
    idempotency.IdempotencyConflict while a request with the same key is in flight.
    `skipped_loras`: collect unknown prompt-tag LoRAs there instead of refusing them (the WebUI API)."""
    plan = plan_job(body, settings, skipped_loras=skipped_loras)
    webhook_events = check_webhook(body)
    # Input images last: the costliest check. Nothing is stored until every check has passed.
    inputs = stage_inputs(plan.request.init_images, plan.request.mask, owner=key.owner, store=store,
                          settings=settings, controls=[(unit.image, unit.mask) for unit in plan.units])
    params = plan.with_inputs(inputs.init_keys, inputs.mask_key, inputs.control_keys).to_stored()

    if idempotency_key is not None:
        try:
            reservation = idempotency.reserve(
                session, key.id, idempotency_key, idempotency.fingerprint(body.model_dump(mode="json"))
            )
        except idempotency.IdempotencyMismatch as exc:
            raise FieldError(
                ("header", "Idempotency-Key"), "this Idempotency-Key was already used with a different request body"
            ) from exc
        if reservation.job_id is not None:
            earlier = repository.get_job(session, reservation.job_id, owner=key.owner)
            if earlier is not None:
                return Submitted(earlier, plan, replayed=True)

    route = get_router().queue_for(plan.checkpoint.name)

    try:
        inputs.write(store)  # before the row commits: a worker must find them as soon as the job exists
        job = lifecycle.submit(
            session, owner=key.owner, api_key_id=key.id, params=params, model_name=plan.checkpoint.name,
            route=route, max_attempts=settings.jobs.max_attempts, webhook_url=body.webhook_url,
            webhook_events=webhook_events,
        )
        if idempotency_key is not None:
            idempotency.attach_job(session, key.id, idempotency_key, job.id)
        lifecycle.commit(session, mark_published=mark_published)
    except Exception:
        session.rollback()
        if idempotency_key is not None:
            idempotency.release(session, key.id, idempotency_key)
        inputs.discard(store)
        raise
    return Submitted(job, plan, replayed=False)
