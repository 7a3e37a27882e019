"""The gateway's hottest reads on its event loop: a job poll and the WebUI's progress poll.

Run through the thread pool, a poll's one query cost the API process more in the hop to a thread and back (two
thread switches and the GIL passed around) than in the query itself; through SQLAlchemy's async engine, more in
its greenlet bridge. So these reads use psycopg's own async connections, in autocommit (each read is one
statement: no BEGIN, no COMMIT), kept per event loop and bounded like the sync pool (`RENDERFARM_DB_POOL_SIZE`).
Connections open on first use, so a process that serves no polls holds none.

A read is safe to repeat: one that fails on a connection the server dropped (a database restart, an idle
timeout) is repeated once on a new connection, and the idle ones, dropped by the same restart, are let go.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

from shared.settings import get_settings

# psycopg prepares a statement run five times; PostgreSQL then plans it again on every run while it estimates a plan
# for the parameters' values cheaper than one for any value (a poll's `owner = $1` looked selective for a rare
# owner): 0.2 ms of its CPU a poll, more than running it. These reads' statements have one right plan (a key, an
# owner's index range, the partial indexes, whose `queued` is in the SQL text: `repository._RecordQuery`).
GENERIC_PLANS = "SET plan_cache_mode = force_generic_plan"

# Called with each statement's SQL before it runs (the tests count a poll's statements with it).
_listeners: list[Callable[[str], None]] = []


@contextmanager
def statements_observed(listener: Callable[[str], None]) -> Iterator[None]:
    """``listener`` sees the SQL of every read made through this module while the block runs."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def conninfo(database_url: str) -> str:
    """A libpq connection string from the farm's SQLAlchemy URL (``postgresql+psycopg://...``)."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


class AsyncReads:
    """Autocommit async connections to one database, for one event loop: at most ``size`` in use at once (a read
    beyond that waits for one to come back)."""

    def __init__(self, database_url: str, size: int) -> None:
        self._conninfo = conninfo(database_url)
        self._slots = asyncio.Semaphore(size)
        self._idle: list[psycopg.AsyncConnection[tuple[Any, ...]]] = []

    async def rows(self, sql: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """The rows of one statement."""
        for listener in _listeners:
            listener(sql)
        async with self._slots:
            for attempt in (1, 2):
                reused = bool(self._idle)
                connection = self._idle.pop() if reused else await self._connect()
                try:
                    found = await self._run(connection, sql, params)
                except BaseException as error:
                    await connection.close()  # failed or canceled mid-statement: its state is unknown
                    if attempt == 2 or not reused or not isinstance(error, psycopg.OperationalError):
                        raise
                    await self._drop_idle()  # dropped by the same restart: let them go too
                    continue
                self._idle.append(connection)
                return found
        raise AssertionError("unreachable: the second attempt returns or raises")

    @staticmethod
    async def _run(connection: psycopg.AsyncConnection[tuple[Any, ...]], sql: str,
                   params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        cursor = connection.cursor()
        try:
            await cursor.execute(sql, params)
            return await cursor.fetchall()
        finally:
            await cursor.close()

    async def _connect(self) -> psycopg.AsyncConnection[tuple[Any, ...]]:
        connection = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        try:
            await connection.execute(GENERIC_PLANS)
        except BaseException:
            await connection.close()
            raise
        return connection

    async def _drop_idle(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.close()

    async def close(self) -> None:
        await self._drop_idle()


_per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncReads] = weakref.WeakKeyDictionary()


def get_reads() -> AsyncReads:
    """This event loop's reads (each loop has its own connections: an async connection belongs to one loop)."""
    loop = asyncio.get_running_loop()
    reads = _per_loop.get(loop)
    if reads is None:
        services = get_settings().services
        reads = _per_loop[loop] = AsyncReads(services.database_url, services.db_pool_size)
    return reads


async def close_reads() -> None:
    """Close this event loop's connections (the API's shutdown)."""
    reads = _per_loop.pop(asyncio.get_running_loop(), None)
    if reads is not None:
        await reads.close()
