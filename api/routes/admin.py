"""The admin dashboard's page and its JSON: queue depth, the fleet, the last hour, pause and resume.

Every route needs an admin API key (401 without a key, 403 for a non-admin one). The page
itself is static code holding no data: a browser navigating to it cannot send the key, so
it is served to anyone, and refused (403) to a request that presents a non-admin key. Its
script keeps the key in `sessionStorage` (gone when the tab closes, never in a URL) and
sends it as a bearer token to the routes below.
"""

from __future__ import annotations

import logging
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from sqlalchemy.orm import Session

from api.admin import queries as admin_queries
from api.admin.queries import RunningJob
from api.admin.views import (
    BrokerDepth,
    CurrentJob,
    FleetView,
    PauseResult,
    PauseView,
    QueueView,
    StatsView,
    WorkerView,
)
from api.deps import AdminKey, SessionDep, SettingsDep, require_admin, require_key
from shared.db.models import ApiKey
from shared.errors import FieldError
from shared.queueing.farm_state import broadcast_pause_sync, get_pause_state, set_paused
from shared.queueing.fleet import WorkerSighting, broker_queue, get_redis, images_per_second, lost_after, read_fleet
from shared.queueing.queues import QueueName
from shared.settings import Settings, get_settings

PAGE_DIR = Path(__file__).resolve().parent.parent / "admin_page"
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data: blob: http: https:; connect-src 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
# 5 to 2880 minutes, or 1 to 48 hours, without leading zeros: the pattern the schema documents is the rule.
WINDOW_PATTERN = (r"^([5-9]|[1-9][0-9]|[1-9][0-9]{2}|1[0-9]{3}|2[0-7][0-9]{2}|28[0-7][0-9]|2880)m$"
                  r"|^([1-9]|[1-3][0-9]|4[0-8])h$")
WINDOW = re.compile(r"^(\d{1,4})([mh])$")
log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/admin", tags=["admin"])
page_router = APIRouter(include_in_schema=False)


@page_router.get("/admin")
def admin_page(request: Request, session: SessionDep) -> FileResponse:
    if request.headers.get("authorization"):  # a key was presented: it must be an admin's
        require_admin(require_key(request, session))
    return FileResponse(PAGE_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)


@router.get("/queue", response_model=QueueView)
def get_queue(_: AdminKey, session: SessionDep) -> QueueView:
    """Queue depth now: rows in Postgres (the truth) and messages in the broker, side by side."""
    pause = get_pause_state(session)
    try:
        depth = broker_queue(get_redis())
        broker = BrokerDepth(queue=QueueName.RENDER, waiting=depth.waiting, unacked=depth.unacked)
    except Exception as exc:  # the broker being down is exactly what an operator must see
        broker = BrokerDepth(queue=QueueName.RENDER, waiting=None, unacked=None, error=exc.__class__.__name__)
    return QueueView(
        pause=PauseView(paused=pause.paused, paused_at=pause.paused_at, paused_by=pause.paused_by),
        database=admin_queries.queue_depth(session),
        broker=broker,
        checked_at=datetime.now(UTC),
    )


def _change_pause(session: Session, key: ApiKey, paused: bool) -> PauseResult:
    state = set_paused(session, paused, by=key.name or key.owner)
    session.commit()
    # Commit, then broadcast: a worker told to re-read the flag must find the new value.
    try:
        notified = broadcast_pause_sync()
    except Exception:  # the flag is committed; each worker re-reads it within pause_poll_seconds anyway
        log.warning("could not broadcast the pause state; workers will poll it", exc_info=True)
        notified = []
    return PauseResult(paused=state.paused, paused_at=state.paused_at, paused_by=state.paused_by,
                       workers_notified=notified)


@router.post("/queue/pause", response_model=PauseResult)
def pause_queue(key: AdminKey, session: SessionDep) -> PauseResult:
    """Stop taking new jobs: queued jobs wait (rows and messages untouched), running ones finish."""
    return _change_pause(session, key, True)


@router.post("/queue/resume", response_model=PauseResult)
def resume_queue(key: AdminKey, session: SessionDep) -> PauseResult:
    return _change_pause(session, key, False)


def _fleet(settings: Settings) -> list[WorkerSighting]:
    return read_fleet(get_redis(), lost_after_seconds=lost_after(settings),
                      forget_after_seconds=settings.admin.forget_lost_worker_seconds)


