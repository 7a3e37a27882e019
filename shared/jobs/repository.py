"""Reading jobs. Every change to a job goes through `shared.jobs.lifecycle`."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Select, and_, bindparam, case, func, literal, or_, select, union_all
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, aliased, contains_eager

from shared.db.async_reads import get_reads
from shared.db.models import Job, JobImage
from shared.db.session import get_engine
from shared.jobs.states import JobStatus

T = TypeVar("T")


def get_job(session: Session, job_id: uuid.UUID, owner: str | None = None) -> Job | None:
    """The job, or None when it does not exist or belongs to another owner (owner=None: any)."""
    job = session.get(Job, job_id)
    if job is None or (owner is not None and job.owner != owner):
        return None
    return job


@contextmanager
def read_session() -> Iterator[Session]:
    """A session for reads whose every statement stands alone (a poll's one query): its connection is in
    autocommit, so no BEGIN and no ROLLBACK round trips surround the query."""
    with get_engine().connect().execution_options(isolation_level="AUTOCOMMIT") as connection, \
            Session(bind=connection) as session:
        yield session


def read(fn: Callable[[Session], T]) -> T:
    """``fn`` in a :func:`read_session`, once more on a fresh connection if the first one turned out dead: pooled
    connections are pinged only after sitting idle (shared/db/session.py), so after a database restart a busy
    process's next read can meet a dropped connection; SQLAlchemy then invalidates the pool, and a read is safe to
    repeat."""
    try:
        with read_session() as session:
            return fn(session)
    except DBAPIError as error:
        if not error.connection_invalidated:
            raise
    with read_session() as session:
        return fn(session)


AHEAD_COUNT_LIMIT = 1000  # a poll counts at most this many queued jobs ahead of its own


# Fair share: a poll counts at most this many of its owner's jobs ahead of it; a job further back takes its place
# from the queue snapshot (at most a second old). Was 100: a poll of a job deep in a long queue read 200 index rows.
OWN_AHEAD_LIMIT = 20


def _count_ahead(fair: bool) -> Any:
    """While ``Job`` is queued, one bounded count of the jobs ahead of it (an index range scan that stops at its
    bound: a poll never recounts a long queue). First come, first served: the queued jobs created before it (any
    owner). Fair share: its owner's own queued jobs ahead of it in the owner's order (priority, then age), the part
    of its fair position the queue snapshot may hold stale."""
    ahead = aliased(Job)
    if fair:
        # The owner's first OWN_AHEAD_LIMIT queued jobs in its order (the first entries of ix_jobs_queued_owner, the
        # only index in that order), then those of them ahead of this job: min(ahead, limit), whatever else the
        # table holds. A range bounded by this job's own priority and age let PostgreSQL pick ix_jobs_created_at
        # instead when most jobs were queued as it last analyzed them, and walk every older finished job from the
        # oldest on: 1.8 ms a poll (1,258 pages) with 1,700 finished, 0.03 ms (26 pages) this way.
        first = (select(ahead.priority, ahead.created_at)
                 .where(ahead.status == JobStatus.QUEUED, ahead.owner == Job.owner, ahead.front_at.is_(None))
                 .order_by(ahead.priority.desc(), ahead.created_at)
                 .limit(OWN_AHEAD_LIMIT).correlate(Job).lateral("owners_first"))
        before = or_(first.c.priority > Job.priority,
                     and_(first.c.priority == Job.priority, first.c.created_at < Job.created_at))
        counted = select(func.count()).select_from(first).where(before)
    else:
        first_ahead = (select(literal(1)).select_from(ahead)
                       .where(ahead.status == JobStatus.QUEUED, ahead.created_at < Job.created_at)
                       .order_by(ahead.created_at)  # a range of ix_jobs_status_created, not all of the partial index
                       .limit(AHEAD_COUNT_LIMIT).correlate(Job).lateral("first_ahead"))
        counted = select(func.count()).select_from(first_ahead)
    return case((Job.status == JobStatus.QUEUED, counted.scalar_subquery()),
                else_=None)


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """An image of a job as stored (the columns of `JobImage` a view shows): what `lifecycle.succeed` records and
    a poll reads back."""

    index: int
    key: str
    seed: int
    width: int
    height: int
    infotext: str


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A job as a poll reads it: the columns of `Job` that its view, its queue position and the WebUI's progress
    use, read as plain values. A poll builds no ORM object: loading one cost more than the query itself."""

    images: tuple[ImageRecord, ...]  # in index order; none when read without them (the WebUI's progress)
    id: uuid.UUID
    owner: str
    mode: str
    status: str
    status_seq: int
    params: dict[str, Any]
    model_name: str
    model_hash: str | None
    attempt: int
    progress: float
    phase: str | None
    error_type: str | None
    error_message: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    batch_id: uuid.UUID | None
    batch_images: int | None
    render_seconds: float | None
    priority: int
    front_at: datetime | None
    lease_owner: str | None
    cancel_requested_at: datetime | None
    training: dict[str, Any] | None


_JOB_FIELDS = tuple(f.name for f in fields(JobRecord) if f.name != "images")
_IMAGE_FIELDS = tuple(f.name for f in fields(ImageRecord))
JOB_RECORD_COLUMNS = ", ".join(_JOB_FIELDS)  # the `jobs` columns a JobRecord is read from, in its order, as SQL


def job_record(row: Sequence[Any]) -> JobRecord:
    """A JobRecord (without images) from a row of :data:`JOB_RECORD_COLUMNS` (a submit's ``RETURNING``)."""
    return JobRecord((), *row)


@dataclass(frozen=True)
class JobViewRow:
    job: JobRecord
    ahead: int | None  # first come, first served: queued jobs created before it, up to AHEAD_COUNT_LIMIT
    own_ahead: int | None  # fair share: its owner's queued jobs before it in the owner's order, up to OWN_AHEAD_LIMIT

    @classmethod
    def of(cls, job: JobRecord, count: Any, fair: bool) -> JobViewRow:
        counted = None if count is None else int(count)
        return cls(job, None if fair else counted, counted if fair else None)


class _RecordQuery:
    """A statement that reads `JobRecord` columns, compiled once and run as its SQL text through the event loop's
    async connections (`shared.db.async_reads`): no thread hop, no statement cache lookup, no result metadata
    built from the cursor's description, no ORM loading (each cost a poll more than the query's round trip)."""

    def __init__(self, statement: Select[Any]) -> None:
        compiled = statement.compile(dialect=psycopg_dialect())
        sql, self._defaults = str(compiled), {}
        for key, value in compiled.params.items():
            bind = compiled.binds[key]
            if bind.required:  # a parameter of the query (`bindparam("owner")`): sent with each run
                self._defaults[key] = value
                continue
            # A constant of the statement (a status, a limit) is written into its text: PostgreSQL then plans the
            # prepared statement once (a generic plan) instead of on every run. As a parameter, `status = $1` could
            # not use the partial indexes (`WHERE status = 'queued'`), so every generic plan cost more than a custom
            # one, and a poll was planned again each time: 0.2 ms of PostgreSQL's CPU, more than it ran.
            literal = compiled.render_literal_value(value, bind.type).replace("%", "%%")
            sql = sql.replace(f"%({key})s", literal)
        self._sql = sql

    async def rows(self, **params: Any) -> Sequence[Sequence[Any]]:
        return await get_reads().rows(self._sql, {**self._defaults, **params})


def _job_columns() -> list[Any]:
    return [getattr(Job, name) for name in _JOB_FIELDS]


def _job_view_query(fair: bool) -> _RecordQuery:
    """The job, its images, and :func:`_count_ahead`."""
    return _RecordQuery(
        select(*_job_columns(), *(getattr(JobImage, name) for name in _IMAGE_FIELDS), _count_ahead(fair))
        .outerjoin(JobImage, JobImage.job_id == Job.id)
        .where(Job.id == bindparam("job_id"), Job.owner == bindparam("owner"))
        .order_by(JobImage.index)
    )


# Built once: building one (an alias, a lateral) cost more than running it.
_JOB_VIEW_QUERIES = {fair: _job_view_query(fair) for fair in (False, True)}


def _latest_job_query(fair: bool) -> _RecordQuery:
    mine = aliased(Job)
    # Queued in ix_jobs_queued_owner's order (no other index has it), running from ix_jobs_running_owner: one
    # `status IN (queued, running)` let PostgreSQL scan the table when most jobs were queued as it last analyzed them.
    queued = (select(literal(1)).select_from(mine)
              .where(mine.owner == bindparam("owner"), mine.status == JobStatus.QUEUED)
              .order_by(mine.priority.desc(), mine.created_at).limit(AHEAD_COUNT_LIMIT))
    running = (select(literal(1)).select_from(mine)
               .where(mine.owner == bindparam("owner"), mine.status == JobStatus.RUNNING).limit(AHEAD_COUNT_LIMIT))
    first_active = union_all(queued, running).limit(AHEAD_COUNT_LIMIT).lateral("first_active")
    count_active = select(func.count()).select_from(first_active).scalar_subquery()
    return _RecordQuery(
        select(*_job_columns(), _count_ahead(fair), count_active)
        .where(Job.owner == bindparam("owner"))
        .order_by(Job.created_at.desc()).limit(1)
    )


_LATEST_JOB_QUERIES = {fair: _latest_job_query(fair) for fair in (False, True)}


async def get_latest_job_row(owner: str, fair: bool = False) -> tuple[JobViewRow | None, int]:
    """What the WebUI API's progress poll reads, in one round trip: the owner's newest job (without its images)
    with the count a job poll reads (:func:`_count_ahead`), and the owner's queued and running jobs, counted up to
    ``AHEAD_COUNT_LIMIT``."""
    rows = await _LATEST_JOB_QUERIES[fair].rows(owner=owner)
    if not rows:
        return None, 0
    n = len(_JOB_FIELDS)
    row = rows[0]
    return JobViewRow.of(JobRecord((), *row[:n]), row[n], fair), int(row[n + 1] or 0)


async def get_job_view_row(job_id: uuid.UUID, owner: str, fair: bool = False) -> JobViewRow | None:
    """What a poll reads, in one round trip: the job with its images (a LEFT JOIN) and, while it is queued, one
    count of the jobs ahead of it (:func:`_job_view_query`; an index range scan that stops at its bound: a poll never
    recounts a long queue). None when the job is not ``owner``'s."""
    rows = await _JOB_VIEW_QUERIES[fair].rows(job_id=job_id, owner=owner)
    if not rows:
        return None
    n, m = len(_JOB_FIELDS), len(_IMAGE_FIELDS)
    images = tuple(ImageRecord(*row[n:n + m]) for row in rows if row[n] is not None)
    return JobViewRow.of(JobRecord(images, *rows[0][:n]), rows[0][n + m], fair)


def list_jobs(
    session: Session, owner: str, *, status: JobStatus | None = None, model: str | None = None, limit: int = 20,
    offset: int = 0,
) -> tuple[list[Job], int]:
    """A page of the owner's jobs, newest first, with their images, and how many match in all: one statement. The
    page is the first entries of `ix_jobs_owner_created` (owner, created_at DESC, id: the list's order), the total
    an index-only count of the owner's entries in the same statement, not a window over the page's query (which
    kept every matching row to count them: 10 ms for an owner with 44,000 jobs, 5 ms as a count; 33 ms when the
    index lacked the id and PostgreSQL sorted all the rows). A page past the end has no row to carry the total, so
    only then is it counted in a statement of its own."""
    where = [Job.owner == owner]
    if status is not None:
        where.append(Job.status == status)
    if model is not None:
        where.append(Job.model_name == model)
    count = select(func.count()).select_from(Job).where(*where)
    total = count.correlate(None).scalar_subquery().label("total")
    page = (select(Job.id, Job.created_at).where(*where)
            .order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset).subquery("page"))
    rows = session.execute(
        select(Job, total).join(page, page.c.id == Job.id)
        .outerjoin(Job.images).options(contains_eager(Job.images))
        .order_by(page.c.created_at.desc(), page.c.id, JobImage.index)
        .execution_options(populate_existing=True)
    ).unique().all()
    if rows:
        return [row[0] for row in rows], int(rows[0][1])
    return [], int(session.scalar(count) or 0) if offset else 0


def held_job(session: Session, job_id: uuid.UUID, worker: str) -> Job | None:
    """The job while it runs under ``worker``'s lease (the leader of the batch it is rendering), else None."""
    return session.scalar(select(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING,
                                            Job.lease_owner == worker))
