"""Job submission and polling: validate, persist, commit, then publish."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Body, Header, HTTPException, Query, status
from pydantic import Discriminator, Tag

from api.deps import CurrentKey, SessionDep, SettingsDep, StoreDep
from api.responses import CONFLICT, NOT_FOUND
from api.submission import idempotency, submit
from shared.db.session import get_session_factory
from shared.jobs import lifecycle, repository
from shared.jobs.schemas import JobListView, JobView, Txt2ImgRequest, UpscaleRequest
from shared.jobs.states import JobStatus
from shared.jobs.views import job_view, queue_position

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


IdempotencyKeyHeader = Annotated[
    str | None,
    Header(alias="Idempotency-Key", max_length=255, description="same key + same body = the same job"),
]


def _job_kind(value: object) -> str:
    """Which request a body is: ``mode: "upscale"`` is an upscale job, anything else a render (txt2img/img2img)."""
    mode = value.get("mode") if isinstance(value, dict) else getattr(value, "mode", None)
    return UPSCALE_TAG if mode == "upscale" else RENDER_TAG


# Tags of the body's two shapes; the validation error handler leaves them out of an error's location.
RENDER_TAG, UPSCALE_TAG = "render", "upscale"
JobRequest = Annotated[
    Annotated[Txt2ImgRequest, Tag(RENDER_TAG)] | Annotated[UpscaleRequest, Tag(UPSCALE_TAG)],
    Discriminator(_job_kind),
]


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobView)
def submit_job(
    body: Annotated[JobRequest, Body(description="a render (txt2img, img2img; the default) or, with "
                                                 "mode \"upscale\", an upscale job (the WebUI's Extras)")],
    key: CurrentKey,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    background: BackgroundTasks,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JobView:
    def mark_published_after_response(job_ids: list[uuid.UUID]) -> None:
        background.add_task(_mark_published, job_ids)

    try:
        if isinstance(body, UpscaleRequest):
            submitted = submit.submit_upscale(session, key, body, settings, store, idempotency_key=idempotency_key,
                                              mark_published=mark_published_after_response)
        else:
            submitted = submit.submit_job(session, key, body, settings, store, idempotency_key=idempotency_key,
                                          mark_published=mark_published_after_response)
    except idempotency.IdempotencyConflict as exc:
        raise HTTPException(
            status.HTTP_409_CONFLICT, detail="a request with this Idempotency-Key is still being processed"
        ) from exc
    job = submitted.job
    position = None if submitted.replayed else queue_position(session, job)
    view = job_view(job, store, settings.services.url_expires_seconds, position)
    # Hand the connection back now: the background task takes one of its own before this request's session
    # dependency exits, and 15 requests each holding one while waiting for another emptied the pool
    # (QueuePool timeouts with 24 concurrent submits, bench/batching.py).
    session.close()
    return view


def _mark_published(job_ids: list[uuid.UUID]) -> None:
    """After the response: the recovery loop only needs this to tell published jobs from orphans."""
    with get_session_factory()() as session:
        lifecycle.mark_jobs_published(session, job_ids)
        session.commit()


@router.get("/{job_id}", response_model=JobView, responses=NOT_FOUND)
def get_job(job_id: uuid.UUID, key: CurrentKey, session: SessionDep, settings: SettingsDep, store: StoreDep) -> JobView:
    job = repository.get_job(session, job_id, owner=key.owner)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} not found")
    return job_view(job, store, settings.services.url_expires_seconds, queue_position(session, job))


@router.post("/{job_id}/cancel", response_model=JobView, responses={**NOT_FOUND, **CONFLICT})
def cancel_job(job_id: uuid.UUID, key: CurrentKey, session: SessionDep, settings: SettingsDep,
               store: StoreDep) -> JobView:
    """A queued job is canceled at once; a running one stops at its next denoising step."""
    job = repository.get_job(session, job_id, owner=key.owner)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} not found")
    outcome = lifecycle.cancel(session, job_id)
    lifecycle.commit(session)
    session.refresh(job)
    if outcome == lifecycle.CancelOutcome.ALREADY_TERMINAL and job.status != JobStatus.CANCELED:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"job {job_id} already {job.status}; nothing to cancel")
    return job_view(job, store, settings.services.url_expires_seconds)


@router.get("", response_model=JobListView)
def list_jobs(
    key: CurrentKey,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    offset: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,  # PostgreSQL's bigint
) -> JobListView:
    jobs, total = repository.list_jobs(session, key.owner, status=status_filter, limit=limit, offset=offset)
    return JobListView(
        jobs=[job_view(j, store, settings.services.url_expires_seconds) for j in jobs], total=total, limit=limit,
        offset=offset,
    )
