"""The dashboard's queries against a real PostgreSQL, and the fleet reads against a real Redis."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.orm import Session

from api.admin import metrics, metrics_rollup
from api.admin import queries as admin_queries
from devtools.embedded import EmbeddedPostgres
from shared.db.models import Job, JobImage, QueueSample
from shared.queueing.farm_state import get_pause_state, read_paused_flag, set_paused
from shared.queueing.fleet import SEEN_KEY, WORKER_KEY_PREFIX, broker_queue, read_fleet
from tests.conftest import _fresh_database

NOW = datetime(2030, 1, 1, 12, 0, 30, tzinfo=UTC)


@pytest.fixture(scope="module")
def db_url(postgres: EmbeddedPostgres) -> str:
    return _fresh_database(postgres, "admin_queries")


@pytest.fixture
def session(db_url: str) -> Iterator[Session]:
    engine = sa.create_engine(db_url)
    with Session(engine) as s:
        s.execute(sa.text("TRUNCATE jobs, job_images, queue_samples, metric_counters, metrics_counted_jobs CASCADE"))
        s.commit()
        yield s
    engine.dispose()


def add_job(session: Session, *, status: str = "queued", model: str = "a.safetensors", created: datetime = NOW,
            started: datetime | None = None, finished: datetime | None = None, error_type: str | None = None,
            images: int = 0) -> Job:
    job = Job(id=uuid.uuid4(), owner="alice", status=status, params={"seed": 1, "prompt": "p"}, model_name=model,
              seed=1, created_at=created, started_at=started, finished_at=finished, error_type=error_type)
    session.add(job)
    session.flush()
    for index in range(images):
        session.add(JobImage(job_id=job.id, index=index, key=f"jobs/{job.id}/{index}.png", seed=1, width=64,
                             height=64, infotext="", created_at=finished))
    session.flush()
    return job


def test_queue_depth_counts_pending_jobs_per_model(session: Session) -> None:
    add_job(session, created=NOW - timedelta(seconds=90))
    add_job(session, created=NOW - timedelta(seconds=10))
    add_job(session, status="running", model="b.safetensors", started=NOW)
    add_job(session, status="succeeded", started=NOW, finished=NOW)
    depth = admin_queries.queue_depth(session, NOW)
    assert (depth.queued, depth.running) == (2, 1)
    assert depth.oldest_queued_age_seconds == pytest.approx(90)
    by_model = {m.model: (m.queued, m.running) for m in depth.by_model}
    assert by_model == {"a.safetensors": (2, 0), "b.safetensors": (0, 1)}


def test_throughput_counts_images_and_finished_jobs_per_minute(session: Session) -> None:
    minute = NOW.replace(second=0)
    queued_at = minute - timedelta(seconds=10)
    add_job(session, status="succeeded", created=queued_at, started=minute, finished=minute + timedelta(seconds=5),
            images=2)
    add_job(session, status="succeeded", created=queued_at, started=minute, finished=minute + timedelta(seconds=20),
            images=1)
    add_job(session, status="failed", finished=minute - timedelta(minutes=2), error_type="render_error")
    add_job(session, status="succeeded", finished=NOW - timedelta(hours=2), images=4)  # outside the window
    series = admin_queries.throughput_series(session, NOW - timedelta(hours=1), NOW, 60)
    assert len(series.t) == 61 and series.t[-1] == int(minute.timestamp())
    assert series.images_per_minute[-1] == 3
    assert sum(series.images_per_minute) == 3
    assert series.succeeded[-1] == 2 and series.failed[-3] == 1
    by_status, by_error, images = admin_queries.finished_counts(session, NOW - timedelta(hours=1))
    assert by_status == {"succeeded": 2, "failed": 1} and by_error == {"render_error": 1} and images == 3
    durations, waits = admin_queries.timing_percentiles(session, NOW - timedelta(hours=1))
    assert durations is not None and durations.max == pytest.approx(20) and durations.p50 == pytest.approx(12.5)
    assert waits is not None and waits.p50 == pytest.approx(10) and waits.max == pytest.approx(10)


def test_metric_totals_count_each_finished_job_once(session: Session, db_url: str) -> None:
    session.execute(sa.text("TRUNCATE metric_counters, metrics_counted_jobs"))
    add_job(session, status="succeeded", created=NOW - timedelta(seconds=4), started=NOW - timedelta(seconds=3),
            finished=NOW, images=2)
    add_job(session, status="succeeded", model="b", created=NOW, started=NOW, finished=NOW + timedelta(seconds=45))
    add_job(session, status="failed", started=NOW, finished=NOW, error_type="render_error")
    add_job(session, status="queued")
    session.commit()
    assert metrics_rollup.advance(session) == 3
    session.commit()
    assert metrics_rollup.advance(session) == 0  # nothing new: nothing counted twice
    # A job stamped finished a minute before the newest counted one, but committed only now, is still counted.
    add_job(session, status="failed", started=NOW, finished=NOW - timedelta(minutes=1), error_type=None)
    session.commit()
    assert metrics_rollup.advance(session) == 1
    session.commit()
    counters = metrics_rollup.read_counters(session)
    durations = metrics.histograms(counters, "duration", metrics_rollup.DURATION_BUCKETS)
    assert durations["a.safetensors"].count == 1 and durations["a.safetensors"].total == pytest.approx(3)
    bounds = dict(zip(metrics_rollup.DURATION_BUCKETS, durations["b"].cumulative, strict=True))
    assert bounds[30] == 0 and bounds[60] == 1
    waits = metrics.histograms(counters, "wait", metrics_rollup.WAIT_BUCKETS)
    assert waits["a.safetensors"].count == 3  # every finished job that had started, whatever its end
    assert counters[("images", "a.safetensors", "")] == 2
    assert counters[("failures", "", "render_error")] == 1 and counters[("failures", "", "unknown")] == 1
    assert counters[("jobs_finished", "a.safetensors", "failed")] == 2
    assert metrics.jobs_by_state(session)["queued"] == 1
    assert metrics.webhook_outcomes(session) == {}  # no deliveries table yet


def test_one_replica_counts_at_a_time(session: Session, db_url: str) -> None:
    add_job(session, status="succeeded", started=NOW, finished=NOW)
    session.commit()
    engine = sa.create_engine(db_url)
    try:
        with Session(engine) as other:
            other.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": metrics_rollup._LOCK_KEY})
            assert metrics_rollup.advance(session) == 0  # another replica holds the lock: skip, don't wait
            session.rollback()
            other.rollback()
    finally:
        engine.dispose()
    assert metrics_rollup.advance(session) >= 0
    session.commit()


def test_samples_keep_one_row_per_period_whatever_the_replicas(session: Session) -> None:
    add_job(session)
    session.commit()
    # Two replicas sampling within the same 10 s period: one row.
    first = admin_queries.record_sample(session, NOW, 10, broker_waiting=1, workers_alive=1)
    second = admin_queries.record_sample(session, NOW + timedelta(seconds=3), 10, broker_waiting=1, workers_alive=1)
    later = admin_queries.record_sample(session, NOW + timedelta(seconds=10), 10, broker_waiting=0, workers_alive=1)
    session.commit()
    assert (first, second, later) == (True, False, True)
    assert session.scalar(sa.select(sa.func.count()).select_from(QueueSample)) == 2
    series = admin_queries.queue_series(session, NOW - timedelta(minutes=1), NOW + timedelta(seconds=15), 10)
    assert series.queued[-2:] == [1, 1] and series.broker_waiting[-2:] == [1, 0]
    assert series.queued[0] is None  # no sample then: a gap, not a zero
    # Old samples are pruned by whichever replica writes.
    admin_queries.record_sample(session, NOW + timedelta(days=3), 10, broker_waiting=0, workers_alive=0)
    session.commit()
    assert session.scalar(sa.select(sa.func.count()).select_from(QueueSample)) == 1


def test_pause_flag_round_trip(session: Session, db_url: str) -> None:
    assert get_pause_state(session).paused is False
    state = set_paused(session, True, by="ops")
    session.commit()
    assert state.paused and state.paused_by == "ops"
    again = set_paused(session, True, by="someone else")
    session.commit()
    assert again.paused_at == state.paused_at and again.paused_by == "ops"  # the first pause is when waiting began
    assert read_paused_flag(db_url) is True
    set_paused(session, False, by="ops")
    session.commit()
    assert read_paused_flag(db_url) is False and get_pause_state(session).paused_at is None


@pytest.fixture
def redis_client(redis_db_url: Callable[[], str]) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_db_url())
    client.flushdb()
    yield client
    client.flushdb()


def beat(client: redis.Redis, name: str, at: float, ttl: int = 60, **extra: object) -> None:
    info = {"name": name, "pid": 1, "device": "cpu", "models": ["a"], "ready": True, "current_job": None,
            "jobs_done": 3, "heartbeat_at": at} | extra
    client.set(WORKER_KEY_PREFIX + name, json.dumps(info), ex=ttl)


def test_fleet_shows_a_silent_worker_as_lost_then_forgets_it(redis_client: redis.Redis) -> None:
    now = 1_000_000.0
    beat(redis_client, "w1:1", now - 1)
    beat(redis_client, "w2:2", now - 2)
    fleet = read_fleet(redis_client, lost_after_seconds=10, forget_after_seconds=100, now=now)
    assert [(s.info["name"], s.lost) for s in fleet] == [("w1:1", False), ("w2:2", False)]
    # w2's key expires (its TTL ran out): the seen hash still knows it, so it shows as lost.
    redis_client.delete(WORKER_KEY_PREFIX + "w2:2")
    fleet = read_fleet(redis_client, lost_after_seconds=10, forget_after_seconds=100, now=now + 5)
    assert [(s.info["name"], s.lost) for s in fleet] == [("w1:1", False), ("w2:2", True)]
    # A key still present but silent past three heartbeats is lost too.
    fleet = read_fleet(redis_client, lost_after_seconds=10, forget_after_seconds=100, now=now + 20)
    assert all(s.lost for s in fleet)
    # Long gone: forgotten.
    redis_client.delete(WORKER_KEY_PREFIX + "w1:1")
    assert read_fleet(redis_client, lost_after_seconds=10, forget_after_seconds=100, now=now + 500) == []
    assert redis_client.hlen(SEEN_KEY) == 0


def test_broker_queue_counts_every_priority_list(redis_client: redis.Redis) -> None:
    redis_client.rpush("render", "a", "b")
    redis_client.rpush("render\x06\x163", "c")
    redis_client.hset("unacked", mapping={"tag1": "x"})
    assert broker_queue(redis_client) == broker_queue(redis_client).__class__(waiting=3, unacked=1)
