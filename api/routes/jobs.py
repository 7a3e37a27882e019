"""Job submission and polling: validate, persist, commit, then publish."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, HTTPException, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import Discriminator, Tag
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import CachedKey, CurrentKey, SessionDep, SettingsDep, StoreDep, object_store, require_owner
from api.limits import TOO_MANY_RESPONSES, limit_on_loop
from api.responses import CONFLICT, NOT_FOUND
from api.submission import idempotency, submit
from shared import blocking
from shared.db.models import ApiKey
from shared.db.session import get_session_factory
from shared.jobs import lifecycle, repository
from shared.jobs.repository import JobViewRow
from shared.jobs.schemas import JobListView, JobView, Txt2ImgRequest, UpscaleRequest
from shared.jobs.states import JobStatus
from shared.jobs.views import (
    etag_matches,
    job_etag,
    job_view,
    poll_position,
    queue_position,
)
from shared.queueing import job_notices
from shared.settings import Settings, get_settings
from shared.storage.base import ObjectStore

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


IdempotencyKeyHeader = Annotated[
    str | None,
    Header(alias="Idempotency-Key", max_length=255, description="same key + same body = the same job"),
]


def _job_kind(value: object) -> str:
    """Which request a body is: ``mode: "upscale"`` is an upscale job, anything else a render (txt2img/img2img)."""
    mode = value.get("mode") if isinstance(value, dict) else getattr(value, "mode", None)
    return UPSCALE_TAG if mode == "upscale" else RENDER_TAG


# Tags of the body's two shapes; the validation error handler leaves them out of an error's location.
RENDER_TAG, UPSCALE_TAG = "render", "upscale"
JobRequest = Annotated[
    Annotated[Txt2ImgRequest, Tag(RENDER_TAG)] | Annotated[UpscaleRequest, Tag(UPSCALE_TAG)],
    Discriminator(_job_kind),
]


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobView, responses=TOO_MANY_RESPONSES)
async def submit_job(
    request: Request,
    body: Annotated[JobRequest, Body(description="a render (txt2img, img2img; the default) or, with "
                                                 "mode \"upscale\", an upscale job (the WebUI's Extras)")],
    key: CachedKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """The owner's limits, the checks, then one transaction (the row, its event, the Idempotency-Key record) and
    the publish; nothing runs after the response. Each hop to a thread, each round trip of a transaction and the
    ORM cost a submit more than most of its steps (issue 20), so a job without a webhook or input images is
    checked, inserted and published on the event loop: the limits, the checks (`submit.prepares_on_loop`; in the
    thread pool after all when one would block, `shared.blocking`), and the row in one statement
    (`submit.persist_on_loop`). A job with images is checked in one trip to the thread pool (decoding them is
    CPU-bound); one with a webhook, and a replayed Idempotency-Key, are written in the thread (`submit.persist`)."""
    settings, store = get_settings(), await object_store()
    policy = await limit_on_loop(request, key.owner, settings)

    def prepare() -> submit.Prepared | JobView:
        prepared = submit.prepare(key, body, settings, store)
        return submit.write_inputs(prepared, store) if submit.runs_on_loop(body) else persist(prepared)

    def persist(prepared: submit.Prepared) -> JobView:
        with get_session_factory()() as session:
            return _persisted(session, key, prepared, settings, store, idempotency_key)

    done: submit.Prepared | JobView | None = None
    if submit.prepares_on_loop(body):  # the same steps as in the thread: no images to write, nothing to persist
        with contextlib.suppress(blocking.WouldBlock), blocking.refused():
            done = prepare()
    if done is None:
        done = await run_in_threadpool(prepare)
    if isinstance(done, submit.Prepared):
        record = await submit.persist_on_loop(key, done, store, settings.jobs.max_attempts, policy.max_priority,
                                              idempotency_key)
        if record is None:  # the Idempotency-Key was recorded first: the earlier job, a 409 or a 422
            done = await run_in_threadpool(persist, done)
        else:
            done = job_view(record, store, settings.services.url_expires_seconds,
                            await poll_position(JobViewRow(record, None, None), settings))
    return Response(done.model_dump_json(), status_code=status.HTTP_202_ACCEPTED, media_type="application/json")


def _persisted(session: Session, key: ApiKey, prepared: submit.Prepared, settings: Settings, store: ObjectStore,
               idempotency_key: str | None) -> JobView:
    """:func:`submit.persist` and the job's view."""
    try:
        submitted = submit.persist(session, key, prepared, store, settings.jobs.max_attempts, idempotency_key)
    except idempotency.IdempotencyConflict as exc:
        raise HTTPException(
            status.HTTP_409_CONFLICT, detail="a request with this Idempotency-Key is still being processed"
        ) from exc
    job = submitted.job
    gateway = settings.gateway
    position = None if submitted.replayed else queue_position(session, job, gateway.queue_position_refresh_seconds)
    return job_view(job, store, settings.services.url_expires_seconds, position)


