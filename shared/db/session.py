"""Engine and session factory, created on first use from settings (never at import)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.orm import Session, sessionmaker

from shared.settings import get_settings

# A pooled connection idle longer than this is pinged before use; one used more recently is not (see make_engine).
PING_AFTER_IDLE_SECONDS = 2.0


def make_engine(database_url: str, pool_size: int, max_overflow: int) -> Engine:
    """A pooled engine that pings a connection only after it sat idle a while.

    SQLAlchemy's ``pool_pre_ping`` costs a round trip on every checkout: under load, a job poll's one query became
    two (issue 20). A connection that was used a moment ago is almost surely alive; one idle for seconds may have
    been dropped (a database restart, an idle timeout), so it is pinged first and replaced if dead. A connection
    that dies in between still fails its statement, and SQLAlchemy then invalidates the whole pool."""
    engine = create_engine(database_url, pool_size=pool_size, max_overflow=max_overflow)
    event.listen(engine, "connect", _note_checkin)  # a new connection is alive
    event.listen(engine, "checkin", _note_checkin)
    event.listen(engine, "checkout", _ping_if_idle)
    return engine


def _note_checkin(dbapi_connection: Any, record: Any) -> None:
    record.info["idle_since"] = time.monotonic()


def _ping_if_idle(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    idle_since = record.info.get("idle_since")
    if idle_since is not None and time.monotonic() - idle_since < PING_AFTER_IDLE_SECONDS:
        return
    try:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        if not getattr(dbapi_connection, "autocommit", True):
            dbapi_connection.rollback()  # the ping opened a transaction; the checkout starts clean
    except Exception as error:
        raise exc.DisconnectionError(f"a pooled connection was dead: {error}") from error


@lru_cache
def get_engine() -> Engine:
    services = get_settings().services
    return make_engine(services.database_url, services.db_pool_size, services.db_max_overflow)


@lru_cache
def get_session_factory() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = get_session_factory()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
