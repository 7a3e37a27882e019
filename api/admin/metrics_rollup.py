"""Counts finished jobs into `metric_counters` once each, so a scrape reads a few rows, not every job.

Counting all jobs at every scrape costs time in proportion to the table (about 0.5 s per
scrape at 100,000 jobs, see docs/benchmarks.md). Instead, newly finished jobs are
added to running totals: jobs by model and status, images by model, failures by error type,
the render-time, queue-wait and images-per-UNet-call histograms by model, and batches formed. Each
succeeded job's render seconds and planned steps also go into its model's decayed history
(`api.admin.work_estimate`), the seconds per step that price the queued work.

Exactly once, without a clock lag: the jobs already counted are remembered (for
`KEEP`) and each pass looks at jobs finished since `OVERLAP` before the newest one counted,
skipping those remembered. A job whose `finished_at` was stamped before the newest counted
one but committed later (up to `OVERLAP` later) is still found. A transaction-level
advisory lock lets one API replica advance at a time; the others just read the totals.
Run by the API's sampler every period and by `/metrics` before it reads.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from api.admin.work_estimate import (
    PLAN_SQL,
    SECONDS_COUNTER,
    STEPS_COUNTER,
    fold,
    histories_from_counters,
    job_steps,
)
from shared.db.models import MetricCounter, MetricsCountedJob

BATCH_IMAGES_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64)
DURATION_BUCKETS: tuple[float, ...] = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
WAIT_BUCKETS: tuple[float, ...] = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 1800, 3600)
OVERLAP = timedelta(minutes=5)
KEEP = timedelta(minutes=15)
BATCH = 5000
_LOCK_KEY = 0x72664D52  # "rfMR": one rollup at a time across API replicas
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# The jobs of one batch are claimed together and finish within the job time limit of each other, so a batch's
# size is counted among the jobs running or finished since `BATCH_SPAN` before the window (two index ranges),
# not by a per-row count over a column without an index (a scan of the table per job counted).
BATCH_SPAN = timedelta(minutes=15)

_NEW_FINISHED = text(
    "WITH sizes AS (SELECT batch_id, count(*) AS n FROM jobs "
    "WHERE batch_id IS NOT NULL AND (finished_at >= :batch_since OR status = 'running') GROUP BY batch_id) "
    "SELECT j.id, j.model_name, j.status, j.error_type, j.created_at, j.started_at, j.finished_at, "
    "(SELECT count(*) FROM job_images i WHERE i.job_id = j.id) AS images, j.batch_images, "
    "coalesce(s.n, 0) AS batch_jobs, "
    f"j.render_seconds, {PLAN_SQL} AS plan "
    "FROM jobs j LEFT JOIN sizes s ON s.batch_id = j.batch_id WHERE j.finished_at >= :since "
    "AND NOT EXISTS (SELECT 1 FROM metrics_counted_jobs c WHERE c.job_id = j.id) "
    "ORDER BY j.finished_at LIMIT :limit"
)


# (name, model, key) -> total: counts and sums of seconds alike
Totals = defaultdict[tuple[str, str, str], float]

def le(bound: float) -> str:
    """A bucket bound as Prometheus writes it (`0.5`, `10.0`)."""
    return repr(float(bound))


def _observe(totals: Totals, prefix: str, model: str, value: float,
             bounds: Sequence[float]) -> None:
    for bound in bounds:
        if value <= bound:
            totals[(f"{prefix}_bucket", model, le(bound))] += 1
    totals[(f"{prefix}_count", model, "")] += 1
    totals[(f"{prefix}_sum", model, "")] += value


def increments(rows: Sequence[tuple]) -> Totals:
    """What a batch of finished jobs adds to each (name, model, key) total; bucket counts are cumulative."""
    totals: Totals = defaultdict(float)
    for _id, model, status, error_type, created, started, finished, images, *batch in rows:
        totals[("jobs_finished", model, status)] += 1
        batch_images, batch_jobs = (*batch, None, None)[:2]
        if batch_jobs:  # each job of a batch adds its share: a batch counts once when all its jobs are counted
            totals[("batches", model, "")] += 1 / batch_jobs
        if status == "succeeded" and batch_images:
            _observe(totals, "batch_images", model, float(batch_images), BATCH_IMAGES_BUCKETS)
        if images:
            totals[("images", model, "")] += images
        if status == "failed":
            totals[("failures", "", error_type or "unknown")] += 1
        if started is not None:
            _observe(totals, "wait", model, max(0.0, (started - created).total_seconds()), WAIT_BUCKETS)
            if status == "succeeded":
                _observe(totals, "duration", model, max(0.0, (finished - started).total_seconds()), DURATION_BUCKETS)
    return totals


def advance(session: Session, *, batches: int = 1, batch_size: int = BATCH) -> int:
    """Count up to `batches` x `batch_size` newly finished jobs; 0 when another replica is counting. Caller commits."""
    if not session.scalar(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": _LOCK_KEY}):
        return 0
    counted = 0
    for _ in range(batches):
        newest = session.scalar(select(func.max(MetricsCountedJob.finished_at)))
        since = newest - OVERLAP if newest else _EPOCH
        rows = session.execute(_NEW_FINISHED, {"since": since, "batch_since": since - BATCH_SPAN,
                                               "limit": batch_size}).all()
        if not rows:
            break
        totals = increments(rows)
        stmt = insert(MetricCounter).values(
            [{"name": n, "model": m, "key": k, "value": float(v)} for (n, m, k), v in totals.items()]
        )
        session.execute(stmt.on_conflict_do_update(
            index_elements=[MetricCounter.name, MetricCounter.model, MetricCounter.key],
            set_={"value": MetricCounter.value + stmt.excluded.value},
        ))
        _fold_render_history(session, rows)
        session.execute(insert(MetricsCountedJob).values([{"job_id": r[0], "finished_at": r[6]} for r in rows]))
        counted += len(rows)
        if len(rows) < batch_size:
            break
    newest = session.scalar(select(func.max(MetricsCountedJob.finished_at)))
    if newest is not None:
        session.execute(delete(MetricsCountedJob).where(MetricsCountedJob.finished_at < newest - KEEP))
    return counted


def render_observations(rows: Sequence[tuple]) -> list[tuple[str, float, int]]:
    """(model, render seconds, planned steps) of the succeeded jobs among `advance`'s rows, in finish order."""
    observed = []
    for _id, model, status, *rest in rows:
        render_seconds, plan = (*rest[7:], None, None)[:2]
        if status == "succeeded" and render_seconds:
            observed.append((model, float(render_seconds), job_steps(plan)))
    return observed


