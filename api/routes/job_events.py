"""GET /v1/jobs/{id}/events: the job as Server-Sent Events, ending with its terminal event.

Each event's id is `<status_seq>.<current_step>`, rising with every change; a client
that reconnects with `Last-Event-ID` gets only what it has not seen. The stream re-reads the
row (Postgres is the source of truth) when a job notice names the job (shared/queueing/job_notices.py),
and every `IDLE_READ_SECONDS` anyway; while notices are unavailable it polls every `POLL_SECONDS`.
Between reads it holds no thread and no database connection, in whichever API process serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable

from fastapi import APIRouter, Header, HTTPException, status
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from api.deps import CachedKey, SettingsDep, StoreDep
from api.responses import NOT_FOUND
from api.routes.jobs import read_job_view
from shared.jobs.schemas import JobView
from shared.jobs.states import JobStatus
from shared.queueing import job_notices

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
POLL_SECONDS = 0.25
IDLE_READ_SECONDS = 5.0  # a re-read without a notice: covers a lost one
KEEPALIVE_SECONDS = 15.0
EVENT_FOR_STATUS = {
    JobStatus.QUEUED: "queued",
    JobStatus.RUNNING: "started",
    JobStatus.SUCCEEDED: "succeeded",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELED: "canceled",
}


def parse_event_id(value: str | None) -> tuple[int, int]:
    try:
        seq, _, step = (value or "").partition(".")
        return int(seq), int(step or 0)
    except ValueError:
        return (0, -1)


def format_event(view: JobView, event: str) -> str:
    return f"id: {view.status_seq}.{view.current_step}\nevent: {event}\ndata: {view.model_dump_json()}\n\n"


@router.get("/{job_id}/events", response_class=StreamingResponse, responses=NOT_FOUND)
async def job_events(
    job_id: uuid.UUID,
    key: CachedKey,
    settings: SettingsDep,
    store: StoreDep,
    last_event_id: str | None = Header(None, alias="Last-Event-ID"),
) -> StreamingResponse:
    def snapshot() -> Awaitable[JobView | None]:
        return read_job_view(job_id, key.owner, store, settings)

    hub = job_notices.get_hub()
    watching = hub.watch(job_id)
    changed = watching.__enter__()  # before the first read: a change between them still wakes the stream
    released = False

    def release() -> None:
        """Stop watching, once: when the stream ends, or after the response when it never started."""
        nonlocal released
        if not released:
            released = True
            watching.__exit__(None, None, None)

    try:
        await hub.ready(2.0)
        first = await snapshot()
    except BaseException:
        release()
        raise
    if first is None:
        release()
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} not found")

    async def stream() -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        try:
            seen = parse_event_id(last_event_id)
            view: JobView | None = first
            last_sent = loop.time()
            while view is not None:
                position = (view.status_seq, view.current_step)
                if position > seen:
                    event = "progress" if position[0] == seen[0] else EVENT_FOR_STATUS[view.status]
                    yield format_event(view, event)
                    seen, last_sent = position, loop.time()
                if view.status.is_terminal:
                    return
                read_by = loop.time() + (IDLE_READ_SECONDS if hub.subscribed else POLL_SECONDS)
                while not changed.is_set() and loop.time() < read_by:
                    keepalive_at = last_sent + KEEPALIVE_SECONDS
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), max(0.0, min(read_by, keepalive_at) - loop.time()))
                    if loop.time() >= keepalive_at:
                        yield ": keepalive\n\n"
                        last_sent = loop.time()
                changed.clear()
                view = await snapshot()
        finally:
            release()

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                             background=BackgroundTask(release))