def _worker_view(sighting: WorkerSighting, jobs: dict[uuid.UUID, RunningJob]) -> WorkerView:
    info = sighting.info
    job_id = info.get("current_job")
    current = None
    if job_id and (jid := _uuid(job_id)):
        row = jobs.get(jid)
        current = CurrentJob(
            id=jid, owner=row.owner if row else None, model=row.model if row else None,
            progress=row.progress if row else None, started_at=row.started_at if row else None,
        )
    memory = info.get("memory")
    if not isinstance(memory, dict):
        memory = {k: v for k, v in info.items() if "memory" in k} or None
    state = "lost" if sighting.lost else "starting" if not info.get("ready") else "busy" if job_id else "idle"
    beat = info.get("heartbeat_at")
    return WorkerView(
        name=str(info.get("name")), state=state, pid=info.get("pid"), device=info.get("device"), memory=memory,
        models=list(info.get("models") or []), loras=[str(x) for x in info.get("loras") or []],
        controlnets=[str(x) for x in info.get("controlnets") or []],
        upscalers=[str(x) for x in info.get("upscalers") or []],
        current_job=current, jobs_done=int(info.get("jobs_done") or 0), model_loads=info.get("model_loads"),
        images_done=int(info.get("images_done") or 0), images_per_second=images_per_second(info),
        batch_jobs=len(info.get("current_batch") or []),
        heartbeat_at=datetime.fromtimestamp(beat, UTC) if beat else None,
        heartbeat_age_seconds=round(sighting.heartbeat_age, 3),
    )


def _uuid(value: object) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


@router.get("/workers", response_model=FleetView)
def get_workers(_: AdminKey, session: SessionDep, settings: SettingsDep) -> FleetView:
    """Each worker's last heartbeat; one silent for three heartbeat periods shows as lost."""
    try:
        fleet = _fleet(settings)
    except Exception as exc:
        return FleetView(workers=[], alive=0, lost=0, lost_after_seconds=lost_after(settings),
                         error=exc.__class__.__name__)
    ids = [i for i in (_uuid(s.info["current_job"]) for s in fleet if s.info.get("current_job")) if i]
    jobs = admin_queries.running_jobs(session, ids)
    workers = [_worker_view(s, jobs) for s in fleet]
    return FleetView(workers=workers, alive=sum(1 for w in workers if w.state != "lost"),
                     lost=sum(1 for w in workers if w.state == "lost"), lost_after_seconds=lost_after(settings))


def parse_window(window: str) -> timedelta:
    match = WINDOW.match(window)
    span = timedelta(minutes=int(match[1])) * (60 if match[2] == "h" else 1) if match else None
    if span is None or not timedelta(minutes=5) <= span <= timedelta(hours=48):
        raise FieldError(("query", "window"), f"window must look like 15m or 1h, from 5m to 48h; got {window!r}")
    return span


@router.get("/stats", response_model=StatsView)
def get_stats(
    _: AdminKey, session: SessionDep,
    window: Annotated[str, Query(description="how far back: 15m, 1h, 6h, 24h (5m to 48h)",
                                 pattern=WINDOW_PATTERN)] = "1h",
) -> StatsView:
    """The charts' data: images and finished jobs per bucket, queue depth samples, failures, timings."""
    span = parse_window(window)
    now = datetime.now(UTC)
    since = now - span
    seconds = int(span.total_seconds())
    throughput_bucket = max(60, seconds // 60 // 60 * 60)  # a minute up to 1 h, then ~60 bars
    queue_bucket = max(int(get_settings().admin.sample_seconds) or 10, seconds // 360)
    by_status, by_error, images = admin_queries.finished_counts(session, since)
    durations, waits = admin_queries.timing_percentiles(session, since)
    by_batch_images, batches = admin_queries.batching_counts(session, since)
    return StatsView(
        window_seconds=seconds,
        now=now,
        throughput=admin_queries.throughput_series(session, since, now, throughput_bucket),
        queue=admin_queries.queue_series(session, since, now, queue_bucket),
        images=images,
        succeeded=by_status.get("succeeded", 0),
        failed=by_status.get("failed", 0),
        canceled=by_status.get("canceled", 0),
        failures_by_type=by_error,
        duration_seconds=durations,
        wait_seconds=waits,
        jobs_by_batch_images=by_batch_images,
        batches=batches,
    )
