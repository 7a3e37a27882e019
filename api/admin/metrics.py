"""Prometheus metrics from Postgres and Redis, read at scrape time.

The API never sees a job finish (workers do), and Celery's prefork children cannot share
in-process counters, so no process keeps counters: gauges are counted live, and counters
and histograms are running totals in Postgres (`api.admin.metrics_rollup` adds each finished
job once). Every API replica therefore reports the same values, a restart loses nothing,
and `rate()` works as usual. A short cache bounds the cost when several scrapers ask at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from api.admin import autoscaling, metrics_rollup
from api.admin import queries as admin_queries
from api.admin.metrics_rollup import BATCH_IMAGES_BUCKETS, DURATION_BUCKETS, WAIT_BUCKETS, le
from api.admin.owner_metrics import owner_usage_metrics
from shared.clock import utcnow
from shared.db.models import Job
from shared.jobs.states import JobStatus
from shared.queueing.farm_state import get_pause_state
from shared.queueing.fleet import broker_queue, images_per_second, read_fleet

log = logging.getLogger(__name__)



@dataclass
class Histogram:
    count: int
    total: float
    cumulative: list[int]  # one per bucket bound; +Inf is `count`


@dataclass
class Snapshot:
    sources_up: dict[str, bool] = field(default_factory=dict)
    jobs_by_state: dict[str, int] = field(default_factory=dict)
    depth_by_model: dict[tuple[str, str], int] = field(default_factory=dict)
    oldest_queued_age: float = 0.0
    paused: bool = False
    counters: dict[tuple[str, str, str], float] = field(default_factory=dict)  # metric_counters rows
    webhook_outcomes: dict[str, int] = field(default_factory=dict)
    broker: dict[str, int] = field(default_factory=dict)
    # name, heartbeat age, lost, jobs done, images per second of rendering (None before the first image)
    workers: list[tuple[str, float, bool, int, float | None]] = field(default_factory=list)
    # For autoscalers (api/admin/autoscaling.py); None when its source failed this scrape.
    queued_work: autoscaling.QueuedWork | None = None
    activity: autoscaling.WorkerActivity | None = None
    # Per-owner usage and queued jobs (api/admin/owner_metrics.py, issue 17's quotas).
    owners: list[Metric] = field(default_factory=list)


def jobs_by_state(session: Session) -> dict[str, int]:
    """A live count (the only full pass left; an index-only scan of ix_jobs_status_created)."""
    counts = {status: int(n) for status, n in session.execute(select(Job.status, func.count()).group_by(Job.status))}
    return {str(s): 0 for s in JobStatus} | counts


def webhook_outcomes(session: Session) -> dict[str, int]:
    """Webhook deliveries by status (pending, delivered, failed) once issue 5's table exists; nothing before."""
    if session.scalar(text("SELECT to_regclass('webhook_deliveries')")) is None:
        return {}
    rows = session.execute(text("SELECT status, count(*) FROM webhook_deliveries GROUP BY 1"))
    return {str(status): int(count) for status, count in rows}


def take_snapshot(
    session: Session, client: redis.Redis, *, lost_after_seconds: float, forget_after_seconds: float
) -> Snapshot:
    snap = Snapshot()
    try:
        snap.jobs_by_state = jobs_by_state(session)
        depth = admin_queries.queue_depth(session)
        for entry in depth.by_model:
            snap.depth_by_model[(entry.model, "queued")] = entry.queued
            snap.depth_by_model[(entry.model, "running")] = entry.running
        snap.oldest_queued_age = depth.oldest_queued_age_seconds or 0.0
        snap.queued_work = autoscaling.read_queued_work(session)
        snap.paused = get_pause_state(session).paused
        metrics_rollup.advance(session, batch_size=1000)  # bounded: the sampler does the bulk of a backfill
        session.commit()
        snap.counters = metrics_rollup.read_counters(session)
        snap.webhook_outcomes = webhook_outcomes(session)
        snap.owners = owner_usage_metrics(session, utcnow())
        snap.sources_up["postgres"] = True
    except Exception:  # report the source as down, keep the rest of the scrape
        log.exception("metrics: Postgres queries failed")
        session.rollback()
        snap.sources_up["postgres"] = False
    try:
        queue = broker_queue(client)
        snap.broker = {"waiting": queue.waiting, "unacked": queue.unacked}
        sightings = read_fleet(client, lost_after_seconds=lost_after_seconds, forget_after_seconds=forget_after_seconds)
        for s in sightings:
            snap.workers.append((str(s.info.get("name")), s.heartbeat_age, s.lost, int(s.info.get("jobs_done") or 0),
                                 images_per_second(s.info)))
        snap.activity = autoscaling.worker_activity(s.info for s in sightings if not s.lost)
        snap.sources_up["redis"] = True
    except Exception:
        log.exception("metrics: Redis reads failed")
        snap.sources_up["redis"] = False
    return snap


