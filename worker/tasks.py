"""Celery glue: a few lines per task; the work happens in `worker.runner`."""

from __future__ import annotations

from shared.queueing.queues import TaskName
from worker.celery_app import app


@app.task(name=TaskName.RENDER_JOB, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def render_job(job_id: str) -> str:
    from worker.runtime import get_runtime

    return get_runtime().runner.run(job_id)
