"""GET /v1/jobs/{id}/events: the job as Server-Sent Events, ending with its terminal event.

Each event's id is `<status_seq>.<current_step>`, rising with every change; a client
that reconnects with `Last-Event-ID` gets only what it has not seen. The stream polls
Postgres (the source of truth) in the thread pool, so it needs no extra infrastructure.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Header, HTTPException, status
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentKey, SettingsDep, StoreDep
from api.responses import NOT_FOUND
from shared.db.session import get_session_factory
from shared.jobs import repository
from shared.jobs.schemas import JobView
from shared.jobs.states import JobStatus
from shared.jobs.views import job_view, queue_position

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
POLL_SECONDS = 0.25
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
    key: CurrentKey,
    settings: SettingsDep,
    store: StoreDep,
    last_event_id: str | None = Header(None, alias="Last-Event-ID"),
) -> StreamingResponse:
    def snapshot() -> JobView | None:
        with get_session_factory()() as session:
            job = repository.get_job(session, job_id, owner=key.owner)
            if job is None:
                return None
            return job_view(job, store, settings.services.url_expires_seconds, queue_position(session, job))

    first = await run_in_threadpool(snapshot)
    if first is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} not found")

    async def stream() -> AsyncIterator[str]:
        seen = parse_event_id(last_event_id)
        view: JobView | None = first
        quiet = 0.0
        while view is not None:
            position = (view.status_seq, view.current_step)
            if position > seen:
                event = "progress" if position[0] == seen[0] else EVENT_FOR_STATUS[view.status]
                yield format_event(view, event)
                seen, quiet = position, 0.0
            if view.status.is_terminal:
                return
            await asyncio.sleep(POLL_SECONDS)
            quiet += POLL_SECONDS
            if quiet >= KEEPALIVE_SECONDS:
                yield ": keepalive\n\n"
                quiet = 0.0
            view = await run_in_threadpool(snapshot)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
