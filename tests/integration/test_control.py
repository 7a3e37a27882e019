"""The render process's control (worker/control/) against a real PostgreSQL: the lease keeper renews the
job's lease, writes its progress and notices a cancel; the recovery pass hands back expired leases."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from shared.clock import utcnow
from shared.db.models import Job
from shared.jobs import lifecycle
from shared.jobs.states import JobStatus
from worker.control.job_control import JobCanceled, JobControl, JobTimedOut
from worker.control.lease_keeper import LeaseKeeper
from worker.control.recovery import recover

PARAMS = {"mode": "txt2img", "prompt": "p", "seed": 5, "batch_size": 1, "n_iter": 1}


@pytest.fixture
def factory(database_url: str) -> sessionmaker[Session]:
    return sessionmaker(sa.create_engine(database_url))


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> list[tuple[uuid.UUID, str]]:
    """Render messages the recovery pass sends, instead of a broker (it needs none here)."""
    sent: list[tuple[uuid.UUID, str]] = []
    monkeypatch.setattr(lifecycle, "publish_render", lambda job_id, queue: sent.append((job_id, queue)))
    return sent


def _running_job(factory: sessionmaker[Session], worker: str) -> uuid.UUID:
    with factory() as session:
        job = lifecycle.submit(session, owner="t", api_key_id=None, params=PARAMS, model_name="m", route="render")
        session.commit()
        assert lifecycle.claim(session, job.id, worker, 5) is not None
        session.commit()
        return job.id


def test_the_lease_keeper_renews_writes_progress_and_notices_a_cancel(factory: sessionmaker[Session]) -> None:
    job_id = _running_job(factory, "w1")
    control = JobControl()
    keeper = LeaseKeeper(control, factory, "w1", lease_seconds=300, beat_seconds=60)
    control.begin([job_id])
    control.on_step(job_id, 1, 4)
    keeper.beat()
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.progress == 0.25
        assert job.lease_until is not None and job.lease_until > utcnow() + timedelta(seconds=200)

    keeper.check_cancel()
    assert not control.cancel_requested(job_id)
    with factory() as session:
        assert lifecycle.cancel(session, job_id) == lifecycle.CancelOutcome.REQUESTED
        session.commit()
    keeper.check_cancel()
    with pytest.raises(JobCanceled):
        control.on_step(job_id, 2, 4)


def test_the_lease_keeper_keeps_a_whole_batch_and_a_cancel_stops_one_job(factory: sessionmaker[Session]) -> None:
    jobs = [_running_job(factory, "w2") for _ in range(3)]
    control = JobControl()
    keeper = LeaseKeeper(control, factory, "w2", lease_seconds=300, beat_seconds=60)
    control.begin(jobs[:2])
    control.add(jobs[2:])  # joined during the batch window
    for k, job_id in enumerate(jobs):
        control.on_step(job_id, k + 1, 4)
    keeper.beat()
    with factory() as session:
        for k, job_id in enumerate(jobs):
            job = session.get(Job, job_id)
            assert job is not None and job.progress == (k + 1) / 4
            assert job.lease_until is not None and job.lease_until > utcnow() + timedelta(seconds=200)
        assert lifecycle.cancel(session, jobs[1]) == lifecycle.CancelOutcome.REQUESTED
        session.commit()
    keeper.check_cancel()
    with pytest.raises(JobCanceled):
        control.on_step(jobs[1], 3, 4)
    control.on_step(jobs[0], 3, 4)  # the others go on
    control.on_step(jobs[2], 4, 4)
    control.end()
    assert control.jobs_done == 3 and control.job_ids == ()


def test_the_step_callback_stops_a_job_past_its_time_limit() -> None:
    control = JobControl()
    first = uuid.uuid4()
    control.begin([first], time_limit=0)
    with pytest.raises(JobTimedOut, match="time limit of 0 s"):
        control.on_step(first, 1, 10)
    control.end()
    second = uuid.uuid4()
    control.begin([second])  # no limit
    control.on_step(second, 1, 10)
    assert control.progress[second] == 0.1 and control.jobs_done == 1


def test_a_cancel_for_another_job_is_ignored() -> None:
    control = JobControl()
    job_id = uuid.uuid4()
    control.begin([job_id])
    assert control.request_cancel(uuid.uuid4()) is False
    control.on_step(job_id, 1, 2)


def test_the_recovery_pass_requeues_an_expired_lease(factory: sessionmaker[Session], published: list) -> None:
    job_id = _running_job(factory, "dead:1")
    with factory() as session:
        session.execute(sa.update(Job).where(Job.id == job_id).values(lease_until=utcnow() - timedelta(seconds=1)))
        session.commit()
        assert recover(session, broker_depth=lambda: 10_000) >= 1
        job = session.get(Job, job_id)
        assert job is not None
        session.refresh(job)
        assert job.status == JobStatus.QUEUED and job.lease_owner is None
    assert (job_id, "render") in published
