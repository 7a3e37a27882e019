"""A job's broker message, written by one LPUSH (shared/queueing/queues.py, `task_message`), is the message Celery's
own producer (`send_task`) writes for the same task on a real Redis: every field but the generated ids, so a Celery
worker reads it as its own. (Every end-to-end test's jobs reach their workers this way.)"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from shared.queueing.queues import QueueName, TaskName, celery_config, job_message
from shared.settings import ServiceSettings, Settings

IDS = {("headers", "id"), ("headers", "root_id"), ("properties", "correlation_id"), ("properties", "delivery_tag"),
       ("properties", "reply_to"), ("headers", "origin")}


@pytest.fixture(scope="module")
def url(redis_db_url: Callable[[], str]) -> str:
    return redis_db_url()


@pytest.fixture
def client(url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield client
    client.close()


def _celery_writes(url: str, client: redis.Redis, task: str, args: list[Any], queue: str) -> dict[str, Any]:
    app = Celery("renderfarm-producer")
    app.conf.update(celery_config(Settings(services=ServiceSettings(redis_url=url))))
    app.send_task(task, args=args, queue=queue)
    return json.loads(client.rpop(queue))  # type: ignore[arg-type]


def _without_ids(message: dict[str, Any]) -> dict[str, Any]:
    return {part: {name: value for name, value in fields.items() if (part, name) not in IDS}
            if isinstance(fields, dict) else fields for part, fields in message.items()}


@pytest.mark.parametrize("queue", [QueueName.RENDER, "render.m.0123abcd", QueueName.TRAIN])
def test_the_message_is_the_one_celery_writes(url: str, client: redis.Redis, queue: str) -> None:
    job_id = uuid.uuid4()
    task = TaskName.TRAIN_JOB if queue == QueueName.TRAIN else TaskName.RENDER_JOB
    theirs = _celery_writes(url, client, task, [str(job_id)], queue)
    ours = json.loads(job_message(job_id, queue))
    assert _without_ids(ours) == _without_ids(theirs)
    assert json.loads(base64.b64decode(ours["body"])) == [[str(job_id)], {}, json.loads(
        base64.b64decode(theirs["body"]))[2]]
    headers, properties = ours["headers"], ours["properties"]
    assert headers["id"] == headers["root_id"] == properties["correlation_id"]
    assert ours["headers"]["origin"].startswith("gen") and theirs["headers"]["origin"].startswith("gen")
    assert job_message(job_id, queue) != job_message(job_id, queue)  # a task id and a delivery tag of its own
