"""Turn job rows into the JSON a client sees."""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from shared.clock import utcnow
from shared.db.models import Job, OwnerPolicy
from shared.jobs import fair_share, repository
from shared.jobs.fair_share import FairOrder
from shared.jobs.repository import JobRecord, JobViewRow
from shared.jobs.schemas import ErrorView, ImageView, JobView, TrainingStatus
from shared.jobs.states import JobStatus
from shared.jobs.training_spec import TRAIN_MODE
from shared.queueing import fleet
from shared.settings import Settings, get_settings
from shared.storage.base import ObjectStore

log = logging.getLogger(__name__)

# A job as the ORM loads it, or as a poll reads it (`repository.JobRecord`): a view is built from either.
ViewedJob = Job | JobRecord


def image_seeds(params: dict) -> list[int]:
    """Image k of batch_size x n_iter uses seed + k (the WebUI's rule); with a variation strength every
    image keeps the seed and the variation seed counts up instead."""
    count = int(params.get("batch_size", 1)) * int(params.get("n_iter", 1))
    if float(params.get("subseed_strength") or 0) > 0:
        return [int(params["seed"])] * count
    return [int(params["seed"]) + k for k in range(count)]


SNAPSHOT_LIMIT = 100_000  # queued jobs a snapshot holds; a job behind them is counted for itself


# A snapshot's reads take at most this share of its process's time: where one read of a long queue takes longer than
# this share of ``refresh`` (about 20 ms at 1 s: some 3,000 queued jobs on the 2-core VM), it is read less often, one
# read's duration / READ_SHARE apart (positions deep in a long queue are that much older; a job's own owner's part
# is counted fresh by its poll). Read every second, 7,000 queued jobs took 9% of an API process under load.
READ_SHARE = 0.02