def histograms(counters: dict[tuple[str, str, str], float], prefix: str,
               bounds: tuple[float, ...]) -> dict[str, Histogram]:
    """Rebuild per-model histograms from the `<prefix>_bucket/_count/_sum` counters."""
    models = {m for (n, m, _k) in counters if n == f"{prefix}_count"}
    return {
        model: Histogram(
            count=int(counters[(f"{prefix}_count", model, "")]),
            total=counters.get((f"{prefix}_sum", model, ""), 0.0),
            cumulative=[int(counters.get((f"{prefix}_bucket", model, le(b)), 0)) for b in bounds],
        )
        for model in models
    }


def _labelled(counters: dict[tuple[str, str, str], float], name: str) -> dict[tuple[str, str], float]:
    return {(m, k): v for (n, m, k), v in counters.items() if n == name}


def _histogram_family(name: str, doc: str, values: dict[str, Histogram], bounds: tuple[float, ...]) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=["model"])
    for model, h in sorted(values.items()):
        buckets = [(le(b), c) for b, c in zip(bounds, h.cumulative, strict=True)] + [("+Inf", h.count)]
        family.add_metric([model], buckets, h.total)
    return family


def families(snap: Snapshot) -> Iterator[Metric]:
    up = GaugeMetricFamily("renderfarm_metrics_source_up", "Whether the source answered this scrape", labels=["source"])
    for source, ok in sorted(snap.sources_up.items()):
        up.add_metric([source], 1.0 if ok else 0.0)
    yield up
    jobs = GaugeMetricFamily("renderfarm_jobs", "Jobs by state (rows in Postgres)", labels=["state"])
    for state, count in sorted(snap.jobs_by_state.items()):
        jobs.add_metric([state], count)
    yield jobs
    depth = GaugeMetricFamily("renderfarm_queue_depth", "Queued and running jobs per model", labels=["model", "state"])
    for (model, state), count in sorted(snap.depth_by_model.items()):
        depth.add_metric([model, state], count)
    yield depth
    yield GaugeMetricFamily("renderfarm_oldest_queued_job_age_seconds", "Age of the oldest queued job (0: none)",
                            value=snap.oldest_queued_age)
    yield GaugeMetricFamily("renderfarm_queue_paused", "1 while the farm takes no new jobs", value=float(snap.paused))
    broker = GaugeMetricFamily("renderfarm_broker_messages", "Messages in the broker's render queue", labels=["kind"])
    for kind, count in sorted(snap.broker.items()):
        broker.add_metric([kind], count)
    yield broker
    yield _histogram_family("renderfarm_job_duration_seconds", "Render time of succeeded jobs (started to finished)",
                            histograms(snap.counters, "duration", DURATION_BUCKETS), DURATION_BUCKETS)
    yield _histogram_family("renderfarm_job_queue_wait_seconds",
                            "Queue wait (created to started) of finished jobs that had started",
                            histograms(snap.counters, "wait", WAIT_BUCKETS), WAIT_BUCKETS)
    yield _histogram_family("renderfarm_batch_images", "Images per UNet call that rendered each succeeded job "
                            "(its effective batch size)", histograms(snap.counters, "batch_images",
                                                                     BATCH_IMAGES_BUCKETS), BATCH_IMAGES_BUCKETS)
    batches = CounterMetricFamily("renderfarm_batches_formed", "Batches claimed together (one job alone counts "
                                  "as a batch of one)", labels=["model"])
    for (model, _), total in sorted(_labelled(snap.counters, "batches").items()):
        batches.add_metric([model], round(total, 3))
    yield batches
    finished = CounterMetricFamily("renderfarm_jobs_finished", "Finished jobs by model and final state",
                                   labels=["model", "status"])
    for (model, status), total in sorted(_labelled(snap.counters, "jobs_finished").items()):
        finished.add_metric([model, status], total)
    yield finished
    images = CounterMetricFamily("renderfarm_images_rendered", "Images rendered and stored", labels=["model"])
    for (model, _), total in sorted(_labelled(snap.counters, "images").items()):
        images.add_metric([model], total)
    yield images
    failures = CounterMetricFamily("renderfarm_job_failures", "Failed jobs by error type", labels=["error_type"])
    for (_, error_type), total in sorted(_labelled(snap.counters, "failures").items()):
        failures.add_metric([error_type], total)
    yield failures
    hooks = CounterMetricFamily("renderfarm_webhook_deliveries", "Webhook deliveries by final outcome",
                                labels=["outcome"])
    for outcome, count in sorted(snap.webhook_outcomes.items()):
        if outcome != "pending":  # a pending delivery has no outcome yet; counting it would make the counter fall
            hooks.add_metric([outcome], count)
    yield hooks
    yield GaugeMetricFamily("renderfarm_webhook_deliveries_pending", "Webhook deliveries waiting for an attempt",
                            value=snap.webhook_outcomes.get("pending", 0))
    workers = GaugeMetricFamily("renderfarm_workers", "Render workers by liveness", labels=["state"])
    workers.add_metric(["alive"], sum(1 for w in snap.workers if not w[2]))
    workers.add_metric(["lost"], sum(1 for w in snap.workers if w[2]))
    yield workers
    age = GaugeMetricFamily("renderfarm_worker_heartbeat_age_seconds", "Seconds since the worker's last heartbeat",
                            labels=["worker"])
    done = GaugeMetricFamily("renderfarm_worker_jobs_done", "Jobs the worker process has finished since it started",
                             labels=["worker"])
    rate = GaugeMetricFamily("renderfarm_worker_images_per_second",
                             "Images the worker process recorded per second of rendering since it started",
                             labels=["worker"])
    for name, heartbeat_age, _lost, jobs_done, per_second in snap.workers:
        age.add_metric([name], round(heartbeat_age, 3))
        done.add_metric([name], jobs_done)
        if per_second is not None:
            rate.add_metric([name], per_second)
    yield age
    yield done
    yield rate
    yield from autoscaling.families(snap.queued_work, snap.activity, snap.counters)
    yield from snap.owners


class FarmCollector(Collector):
    """Collects a snapshot at most every `cache_seconds`; concurrent scrapes share one."""

    def __init__(
        self, session_factory: sessionmaker[Session], client: Callable[[], redis.Redis], *,
        lost_after_seconds: float, forget_after_seconds: float, cache_seconds: float = 2.0,
    ) -> None:
        self.session_factory = session_factory
        self.client = client
        self.lost_after_seconds = lost_after_seconds
        self.forget_after_seconds = forget_after_seconds
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._cached: tuple[float, Snapshot] | None = None

    def snapshot(self) -> Snapshot:
        with self._lock:
            if self._cached and time.monotonic() - self._cached[0] < self.cache_seconds:
                return self._cached[1]
            with self.session_factory() as session:
                snap = take_snapshot(session, self.client(), lost_after_seconds=self.lost_after_seconds,
                                     forget_after_seconds=self.forget_after_seconds)
            self._cached = (time.monotonic(), snap)
            return snap

    def collect(self) -> Iterator[Metric]:
        yield from families(self.snapshot())


def farm_registry(collector: FarmCollector) -> CollectorRegistry:
    """A registry of our own: the process-global one would add this process's Python internals to a farm view."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
