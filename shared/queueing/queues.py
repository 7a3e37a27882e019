"""Queue and task names, and the Celery configuration both sides agree on.

The API enqueues by task *name* through a producer-only Celery app, so it never
imports worker code (or torch).
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from functools import lru_cache
from typing import Any

from celery import Celery

from shared.settings import Settings, get_settings


class QueueName(StrEnum):
    RENDER = "render"
    TRAIN = "train"  # training jobs (issue 15): consumed only by workers started with `-Q ...,train`
    WEBHOOKS = "webhooks"  # consumed by worker.webhook_sender.app, never by render workers


class TaskName(StrEnum):
    RENDER_JOB = "renderfarm.render_job"
    TRAIN_JOB = "renderfarm.train_job"
    DELIVER_WEBHOOK = "renderfarm.deliver_webhook"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Settings for long GPU tasks (docs/architecture.md, rule 7)."""
    return {
        "broker_url": settings.services.redis_url,
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.jobs.job_time_limit,
        # A backstop for the runner's own step deadline (the same limit): it also stops a job stuck
        # outside the denoising loop, which then fails as `timeout` instead of losing its process.
        "task_soft_time_limit": settings.jobs.render_time_limit,
        "broker_transport_options": {"visibility_timeout": settings.jobs.broker_visibility_timeout},
        "broker_connection_retry_on_startup": True,
        "task_default_queue": QueueName.RENDER,
        "task_routes": {
            TaskName.RENDER_JOB: {"queue": QueueName.RENDER},
            TaskName.TRAIN_JOB: {"queue": QueueName.TRAIN},
            TaskName.DELIVER_WEBHOOK: {"queue": QueueName.WEBHOOKS},
        },
        "worker_send_task_events": True,
        "task_send_sent_event": settings.gateway.task_sent_events,
        "worker_hijack_root_logger": False,
    }


@lru_cache
def get_producer() -> Celery:
    app = Celery("renderfarm-producer")
    app.conf.update(celery_config(get_settings()))
    return app


def publish_render(job_id: uuid.UUID, queue: str = QueueName.RENDER) -> None:
    """Tell a job queue (the shared render queue, a model's: shared/queueing/routing.py, or the training queue)
    that a job may be ready. Call only after the job's row has committed."""
    task = TaskName.TRAIN_JOB if queue == QueueName.TRAIN else TaskName.RENDER_JOB
    get_producer().send_task(
        task, args=[str(job_id)], queue=queue, retry=True,
        retry_policy={"max_retries": 3, "interval_start": 0.1, "interval_step": 0.5, "interval_max": 2},
    )
