"""The dashboard's reads from Postgres, and the queue samples its charts are drawn from.

Every query here is bounded by an index (see migration 0003) so that it stays fast with
a large jobs table: `bench/admin_queries.py` times each one on 100,000 rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from api.admin.views import DatabaseDepth, ModelDepth, Percentiles, QueueSeries, ThroughputSeries
from shared.db.models import Job, QueueSample
from shared.jobs.states import JobStatus

PENDING = (JobStatus.QUEUED, JobStatus.RUNNING)


def queue_depth(session: Session, now: datetime | None = None) -> DatabaseDepth:
    """Queued and running jobs, in total and per model; walks only pending rows (ix_jobs_status_created)."""
    now = now or datetime.now(UTC)
    rows = session.execute(
        select(Job.model_name, Job.status, func.count(), func.min(Job.created_at))
        .where(Job.status.in_([str(s) for s in PENDING]))
        .group_by(Job.model_name, Job.status)
    ).all()
    models: dict[str, ModelDepth] = {}
    for model, status, count, oldest in rows:
        entry = models.setdefault(model, ModelDepth(model=model, queued=0, running=0, oldest_queued_at=None))
        if status == JobStatus.QUEUED:
            entry.queued, entry.oldest_queued_at = count, oldest
        else:
            entry.running = count
    oldest_queued = min((m.oldest_queued_at for m in models.values() if m.oldest_queued_at), default=None)
    return DatabaseDepth(
        queued=sum(m.queued for m in models.values()),
        running=sum(m.running for m in models.values()),
        oldest_queued_at=oldest_queued,
        oldest_queued_age_seconds=(now - oldest_queued).total_seconds() if oldest_queued else None,
        by_model=sorted(models.values(), key=lambda m: (-(m.queued + m.running), m.model)),
    )


def recent_jobs(session: Session, *, limit: int = 25, status: str | None = None) -> Sequence[Job]:
    """Newest first; ix_jobs_created_at (or ix_jobs_status_created with a status) makes it a short index walk."""
    query = select(Job).order_by(Job.created_at.desc(), Job.id).limit(limit)
    if status is not None:
        query = query.where(Job.status == status)
    return session.scalars(query).all()


@dataclass(frozen=True)
class RunningJob:
    id: uuid.UUID
    owner: str
    model: str
    progress: float
    started_at: datetime | None


def running_jobs(session: Session, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, RunningJob]:
    """The jobs workers say they hold, for their progress (written to Postgres by their lease keepers)."""
    if not ids:
        return {}
    rows = session.execute(
        select(Job.id, Job.owner, Job.model_name, Job.progress, Job.started_at).where(Job.id.in_(ids))
    ).all()
    return {row[0]: RunningJob(*row) for row in rows}


def _buckets(since: datetime, now: datetime, bucket: int) -> list[int]:
    first = int(since.timestamp()) // bucket * bucket
    return list(range(first, int(now.timestamp()) + 1, bucket))


def _bucket_expr(column: str, bucket: int) -> str:
    return f"(floor(extract(epoch FROM {column}) / {int(bucket)}) * {int(bucket)})::bigint"


def throughput_series(session: Session, since: datetime, now: datetime, bucket: int) -> ThroughputSeries:
    """Images and finished jobs per bucket, from job_images.created_at and jobs.finished_at (both indexed)."""
    starts = _buckets(since, now, bucket)
    images = dict.fromkeys(starts, 0)
    states: dict[str, dict[int, int]] = {s: dict.fromkeys(starts, 0) for s in ("succeeded", "failed", "canceled")}
    for t, count in session.execute(
        text(f"SELECT {_bucket_expr('created_at', bucket)} AS t, count(*) FROM job_images "
             "WHERE created_at >= :since GROUP BY 1"),
        {"since": since},
    ):
        if t in images:
            images[t] = count
    for t, status, count in session.execute(
        text(f"SELECT {_bucket_expr('finished_at', bucket)} AS t, status, count(*) FROM jobs "
             "WHERE finished_at >= :since GROUP BY 1, 2"),
        {"since": since},
    ):
        if status in states and t in states[status]:
            states[status][t] = count
    per_minute = 60.0 / bucket
    return ThroughputSeries(
        bucket_seconds=bucket,
        t=starts,
        images_per_minute=[round(images[t] * per_minute, 3) for t in starts],
        succeeded=list(states["succeeded"].values()),
        failed=list(states["failed"].values()),
        canceled=list(states["canceled"].values()),
    )


def queue_series(session: Session, since: datetime, now: datetime, bucket: int) -> QueueSeries:
    """The stored samples, the peak of each bucket; a bucket with no sample stays null (a gap, not a zero)."""
    starts = _buckets(since, now, bucket)
    found = {
        int(row[0]): row[1:]
        for row in session.execute(
            text(f"SELECT {_bucket_expr('sampled_at', bucket)} AS t, max(queued), max(running), max(broker_waiting) "
                 "FROM queue_samples WHERE sampled_at >= :since GROUP BY 1"),
            {"since": since},
        )
    }
    empty = (None, None, None)
    return QueueSeries(
        bucket_seconds=bucket,
        t=starts,
        queued=[found.get(t, empty)[0] for t in starts],
        running=[found.get(t, empty)[1] for t in starts],
        broker_waiting=[found.get(t, empty)[2] for t in starts],
    )


def finished_counts(session: Session, since: datetime) -> tuple[dict[str, int], dict[str, int], int]:
    """(jobs by terminal status, failures by error type, images) finished since `since`."""
    by_status: dict[str, int] = {}
    by_error: dict[str, int] = {}
    for status, error_type, count in session.execute(
        select(Job.status, Job.error_type, func.count()).where(Job.finished_at >= since).group_by(
            Job.status, Job.error_type
        )
    ):
        by_status[status] = by_status.get(status, 0) + count
        if status == JobStatus.FAILED:
            by_error[error_type or "unknown"] = by_error.get(error_type or "unknown", 0) + count
    images = session.scalar(text("SELECT count(*) FROM job_images WHERE created_at >= :since"), {"since": since})
    return by_status, by_error, int(images or 0)


def batching_counts(session: Session, since: datetime) -> tuple[dict[int, int], int]:
    """(succeeded jobs by images per UNet call, batches formed) among jobs finished since `since`."""
    by_size = {int(size or 0): int(count) for size, count in session.execute(
        select(Job.batch_images, func.count()).where(Job.finished_at >= since, Job.status == JobStatus.SUCCEEDED,
                                                      Job.batch_images.is_not(None)).group_by(Job.batch_images))}
    batches = session.scalar(select(func.count(func.distinct(Job.batch_id))).where(Job.finished_at >= since,
                                                                                  Job.batch_id.is_not(None)))
    return by_size, int(batches or 0)


def timing_percentiles(session: Session, since: datetime) -> tuple[Percentiles | None, Percentiles | None]:
    """(render time of succeeded jobs, queue wait of started jobs) finished since `since`, in one pass."""
    duration = "extract(epoch FROM finished_at - started_at)"
    wait = "extract(epoch FROM started_at - created_at)"
    succeeded = "FILTER (WHERE status = 'succeeded')"
    row = session.execute(
        text(f"SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY {duration}) {succeeded}, "
             f"percentile_cont(0.95) WITHIN GROUP (ORDER BY {duration}) {succeeded}, max({duration}) {succeeded}, "
             f"percentile_cont(0.5) WITHIN GROUP (ORDER BY {wait}), percentile_cont(0.95) WITHIN GROUP "
             f"(ORDER BY {wait}), max({wait}) "
             "FROM jobs WHERE finished_at >= :since AND started_at IS NOT NULL"),  # ix_jobs_finished_at
        {"since": since},
    ).one()

    def percentiles(p50: float | None, p95: float | None, top: float | None) -> Percentiles | None:
        if p50 is None or p95 is None or top is None:
            return None
        return Percentiles(p50=round(p50, 3), p95=round(p95, 3), max=round(float(top), 3))

    return percentiles(*row[:3]), percentiles(*row[3:])


def record_sample(
    session: Session, at: datetime, period_seconds: float, *, broker_waiting: int | None, workers_alive: int | None,
    retention: timedelta = timedelta(hours=48),
) -> bool:
    """Store the queue depth for the period containing `at`; False when another replica already did.

    Rounding `at` down to the period makes the primary key the same for every API replica,
    so `ON CONFLICT DO NOTHING` keeps one row per period however many replicas sample.
    """
    period = max(1.0, float(period_seconds))
    slot = datetime.fromtimestamp(int(at.timestamp() // period * period), UTC)
    depth = queue_depth(session, at)
    inserted = session.execute(
        insert(QueueSample)
        .values(sampled_at=slot, queued=depth.queued, running=depth.running, broker_waiting=broker_waiting,
                workers_alive=workers_alive)
        .on_conflict_do_nothing(index_elements=[QueueSample.sampled_at])
        .returning(QueueSample.sampled_at)
    ).first()
    if inserted is not None:
        session.execute(delete(QueueSample).where(QueueSample.sampled_at < slot - retention))
    return inserted is not None

