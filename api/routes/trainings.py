"""Trainings (issue 15): embeddings and hypernetworks trained as farm jobs on the `train` queue.

A training is a job (`mode: "train"`): durable, leased, retried on a lost worker from its last checkpoint, canceled
like a render; these routes show it with its step, loss, ETA, previews and the installed result. Its job id also
answers at `/v1/jobs/{id}` (and its SSE stream and webhooks are a job's).
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, Query, status
from sqlalchemy import func, select

from api.deps import CachedKey, CurrentKey, SessionDep, SettingsDep, StoreDep
from api.limits import CREATE_LIMITS
from api.responses import CONFLICT, NOT_FOUND
from api.routes.jobs import IdempotencyKeyHeader
from api.submission import idempotency
from api.submission.training import submit_training
from shared.db.models import Job
from shared.db.session import get_session_factory
from shared.jobs import lifecycle, repository
from shared.jobs.schemas import ErrorView
from shared.jobs.states import JobStatus
from shared.jobs.training_schemas import (
    TrainingPage,
    TrainingPreview,
    TrainingRequest,
    TrainingResult,
    TrainingView,
)
from shared.jobs.training_spec import TEMPLATES, TRAIN_MODE
from shared.storage.base import ObjectStore

router = APIRouter(prefix="/v1/trainings", tags=["trainings"])


def training_view(job: Job, store: ObjectStore, url_expires: int) -> TrainingView:
    """A training job as its owner sees it: the row's status, and its own state (`jobs.training`)."""
    params, state = job.params, dict(job.training or {})
    checkpoint = state.get("checkpoint") or {}
    result = state.get("result")
    running = job.status == JobStatus.RUNNING
    return TrainingView(
        id=job.id, kind=str(params.get("kind")), name=str(params.get("name")), status=JobStatus(job.status),
        status_seq=job.status_seq, model=job.model_name, dataset=str(params.get("dataset")),
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at, attempt=job.attempt,
        progress=job.progress, step=int(state.get("step") or 0), steps=int(params.get("steps") or 0),
        loss=state.get("loss"), learn_rate=state.get("learn_rate"),
        eta_seconds=state.get("eta_seconds") if running else None,
        losses=[list(pair) for pair in state.get("losses") or []],
        checkpoint_step=checkpoint.get("step"),
        previews=[TrainingPreview(step=p["step"], url=store.url(p["key"], url_expires), prompt=p.get("prompt", ""))
                  for p in state.get("previews") or []],
        result=TrainingResult(**result) if result else None, probe_loss=state.get("probe_loss"),
        params={k: v for k, v in params.items() if k != "items"},
        error=ErrorView(type=job.error_type, message=job.error_message or "") if job.error_type else None,
        links={"self": f"/v1/trainings/{job.id}", "job": f"/v1/jobs/{job.id}", "events": f"/v1/jobs/{job.id}/events"},
    )


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=TrainingView, dependencies=CREATE_LIMITS,
             responses=CONFLICT)
def create_training(body: Annotated[TrainingRequest, Body()], key: CachedKey, settings: SettingsDep,
                    store: StoreDep, idempotency_key: IdempotencyKeyHeader = None) -> TrainingView:
    """Queue a training; a bad field is a 422 naming it, with nothing stored."""
    with get_session_factory()() as session:
        try:
            submitted = submit_training(session, key, body, settings, store, idempotency_key=idempotency_key)
        except idempotency.IdempotencyConflict as exc:
            raise HTTPException(status.HTTP_409_CONFLICT,
                                detail="a request with this Idempotency-Key is still being processed") from exc
        return training_view(submitted.job, store, settings.services.url_expires_seconds)


@router.get("/templates")
def list_templates() -> dict[str, Any]:
    """The prompt templates a training may name (`template_filename`), with their lines."""
    return {"templates": [{"name": name, "lines": list(lines)} for name, lines in TEMPLATES.items()]}


def _mine(session: Any, training_id: uuid.UUID, owner: str) -> Job:
    job = repository.get_job(session, training_id, owner=owner)
    if job is None or job.mode != TRAIN_MODE:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"training {training_id} not found")
    return job


@router.get("/{training_id}", response_model=TrainingView, responses=NOT_FOUND)
def get_training(training_id: uuid.UUID, key: CurrentKey, session: SessionDep, settings: SettingsDep,
                 store: StoreDep) -> TrainingView:
    return training_view(_mine(session, training_id, key.owner), store, settings.services.url_expires_seconds)


@router.get("", response_model=TrainingPage)
def list_trainings(key: CurrentKey, session: SessionDep, settings: SettingsDep, store: StoreDep,
                   status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
                   limit: Annotated[int, Query(ge=1, le=200)] = 20,
                   offset: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0) -> TrainingPage:
    """The caller's trainings, newest first."""
    where = [Job.owner == key.owner, Job.mode == TRAIN_MODE]
    if status_filter is not None:
        where.append(Job.status == status_filter)
    rows = session.scalars(select(Job).where(*where).order_by(Job.created_at.desc(), Job.id).limit(limit)
                           .offset(offset)).all()
    total = int(session.scalar(select(func.count()).select_from(Job).where(*where)) or 0)
    expires = settings.services.url_expires_seconds
    return TrainingPage(trainings=[training_view(job, store, expires) for job in rows], total=total, limit=limit,
                        offset=offset)


@router.post("/{training_id}/cancel", response_model=TrainingView, responses={**NOT_FOUND, **CONFLICT})
def cancel_training(training_id: uuid.UUID, key: CurrentKey, session: SessionDep, settings: SettingsDep,
                    store: StoreDep) -> TrainingView:
    """A queued training is canceled at once; a running one stops at its next step, keeping its last checkpoint."""
    job = _mine(session, training_id, key.owner)
    outcome = lifecycle.cancel(session, job.id)
    lifecycle.commit(session)
    session.refresh(job)
    if outcome == lifecycle.CancelOutcome.ALREADY_TERMINAL and job.status != JobStatus.CANCELED:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            detail=f"training {training_id} already {job.status}; nothing to cancel")
    return training_view(job, store, settings.services.url_expires_seconds)
