"""Turn job rows into the JSON a client sees."""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.clock import utcnow
from shared.db.models import Job, OwnerPolicy
from shared.jobs.schemas import ErrorView, ImageView, JobView
from shared.jobs.states import JobStatus
from shared.settings import get_settings
from shared.storage.base import ObjectStore


def image_seeds(params: dict) -> list[int]:
    """Image k of batch_size x n_iter uses seed + k (the WebUI's rule); with a variation strength every
    image keeps the seed and the variation seed counts up instead."""
    count = int(params.get("batch_size", 1)) * int(params.get("n_iter", 1))
    if float(params.get("subseed_strength") or 0) > 0:
        return [int(params["seed"])] * count
    return [int(params["seed"]) + k for k in range(count)]


SNAPSHOT_LIMIT = 100_000  # queued jobs a snapshot holds; a job behind them is counted for itself


class _Refreshed:
    """A per-process read of the queue, redone at most once per ``refresh`` seconds (positions may be that old)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._read_at = float("-inf")

    def clear(self) -> None:
        with self._lock:
            self._read_at = float("-inf")

    def _refresh(self, refresh: float, read: Callable[[], None]) -> None:
        """Call ``read`` (which stores what it read) if the last read is ``refresh`` seconds old; hold the lock."""
        if time.monotonic() - self._read_at >= refresh:
            read()
            self._read_at = time.monotonic()


class QueueSnapshot(_Refreshed):
    """The creation times of the queued jobs, oldest first: a poll's queue position is a bisection, not a count
    over the queue."""

    def __init__(self) -> None:
        super().__init__()
        self._created: list[datetime] = []
        self._complete = True

    def _read(self, session: Session) -> None:
        rows = session.scalars(
            select(Job.created_at).where(Job.status == JobStatus.QUEUED).order_by(Job.created_at)
            .limit(SNAPSHOT_LIMIT + 1)
        ).all()
        self._created, self._complete = list(rows[:SNAPSHOT_LIMIT]), len(rows) <= SNAPSHOT_LIMIT

    def position(self, session: Session, created_at: datetime, refresh: float) -> int:
        with self._lock:
            self._refresh(refresh, lambda: self._read(session))
            created, complete = self._created, self._complete
        if complete or (created and created_at <= created[-1]):
            return bisect.bisect_left(created, created_at) + 1
        return count_position(session, created_at)


QUEUE_SNAPSHOT = QueueSnapshot()


def count_position(session: Session, created_at: datetime) -> int:
    ahead = session.scalar(
        select(func.count()).select_from(Job).where(Job.status == JobStatus.QUEUED, Job.created_at < created_at)
    )
    return int(ahead or 0) + 1


_OwnerKey = tuple[int, datetime]  # (-priority, created_at): an owner's own order


class FairQueueSnapshot(_Refreshed):
    """The queued jobs by owner (in each owner's own order), the owners' weights and the jobs moved to the front,
    read at most once per ``refresh`` seconds per process: a poll's fair-share position is computed from it.

    The position is an estimate, stated as such in the README: fair share orders owners by recent render time per
    weight, which depends on how long jobs will take. Assuming jobs of equal cost, before the r-th job of owner A
    (in A's own order) run the jobs moved to the front, A's r - 1 earlier jobs, and from every other owner B with
    queued work the jobs whose turn comes first (:func:`_ahead_of`)."""

    def __init__(self) -> None:
        super().__init__()
        self._owners: dict[str, list[_OwnerKey]] = {}
        self._weights: dict[str, float] = {}
        self._fronts: list[datetime] = []

    def _read(self, session: Session, default_weight: float) -> None:
        rows = session.execute(
            select(Job.owner, Job.priority, Job.created_at, Job.front_at,
                   func.coalesce(OwnerPolicy.weight, default_weight))
            .outerjoin(OwnerPolicy, OwnerPolicy.owner == Job.owner)
            .where(Job.status == JobStatus.QUEUED).limit(SNAPSHOT_LIMIT)
        ).all()
        owners: dict[str, list[_OwnerKey]] = {}
        weights: dict[str, float] = {}
        fronts: list[datetime] = []
        for owner, priority, created_at, front_at, weight in rows:
            if front_at is not None:
                fronts.append(front_at)
                continue
            owners.setdefault(owner, []).append((-int(priority or 0), created_at))
            weights[owner] = float(weight)
        for keys in owners.values():
            keys.sort()
        self._owners, self._weights, self._fronts = owners, weights, sorted(fronts)

    def position(self, session: Session, job: Job, refresh: float, default_weight: float,
                 own_ahead: int | None = None) -> int:
        """``own_ahead``: the owner's queued jobs before this one as the job's own read counted them (fresh, where the
        snapshot may still hold jobs claimed since); the snapshot's count when None."""
        with self._lock:
            self._refresh(refresh, lambda: self._read(session, default_weight))
            owners, weights, fronts = self._owners, self._weights, self._fronts
        if job.front_at is not None:
            return bisect.bisect_left(fronts, job.front_at) + 1
        key = (-int(job.priority or 0), job.created_at)
        rank = (own_ahead if own_ahead is not None else bisect.bisect_left(owners.get(job.owner, []), key)) + 1
        mine = weights.get(job.owner, default_weight)
        others = sum(_ahead_of(rank, key, mine, weights[owner], keys)
                     for owner, keys in owners.items() if owner != job.owner)
        return len(fronts) + rank + others


def _ahead_of(rank: int, key: _OwnerKey, weight: float, other_weight: float, other: list[_OwnerKey]) -> int:
    """How many of another owner's queued jobs (``other``, in its order) fair share runs before the ``rank``-th job
    of an owner: its k-th job goes first while (k - 1) / other_weight < (rank - 1) / weight (equal costs), and on
    a tie when it comes first in the claim's own tie-break (priority, then age)."""
    share = (rank - 1) * other_weight / weight
    before = min(len(other), math.ceil(share))
    if share == int(share) and before < len(other) and other[before] < key:
        before += 1
    return before


FAIR_QUEUE_SNAPSHOT = FairQueueSnapshot()


def queue_position(session: Session, job: Job, refresh: float | None = None, *, ahead: int | None = None,
                   ahead_limit: int = 0, own_ahead: int | None = None) -> int | None:
    """1 = next to run, while the job is queued. With fair share on (the default), its place in the fair order
    (:class:`FairQueueSnapshot`, at most ``refresh`` seconds old). Otherwise 1 + the queued jobs created before it
    (first come, first served): ``ahead`` is those jobs as the job's own read counted them, up to ``ahead_limit``
    (exact below it; `repository.get_job_view_row`); otherwise, or at the limit, with ``refresh``: from this
    process's snapshot of the queue, at most that many seconds old; None: counted now. ``own_ahead``: the owner's
    own queued jobs ahead of it, as its read counted them (fair share: the owner's part of the estimate is fresh).
    """
    if job.status != JobStatus.QUEUED:
        return None
    fair = get_settings().fair_share
    if fair.fair_share:
        fresh = own_ahead if own_ahead is not None and own_ahead < ahead_limit else None
        return FAIR_QUEUE_SNAPSHOT.position(session, job, refresh or 0.0, fair.default_weight, fresh)
    if ahead is not None and ahead < ahead_limit:
        return ahead + 1
    if refresh is None:
        return count_position(session, job.created_at)
    return max(QUEUE_SNAPSHOT.position(session, job.created_at, refresh), (ahead or 0) + 1)


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


def eta_seconds(job: Job) -> float | None:
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


def job_view(job: Job, store: ObjectStore, url_expires: int, position: int | None = None) -> JobView:
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
        eta_seconds=eta_seconds(job),
        queue_position=position,
        batch_id=job.batch_id,
        batch_images=job.batch_images,
        render_seconds=job.render_seconds,
        images=images,
        error=error,
        links={"self": f"/v1/jobs/{job.id}"},
    )
