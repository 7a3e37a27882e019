"""Routing by model affinity: a job goes to a queue that only workers holding its checkpoint warm consume.

Every render worker consumes the shared `render` queue plus one queue per checkpoint it holds
(`render.m.<digest of the name>`, added and cancelled as its pipeline cache changes; see
worker/queue_sync.py). At submit the API reads the workers' heartbeats (Redis, one SCAN + MGET,
cached for a second) and publishes to the model's queue when some live worker advertises that
model, to the shared queue otherwise; whichever worker takes a cold job loads the model and
starts consuming its queue.

A worker also consumes one queue per checkpoint it has on disk but not warm (:func:`disk_key`): with the model
store, a job whose checkpoint no worker holds warm goes to one that need not download it.

A job with ControlNet units prefers, among those, a worker that also holds its first unit's ControlNet: each
worker also consumes one queue per (checkpoint, ControlNet) pair it holds (:func:`affinity_key`), and the
router publishes there when some live worker advertises the pair.

Deferral is bounded: the recovery loop (worker/control/recovery.py) publishes to the shared queue every
job that has waited in a model queue longer than `affinity_max_wait_seconds`, so a busy or
vanished holder delays a job by at most that much, and no model starves. The message left
behind in the model queue is harmless: the claim is a compare-and-set.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterable
from functools import lru_cache

import redis

from shared.queueing.fleet import get_redis, live_worker_infos
from shared.queueing.queues import QueueName
from shared.settings import get_settings

MODEL_QUEUE_PREFIX = f"{QueueName.RENDER}.m."
_FLEET_CACHE_SECONDS = 1.0


def model_queue(model_name: str) -> str:
    """The queue of one checkpoint. A digest keeps the name safe for any broker, whatever the file is called."""
    return MODEL_QUEUE_PREFIX + hashlib.sha256(model_name.encode()).hexdigest()[:16]


def is_model_queue(queue: str) -> bool:
    return queue.startswith(MODEL_QUEUE_PREFIX)


def affinity_key(model_name: str, controlnet: str | None = None) -> str:
    """What an affinity queue is for: a checkpoint, or a checkpoint with a ControlNet (by title) held beside it."""
    return f"{model_name}\x1fcontrolnet:{controlnet}" if controlnet else model_name


def affinity_keys(models: Iterable[str], controlnets: Iterable[str] = ()) -> set[str]:
    """The affinity keys of a worker holding ``models`` and ``controlnets``: each checkpoint, and each pair."""
    models, controlnets = [str(m) for m in models], [str(c) for c in controlnets]
    return set(models) | {affinity_key(m, c) for m in models for c in controlnets}


_DISK_SUFFIX = "\x1fdisk"


def disk_key(model_name: str) -> str:
    """The affinity key of a checkpoint a worker holds on its disk but not in memory (issue 19's model store: a
    worker that has the file skips the download; one that holds it warm skips the load too)."""
    return model_name + _DISK_SUFFIX


def worker_keys(info: dict) -> set[str]:
    """The affinity keys one heartbeat advertises: what it holds warm, and the checkpoints on its disk."""
    return affinity_keys(info.get("models") or [], info.get("controlnets") or []) | {
        disk_key(str(m)) for m in info.get("models_on_disk") or []}


def advertised_models(infos: Iterable[dict]) -> set[str]:
    """Affinity keys (checkpoints, and checkpoint-ControlNet pairs) of workers that can take jobs now (ready and
    not paused). A checkpoint on the disk of every such worker (one machine, one folder) is left out: its disk
    queue would be the shared queue with a detour."""
    able = [worker_keys(info) for info in infos if info.get("ready") and not info.get("paused")]
    if not able:
        return set()
    everywhere = {key for key in set.intersection(*able) if key.endswith(_DISK_SUFFIX)}
    return set.union(*able) - everywhere


@lru_cache
def get_router() -> AffinityRouter:
    """The API process's router, reading heartbeats through the admin Redis client (short timeouts)."""
    return AffinityRouter(get_redis(), enabled=get_settings().routing.affinity_routing)


class AffinityRouter:
    """Chooses the queue for a job from the live workers' heartbeats; thread-safe, one per process."""

    def __init__(self, client: redis.Redis, enabled: bool = True, cache_seconds: float = _FLEET_CACHE_SECONDS) -> None:
        self.client = client
        self.enabled = enabled
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._held: set[str] = set()
        self._read_at = float("-inf")

    def warm_models(self) -> set[str]:
        with self._lock:
            if time.monotonic() - self._read_at > self.cache_seconds:
                self._held = advertised_models(live_worker_infos(self.client))
                self._read_at = time.monotonic()
            return set(self._held)

    def queue_for(self, model_name: str, controlnet: str | None = None) -> str:
        """The queue of the checkpoint with ``controlnet`` (a job's first unit's title) when a live worker holds both
        warm, else the checkpoint's when one holds it, else its disk queue when one has its file on disk, else the
        shared queue (also when Redis fails: the shared
        queue is always right, only slower)."""
        if not self.enabled:
            return QueueName.RENDER
        try:
            held = self.warm_models()
        except redis.RedisError:
            return QueueName.RENDER
        for key in (affinity_key(model_name, controlnet), model_name, disk_key(model_name)):
            if key in held:
                return model_queue(key)
        return QueueName.RENDER


def held_by_every_worker(infos: Iterable[dict]) -> set[str]:
    """Affinity keys that every ready worker holds (none when no worker is ready)."""
    held = [worker_keys(info) for info in infos if info.get("ready")]
    return set.intersection(*held) if held else set()


def orphan_model_queues(queue_keys: Iterable[str], infos: Iterable[dict]) -> list[str]:
    """Model queues no live worker (ready or not, paused or not) holds the model of: nobody will ever consume
    them. Deleting them loses nothing: the recovery loop re-publishes their jobs to the shared queue after the
    deferral bound, from Postgres."""
    live = {model_queue(key) for info in infos for key in worker_keys(info)}
    return [key for key in queue_keys if is_model_queue(key) and key.split("\x06\x16")[0] not in live]


def model_queue_keys(client: redis.Redis) -> list[str]:
    """The Redis lists of the model queues (and their priority lists) that hold messages now."""
    return [k.decode() if isinstance(k, bytes) else str(k)
            for k in client.scan_iter(match=MODEL_QUEUE_PREFIX + "*", count=500)]


def desired_queues(paused: bool, models: Iterable[str], affinity: bool) -> set[str]:
    """The render queues a worker holding ``models`` (its affinity keys) consumes: none while the farm is paused,
    else the shared queue plus each key's own (with affinity routing)."""
    if paused:
        return set()
    return {str(QueueName.RENDER)} | ({model_queue(name) for name in models} if affinity else set())