NOT_MODIFIED: dict[int | str, dict[str, Any]] = {
    304: {"description": "the job is as the `If-None-Match` ETag says (no body)"},
}
FALLBACK_POLL_SECONDS = 1.0  # a long-poll re-reads the row this often while job notices are unavailable
WAIT_DESCRIPTION = ("hold the request up to this many seconds (capped by RENDERFARM_LONG_POLL_MAX_SECONDS) until the "
                    "job's status or progress differs from `If-None-Match` (or from the job as it was when the "
                    "request came)")
IF_NONE_MATCH_DESCRIPTION = "an ETag from an earlier answer"
# A poll's parameters as FastAPI would document them; `poll_parameters` parses them (see there).
POLL_OPERATION: dict[str, Any] = {
    "parameters": [
        {"name": "job_id", "in": "path", "required": True,
         "schema": {"type": "string", "format": "uuid", "title": "Job Id"}},
        {"name": "wait", "in": "query", "required": False, "description": WAIT_DESCRIPTION,
         "schema": {"type": "number", "minimum": 0, "default": 0, "title": "Wait", "description": WAIT_DESCRIPTION}},
        {"name": "If-None-Match", "in": "header", "required": False, "description": IF_NONE_MATCH_DESCRIPTION,
         "schema": {"anyOf": [{"type": "string"}, {"type": "null"}], "title": "If-None-Match",
                    "description": IF_NONE_MATCH_DESCRIPTION}},
    ],
    "responses": {"422": {"description": "Validation Error", "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}}}},
}


def poll_parameters(request: Request) -> tuple[uuid.UUID, float, str | None]:
    """A poll's job id, `wait` and `If-None-Match`, or FastAPI's own 422 naming each bad one. Parsed here rather
    than declared on the route: FastAPI's validation of declared parameters (a pydantic run for each) cost a job poll
    about 7% of its CPU (issue 20), more than the parsing itself."""
    errors: list[dict[str, Any]] = []
    raw_id = request.path_params["job_id"]
    try:
        job_id = uuid.UUID(raw_id)
    except ValueError:
        errors.append({"type": "uuid_parsing", "loc": ("path", "job_id"), "input": raw_id,
                       "msg": "Input should be a valid UUID"})
    raw_wait, wait = request.query_params.get("wait"), 0.0
    if raw_wait is not None:
        try:
            wait = float(raw_wait)
        except ValueError:
            errors.append({"type": "float_parsing", "loc": ("query", "wait"), "input": raw_wait,
                           "msg": "Input should be a valid number, unable to parse string as a number"})
        else:
            if not wait >= 0:  # NaN too
                errors.append({"type": "greater_than_equal", "loc": ("query", "wait"), "input": raw_wait,
                               "msg": "Input should be greater than or equal to 0", "ctx": {"ge": 0}})
    if errors:
        raise RequestValidationError(errors)
    return job_id, wait, request.headers.get("if-none-match")


async def read_job_view(job_id: uuid.UUID, owner: str, store: ObjectStore, settings: Settings) -> JobView | None:
    """The owner's job as the API shows it, from one statement (its images, the queued jobs ahead of it), or None.
    On the event loop: the read is async and the queue position comes from this process's snapshots, read again
    in a thread only when they are due (once a second at most)."""
    fair = settings.fair_share.fair_share
    found = await repository.get_job_view_row(job_id, owner, fair)
    if found is None:
        return None
    return job_view(found.job, store, settings.services.url_expires_seconds,
                    await poll_position(found, settings))


@router.get("/{job_id}", response_model=JobView, responses={**NOT_FOUND, **NOT_MODIFIED},
            openapi_extra=POLL_OPERATION)
async def get_job(request: Request) -> Response:
    """The job, with an `ETag`; `If-None-Match` answers 304 while it still matches. With `wait`, a long-poll: it
    answers as soon as the job changes, or when `wait` runs out. Waiting holds no thread and no database
    connection: the route waits on this process's job-notice subscriber (shared/queueing/job_notices.py)."""
    job_id, wait, if_none_match = poll_parameters(request)
    owner, settings, store = await require_owner(request), get_settings(), await object_store()

    def load() -> Awaitable[JobView | None]:
        return read_job_view(job_id, owner, store, settings)

    wait = min(wait, settings.gateway.long_poll_max_seconds)
    if wait <= 0:
        return _answer(job_id, await load(), if_none_match)
    hub = job_notices.get_hub()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    with hub.watch(job_id) as changed:
        await hub.ready(min(wait, 2.0))  # subscribed before the first read: no change slips between them
        view = await load()
        if view is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} not found")
        baseline = if_none_match or job_etag(view)
        while not view.status.is_terminal and etag_matches(baseline, job_etag(view)):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            step = remaining if hub.subscribed else min(remaining, FALLBACK_POLL_SECONDS)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), step)
            changed.clear()
            reread = await _shared_read(job_id, owner, load, hub.generation)
            if reread is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} not found")
            view = reread
    return _answer(job_id, view, if_none_match)


