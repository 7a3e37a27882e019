"""A background thread that renews the running job's lease, watches for cancels, and advertises the worker.

Lease renewal, progress writes and cancel checks happen here, off the denoising path:
the step callback only reads an in-memory flag. The worker's description goes to Redis
under `renderfarm:workers:<name>` with a TTL, so a worker that stops beating disappears.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING

import redis
from sqlalchemy.orm import Session, sessionmaker

from shared.jobs import repository
from shared.jobs.events import publish_events, record_event
from shared.jobs.sweeper import sweep
from shared.queueing.fleet import WORKER_KEY_PREFIX, broker_queue, live_worker_infos
from shared.queueing.queues import publish_render
from shared.queueing.routing import held_by_every_worker, model_queue_keys, orphan_model_queues
from shared.settings import Settings

if TYPE_CHECKING:
    from worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)
CANCEL_POLL_SECONDS = 0.5


class Heartbeat:
    def __init__(self, runtime: WorkerRuntime, session_factory: sessionmaker[Session], settings: Settings) -> None:
        self.runtime = runtime
        self.session_factory = session_factory
        self.settings = settings
        self.interval = max(1.0, settings.jobs.lease_seconds / 4)
        self.current_job_id: str | None = None
        self.progress: float = 0.0
        self.cancel_event = threading.Event()
        self._written_progress: float = -1.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._redis = redis.Redis.from_url(settings.services.redis_url, socket_timeout=5)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def track(self, job_id: str) -> None:
        self.cancel_event.clear()
        self.progress = 0.0
        self._written_progress = 0.0
        self.current_job_id = job_id

    def untrack(self) -> None:
        self.current_job_id = None
        self.cancel_event.clear()

    def beat(self) -> None:
        job_id = self.current_job_id
        if job_id is not None:
            deliveries: list[int] = []
            with self.session_factory() as session:
                repository.renew_lease(session, uuid.UUID(job_id), self.runtime.name, self.settings.jobs.lease_seconds)
                if self.progress != self._written_progress:
                    repository.set_progress(session, uuid.UUID(job_id), self.runtime.name, self.progress)
                    self._written_progress = self.progress
                    deliveries = record_event(session, uuid.UUID(job_id), "progress")
                session.commit()
            publish_events(deliveries)
        self.advertise()

    def advertise(self) -> None:
        """Write this worker's description (models held, LoRAs, memory, current job) where the API reads it."""
        info = self.runtime.describe() | {"heartbeat_at": time.time()}
        self._redis.set(WORKER_KEY_PREFIX + self.runtime.name, json.dumps(info), ex=int(self.interval * 4) + 5)

    def check_cancel(self) -> None:
        job_id = self.current_job_id
        if job_id is None or self.cancel_event.is_set():
            return
        with self.session_factory() as session:
            if repository.cancel_requested(session, uuid.UUID(job_id)) and self.current_job_id == job_id:
                log.info("job %s: cancel requested", job_id)
                self.cancel_event.set()

    def broker_depth(self) -> int:
        """Messages waiting in the render queues plus those delivered but not yet acknowledged. Model queues
        that no live worker consumes are dropped first (their jobs go to the shared queue after the deferral
        bound), so they neither linger in Redis nor hide a lost message."""
        orphans = orphan_model_queues(model_queue_keys(self._redis), live_worker_infos(self._redis))
        if orphans:
            self._redis.delete(*orphans)
        queue = broker_queue(self._redis)
        return queue.waiting + queue.unacked

    def sweep(self) -> None:
        # A job for a model every worker holds gains nothing by moving to the shared queue: it is not deferred.
        held_everywhere = held_by_every_worker(live_worker_infos(self._redis))
        with self.session_factory() as session:
            sweep(session, publish_render, self.broker_depth, self.settings.jobs.republish_after_seconds,
                  affinity_max_wait=self.settings.routing.affinity_max_wait_seconds, keep_deferred=held_everywhere)

    def _loop(self) -> None:
        next_beat = time.monotonic() + self.interval
        while not self._stop.wait(CANCEL_POLL_SECONDS):
            try:
                self.check_cancel()
            except Exception:
                log.exception("cancel check failed")
            if time.monotonic() < next_beat:
                continue
            next_beat = time.monotonic() + self.interval
            try:
                self.beat()
            except Exception:  # keep beating: one failed write must not end the lease renewals
                log.exception("heartbeat failed")
            try:
                self.sweep()
            except Exception:
                log.exception("sweep failed")
