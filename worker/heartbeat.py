"""A background thread that renews the running job's lease and advertises the worker.

Lease renewal and progress writes happen here, off the denoising path. The worker's
description goes to Redis under `renderfarm:workers:<name>` with a TTL, so a worker
that stops beating disappears by itself.
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
from shared.jobs.sweeper import sweep
from shared.queue import publish_render
from shared.settings import Settings

if TYPE_CHECKING:
    from worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)
WORKER_KEY_PREFIX = "renderfarm:workers:"


class Heartbeat:
    def __init__(self, runtime: WorkerRuntime, session_factory: sessionmaker[Session], settings: Settings) -> None:
        self.runtime = runtime
        self.session_factory = session_factory
        self.settings = settings
        self.interval = max(1.0, settings.lease_seconds / 4)
        self.current_job_id: str | None = None
        self.progress: float = 0.0
        self._written_progress: float = -1.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._redis = redis.Redis.from_url(settings.redis_url, socket_timeout=5)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def track(self, job_id: str) -> None:
        self.current_job_id = job_id
        self.progress = 0.0
        self._written_progress = 0.0

    def untrack(self) -> None:
        self.current_job_id = None

    def beat(self) -> None:
        job_id = self.current_job_id
        if job_id is not None:
            with self.session_factory() as session:
                repository.renew_lease(session, uuid.UUID(job_id), self.runtime.name, self.settings.lease_seconds)
                if self.progress != self._written_progress:
                    repository.set_progress(session, uuid.UUID(job_id), self.runtime.name, self.progress)
                    self._written_progress = self.progress
                session.commit()
        info = self.runtime.describe() | {"heartbeat_at": time.time()}
        self._redis.set(WORKER_KEY_PREFIX + self.runtime.name, json.dumps(info), ex=int(self.interval * 4) + 5)

    def sweep(self) -> None:
        with self.session_factory() as session:
            sweep(session, publish_render)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception:  # keep beating: one failed write must not end the lease renewals
                log.exception("heartbeat failed")
            try:
                self.sweep()
            except Exception:
                log.exception("sweep failed")