class _Refreshed:
    """A per-process read of the queue, redone at most once per ``refresh`` seconds (positions may be that old, or
    longer where a read takes more than :data:`READ_SHARE` of that time; ``refresh`` 0: read on every use)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._read_at = float("-inf")
        self._took = 0.0  # seconds the last read took

    def clear(self) -> None:
        with self._lock:
            self._read_at = float("-inf")
            self._took = 0.0

    def due(self, refresh: float) -> bool:
        """Whether the last read is old enough to be read again (the next use with a session reads again)."""
        return time.monotonic() - self._read_at >= self._interval(refresh)

    def usable(self, refresh: float) -> bool:
        """Whether a due read may still be answered from while the next one runs: younger than twice the time
        between reads (not before the first read, nor after :meth:`clear`, nor after a long quiet spell)."""
        return time.monotonic() - self._read_at < 2 * self._interval(refresh)

    def _interval(self, refresh: float) -> float:
        return max(refresh, self._took / READ_SHARE) if refresh > 0 else 0.0

    def _refresh(self, refresh: float, read: Callable[[], None]) -> None:
        """Call ``read`` (which stores what it read) if :meth:`due`; hold the lock."""
        if self.due(refresh):
            started = time.monotonic()
            read()
            self._read_at = time.monotonic()
            self._took = self._read_at - started


def _raw_rows(session: Session, statement: Select[Any]) -> list[tuple[Any, ...]]:
    """The rows of a snapshot's read as psycopg's plain tuples, fetched in binary, on ``session``'s connection.
    A snapshot reads up to SNAPSHOT_LIMIT rows in a thread of the API process, holding the GIL while it turns them
    into Python objects, and the event loop's polls run slower meanwhile: through SQLAlchemy's result rows, 86,776
    queued jobs took 0.3-0.5 s of CPU; as binary tuples, 0.1 s."""
    sql = str(statement.compile(dialect=session.get_bind().dialect, compile_kwargs={"literal_binds": True}))
    cursor = session.connection().connection.cursor(binary=True)  # psycopg's cursor (the DBAPI one, proxied)
    try:
        cursor.execute(sql)
        return list(cursor.fetchall())
    finally:
        cursor.close()


class QueueSnapshot(_Refreshed):
    """The creation times of the queued jobs, oldest first: a poll's queue position is a bisection, not a count
    over the queue."""

    def __init__(self) -> None:
        super().__init__()
        # (creation times, whether that is every queued job), replaced whole: read without the lock by async polls
        self._read_state: tuple[list[datetime], bool] = ([], True)

    def _read(self, session: Session) -> None:
        rows = _raw_rows(session, select(Job.created_at).where(Job.status == JobStatus.QUEUED)
                        .order_by(Job.created_at).limit(SNAPSHOT_LIMIT + 1))
        self._read_state = ([created for created, in rows[:SNAPSHOT_LIMIT]], len(rows) <= SNAPSHOT_LIMIT)

    def refresh(self, session: Session, refresh: float) -> None:
        with self._lock:
            self._refresh(refresh, lambda: self._read(session))

    def position(self, session: Session | None, created_at: datetime, refresh: float) -> int:
        """With ``session`` None, from the snapshot as it is (no I/O): a job behind a full snapshot is placed
        right after it."""
        if session is not None:
            self.refresh(session, refresh)
        created, complete = self._read_state
        if complete or (created and created_at <= created[-1]):
            return bisect.bisect_left(created, created_at) + 1
        return count_position(session, created_at) if session is not None else len(created) + 1


QUEUE_SNAPSHOT = QueueSnapshot()


def count_position(session: Session, created_at: datetime) -> int:
    ahead = session.scalar(
        select(func.count()).select_from(Job).where(Job.status == JobStatus.QUEUED, Job.created_at < created_at)
    )
    return int(ahead or 0) + 1


# A guess for a model with no finished job yet: a mid-range GPU (an L4 or A10) runs SDXL at 1024x1024, or
# SD 1.5 at a batch of 4, at about 4 steps a second. Too high only scales up early; the first job replaces it.
# (`api.admin.work_estimate` prices the queued work for the autoscaler with it too.)
DEFAULT_SECONDS_PER_STEP = 0.25
# A job's render time when nothing has finished yet: 20 steps (the WebUI's default) at the default per step.
DEFAULT_JOB_SECONDS = 20 * DEFAULT_SECONDS_PER_STEP
PACE_JOBS = 50  # the succeeded jobs a RenderPace is read from, newest first
PACE_REFRESH_SECONDS = 5.0  # a RenderPace is read at most this often per process (a heartbeat scan and PACE_JOBS rows)
# The params that decide a job's planned steps (`planned_steps`); `api.admin.work_estimate.PLAN_SQL` reads the same.
PLAN_KEYS = ("mode", "steps", "n_iter", "denoising_strength", "enable_hr", "hr_second_pass_steps")


@dataclass(frozen=True)
class RenderPace:
    """How fast the fleet gets through the queue, for a queued job's ETA (:func:`queued_eta`).

    ``workers``: live workers (heartbeats, `shared.queueing.fleet`), ``idle`` of them ready and holding no job.
    ``seconds_per_job``: the mean measured `render_seconds` of the last `PACE_JOBS` succeeded renders (a batched
    job's share of its batch: batching is in it), what a job ahead is assumed to cost. ``seconds_per_step``: per
    model from the same jobs (their render seconds over their planned steps), ``fleet_seconds_per_step`` over all
    of them: what the job itself costs (:meth:`job_seconds`)."""

    workers: int
    idle: int
    seconds_per_job: float = DEFAULT_JOB_SECONDS
    fleet_seconds_per_step: float = DEFAULT_SECONDS_PER_STEP
    seconds_per_step: Mapping[str, float] = field(default_factory=dict)

    def job_seconds(self, model: str | None, steps: int) -> float:
        """A job's own render time: its planned steps at its model's pace (the fleet's for a model not seen
        lately); a job without steps (an upscale) at the mean job's."""
        if steps <= 0:
            return self.seconds_per_job
        return steps * self.seconds_per_step.get(model or "", self.fleet_seconds_per_step)


def pace_from(renders: Iterable[tuple[str | None, float, Mapping[str, Any]]],
              workers: Iterable[Mapping[str, Any]]) -> RenderPace:
    """A RenderPace from recent succeeded renders (model, render seconds, the `PLAN_KEYS` of its params) and the
    live workers' heartbeat descriptions (worker/runtime.py `describe`). Without renders the defaults stand."""
    total = 0.0
    jobs = 0
    model_seconds: dict[str, float] = {}
    model_steps: dict[str, int] = {}
    for model, seconds, plan in renders:
        if seconds is None or seconds <= 0:
            continue
        total += seconds
        jobs += 1
        steps = planned_steps(dict(plan)) if plan.get("steps") is not None else 0
        if steps > 0:
            model_seconds[model or ""] = model_seconds.get(model or "", 0.0) + seconds
            model_steps[model or ""] = model_steps.get(model or "", 0) + steps
    infos = list(workers)
    idle = sum(1 for info in infos if info.get("ready") and not (info.get("current_job") or info.get("current_batch")))
    all_steps = sum(model_steps.values())
    return RenderPace(
        workers=len(infos), idle=idle,
        seconds_per_job=total / jobs if jobs else DEFAULT_JOB_SECONDS,
        fleet_seconds_per_step=sum(model_seconds.values()) / all_steps if all_steps else DEFAULT_SECONDS_PER_STEP,
        seconds_per_step={model: model_seconds[model] / steps for model, steps in model_steps.items()},
    )


def queued_eta(position: int, own_seconds: float, pace: RenderPace) -> float | None:
    """Seconds until a queued job at ``position`` (1 = next) is done, or None with no live worker to run it.

    Assumptions (an estimate, as the position is): every live worker takes this queue's jobs; the first ``idle``
    positions start at once; the jobs ahead of the rest cost ``seconds_per_job`` each and the fleet finishes them
    at an even pace, ``workers`` jobs per ``seconds_per_job`` (busy workers half-way through theirs on average:
    the first frees up after half a job's share); then the job takes ``own_seconds`` itself. A paused queue, a
    worker following other queues, a cold start or a backlog unlike the recent jobs make it wrong."""
    if pace.workers <= 0 or position < 1:
        return None
    idle = min(pace.idle, pace.workers)
    waiting = 0.0 if position <= idle else (position - idle - 0.5) * pace.seconds_per_job / pace.workers
    return round(waiting + max(0.0, own_seconds), 2)


def read_pace(session: Session) -> RenderPace:
    """The latest `PACE_JOBS` succeeded renders (the finished_at index, newest first) and the heartbeats; a
    broker that cannot be reached reads as no live worker (no ETA) rather than failing the poll."""
    rows = session.execute(
        select(Job.model_name, Job.render_seconds, *(Job.params[key] for key in PLAN_KEYS))
        .where(Job.finished_at.is_not(None), Job.status == JobStatus.SUCCEEDED, Job.render_seconds > 0,
               Job.mode != TRAIN_MODE)
        .order_by(Job.finished_at.desc()).limit(PACE_JOBS)
    ).all()
    renders = [(model, float(seconds), {k: v for k, v in zip(PLAN_KEYS, plan, strict=True) if v is not None})
               for model, seconds, *plan in rows]
    try:
        workers = fleet.live_worker_infos(fleet.get_redis())
    except redis.RedisError as exc:
        log.warning("queue ETA: the worker heartbeats could not be read: %s", exc)
        workers = []
    return pace_from(renders, workers)


class PaceSnapshot(_Refreshed):
    """This process's RenderPace, read at most every ``max(refresh, PACE_REFRESH_SECONDS)`` seconds by
    :func:`queue_position` (which has a session); :func:`job_view` then uses the latest without any I/O."""

    def __init__(self) -> None:
        super().__init__()
        self._pace: RenderPace | None = None

    def clear(self) -> None:
        super().clear()
        self._pace = None

    def read(self, session: Session | None, refresh: float) -> RenderPace | None:
        """The pace, read again first when it is due and ``session`` is given."""
        def store() -> None:
            assert session is not None
            self._pace = read_pace(session)
        if session is None:
            return self._pace
        with self._lock:
            self._refresh(self.interval(refresh), store)
            return self._pace

    @staticmethod
    def interval(refresh: float) -> float:
        return max(refresh, PACE_REFRESH_SECONDS)

    def latest(self) -> RenderPace | None:
        return self._pace


FLEET_PACE = PaceSnapshot()


_OwnerKey = tuple[int, datetime]  # (-priority, created_at): an owner's own order


class FairQueueSnapshot(_Refreshed):
    """The queued jobs by owner (in each owner's own order), the owners' weights and recent render time, and the
    jobs moved to the front, read at most once per ``refresh`` seconds per process: a poll's fair-share position is
    computed from it.

    The position is an estimate, stated as such in the README. The claim orders owners by recent render time per
    weight (`fair_share.recent_usage`, the same expression); assuming every job costs the recent mean job
    (``seconds_per_job``, from :class:`RenderPace`), an owner's recent render time counts as that many jobs already
    run. Before the r-th job of owner A (in A's own order) run the jobs moved to the front, A's r - 1 earlier jobs,
    and from every other owner B with queued work the jobs whose turn comes first (:func:`_ahead_of`)."""

    def __init__(self) -> None:
        super().__init__()
        # (owners' queued keys, weights, recent use, fronts), replaced whole: an async poll reads it without the
        # lock while a thread may be storing a new read, and must never see one read's owners with another's weights
        self._state: tuple[dict[str, list[_OwnerKey]], dict[str, float], dict[str, float], list[datetime]] = (
            {}, {}, {}, [])

    def _read(self, session: Session, order: FairOrder) -> None:
        usage = fair_share.recent_usage(order)
        rows = _raw_rows(session, select(
            Job.owner, Job.priority, Job.created_at, Job.front_at,
            func.coalesce(OwnerPolicy.weight, order.default_weight), func.coalesce(usage.c.used, 0.0))
            .outerjoin(OwnerPolicy, OwnerPolicy.owner == Job.owner)
            .outerjoin(usage, usage.c.owner == Job.owner)
            .where(Job.status == JobStatus.QUEUED).limit(SNAPSHOT_LIMIT))
        owners: dict[str, list[_OwnerKey]] = {}
        weights: dict[str, float] = {}
        used: dict[str, float] = {}
        fronts: list[datetime] = []
        for owner, priority, created_at, front_at, weight, seconds in rows:
            if front_at is not None:
                fronts.append(front_at)
                continue
            owners.setdefault(owner, []).append((-int(priority or 0), created_at))
            weights[owner] = float(weight)
            used[owner] = max(0.0, float(seconds or 0.0))
        for keys in owners.values():
            keys.sort()
        self._state = (owners, weights, used, sorted(fronts))

    def refresh(self, session: Session, refresh: float, order: FairOrder) -> None:
        with self._lock:
            self._refresh(refresh, lambda: self._read(session, order))

    def position(self, session: Session | None, job: ViewedJob, refresh: float, order: FairOrder,
                 own_ahead: int | None = None, seconds_per_job: float = DEFAULT_JOB_SECONDS) -> int:
        """``own_ahead``: the owner's queued jobs before this one as the job's own read counted them (fresh, where the
        snapshot may still hold jobs claimed since); the snapshot's count when None. ``seconds_per_job``: what a job
        is assumed to cost, turning recent render time into jobs. With ``session`` None, from the snapshot as it is
        (no I/O)."""
        if session is not None:
            self.refresh(session, refresh, order)
        owners, weights, used, fronts = self._state
        if job.front_at is not None:
            return bisect.bisect_left(fronts, job.front_at) + 1
        key = (-int(job.priority or 0), job.created_at)
        rank = (own_ahead if own_ahead is not None else bisect.bisect_left(owners.get(job.owner, []), key)) + 1
        mine = weights.get(job.owner, order.default_weight)
        cost = seconds_per_job if seconds_per_job > 0 else DEFAULT_JOB_SECONDS
        my_jobs = used.get(job.owner, 0.0) / cost
        others = sum(_ahead_of(rank, key, mine, weights[owner], keys, my_jobs, used.get(owner, 0.0) / cost)
                     for owner, keys in owners.items() if owner != job.owner)
        return len(fronts) + rank + others


def _ahead_of(rank: int, key: _OwnerKey, weight: float, other_weight: float, other: list[_OwnerKey],
              used: float = 0.0, other_used: float = 0.0) -> int:
    """How many of another owner's queued jobs (``other``, in its order) fair share runs before the ``rank``-th job
    of an owner. ``used`` and ``other_used``: the two owners' recent render time, counted in jobs. With jobs of
    equal cost the other's k-th job goes first while (other_used + k - 1) / other_weight < (used + rank - 1) /
    weight, and on a tie when it comes first in the claim's own tie-break (priority, then age)."""
    share = (used + rank - 1) * other_weight / weight - other_used
    before = min(len(other), max(0, math.ceil(share)))
    if share >= 0 and share == int(share) and before < len(other) and other[before] < key:
        before += 1
    return before


FAIR_QUEUE_SNAPSHOT = FairQueueSnapshot()


def queue_position(session: Session | None, job: ViewedJob, refresh: float | None = None, *, ahead: int | None = None,
                   ahead_limit: int = 0, own_ahead: int | None = None) -> int | None:
    """1 = next to run, while the job is queued. With fair share on (the default), its place in the fair order
    (:class:`FairQueueSnapshot`, at most ``refresh`` seconds old). Otherwise 1 + the queued jobs created before it
    (first come, first served): ``ahead`` is those jobs as the job's own read counted them, up to ``ahead_limit``
    (exact below it; `repository.get_job_view_row`); otherwise, or at the limit, with ``refresh``: from this
    process's snapshot of the queue, at most that many seconds old; None: counted now. ``own_ahead``: the owner's
    own queued jobs ahead of it, as its read counted them (fair share: the owner's part of the estimate is fresh).

    Also keeps this process's :class:`RenderPace` (`FLEET_PACE`) current, which :func:`job_view` turns into the
    queued job's ETA. With ``session`` None, no I/O: the snapshots are used as they are (an async poll refreshes
    them first, in a thread, when :func:`snapshots_due` says so)."""
    if job.status != JobStatus.QUEUED:
        return None
    pace = FLEET_PACE.read(session, refresh or 0.0)
    fair = get_settings().fair_share
    order = FairOrder.from_settings(fair)
    if order is not None:
        fresh = own_ahead if own_ahead is not None and own_ahead < ahead_limit else None
        return FAIR_QUEUE_SNAPSHOT.position(session, job, refresh or 0.0, order, fresh,
                                            pace.seconds_per_job if pace is not None else DEFAULT_JOB_SECONDS)
    if ahead is not None and ahead < ahead_limit:
        return ahead + 1
    if refresh is None and session is not None:
        return count_position(session, job.created_at)
    return max(QUEUE_SNAPSHOT.position(session, job.created_at, refresh or 0.0), (ahead or 0) + 1)


def snapshots_due(refresh: float) -> bool:
    """Whether a queued job's position needs a snapshot read again (:func:`refresh_snapshots`): the pace or the
    queue snapshot the farm's order uses is older than it may be."""
    return FLEET_PACE.due(PaceSnapshot.interval(refresh)) or _order_snapshot().due(refresh)


def _order_snapshot() -> _Refreshed:
    """The queue snapshot the farm's order uses: fair share's, or first come, first served's."""
    return FAIR_QUEUE_SNAPSHOT if FairOrder.from_settings(get_settings().fair_share) is not None else QUEUE_SNAPSHOT


async def poll_position(found: JobViewRow, settings: Settings) -> int | None:
    """:func:`queue_position` for an async poll (`repository.get_job_view_row`, `get_latest_job_row`): from the
    snapshots as they are, read again first (in a thread, once a second at most) when they are due."""
    if found.job.status != JobStatus.QUEUED:
        return None
    refresh = settings.gateway.queue_position_refresh_seconds
    if snapshots_due(refresh):
        await _snapshots_refreshed(refresh)
    fair = settings.fair_share.fair_share
    return queue_position(None, found.job, refresh, ahead=found.ahead, own_ahead=found.own_ahead,
                          ahead_limit=repository.OWN_AHEAD_LIMIT if fair else repository.AHEAD_COUNT_LIMIT)


_refreshing: asyncio.Future[None] | None = None  # this process's read of the snapshots in progress, if any


async def _snapshots_refreshed(refresh: float) -> None:
    """Read the snapshots again (in a thread, one read at a time per process). A poll waits for the read only when
    there is nothing recent to answer from (the process's first read, one after a clear, or a last read older than
    twice the time between reads) or with ``refresh`` 0 (read on every use); otherwise it answers from the
    snapshots as they are while the read goes on in the background. When every poll that came during a read waited
    for it, a long queue's read (0.2-0.5 s with 80,000 queued) stalled all of a process's polls that long, every
    few seconds."""
    def read_now() -> Awaitable[None]:
        return asyncio.to_thread(repository.read, lambda session: refresh_snapshots(session, refresh))

    if refresh <= 0:  # read on every use: this poll's own read, not one that started before it
        await read_now()
        return
    global _refreshing
    read = _refreshing
    if read is None or read.done() or read.get_loop() is not asyncio.get_running_loop():
        read = _refreshing = asyncio.ensure_future(read_now())
        read.add_done_callback(_log_failed_read)
    if not (FLEET_PACE.usable(PaceSnapshot.interval(refresh)) and _order_snapshot().usable(refresh)):
        await asyncio.shield(read)


def _log_failed_read(read: asyncio.Future[None]) -> None:
    if not read.cancelled() and read.exception() is not None:
        log.warning("reading the queue snapshots failed; positions are from the last read", exc_info=read.exception())


def refresh_snapshots(session: Session, refresh: float) -> None:
    """Read again what :func:`snapshots_due` found due."""
    FLEET_PACE.read(session, refresh)
    order = FairOrder.from_settings(get_settings().fair_share)
    if order is not None:
        FAIR_QUEUE_SNAPSHOT.refresh(session, refresh, order)
    else:
        QUEUE_SNAPSHOT.refresh(session, refresh)


def job_etag(view: JobView) -> str:
    """A weak validator of a job view: it changes with the status (`status_seq`), the progress, the queue
    position, the phase (image URLs are re-signed on every read, so the bytes are not identical: weak)."""
    return f'W/"{view.id.hex}.{view.status_seq}.{view.progress:.6f}.{view.queue_position or 0}.{view.phase or ""}"'


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """`If-None-Match` against a weak ETag (RFC 9110's weak comparison; ``*`` matches any)."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    bare = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == bare for tag in if_none_match.split(","))


def eta_seconds(job: ViewedJob, position: int | None = None) -> float | None:
    """Seconds until the job is done. Running: from its progress so far. Queued at ``position``: estimated from
    this process's latest :class:`RenderPace` (:func:`queued_eta`; None before :func:`queue_position` read one,
    with no live worker, or for a training)."""
    if job.status == JobStatus.QUEUED:
        pace = FLEET_PACE.latest()
        if position is None or pace is None or job.mode == TRAIN_MODE:  # a training is not priced as a render
            return None
        return queued_eta(position, pace.job_seconds(job.model_name, planned_steps(job.params)), pace)
    if job.status != JobStatus.RUNNING or not job.started_at or job.progress <= 0:
        return None
    elapsed = (utcnow() - job.started_at).total_seconds()
    return round(max(0.0, elapsed / job.progress * (1 - job.progress)), 2)


def planned_steps(params: dict[str, Any]) -> int:
    """Sampling steps the job runs, as the WebUI counts them: img2img runs ``int(strength * steps) + 1`` of
    its steps, hires fix adds its second pass (``hr_second_pass_steps``, or the first pass's steps), and
    every ``n_iter`` repeats it all."""
    steps = int(params.get("steps", 0))
    if params.get("mode") == "img2img" and params.get("denoising_strength") is not None:
        strength = min(max(float(params["denoising_strength"]), 0.0), 0.999)
        steps = min(int(strength * steps) + 1, steps)
    elif params.get("enable_hr"):
        steps += int(params.get("hr_second_pass_steps") or 0) or steps
    return steps * int(params.get("n_iter", 1))


def job_view(job: ViewedJob, store: ObjectStore, url_expires: int, position: int | None = None) -> JobView:
    images = [
        ImageView(
            index=img.index,
            url=store.url(img.key, url_expires),
            seed=img.seed,
            width=img.width,
            height=img.height,
            infotext=img.infotext,
        )
        for img in job.images
    ]
    total_steps = planned_steps(job.params)
    error = ErrorView(type=job.error_type, message=job.error_message or "") if job.error_type else None
    return JobView(
        id=job.id,
        status=JobStatus(job.status),
        status_seq=job.status_seq,
        mode=job.mode,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        params=job.params,
        model=job.model_name,
        model_hash=job.model_hash,
        seeds=image_seeds(job.params),
        attempt=job.attempt,
        progress=job.progress,
        phase=job.phase if job.status == JobStatus.RUNNING else None,
        current_step=round(job.progress * total_steps),
        total_steps=total_steps,
        eta_seconds=eta_seconds(job, position),
        queue_position=position,
        batch_id=job.batch_id,
        batch_images=job.batch_images,
        render_seconds=job.render_seconds,
        images=images,
        error=error,
        links={"self": f"/v1/jobs/{job.id}"},
        training=training_status(job),
    )


def training_status(job: ViewedJob) -> TrainingStatus | None:
    """A training job's progress for its job view; None for renders."""
    state = job.training
    if job.mode != TRAIN_MODE or state is None:
        return None
    checkpoint = state.get("checkpoint") or {}
    return TrainingStatus(step=int(state.get("step") or 0), steps=int(state.get("steps") or 0),
                          loss=state.get("loss"), learn_rate=state.get("learn_rate"),
                          eta_seconds=state.get("eta_seconds") if job.status == JobStatus.RUNNING else None,
                          checkpoint_step=checkpoint.get("step"), result=state.get("result"))
