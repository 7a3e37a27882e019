"""The gateway's hottest statements on its event loop: a job poll, the WebUI's progress poll, a submit's insert.

Run through the thread pool, a poll's one query cost the API process more in the hop to a thread and back (two
thread switches and the GIL passed around) than in the query itself; through SQLAlchemy's async engine, more in
its greenlet bridge; through psycopg's async connections, 108 µs of the API's CPU a poll's statement, against
44 µs with asyncpg, whose protocol is compiled (issue 20: the job poll's statement, 8 at a time on uvloop). So
these statements run on asyncpg connections, outside any transaction (each is one statement: no BEGIN, no
COMMIT), kept per event loop and bounded like the sync pool (`RENDERFARM_DB_POOL_SIZE`).
Connections open on first use, so a process that serves no polls holds none.

Callers write their SQL as they would for psycopg (``%(name)s`` parameters, ``%%`` for a percent sign: the text
SQLAlchemy compiles for it); it is turned into asyncpg's numbered form once per statement. asyncpg prepares each
statement on a connection once and checks the parameters' types against it (a string for a text column, a
datetime for a timestamp); json and jsonb go in and come out as Python values.

A statement is safe to repeat: one that fails on a connection the server dropped (a database restart, an idle
timeout) is repeated once on a new connection, and the idle ones, dropped by the same restart, are let go.
"""

from __future__ import annotations

import asyncio
import json
import re
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from shared.settings import get_settings

# PostgreSQL plans a prepared statement again on every run while it estimates a plan for the parameters' values
# cheaper than one for any value (a poll's `owner = $1` looked selective for a rare owner): 0.2 ms of its CPU a
# poll, more than running it. These statements have one right plan (a key, an owner's index range, the partial
# indexes, whose `queued` is in the SQL text: `repository._RecordQuery`).
SERVER_SETTINGS = {"plan_cache_mode": "force_generic_plan"}

# What a connection the server dropped (or never let in) raises: the statement is worth one more try elsewhere.
DROPPED = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.AdminShutdownError,
           asyncpg.CrashShutdownError, asyncpg.CannotConnectNowError, OSError)

# Called with each statement's SQL before it runs (the tests count a poll's statements with it).
_listeners: list[Callable[[str], None]] = []


@contextmanager
def statements_observed(listener: Callable[[str], None]) -> Iterator[None]:
    """``listener`` sees the SQL of every statement run through this module while the block runs."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def dsn(database_url: str) -> str:
    """A libpq connection URL from the farm's SQLAlchemy URL (``postgresql+psycopg://...``)."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%%")


@lru_cache(maxsize=256)
def numbered(sql: str) -> tuple[str, tuple[str, ...]]:
    """``sql`` with its ``%(name)s`` parameters as ``$1, $2, ...`` (one number per name) and ``%%`` as ``%``, and
    the names in their numbers' order."""
    names: dict[str, int] = {}

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return "%"
        return f"${names.setdefault(name, len(names) + 1)}"

    text = _PLACEHOLDER.sub(number, sql)
    return text, tuple(names)


async def _json_codecs(connection: asyncpg.Connection) -> None:
    for kind in ("json", "jsonb"):
        await connection.set_type_codec(kind, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


class AsyncReads:
    """Connections to one database, for one event loop: at most ``size`` in use at once (a statement beyond that
    waits for one to come back)."""

    def __init__(self, database_url: str, size: int) -> None:
        self._dsn = dsn(database_url)
        self._slots = asyncio.Semaphore(size)
        self._idle: list[asyncpg.Connection] = []

    async def rows(self, sql: str, params: Mapping[str, Any]) -> Sequence[Sequence[Any]]:
        """The rows of one statement (each indexable and sliceable like a tuple)."""
        for listener in _listeners:
            listener(sql)
        text, names = numbered(sql)
        args = [params[name] for name in names]
        async with self._slots:
            for attempt in (1, 2):
                reused = bool(self._idle)
                connection = self._idle.pop() if reused else await self._connect()
                try:
                    found: list[Any] = await connection.fetch(text, *args)
                except BaseException as error:
                    if isinstance(error, asyncpg.PostgresError) and not isinstance(error, DROPPED):
                        self._idle.append(connection)  # the statement failed (a key taken, say): the connection is fine
                        raise
                    connection.terminate()  # dropped, or canceled mid-statement: its state is unknown
                    if attempt == 2 or not reused or not isinstance(error, DROPPED):
                        raise
                    self._drop_idle()  # dropped by the same restart: let them go too
                    continue
                self._idle.append(connection)
                return found
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _connect(self) -> asyncpg.Connection:
        connection = await asyncpg.connect(self._dsn, server_settings=SERVER_SETTINGS)
        try:
            await _json_codecs(connection)
        except BaseException:
            connection.terminate()
            raise
        return connection

    def _drop_idle(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.terminate()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.close()


_per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncReads] = weakref.WeakKeyDictionary()


def get_reads() -> AsyncReads:
    """This event loop's connections (each loop has its own: an asyncpg connection belongs to one loop)."""
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
