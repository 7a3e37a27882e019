"""Job submission and polling: validate, persist, commit, then publish."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Header, HTTPException, Query, status

from api.deps import CurrentKey, SessionDep, SettingsDep, StoreDep
from shared.db.session import get_session_factory
from shared.errors import FieldError
from shared.jobs import idempotency, repository
from shared.jobs.events import publish_events, record_event
from shared.jobs.schemas import JobListView, JobView, Txt2ImgRequest, check_limits, resolve_params
from shared.jobs.states import JobStatus
from shared.jobs.views import job_view, queue_position
from shared.model_registry import default_checkpoint, resolve_checkpoint
from shared.queue import publish_render
from shared.webhooks.outbox import check_webhook_events
from shared.webhooks.ssrf import WebhookUrlError, check_webhook_url

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


IdempotencyKeyHeader = Annotated[
    str | None,
    Header(alias="Idempotency-Key", max_length=255, description="same key + same body = the same job"),
]


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobView)
def submit_job(
    body: Txt2ImgRequest,
    key: CurrentKey,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    background: BackgroundTasks,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JobView:
    check_limits(body, settings)
    requested = body.model or default_checkpoint(settings.models_dir, settings.default_model)
    if requested is None:
        raise FieldError(("body", "model"), "no checkpoint is installed; put a .safetensors file in Stable-diffusion/")
    checkpoint = resolve_checkpoint(settings.models_dir, requested)
    params = resolve_params(body, checkpoint.name)
    webhook_events = check_webhook(body)

    if idempotency_key is not None:
        try:
            reservation = idempotency.reserve(
                session, key.id, idempotency_key, idempotency.fingerprint(body.model_dump(mode="json"))
            )
        except idempotency.IdempotencyMismatch as exc:
            raise FieldError(
                ("header", "Idempotency-Key"), "this Idempotency-Key was already used with a different request body"
            ) from exc
        except idempotency.IdempotencyConflict as exc:
            raise HTTPException(
                status.HTTP_409_CONFLICT, detail="a request with this Idempotency-Key is still being processed"
            ) from exc
        if reservation.job_id is not None:
            job = repository.get_job(session, reservation.job_id, owner=key.owner)
            if job is not None:
                return job_view(job, store, settings.url_expires_seconds)

    try:
        job = repository.create_job(
            session, owner=key.owner, api_key_id=key.id, params=params, model_name=checkpoint.name,
            model_hash=None, max_attempts=settings.max_attempts, webhook_url=body.webhook_url,
            webhook_events=webhook_events,
        )
        if idempotency_key is not None:
            idempotency.attach_job(session, key.id, idempotency_key, job.id)
        deliveries = record_event(session, job.id)
        session.commit()
    except Exception:
        session.rollback()
        if idempotency_key is not None:
            idempotency.release(session, key.id, idempotency_key)
        raise
    # Commit, then publish: a lost message costs a re-publish, never the job.
    publish_events(deliveries)
    try:
        publish_render(job.id)
        background.add_task(_mark_published, job.id)
    except Exception:  # the row is queued and unpublished; the sweeper publishes it
        log.exception("could not publish job %s; it stays queued for the sweeper", job.id)
    return job_view(job, store, settings.url_expires_seconds, queue_position(session, job))


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


def _mark_published(job_id: uuid.UUID) -> None:
    """After the response: the sweeper only needs this to tell published jobs from orphans."""
    with get_session_factory()() as session:
        repository.mark_published(session, job_id)
        session.commit()


@router.get("/{job_id}", response_model=JobView)
def get_job(job_id: uuid.UUID, key: CurrentKey, session: SessionDep, settings: SettingsDep, store: StoreDep) -> JobView:
    job = repository.get_job(session, job_id, owner=key.owner)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} not found")
    return job_view(job, store, settings.url_expires_seconds, queue_position(session, job))


@router.post("/{job_id}/cancel", response_model=JobView)
def cancel_job(job_id: uuid.UUID, key: CurrentKey, session: SessionDep, settings: SettingsDep,
               store: StoreDep) -> JobView:
    """A queued job is canceled at once; a running one stops at its next denoising step."""
    job = repository.get_job(session, job_id, owner=key.owner)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} not found")
    outcome = repository.cancel_job(session, job_id)
    deliveries = record_event(session, job_id) if outcome == repository.CancelOutcome.CANCELED else []
    session.commit()
    publish_events(deliveries)
    session.refresh(job)
    if outcome == repository.CancelOutcome.ALREADY_TERMINAL and job.status != JobStatus.CANCELED:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"job {job_id} already {job.status}; nothing to cancel")
    return job_view(job, store, settings.url_expires_seconds)


@router.get("", response_model=JobListView)
def list_jobs(
    key: CurrentKey,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> JobListView:
    jobs, total = repository.list_jobs(session, key.owner, status=status_filter, limit=limit, offset=offset)
    return JobListView(
        jobs=[job_view(j, store, settings.url_expires_seconds) for j in jobs], total=total, limit=limit, offset=offset
    )
