"""Create a farm job from a farm request, outside any route: the WebUI API's way into the job system.

Both go through ``api.submission.submit.submit_job``: the same checks, input staging, row and
commit-then-publish as ``POST /v1/jobs``.
"""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.submission.params import JobPlan
from api.submission.submit import submit_job
from shared.db.models import ApiKey, Job
from shared.jobs.schemas import Txt2ImgRequest
from shared.jobs.states import JobStatus
from shared.settings import Settings
from shared.storage.base import ObjectStore

__all__ = ["create_job_from_request", "job_status"]



def create_job_from_request(session: Session, key: ApiKey, request: Txt2ImgRequest, settings: Settings,
                            store: ObjectStore, skipped_loras: list[str] | None = None) -> tuple[Job, JobPlan]:
    """The same submit flow as ``POST /v1/jobs`` (api.submission.submit); raises FieldError on bad input.

    Like the WebUI's API, an unknown LoRA named by a prompt tag does not refuse the call: pass a list
    as `skipped_loras` and its name lands there (for a warning in `info`)."""
    submitted = submit_job(session, key, request, settings, store, skipped_loras=skipped_loras)
    assert isinstance(submitted.plan, JobPlan)
    return submitted.job, submitted.plan


def job_status(session: Session, job_id: uuid.UUID) -> JobStatus | None:
    """A fresh read of the row's status (Postgres decides); None when the row is gone."""
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    return JobStatus(status) if status is not None else None
