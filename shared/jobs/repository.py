"""Reading jobs. Every change to a job goes through `shared.jobs.lifecycle`."""

from __future__ import annotations

import uuid

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.db.models import Job
from shared.jobs.states import JobStatus


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


def held_job(session: Session, job_id: uuid.UUID, worker: str) -> Job | None:
    """The job while it runs under ``worker``'s lease (the leader of the batch it is rendering), else None."""
    return session.scalar(select(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING,
                                            Job.lease_owner == worker))
