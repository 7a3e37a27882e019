"""Pause and resume taking new jobs: queued jobs wait, running ones finish, nothing is lost.

The flag lives in Postgres (one row of `farm_state`), so every API replica and every
worker reads the same truth. Pausing does not touch jobs or broker messages at all:
render workers stop *consuming* the render queue, so messages wait in Redis and rows
stay `queued`; a worker busy with a job finishes it and then takes no other.

Workers learn of a change through a Celery control broadcast, `renderfarm_sync_pause`,
that carries no value: each worker re-reads the flag from Postgres and follows it, so a
late, repeated or reordered broadcast can never leave a worker in the wrong state. Nor can
a missed one for long: a render worker also re-reads the flag by itself every
`pause_poll_seconds` (it was reconnecting to the broker, or started in the instant between
reading the flag and the broadcast), and a worker that starts while the farm is paused
reads it before it takes a message (`worker_ready`). The broadcast goes only to nodes that
run the render task; a worker that does not serve the render queue ignores it, which the
stock `add_consumer` broadcast would not (it would start a webhook worker on render jobs).
See worker/celery_app.py for the worker's side.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from shared.db.models import FarmState
from shared.queueing.queues import TaskName, get_producer

log = logging.getLogger(__name__)

SYNC_PAUSE_COMMAND = "renderfarm_sync_pause"


@dataclass(frozen=True)
class PauseState:
    paused: bool
    paused_at: datetime | None
    paused_by: str | None


def get_pause_state(session: Session) -> PauseState:
    row = session.scalar(select(FarmState).where(FarmState.id == 1))
    if row is None:  # a database migrated before 0003 seeded the row cannot be paused
        return PauseState(False, None, None)
    return PauseState(row.paused, row.paused_at, row.paused_by)


def set_paused(session: Session, paused: bool, by: str) -> PauseState:
    """Record the flag in the caller's transaction; broadcast only after it commits."""
    now = datetime.now(UTC)
    row = session.scalar(select(FarmState).where(FarmState.id == 1).with_for_update())
    if row is None:
        row = FarmState(id=1, paused=False)
        session.add(row)
    if paused and not row.paused:
        # Pausing twice keeps the first moment and who did it: that is when the queue began to wait.
        row.paused_at, row.paused_by = now, by
    elif not paused:
        row.paused_at, row.paused_by = None, None
    row.paused = paused
    row.updated_at = now
    session.flush()
    return PauseState(row.paused, row.paused_at, row.paused_by)


def read_paused_flag(database_url: str) -> bool:
    """The flag for a Celery worker's parent process: one connection, no pool left behind to leak into forks."""
    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return bool(conn.execute(text("SELECT paused FROM farm_state WHERE id = 1")).scalar())
    finally:
        engine.dispose()


def render_nodes(timeout: float = 0.5) -> list[str]:
    """Celery nodes that run the render task (asked with the stock `registered` inspect command).

    The sync command is sent only to them: another Celery app on the same broker (the webhook
    sender) does not know it and would log an error for every broadcast.
    """
    replies = get_producer().control.inspect(timeout=timeout).registered() or {}
    return sorted(node for node, tasks in replies.items() if TaskName.RENDER_JOB in (tasks or []))


def broadcast_pause_sync(timeout: float = 1.0) -> list[str]:
    """Ask every render worker to re-read the flag now; returns those that answered within `timeout`."""
    nodes = render_nodes()
    if not nodes:
        return []
    replies = get_producer().control.broadcast(
        SYNC_PAUSE_COMMAND, destination=nodes, reply=True, timeout=timeout, limit=len(nodes)
    ) or []
    return sorted(name for reply in replies for name in reply)
