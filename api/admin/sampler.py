"""A background task in each API process: sample the queue, remember workers, keep metric totals current.

- Queue samples: one row per period in `queue_samples`, whichever replica writes it first
  (see `admin_queries.record_sample`), so the dashboard's charts keep their history across
  reloads and restarts, and N replicas write no more rows than one.
- Workers: reading the fleet copies live heartbeats into the "seen" hash, so a worker that
  dies while nobody watches the page is still shown as lost afterwards.
- Metrics: newly finished jobs are added to the running totals /metrics reads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta

from api.admin import metrics_rollup
from api.admin import queries as admin_queries
from shared.db.session import get_session_factory
from shared.queueing.fleet import broker_queue, get_redis, lost_after, read_fleet
from shared.settings import get_settings

log = logging.getLogger(__name__)


def sample_once(now: datetime | None = None) -> bool:
    """One period's work; True when this replica wrote the sample."""
    settings = get_settings()
    admin = settings.admin
    now = now or datetime.now(UTC)
    broker_waiting: int | None = None
    workers_alive: int | None = None
    try:
        client = get_redis()
        broker_waiting = broker_queue(client).waiting
        fleet = read_fleet(client, lost_after_seconds=lost_after(settings),
                           forget_after_seconds=admin.forget_lost_worker_seconds)
        workers_alive = sum(1 for s in fleet if not s.lost)
    except Exception:  # the sample still records Postgres's view
        log.warning("sampler: Redis unavailable", exc_info=True)
    with get_session_factory()() as session:
        wrote = admin_queries.record_sample(
            session, now, admin.sample_seconds, broker_waiting=broker_waiting, workers_alive=workers_alive,
            retention=timedelta(hours=admin.sample_retention_hours),
        )
        session.commit()
        metrics_rollup.advance(session, batches=4)  # keep /metrics' totals current between scrapes
        session.commit()
    return wrote


async def _loop(period: float) -> None:
    while True:
        # Wake just after each period boundary: every period gets its sample, none gets two tries.
        await asyncio.sleep(period - time.time() % period + 0.05)
        try:
            await asyncio.to_thread(sample_once)
        except Exception:  # a failed period must not end the sampling
            log.exception("queue sample failed")


@asynccontextmanager
async def run_sampler() -> AsyncIterator[None]:
    """Sample for as long as the API runs (used in its lifespan)."""
    period = get_settings().admin.sample_seconds
    task = asyncio.create_task(_loop(period), name="queue-sampler") if period > 0 else None
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
