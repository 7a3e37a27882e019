"""Queue and task names, the Celery configuration both sides agree on, and the job messages.

The API enqueues by task *name*, so it never imports worker code (or torch). A job's message ("this job may be
ready") is written straight to the broker's list as Celery's own producer writes it (protocol 2, kombu's Redis
transport: :func:`task_message`), by one LPUSH: Celery's `send_task` cost a submit 0.3 ms of CPU for the same
LPUSH (issue 20), and the event loop has no use for its sync client. With `RENDERFARM_TASK_SENT_EVENTS` on, the
message goes through `send_task`, which also emits the `task-sent` monitoring event.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import uuid
import weakref
from enum import StrEnum
from functools import lru_cache
from typing import Any

import redis
import redis.asyncio as aredis
from celery import Celery
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

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


def job_task(queue: str) -> TaskName:
    """The task a job queue's messages name: the training queue's are trainings, every other queue's renders."""
    return TaskName.TRAIN_JOB if queue == QueueName.TRAIN else TaskName.RENDER_JOB


_NO_WORKFLOW = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_REPLY_TO = str(uuid.uuid4())  # Celery's producer names itself so; this farm never reads replies


def task_message(task: str, args: list[Any], queue: str) -> bytes:
    """One task message as Celery's producer puts it on a Redis list (protocol 2 in kombu's Redis transport, the
    default exchange, priority 0): what a Celery worker consuming ``queue`` reads.
    tests/integration/test_task_message.py holds it against what `send_task` writes."""
    task_id = str(uuid.uuid4())
    body = json.dumps([args, {}, _NO_WORKFLOW]).encode()
    return json.dumps({
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None, "expires": None, "group": None,
            "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id, "parent_id": None,
            "argsrepr": repr(args), "kwargsrepr": "{}", "origin": f"gen{os.getpid()}@{socket.gethostname()}",
            "ignore_result": None, "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
        },
        "properties": {
            "correlation_id": task_id, "reply_to": _REPLY_TO, "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0, "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }).encode()


def job_message(job_id: uuid.UUID, queue: str) -> bytes:
    return task_message(job_task(queue), [str(job_id)], queue)


# A message that meets a broker restart is sent again (as `send_task`'s retry policy did): 3 more tries, 0.1 s
# apart and doubling, up to 2 s.
_RETRIES, _BACKOFF = 3, ExponentialBackoff(cap=2.0, base=0.1)
_RETRIED = [redis.ConnectionError, redis.TimeoutError]


@lru_cache
def _broker(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2, retry=Retry(_BACKOFF, _RETRIES),
                                retry_on_error=_RETRIED)


def publish_render(job_id: uuid.UUID, queue: str = QueueName.RENDER) -> None:
    """Tell a job queue (the shared render queue, a model's: shared/queueing/routing.py, or the training queue)
    that a job may be ready. Call only after the job's row has committed."""
    if get_settings().gateway.task_sent_events:
        get_producer().send_task(
            job_task(queue), args=[str(job_id)], queue=queue, retry=True,
            retry_policy={"max_retries": 3, "interval_start": 0.1, "interval_step": 0.5, "interval_max": 2},
        )
        return
    _broker(get_settings().services.redis_url).lpush(queue, job_message(job_id, queue))


_async_brokers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[str, aredis.Redis]] = (
    weakref.WeakKeyDictionary())


def async_broker() -> aredis.Redis:
    """This event loop's client of the broker (an asyncio client belongs to one loop)."""
    loop, url = asyncio.get_running_loop(), get_settings().services.redis_url
    held = _async_brokers.get(loop)
    if held is None or held[0] != url:
        held = _async_brokers[loop] = (url, aredis.Redis.from_url(
            url, socket_timeout=5, socket_connect_timeout=2, retry=AsyncRetry(_BACKOFF, _RETRIES),
            retry_on_error=_RETRIED))
    return held[1]


async def publish_render_async(job_id: uuid.UUID, queue: str = QueueName.RENDER) -> None:
    """:func:`publish_render` from the event loop (a submit on the loop: `lifecycle.submit_now`)."""
    if get_settings().gateway.task_sent_events:
        await asyncio.to_thread(publish_render, job_id, queue)
        return
    await async_broker().lpush(queue, job_message(job_id, queue))
