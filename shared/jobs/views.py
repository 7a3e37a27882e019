"""Turn job rows into the JSON a client sees."""

from __future__ import annotations

from shared.db.models import Job
from shared.jobs.schemas import ErrorView, ImageView, JobView
from shared.jobs.states import JobStatus
from shared.storage.base import ObjectStore


def image_seeds(params: dict) -> list[int]:
    """Image k of batch_size x n_iter uses seed + k (the WebUI's rule)."""
    count = int(params.get("batch_size", 1)) * int(params.get("n_iter", 1))
    return [int(params["seed"]) + k for k in range(count)]


def job_view(job: Job, store: ObjectStore, url_expires: int) -> JobView:
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
        images=images,
        error=error,
        links={"self": f"/v1/jobs/{job.id}"},
    )
