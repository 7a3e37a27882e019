"""Usage accounting (shared/owners/usage.py) and its metrics (api/admin/owner_metrics.py) on a real PostgreSQL:
a succeeded job counts toward its owner's UTC day of `finished_at`, sums per day and month, the queued count."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from api.admin.owner_metrics import owner_usage_metrics
from devtools.embedded import EmbeddedPostgres
from shared.clock import utcnow
from shared.db.models import Job
from shared.jobs import lifecycle
from shared.owners.usage import owner_used, queued_jobs, record_usage, used_by_owner

PARAMS = {"mode": "txt2img", "prompt": "p", "seed": 5, "batch_size": 1, "n_iter": 1}


def _finished(session: Session, owner: str, seconds: float, images: int, at: datetime) -> None:
    job = lifecycle.submit(session, owner=owner, api_key_id=None, params=PARAMS, model_name="m", route="render")
    session.execute(update(Job).where(Job.id == job.id).values(status="succeeded", finished_at=at,
                                                               render_seconds=seconds))
    record_usage(session, job.id, seconds, images)
    session.commit()


def test_usage_counts_per_utc_day_and_month(session: Session) -> None:
    owner = f"usage-{uuid.uuid4().hex[:6]}"
    now = utcnow()
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    _finished(session, owner, 2.0, 1, now)
    _finished(session, owner, 3.5, 4, now)
    _finished(session, owner, 10.0, 2, month_start - timedelta(seconds=1))  # last month: not counted
    if now.day > 1:
        _finished(session, owner, 1.0, 1, month_start)  # this month, not today
    used = owner_used(session, owner, now)
    assert (used.today.gpu_seconds, used.today.images, used.today.jobs) == (5.5, 5, 2)
    expected_month = (6.5, 6, 3) if now.day > 1 else (5.5, 5, 2)
    assert (used.month.gpu_seconds, used.month.images, used.month.jobs) == expected_month
    assert [day for day, _ in used.days][-1] == now.date()
    today, month = used_by_owner(session, now)[owner]
    assert today == used.today and month == used.month
    # Seen from tomorrow, today's use is yesterday's: nothing today, the month unchanged (unless it ends).
    tomorrow = owner_used(session, owner, now + timedelta(days=1))
    assert tomorrow.today.jobs == 0


def test_a_job_finished_just_before_utc_midnight_counts_for_that_day(session: Session) -> None:
    owner = f"usage-{uuid.uuid4().hex[:6]}"
    late = datetime(2026, 7, 14, 23, 59, 59, tzinfo=UTC)
    _finished(session, owner, 4.0, 1, late)
    assert owner_used(session, owner, late).today.gpu_seconds == 4.0
    assert owner_used(session, owner, late + timedelta(seconds=2)).today.gpu_seconds == 0.0


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self):  # type: ignore[no-untyped-def]
        return iter(self.families)


def test_metrics_per_owner(session: Session) -> None:
    owner = f"usage-{uuid.uuid4().hex[:6]}"
    now = utcnow()
    _finished(session, owner, 2.5, 3, now)
    waiting = lifecycle.submit(session, owner=owner, api_key_id=None, params=PARAMS, model_name="m", route="render")
    session.commit()
    assert queued_jobs(session, owner) == 1
    registry = CollectorRegistry()
    registry.register(_Families(owner_usage_metrics(session, now)))
    session.execute(update(Job).where(Job.id == waiting.id).values(status="canceled"))  # leave no queued job behind
    session.commit()
    text = generate_latest(registry).decode()
    assert f'renderfarm_owner_gpu_seconds_total{{owner="{owner}"}} 2.5' in text
    assert f'renderfarm_owner_images_total{{owner="{owner}"}} 3.0' in text
    assert f'renderfarm_owner_jobs_succeeded_total{{owner="{owner}"}} 1.0' in text
    assert f'renderfarm_owner_gpu_seconds_today{{owner="{owner}"}} 2.5' in text
    assert f'renderfarm_owner_images_month{{owner="{owner}"}} 3.0' in text
    assert f'renderfarm_owner_queued_jobs{{owner="{owner}"}} 1.0' in text


def test_the_migration_counts_jobs_that_succeeded_before_it(postgres: EmbeddedPostgres) -> None:
    """0010 fills owner_usage from the succeeded jobs already there, so no owner starts over on upgrade."""
    import psycopg
    import sqlalchemy as sa

    from shared.db.migrate import upgrade

    name = "farm_usage_migration"
    with psycopg.connect(host="127.0.0.1", port=postgres.port, user=postgres.user, dbname="postgres",
                         autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://{postgres.user}@127.0.0.1:{postgres.port}/{name}"
    upgrade(url, "0009")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for n, (status, seconds, images) in enumerate([("succeeded", 2.0, 2), ("succeeded", 1.5, 1),
                                                       ("failed", None, 0)]):
            job_id = uuid.uuid4()
            conn.execute(sa.text(
                "INSERT INTO jobs (id, owner, mode, status, status_seq, params, model_name, seed, attempt, "
                "max_attempts, progress, finished_at, render_seconds) VALUES (:id, 'old', 'txt2img', :status, 1, "
                "'{}', 'm', :n, 1, 3, 1, '2026-11-30 23:30:00+00', :seconds)"),
                {"id": job_id, "status": status, "n": n, "seconds": seconds})
            for index in range(images):
                conn.execute(sa.text(
                    "INSERT INTO job_images (job_id, index, key, seed, width, height, infotext) "
                    "VALUES (:id, :index, 'k', 1, 64, 64, '')"), {"id": job_id, "index": index})
    upgrade(url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT owner, day, gpu_seconds, images, jobs FROM owner_usage")).all()
    engine.dispose()
    assert [tuple(row) for row in rows] == [("old", datetime(2026, 11, 30).date(), 3.5, 3, 2)]


def test_a_failed_or_canceled_job_is_charged_its_gpu_time_but_no_images(session: Session) -> None:
    """The GPU was spent whether or not the images were kept: quotas and fair share count it."""
    from shared.jobs import fair_share
    from shared.jobs.fair_share import FairOrder
    from shared.jobs.states import ErrorType
    from shared.settings import FairShareSettings

    owner = f"spent-{uuid.uuid4().hex[:6]}"
    ids = []
    for _ in range(3):
        job = lifecycle.submit(session, owner=owner, api_key_id=None, params=PARAMS, model_name="m", route="render")
        assert lifecycle.claim(session, job.id, "w", 60) is not None
        ids.append(job.id)
    session.commit()
    assert lifecycle.fail(session, ids[0], "w", ErrorType.TIMEOUT, "too long", render_seconds=7.5)
    assert lifecycle.finish_canceled(session, ids[1], "w", render_seconds=2.5)
    assert lifecycle.fail(session, ids[2], "w", ErrorType.INVALID_INPUT, "bad")  # before any GPU work
    session.commit()
    used = owner_used(session, owner, utcnow())
    assert (used.today.gpu_seconds, used.today.images, used.today.jobs) == (10.0, 0, 0)
    assert [session.get(Job, job_id).render_seconds for job_id in ids] == [7.5, 2.5, None]
    order = FairOrder.from_settings(FairShareSettings())
    assert order is not None
    usage = fair_share.recent_usage(order)
    recent = session.execute(select(usage.c.used).where(usage.c.owner == owner)).scalar_one()
    assert 9.9 < recent <= 10.0  # decayed by the seconds since, with a 10-minute half-life
