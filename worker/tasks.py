"""Celery glue: a few lines per task; the work happens in `worker.runner`."""

from __future__ import annotations

from shared.queueing.queues import TaskName
from shared.settings import get_settings
from worker.celery_app import app


@app.task(name=TaskName.RENDER_JOB, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def render_job(job_id: str) -> str:
    from worker.runtime import get_runtime

    return get_runtime().runner.run(job_id)


_TRAINING_LIMIT = get_settings().training.training_time_limit


# A training stops itself (as `timeout`, its last checkpoint kept) at its own limit; Celery's limits are backstops.
@app.task(name=TaskName.TRAIN_JOB, acks_late=True, reject_on_worker_lost=True, ignore_result=True,
          soft_time_limit=_TRAINING_LIMIT + 60, time_limit=_TRAINING_LIMIT + 120)
def train_job(job_id: str) -> str:
    from worker.runtime import get_runtime

    return get_runtime().runner.run_training(job_id)
