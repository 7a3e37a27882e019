"""Every job state change goes through here.

Claims and completions are compare-and-set UPDATEs: a duplicate delivery, a second
worker or a stale lease holder finds no row to change and does nothing. Each change
checks the allowed transition and bumps `status_seq`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shared.clock import utcnow
from shared.db.models import Job, JobImage
from shared.jobs.states import ALLOWED_TRANSITIONS, JobStatus


@dataclass(frozen=True)
class NewImage:
    index: int
    key: str
    seed: int
    width: int
    height: int
    infotext: str


def _sources_for(target: JobStatus) -> list[str]:
    return [str(src) for src, targets in ALLOWED_TRANSITIONS.items() if target in targets]


def create_job(
    session: Session,
    *,
    owner: str,
    api_key_id: int | None,
    params: dict[str, Any],
    model_name: str,
    model_hash: str | None,
    max_attempts: int = 3,
    webhook_url: str | None = None,
    webhook_events: list[str] | None = None,
    route: str | None = None,
) -> Job:
    job = Job(
        id=uuid.uuid4(),
        owner=owner,
        api_key_id=api_key_id,
        mode=params.get("mode", "txt2img"),
        status=JobStatus.QUEUED,
        status_seq=1,
        params=params,
        model_name=model_name,
        model_hash=model_hash,
        seed=params["seed"],
        max_attempts=max_attempts,
        webhook_url=webhook_url,
        webhook_events=webhook_events,
        route=route,
    )
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, job_id: uuid.UUID, owner: str | None = None) -> Job | None:
    """The job, or None when it does not exist or belongs to another owner (owner=None: any)."""
    job = session.get(Job, job_id)
    if job is None or (owner is not None and job.owner != owner):
        return None
    return job


def list_jobs(
    session: Session, owner: str, *, status: JobStatus | None = None, limit: int = 20, offset: int = 0
) -> tuple[list[Job], int]:
    query = select(Job).where(Job.owner == owner)
    count = select(func.count()).select_from(Job).where(Job.owner == owner)
    if status is not None:
        query = query.where(Job.status == status)
        count = count.where(Job.status == status)
    rows = session.scalars(query.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)).all()
    return list(rows), int(session.scalar(count) or 0)


def mark_published(session: Session, job_id: uuid.UUID) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(published_at=utcnow()))


def claim_job(session: Session, job_id: uuid.UUID, worker: str, lease_seconds: int) -> Job | None:
    """queued -> running for exactly one caller; everybody else gets None."""
    now = utcnow()
    claimed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
        .values(
            status=JobStatus.RUNNING,
            status_seq=Job.status_seq + 1,
            attempt=Job.attempt + 1,
            lease_owner=worker,
            lease_until=now + timedelta(seconds=lease_seconds),
            started_at=now,
            progress=0.0,
        )
        .returning(Job.id)
    ).scalar_one_or_none()
    if claimed is None:
        return None
    session.flush()
    job = session.get(Job, job_id, populate_existing=True)
    return job


def renew_lease(session: Session, job_id: uuid.UUID, worker: str, lease_seconds: int) -> bool:
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.lease_owner == worker)
        .values(lease_until=utcnow() + timedelta(seconds=lease_seconds))
    )
    return result.rowcount == 1


def set_progress(session: Session, job_id: uuid.UUID, worker: str, progress: float) -> None:
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.lease_owner == worker)
        .values(progress=progress)
    )


def complete_job(
    session: Session, job_id: uuid.UUID, worker: str, images: list[NewImage], model_hash: str | None = None
) -> bool:
    """running -> succeeded with its outputs, in the caller's transaction; False if the lease was lost."""
    extra = {"model_hash": model_hash} if model_hash else {}
    done = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(_sources_for(JobStatus.SUCCEEDED)), Job.lease_owner == worker)
        .values(
            **extra,
            status=JobStatus.SUCCEEDED,
            status_seq=Job.status_seq + 1,
            finished_at=utcnow(),
            progress=1.0,
            lease_until=None,
        )
        .returning(Job.id)
    ).scalar_one_or_none()
    if done is None:
        return False
    for image in images:
        session.add(
            JobImage(
                job_id=job_id,
                index=image.index,
                key=image.key,
                seed=image.seed,
                width=image.width,
                height=image.height,
                infotext=image.infotext,
            )
        )
    session.flush()
    return True


def fail_job(
    session: Session, job_id: uuid.UUID, error_type: str, message: str, *, worker: str | None = None
) -> bool:
    """-> failed with a kind and a message a user can act on; only the lease holder may fail a running job."""
    conditions = [Job.id == job_id, Job.status.in_(_sources_for(JobStatus.FAILED))]
    if worker is not None:
        conditions.append(Job.lease_owner == worker)
    done = session.execute(
        update(Job)
        .where(*conditions)
        .values(
            status=JobStatus.FAILED,
            status_seq=Job.status_seq + 1,
            finished_at=utcnow(),
            error_type=error_type,
            error_message=message[:4000],
            lease_until=None,
        )
        .returning(Job.id)
    ).scalar_one_or_none()
    return done is not None


class CancelOutcome:
    CANCELED = "canceled"  # was queued: canceled at once, never renders
    REQUESTED = "requested"  # is running: its worker stops at the next step
    ALREADY_TERMINAL = "terminal"


def cancel_job(session: Session, job_id: uuid.UUID) -> str:
    """Cancel a queued job at once or ask a running one to stop; repeating a cancel is harmless."""
    now = utcnow()
    canceled = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.CANCELED, status_seq=Job.status_seq + 1, finished_at=now, cancel_requested_at=now)
        .returning(Job.id)
    ).scalar_one_or_none()
    if canceled is not None:
        return CancelOutcome.CANCELED
    requested = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING)
        .values(cancel_requested_at=func.coalesce(Job.cancel_requested_at, now))
        .returning(Job.id)
    ).scalar_one_or_none()
    return CancelOutcome.REQUESTED if requested is not None else CancelOutcome.ALREADY_TERMINAL


def cancel_requested(session: Session, job_id: uuid.UUID) -> bool:
    return session.scalar(select(Job.cancel_requested_at).where(Job.id == job_id)) is not None


def finish_canceled(session: Session, job_id: uuid.UUID, worker: str) -> bool:
    """running -> canceled by the worker that stopped it; its partial images are not recorded."""
    done = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.lease_owner == worker)
        .values(status=JobStatus.CANCELED, status_seq=Job.status_seq + 1, finished_at=utcnow(), lease_until=None)
        .returning(Job.id)
    ).scalar_one_or_none()
    return done is not None
