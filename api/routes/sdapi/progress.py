"""``GET progress``, ``POST interrupt`` and ``POST skip``: about the caller's own jobs only.

The WebUI has one global job, so its progress is everyone's. Here "the current job" is the
caller's most recent one, and ``job_count`` counts the caller's queued and running jobs, which is
what ``webuiapi.util_wait_for_ready`` waits on. ``eta_relative`` is that job's seconds to done: from its
progress while it runs, estimated from its queue position while it waits (`shared.jobs.views.queued_eta`).
Interrupt and skip cancel the caller's running jobs (the farm cannot skip one image of a batch; skip stops
the job like interrupt).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import SessionDep, SettingsDep
from api.sdapi.auth import SdapiKey
from api.sdapi.info import job_timestamp
from shared.db.models import Job
from shared.jobs import lifecycle, repository
from shared.jobs.states import JobStatus
from shared.jobs.views import eta_seconds, poll_position
from shared.settings import Settings

router = APIRouter()


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict[str, Any]
    current_image: str | None = None
    textinfo: str | None = None


def _textinfo(job: repository.JobRecord, position: int | None) -> str:
    if job.status == JobStatus.QUEUED:
        return f"job {job.id} queued, position {position}"
    if job.status == JobStatus.RUNNING:
        return f"job {job.id} running on {job.lease_owner or 'a worker'}"
    return f"job {job.id} {job.status}"


async def _progress(owner: str, settings: Settings) -> ProgressResponse:
    fair = settings.fair_share.fair_share
    found, active = await repository.get_latest_job_row(owner, fair)
    job = found.job if found is not None else None
    position = await poll_position(found, settings) if found is not None else None
    running_job = job if job is not None and job.status == JobStatus.RUNNING else None
    running = running_job is not None
    total = int(job.params.get("steps", 0)) * int(job.params.get("n_iter", 1)) if job is not None else 0
    state = {
        "skipped": False,
        "interrupted": job is not None and job.status == JobStatus.CANCELED,
        "stopping_generation": job is not None and job.cancel_requested_at is not None and running,
        "job": f"job {job.id}" if job is not None else "",
        "job_count": active,
        "job_timestamp": job_timestamp(job) if job is not None else "0",
        "job_no": 0,
        "sampling_step": round(running_job.progress * total) if running_job is not None else 0,
        "sampling_steps": total if job is not None else 0,
    }
    return ProgressResponse(
        progress=running_job.progress if running_job is not None else 0.0,
        # Running: from its progress; queued: estimated from its queue position and the fleet's pace (0 unknown).
        eta_relative=(eta_seconds(job, position) or 0.0) if job is not None else 0.0,
        state=state,
        textinfo=_textinfo(job, position) if job is not None else None,
    )


@router.get("/progress", response_model=ProgressResponse)
async def progress(key: SdapiKey, settings: SettingsDep, skip_current_image: bool = False) -> ProgressResponse:
    """The caller's newest job, in one statement (`repository.get_latest_job_row`); ``job_count`` counts the
    caller's queued and running jobs up to 1,000."""
    return await _progress(key.owner, settings)


def _cancel_running(key: SdapiKey, session: Session) -> dict[str, Any]:
    jobs = session.scalars(select(Job.id).where(Job.owner == key.owner, Job.status == JobStatus.RUNNING)).all()
    for job_id in jobs:
        lifecycle.cancel(session, job_id)
    lifecycle.commit(session)
    return {}


@router.post("/interrupt")
def interrupt(key: SdapiKey, session: SessionDep) -> dict[str, Any]:
    """Stops the caller's running jobs at their next denoising step; other users' jobs are untouched."""
    return _cancel_running(key, session)


@router.post("/skip")
def skip(key: SdapiKey, session: SessionDep) -> dict[str, Any]:
    return _cancel_running(key, session)