def _answer(job_id: uuid.UUID, view: JobView | None, if_none_match: str | None) -> Response:
    if view is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} not found")
    etag = job_etag(view)
    headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
    if etag_matches(if_none_match, etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    return Response(view.model_dump_json(), media_type="application/json", headers=headers)


# Long-polls of one job woken by the same notice share one read (a thousand waiters, one query). A read is shared
# only with waiters woken no later than it started (its hub generation), so nobody takes a read older than its notice.
_reads: dict[tuple[uuid.UUID, str], tuple[int, asyncio.Future[JobView | None]]] = {}


async def _shared_read(job_id: uuid.UUID, owner: str, load: Callable[[], Awaitable[JobView | None]],
                       generation: int) -> JobView | None:
    slot = (job_id, owner)
    current = _reads.get(slot)
    if current is None or current[0] < generation or current[1].get_loop() is not asyncio.get_running_loop():
        read = asyncio.ensure_future(load())
        current = (generation, read)
        _reads[slot] = current
        read.add_done_callback(lambda done: _reads.pop(slot, None) if _reads.get(slot, (0, None))[1] is done
                               else None)
    return await asyncio.shield(current[1])


@router.post("/{job_id}/cancel", response_model=JobView, responses={**NOT_FOUND, **CONFLICT})
def cancel_job(job_id: uuid.UUID, key: CurrentKey, session: SessionDep, settings: SettingsDep,
               store: StoreDep) -> JobView:
    """A queued job is canceled at once; a running one stops at its next denoising step."""
    job = repository.get_job(session, job_id, owner=key.owner)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} not found")
    outcome = lifecycle.cancel(session, job_id)
    lifecycle.commit(session)
    session.refresh(job)
    if outcome == lifecycle.CancelOutcome.ALREADY_TERMINAL and job.status != JobStatus.CANCELED:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"job {job_id} already {job.status}; nothing to cancel")
    return job_view(job, store, settings.services.url_expires_seconds)


@router.get("", response_model=JobListView)
async def list_jobs(
    key: CachedKey,
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
    model: Annotated[str | None, Query(max_length=500, description="only jobs of this checkpoint (its name)")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    offset: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,  # PostgreSQL's bigint
) -> Response:
    """The caller's jobs, newest first, with their images: one statement (`repository.list_jobs`)."""
    owner, expires, store = key.owner, get_settings().services.url_expires_seconds, await object_store()

    def load(session: Session) -> JobListView:
        jobs, total = repository.list_jobs(session, owner, status=status_filter, model=model, limit=limit,
                                           offset=offset)
        return JobListView(jobs=[job_view(j, store, expires) for j in jobs], total=total, limit=limit,
                           offset=offset)

    page = await run_in_threadpool(repository.read, load)
    return Response(page.model_dump_json(), media_type="application/json")