def _fold_render_history(session: Session, rows: Sequence[tuple]) -> None:
    """Fold the rows' succeeded jobs into their models' decayed histories (read, fold, overwrite: under the lock)."""
    observed = render_observations(rows)
    if not observed:
        return
    models = sorted({model for model, _s, _n in observed})
    current = {(n, m, k): v for n, m, k, v in session.execute(
        select(MetricCounter.name, MetricCounter.model, MetricCounter.key, MetricCounter.value)
        .where(MetricCounter.name.in_([SECONDS_COUNTER, STEPS_COUNTER]), MetricCounter.model.in_(models)))}
    changed = fold(histories_from_counters(current), observed)
    if not changed:
        return
    stmt = insert(MetricCounter).values(
        [{"name": SECONDS_COUNTER, "model": m, "key": "", "value": h.seconds} for m, h in changed.items()]
        + [{"name": STEPS_COUNTER, "model": m, "key": "", "value": h.steps} for m, h in changed.items()])
    session.execute(stmt.on_conflict_do_update(
        index_elements=[MetricCounter.name, MetricCounter.model, MetricCounter.key],
        set_={"value": stmt.excluded.value},
    ))


def read_counters(session: Session) -> dict[tuple[str, str, str], float]:
    return {(n, m, k): v for n, m, k, v in session.execute(
        select(MetricCounter.name, MetricCounter.model, MetricCounter.key, MetricCounter.value))}
