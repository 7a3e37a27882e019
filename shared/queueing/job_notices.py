"""Job notices: "job X changed", published on Redis after the change commits, for long-polls to wake on.

Postgres decides, Redis carries (docs/architecture.md, rule 1): a notice says only that a job's row may have
changed; a waiter re-reads the row. `shared.jobs.lifecycle.commit` publishes the ids of the jobs whose status or
progress a committed transaction changed, on one channel. Each API process runs one subscriber (`NoticeHub`, an
asyncio task started by the first waiter) that wakes the asyncio waiters of those jobs: a waiting client holds
neither a thread nor a database connection. A lost notice costs at most the waiter's timeout: when the subscriber
loses Redis it wakes every waiter (they re-read), and a waiter that cannot subscribe polls the row instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Collection, Iterator
from functools import lru_cache

import redis
import redis.asyncio as aredis

from shared.settings import get_settings

log = logging.getLogger(__name__)
CHANNEL = "renderfarm:job-notices"
RECONNECT_SECONDS = 1.0


@lru_cache
def _publisher() -> redis.Redis:
    return redis.Redis.from_url(get_settings().services.redis_url, socket_timeout=2, socket_connect_timeout=2)


def publish(job_ids: Collection[uuid.UUID]) -> None:
    """Announce committed changes of these jobs (call after the commit; raises on a broker error)."""
    if job_ids:
        _publisher().publish(CHANNEL, ",".join(str(job_id) for job_id in dict.fromkeys(job_ids)))


class NoticeHub:
    """One Redis subscription per process, fanned out to asyncio events keyed by job id."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.loop = asyncio.get_running_loop()
        self._waiters: dict[uuid.UUID, set[asyncio.Event]] = {}
        # Rises with every wake-up: a read started at generation g saw every change announced up to g.
        self.generation = 0
        self._subscribed = asyncio.Event()
        self._task = self.loop.create_task(self._run(), name="job-notices")

    @property
    def subscribed(self) -> bool:
        return self._subscribed.is_set()

    def waiter_count(self) -> int:
        return sum(len(events) for events in self._waiters.values())

    async def ready(self, timeout: float) -> bool:
        """Whether the subscription is live (waiting up to ``timeout`` for it)."""
        if not self._subscribed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._subscribed.wait(), timeout)
        return self._subscribed.is_set()

    @contextlib.contextmanager
    def watch(self, job_id: uuid.UUID) -> Iterator[asyncio.Event]:
        """An event set whenever a notice names ``job_id`` (clear it before re-reading the row)."""
        event = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            events = self._waiters.get(job_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._waiters[job_id]

    def _wake(self, job_ids: Collection[uuid.UUID] | None) -> None:
        """Wake the waiters of these jobs; None: every waiter (notices may have been missed)."""
        self.generation += 1
        targets = self._waiters.values() if job_ids is None else (self._waiters.get(j, ()) for j in job_ids)
        for events in targets:
            for event in events:
                event.set()

    def _dispatch(self, data: bytes | str) -> None:
        text = data.decode() if isinstance(data, bytes) else data
        ids = []
        for part in text.split(","):
            with contextlib.suppress(ValueError):
                ids.append(uuid.UUID(part))
        self._wake(ids)

    async def _run(self) -> None:
        # A waiter reads the row after the first subscription is up (or polls until it is): only a
        # re-subscription can have missed notices somebody waits for.
        reconnecting = False
        while True:
            client = aredis.Redis.from_url(self.redis_url, socket_connect_timeout=2, health_check_interval=30)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                self._subscribed.set()
                if reconnecting:
                    self._wake(None)  # anything published while we were not listening: re-read
                reconnecting = True
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._dispatch(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker went away: waiters re-read now and poll until it is back
                if self._subscribed.is_set():
                    log.warning("job notices: lost the Redis subscription (%s); reconnecting", exc)
                self._subscribed.clear()
                self._wake(None)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                    await client.aclose()
            await asyncio.sleep(RECONNECT_SECONDS)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task


_hub: NoticeHub | None = None


def get_hub() -> NoticeHub:
    """This process's hub on the running event loop (a new one when the loop or the Redis URL changed)."""
    global _hub
    url = get_settings().services.redis_url
    loop = asyncio.get_running_loop()
    if _hub is None or _hub.loop is not loop or _hub.redis_url != url or _hub._task.done():
        if _hub is not None and not _hub.loop.is_closed() and _hub.loop is loop:
            _hub._task.cancel()
        _hub = NoticeHub(url)
    return _hub
