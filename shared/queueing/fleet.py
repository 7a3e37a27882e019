"""What Redis knows: the workers' heartbeats and the messages waiting in the render queue.

Workers write their description under `renderfarm:workers:<name>` with a TTL (see
worker/control/beacon.py), so a dead worker's key simply disappears. To show such a worker as
*lost* rather than forget it silently, every read copies the live descriptions into one
hash, `renderfarm:admin:workers_seen`, and a worker found there but no longer beating is
reported lost until `forget_after` seconds after its last heartbeat.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import redis

from shared.queueing.queues import QueueName
from shared.settings import Settings, get_settings

# Written by worker/control/beacon.py (shared must not import worker code).
WORKER_KEY_PREFIX = "renderfarm:workers:"
SEEN_KEY = "renderfarm:admin:workers_seen"
# kombu's Redis transport keeps one list per priority step: "render", "render\x06\x163", ...
_PRIORITY_SEPARATOR = "\x06\x16"
_PRIORITY_STEPS = (0, 3, 6, 9)
_UNACKED_KEY = "unacked"


@lru_cache
def get_redis() -> redis.Redis:
    """One client per process for admin reads; short timeouts so a sick broker cannot hang the dashboard."""
    return redis.Redis.from_url(get_settings().services.redis_url, socket_timeout=2, socket_connect_timeout=2)


def heartbeat_interval(settings: Settings) -> float:
    """How often a worker renews its lease and advertises itself: every quarter lease."""
    return max(1.0, settings.jobs.lease_seconds / 4)


def lost_after(settings: Settings) -> float:
    """Three missed beats: long enough to ride out one slow write, short enough to notice within a lease."""
    return 3 * heartbeat_interval(settings)


@dataclass(frozen=True)
class WorkerSighting:
    info: dict[str, Any]
    heartbeat_age: float
    lost: bool


def live_worker_infos(client: redis.Redis) -> list[dict[str, Any]]:
    """The descriptions of the workers beating now (their keys expire when they stop)."""
    keys = list(client.scan_iter(match=WORKER_KEY_PREFIX + "*", count=500))
    return [info for info in map(_decode, client.mget(keys) if keys else []) if info]


def read_fleet(
    client: redis.Redis, *, lost_after_seconds: float, forget_after_seconds: float, now: float | None = None
) -> list[WorkerSighting]:
    """Every worker seen beating within `forget_after_seconds`, live ones first, lost ones flagged."""
    now = time.time() if now is None else now
    live = {info["name"]: info for info in live_worker_infos(client) if info.get("name")}
    if live:
        client.hset(SEEN_KEY, mapping={name: json.dumps(info) for name, info in live.items()})
    sightings: list[WorkerSighting] = []
    stale: list[str] = []
    for name_raw, raw in client.hgetall(SEEN_KEY).items():
        name = name_raw.decode() if isinstance(name_raw, bytes) else str(name_raw)
        info = live.get(name) or _decode(raw)
        if not info:
            stale.append(name)
            continue
        age = max(0.0, now - float(info.get("heartbeat_at") or 0))
        if name not in live and age > forget_after_seconds:
            stale.append(name)
            continue
        sightings.append(WorkerSighting(info, age, lost=name not in live or age > lost_after_seconds))
    if stale:
        client.hdel(SEEN_KEY, *stale)
    return sorted(sightings, key=lambda s: (s.lost, s.info.get("name", "")))


@dataclass(frozen=True)
class BrokerQueue:
    waiting: int  # messages in the render queue that no worker has taken
    unacked: int  # messages delivered to workers and not yet acknowledged (running, with acks_late)


def broker_queue(client: redis.Redis, queue: str = QueueName.RENDER) -> BrokerQueue:
    """Messages waiting for a render worker: the shared queue and every model queue (shared/queueing/routing.py)."""
    lists = [queue if step == 0 else f"{queue}{_PRIORITY_SEPARATOR}{step}" for step in _PRIORITY_STEPS]
    lists += sorted({k.decode() if isinstance(k, bytes) else str(k)  # each priority list is a key of its own
                     for k in client.scan_iter(match=f"{queue}.m.*", count=500)})
    pipe = client.pipeline(transaction=False)
    for name in lists:
        pipe.llen(name)
    pipe.hlen(_UNACKED_KEY)
    *lengths, unacked = pipe.execute()
    return BrokerQueue(waiting=int(sum(lengths)), unacked=int(unacked))


def _decode(raw: bytes | str | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def images_per_second(info: dict[str, Any]) -> float | None:
    """A worker's images per second of rendering, from its heartbeat's counters (None before its first)."""
    busy, images = float(info.get("busy_seconds") or 0), int(info.get("images_done") or 0)
    return round(images / busy, 3) if busy > 0 and images else None
