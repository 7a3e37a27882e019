"""Turn job rows into the JSON a client sees."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.clock import utcnow
from shared.db.models import Job
from shared.jobs.schemas import ErrorView, ImageView, JobView
from shared.jobs.states import JobStatus
from shared.storage.base import ObjectStore


def image_seeds(params: dict) -> list[int]:
    """Image k of batch_size x n_iter uses seed + k (the WebUI's rule); with a variation strength every
    image keeps the seed and the variation seed counts up instead."""
    count = int(params.get("batch_size", 1)) * int(params.get("n_iter", 1))
    if float(params.get("subseed_strength") or 0) > 0:
        return [int(params["seed"])] * count
    return [int(params["seed"]) + k for k in range(count)]


def queue_position(session: Session, job: Job) -> int | None:
    """1 + the queued jobs created before this one (first come, first served)."""
    if job.status != JobStatus.QUEUED:
        return None
    ahead = session.scalar(
        select(func.count()).select_from(Job).where(Job.status == JobStatus.QUEUED, Job.created_at < job.created_at)
    )
    return int(ahead or 0) + 1


def eta_seconds(job: Job) -> float | None:
    if job.status != JobStatus.RUNNING or not job.started_at or job.progress <= 0:
        return None
    elapsed = (utcnow() - job.started_at).total_seconds()
    return round(max(0.0, elapsed / job.progress * (1 - job.progress)), 2)


def planned_steps(params: dict[str, Any]) -> int:
    """Sampling steps the job runs, as the WebUI counts them: img2img runs ``int(strength * steps) + 1`` of
    its steps, hires fix adds its second pass (``hr_second_pass_steps``, or the first pass's steps), and
    every ``n_iter`` repeats it all."""
    steps = int(params.get("steps", 0))
    if params.get("mode") == "img2img" and params.get("denoising_strength") is not None:
        strength = min(max(float(params["denoising_strength"]), 0.0), 0.999)
        steps = min(int(strength * steps) + 1, steps)
    elif params.get("enable_hr"):
        steps += int(params.get("hr_second_pass_steps") or 0) or steps
    return steps * int(params.get("n_iter", 1))


def job_view(job: Job, store: ObjectStore, url_expires: int, position: int | None = None) -> JobView:
    images = [
        ImageView(
            index=img.index,
            url=store.url(img.key, url_expires),
            seed=img.seed,
            width=img.width,
            height=img.height,
            infotext=img.infotext,
        )
        for img in job.images
    ]
    total_steps = planned_steps(job.params)
    error = ErrorView(type=job.error_type, message=job.error_message or "") if job.error_type else None
    return JobView(
        id=job.id,
        status=JobStatus(job.status),
        status_seq=job.status_seq,
        mode=job.mode,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        params=job.params,
        model=job.model_name,
        model_hash=job.model_hash,
        seeds=image_seeds(job.params),
        attempt=job.attempt,
        progress=job.progress,
        current_step=round(job.progress * total_steps),
        total_steps=total_steps,
        eta_seconds=eta_seconds(job),
        queue_position=position,
        batch_id=job.batch_id,
        batch_images=job.batch_images,
        render_seconds=job.render_seconds,
        images=images,
        error=error,
        links={"self": f"/v1/jobs/{job.id}"},
    )
