"""Which job queues a worker consumes: the pause flag and the models its render process holds decide.

This runs in the Celery *parent* process (the consumer lives there; torch and the pipelines live in
the prefork child). Desired queues:

- farm paused (the flag in Postgres, shared/queueing/farm_state.py): none;
- otherwise the shared `render` queue, plus `render.m.<model>` for every checkpoint the child
  advertises in its heartbeat (shared/queueing/routing.py), so affinity-routed jobs reach it; and
  `train` when the worker was started to take trainings (`-Q render,train` or `-Q train`).

`QueueSync.sync` adds and cancels consumers to match. It runs from worker_ready (before the first
message is taken), from a timer (models every second, the pause flag every few seconds), and from
the `renderfarm_sync_pause` control command the API broadcasts on pause and resume.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis

from shared.queueing.farm_state import read_paused_flag
from shared.queueing.fleet import WORKER_KEY_PREFIX
from shared.queueing.queues import QueueName
from shared.queueing.routing import desired_queues, is_model_queue, worker_keys
from shared.settings import Settings, worker_process_name

log = logging.getLogger(__name__)


class QueueSync:
    def __init__(self, consumer: Any, settings: Settings) -> None:
        self.consumer = consumer
        self.settings = settings
        self.paused = False
        self._target: set[str] | None = None  # the queues last asked for (changes are applied on the loop)
        self._redis = redis.Redis.from_url(settings.services.redis_url, socket_timeout=2, socket_connect_timeout=2)
        consumed = consumer.app.amqp.queues.consume_from
        self.serves_render = QueueName.RENDER in consumed
        self.serves_train = QueueName.TRAIN in consumed  # `-Q ...,train`: trainings too, held by a pause as well

    @property
    def serves_jobs(self) -> bool:
        """Whether this worker takes renders or trainings (the pause flag and, for renders, the held models decide
        its queues); the webhook sender and others do not."""
        return self.serves_render or self.serves_train

    def read_pause_flag(self) -> bool:
        self.paused = read_paused_flag(self.settings.services.database_url)
        return self.paused

    def held_models(self) -> list[str]:
        """The affinity keys (checkpoints, and checkpoint-ControlNet pairs) the render process(es) of this worker
        advertise in their heartbeats."""
        try:
            pids = self.consumer.pool.info.get("processes") or []
        except Exception:  # pool not started yet (or a pool without processes): nothing held
            return []
        keys = [WORKER_KEY_PREFIX + worker_process_name(self.settings, pid) for pid in pids]
        models: list[str] = []
        for raw in self._redis.mget(keys) if keys else []:
            try:
                info = json.loads(raw) if raw else {}
            except ValueError:
                info = {}
            if info.get("ready"):
                models.extend(sorted(worker_keys(info)))
        return models

    def sync(self, *, at_start: bool = False) -> dict[str, Any]:
        """Consume exactly the desired queues. At start-up the event loop has not polled yet, so acting at
        once means not a single message is taken from a queue it should not read; later the change is
        scheduled on the loop, as Celery's own control commands do."""
        if not self.serves_jobs:
            return {"ok": "not a render worker"}
        if _shutting_down(self.consumer):  # a worker in warm shutdown must not start consuming again
            return {"ok": "shutting down"}
        wanted: set[str] = set()
        if self.serves_render:
            models = [] if self.paused else self.held_models()
            wanted |= desired_queues(self.paused, models, self.settings.routing.affinity_routing)
        if self.serves_train and not self.paused:
            wanted.add(QueueName.TRAIN)
        task_consumer = self.consumer.task_consumer
        current = {q.name for q in task_consumer.queues
                   if q.name in (QueueName.RENDER, QueueName.TRAIN) or is_model_queue(q.name)}
        run = (lambda fn, *args: fn(*args)) if at_start else self.consumer.call_soon
        for queue in sorted(current - wanted):
            run(self.consumer.cancel_task_queue, queue)
        for queue in sorted(wanted - current):
            run(self.consumer.add_task_queue, queue)
        if current != wanted and wanted != self._target:
            log.info("job queues: %s", ", ".join(sorted(wanted)) or "none (paused)")
        self._target = wanted
        return {"ok": "paused" if self.paused else "consuming", "paused": self.paused, "queues": sorted(wanted)}


def _shutting_down(consumer: Any) -> bool:
    from celery import bootsteps
    from celery.worker import state

    return bool(state.should_stop or state.should_terminate) or consumer.blueprint.state != bootsteps.RUN
