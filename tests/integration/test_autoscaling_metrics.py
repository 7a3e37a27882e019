"""The autoscaling reads against a real PostgreSQL and Redis: routes, ages, queued work, history, busy workers."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.orm import Session

from api.admin import autoscaling, metrics, metrics_rollup
from api.admin.work_estimate import DEFAULT_SECONDS_PER_STEP, HISTORY_DECAY
from devtools.embedded import EmbeddedPostgres
from shared.db.models import Job
from shared.jobs.views import planned_steps
from shared.queueing.fleet import WORKER_KEY_PREFIX
from shared.queueing.routing import model_queue
from tests.conftest import _fresh_database

NOW = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
TXT = {"mode": "txt2img", "prompt": "p", "seed": 1, "steps": 20, "n_iter": 1, "enable_hr": False}


@pytest.fixture(scope="module")
def db_url(postgres: EmbeddedPostgres) -> str:
    return _fresh_database(postgres, "autoscaling_metrics")


@pytest.fixture
def session(db_url: str) -> Iterator[Session]:
    engine = sa.create_engine(db_url)
    with Session(engine) as s:
        s.execute(sa.text("TRUNCATE jobs, job_images, metric_counters, metrics_counted_jobs CASCADE"))
        s.commit()
        yield s
    engine.dispose()


def add_job(session: Session, *, status: str = "queued", model: str = "a.safetensors", route: str | None = "render",
            created: datetime = NOW, params: dict[str, Any] | None = None, render_seconds: float | None = None,
            finished: datetime | None = None) -> Job:
    job = Job(id=uuid.uuid4(), owner="alice", status=status, params=params or TXT, model_name=model, seed=1,
              route=route, created_at=created, started_at=finished and created, finished_at=finished,
              render_seconds=render_seconds)
    session.add(job)
    session.flush()
    return job


def test_queued_jobs_and_oldest_age_per_route(session: Session) -> None:
    add_job(session, created=NOW - timedelta(seconds=120))
    add_job(session, created=NOW - timedelta(seconds=10))
    add_job(session, route=model_queue("b.safetensors"), model="b.safetensors", created=NOW - timedelta(seconds=40))
    add_job(session, route=None, created=NOW - timedelta(seconds=5))
    add_job(session, status="running", created=NOW - timedelta(seconds=600))  # neither running nor finished count
    add_job(session, status="succeeded", created=NOW - timedelta(seconds=900), finished=NOW, render_seconds=1.0)
    session.commit()
    work = autoscaling.read_queued_work(session, NOW)
    assert {route: q.queued for route, q in work.routes.items()} == {
        "render": 2, model_queue("b.safetensors"): 1, autoscaling.UNROUTED: 1}
    ages = work.route_ages()
    assert ages["render"] == pytest.approx(120) and ages[model_queue("b.safetensors")] == pytest.approx(40)
    later = autoscaling.read_queued_work(session, NOW + timedelta(seconds=30))
    assert later.route_ages()["render"] == pytest.approx(150)  # the oldest job's age grows while it waits


PLANS = [
    TXT,
    TXT | {"n_iter": 3},
    TXT | {"mode": "img2img", "denoising_strength": 0.35, "init_images": ["uploads/x.png"]},
    TXT | {"enable_hr": True, "hr_second_pass_steps": 7},
    TXT | {"enable_hr": True, "hr_second_pass_steps": 0},
    {"mode": "upscale", "upscaler_1": "R-ESRGAN 4x+"},
]


def test_queued_steps_in_sql_match_the_job_view(session: Session) -> None:
    """The query sends Postgres only the params that decide steps; the total matches `planned_steps` on whole
    params, so the estimate and the job view count the same steps."""
    for plan in PLANS:
        add_job(session, params=plan)
        add_job(session, params=plan, model="b.safetensors")
    session.commit()
    expected = sum(planned_steps(p) for p in PLANS if "steps" in p)
    work = autoscaling.read_queued_work(session, NOW)
    assert work.steps_by_model == {"a.safetensors": expected, "b.safetensors": expected}
    assert sum(q.queued for q in work.routes.values()) == 2 * len(PLANS)


def test_finished_jobs_become_history_once(session: Session) -> None:
    add_job(session, params=TXT | {"n_iter": 5})  # 100 queued steps
    session.commit()
    metrics_rollup.advance(session)
    session.commit()
    costs = autoscaling.step_costs(metrics_rollup.read_counters(session), ["a.safetensors"])
    assert costs["a.safetensors"].seconds_per_step == DEFAULT_SECONDS_PER_STEP  # no history yet
    assert not costs["a.safetensors"].from_history

    add_job(session, status="succeeded", finished=NOW, render_seconds=2.0)  # 20 steps: 0.1 s a step
    add_job(session, status="failed", finished=NOW, render_seconds=None)
    session.commit()
    metrics_rollup.advance(session)
    session.commit()
    assert metrics_rollup.advance(session) == 0  # counted once: the history is not folded again
    session.commit()
    counters = metrics_rollup.read_counters(session)
    cost = autoscaling.step_costs(counters, ["a.safetensors"])["a.safetensors"]
    assert cost.from_history and cost.seconds_per_step == pytest.approx(0.1)

    add_job(session, status="succeeded", finished=NOW + timedelta(seconds=5), render_seconds=8.0,
            params=TXT | {"steps": 40})
    session.commit()
    metrics_rollup.advance(session)
    session.commit()
    cost = autoscaling.step_costs(metrics_rollup.read_counters(session), ["a.safetensors"])["a.safetensors"]
    assert cost.seconds_per_step == pytest.approx((2.0 * HISTORY_DECAY + 8.0) / (20 * HISTORY_DECAY + 40))


@pytest.fixture
def redis_client(redis_db_url: Callable[[], str]) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_db_url())
    client.flushdb()
    yield client
    client.flushdb()


def beat(client: redis.Redis, name: str, **extra: object) -> None:
    info = {"name": name, "models": ["a.safetensors"], "ready": True, "current_job": None, "current_batch": [],
            "jobs_done": 0, "heartbeat_at": time.time()} | extra
    client.set(WORKER_KEY_PREFIX + name, json.dumps(info), ex=60)


def test_snapshot_counts_busy_idle_and_queued_work(session: Session, db_url: str,
                                                   redis_client: redis.Redis) -> None:
    add_job(session, status="succeeded", finished=NOW - timedelta(minutes=1), render_seconds=1.0)  # 0.05 s/step
    add_job(session, params=TXT | {"n_iter": 2})
    add_job(session, params=TXT, model="new.safetensors")
    session.commit()
    beat(redis_client, "w1:1", current_job=str(uuid.uuid4()))
    beat(redis_client, "w2:2", current_batch=[str(uuid.uuid4())])
    beat(redis_client, "w3:3")
    beat(redis_client, "w4:4", ready=False)
    beat(redis_client, "w5:5", current_job="x", heartbeat_at=time.time() - 1000)  # lost: beats no more
    snap = metrics.take_snapshot(session, redis_client, lost_after_seconds=30, forget_after_seconds=3600)
    assert snap.sources_up == {"postgres": True, "redis": True}
    assert snap.activity == autoscaling.WorkerActivity(busy=2, idle=1, starting=1)
    samples = {(f.name, tuple(s.labels.values())): s.value for f in metrics.families(snap) for s in f.samples}
    assert samples[("renderfarm_route_queued_jobs", ("render",))] == 2
    assert samples[("renderfarm_queued_steps", ("a.safetensors",))] == 40
    assert samples[("renderfarm_queued_work_seconds", ("a.safetensors",))] == pytest.approx(40 * 0.05)
    assert samples[("renderfarm_seconds_per_step", ("a.safetensors", "history"))] == pytest.approx(0.05)
    assert samples[("renderfarm_queued_work_seconds", ("new.safetensors",))] == pytest.approx(
        20 * DEFAULT_SECONDS_PER_STEP)
    assert samples[("renderfarm_seconds_per_step", ("new.safetensors", "default"))] == DEFAULT_SECONDS_PER_STEP
    assert (samples[("renderfarm_workers_busy", ())], samples[("renderfarm_workers_idle", ())]) == (2, 1)


def test_queued_work_is_read_through_the_status_index(session: Session) -> None:
    """The cost follows the queue, not the table: the planner can serve the query from ix_jobs_status_created."""
    session.execute(sa.text("SET LOCAL enable_seqscan = off"))
    plan = "\n".join(row[0] for row in session.execute(sa.text("EXPLAIN " + str(autoscaling._QUEUED.text))))
    assert "ix_jobs_status_created" in plan or "ix_jobs_queued" in plan, plan


def test_batch_sizes_are_counted_without_a_scan_per_job(session: Session) -> None:
    """A batch counts once when all its jobs are counted, also when one member finishes after the first is counted
    (it is running then, and counted among the batch's jobs)."""
    batch, lone = uuid.uuid4(), uuid.uuid4()
    first = add_job(session, status="succeeded", finished=NOW, render_seconds=1.0)
    second = add_job(session, status="running")
    third = add_job(session, status="succeeded", finished=NOW, render_seconds=1.0)
    first.batch_id = second.batch_id = batch
    third.batch_id = lone
    session.commit()
    assert metrics_rollup.advance(session) == 2
    session.commit()
    second.status, second.finished_at, second.render_seconds = "succeeded", NOW + timedelta(seconds=1), 1.0
    session.commit()
    assert metrics_rollup.advance(session) == 1
    session.commit()
    assert metrics_rollup.read_counters(session)[("batches", "a.safetensors", "")] == pytest.approx(2.0)
    plan = "\n".join(row[0] for row in session.execute(
        sa.text("EXPLAIN " + str(metrics_rollup._NEW_FINISHED.text)),
        {"since": NOW, "batch_since": NOW - metrics_rollup.BATCH_SPAN, "limit": 10}))
    assert "SubPlan" not in plan or "batch_id = j.batch_id" not in plan, plan
