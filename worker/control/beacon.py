"""Advertises this render process to the fleet: `renderfarm:workers:<name>` in Redis, with a TTL.

The API routes jobs by what workers hold (shared.queueing.routing), the dashboard shows them, and the
recovery loop counts them; a worker that stops advertising disappears when its key expires.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import redis

from shared.queueing.fleet import WORKER_KEY_PREFIX
from worker.control.periodic import Periodic


class FleetBeacon(Periodic):
    def __init__(self, name: str, describe: Callable[[], dict[str, Any]], redis_url: str, period: float) -> None:
        super().__init__("fleet-beacon", period)
        self.worker = name
        self.describe = describe
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=5)

    def tick(self) -> None:
        self.advertise()

    def advertise(self) -> None:
        """Write this worker's description (models held, LoRAs, memory, current job) where the API reads it."""
        info = self.describe() | {"heartbeat_at": time.time()}
        self._redis.set(WORKER_KEY_PREFIX + self.worker, json.dumps(info), ex=int(self.period * 4) + 5)
