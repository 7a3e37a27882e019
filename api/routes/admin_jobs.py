"""Jobs as an operator sees them: every owner's, newest first, with cancel and retry.

Retry renders a failed (or canceled) job again as a *new* job with the same parameters, owner and
webhook (`shared.jobs.lifecycle.retry`): finished states are final, so the old row keeps its history
and the new one goes through the queue like any other.
"""

from __future__ import annotations

import logging
import uuid
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status

from api.admin import queries as admin_queries
from api.admin.views import AdminJobDetail, AdminJobList, AdminJobSummary, CancelResult, RetryResult
from api.deps import AdminKey, SessionDep, SettingsDep, StoreDep
from api.responses import CONFLICT, NOT_FOUND
from shared.db.models import Job
from shared.jobs import lifecycle, repository
from shared.jobs.schemas import ErrorView, JobView
from shared.jobs.states import JobStatus
from shared.jobs.training_spec import TRAIN_MODE
from shared.jobs.views import job_view, queue_position
from shared.queueing.routing import get_router
from shared.storage.base import ObjectStore
from shared.storage.local import LocalObjectStore

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/admin/jobs", tags=["admin"])


def thumbnail_url(store: ObjectStore, key: str, expires: int) -> str:
    """An image link for the page; the local store's files are served by this same API, so its links are
    made relative and work whatever host name the operator reached the dashboard by."""
    url = store.url(key, expires)
    if isinstance(store, LocalObjectStore) and url.startswith(store.public_base_url + "/"):
        return url[len(store.public_base_url):]
    return url


def _described(mode: str, params: dict) -> str:
    """What the dashboard's prompt column says: a render's prompt, or what a training trains."""
    if mode == TRAIN_MODE:
        return f"training: {params.get('kind')} {params.get('name')}, {params.get('steps')} steps"
    return str(params.get("prompt", ""))


def _size(mode: str, params: dict) -> str:
    if mode == TRAIN_MODE:
        return f"{params.get('training_width')}x{params.get('training_height')}"
    return f"{params.get('width')}x{params.get('height')}"


def summary(job: Job, store: ObjectStore, expires: int) -> AdminJobSummary:
    params = job.params or {}
    duration = (job.finished_at - job.started_at).total_seconds() if job.finished_at and job.started_at else None
    return AdminJobSummary(
        id=job.id, owner=job.owner, model=job.model_name, status=job.status,
        prompt=_described(job.mode, params)[:200], size=_size(job.mode, params),
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
        duration_seconds=round(duration, 3) if duration is not None else None,
        progress=job.progress, attempt=job.attempt,
        error=ErrorView(type=job.error_type, message=job.error_message or "") if job.error_type else None,
        thumbnail_url=thumbnail_url(store, job.images[0].key, expires) if job.images else None,
        image_count=len(job.images),
    )


@router.get("", response_model=AdminJobList)
def list_recent_jobs(
    _: AdminKey, session: SessionDep, settings: SettingsDep, store: StoreDep,
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 25,
) -> AdminJobList:
    jobs = admin_queries.recent_jobs(session, limit=limit, status=status_filter)
    return AdminJobList(jobs=[summary(j, store, settings.services.url_expires_seconds) for j in jobs], limit=limit)


def _job_or_404(session: SessionDep, job_id: uuid.UUID) -> Job:
    job = repository.get_job(session, job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} not found")
    return job


@router.get("/{job_id}", response_model=AdminJobDetail, responses=NOT_FOUND)
def get_any_job(
    job_id: uuid.UUID, _: AdminKey, session: SessionDep, settings: SettingsDep, store: StoreDep
) -> AdminJobDetail:
    job = _job_or_404(session, job_id)
    view = job_view(job, store, settings.services.url_expires_seconds)
    for image, row in zip(view.images, job.images, strict=True):
        image.url = thumbnail_url(store, row.key, settings.services.url_expires_seconds)
    return AdminJobDetail(owner=job.owner, cancel_requested=job.cancel_requested_at is not None, job=view)


@router.post("/{job_id}/cancel", response_model=CancelResult, responses={**NOT_FOUND, **CONFLICT})
def cancel_any_job(
    job_id: uuid.UUID, _: AdminKey, session: SessionDep, settings: SettingsDep, store: StoreDep
) -> CancelResult:
    """A queued job is canceled at once; a running one is asked to stop at its next step."""
    _job_or_404(session, job_id)
    outcome = lifecycle.cancel(session, job_id)
    lifecycle.commit(session)
    job = _job_or_404(session, job_id)
    session.refresh(job)
    return CancelResult(outcome=outcome, job=job_view(job, store, settings.services.url_expires_seconds))


@router.post("/{job_id}/retry", response_model=RetryResult, status_code=status.HTTP_202_ACCEPTED,
             responses={**NOT_FOUND, **CONFLICT})
def retry_job(
    job_id: uuid.UUID, _: AdminKey, session: SessionDep, settings: SettingsDep, store: StoreDep
) -> RetryResult:
    old = _job_or_404(session, job_id)
    try:
        job = lifecycle.retry(session, old, route=get_router().queue_for(old.model_name))
    except lifecycle.NotRetryable as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from exc
    lifecycle.commit(session)  # commit, then publish: a lost message costs a re-publish, never the job
    session.refresh(job)
    return RetryResult(retry_of=job_id, job=job_view(job, store, settings.services.url_expires_seconds))


@router.post("/{job_id}/front", response_model=JobView, responses={**NOT_FOUND, **CONFLICT})
def move_job_to_front(
    job_id: uuid.UUID, _: AdminKey, session: SessionDep, settings: SettingsDep, store: StoreDep
) -> JobView:
    """The queued job runs next, ahead of fair share and priorities (among jobs moved to the front, the first
    moved runs first). Its message is sent again, so a worker takes it at its next claim."""
    _job_or_404(session, job_id)
    if not lifecycle.move_to_front(session, job_id):
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"job {job_id} is not queued; only a queued job can "
                                                              "be moved to the front")
    lifecycle.commit(session)
    job = _job_or_404(session, job_id)
    session.refresh(job)
    return job_view(job, store, settings.services.url_expires_seconds, queue_position(session, job, 0.0))
