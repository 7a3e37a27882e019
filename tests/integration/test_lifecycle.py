"""The job lifecycle (shared/jobs/lifecycle.py) against a real PostgreSQL: every transition is a
compare-and-set, checked against the one table of allowed transitions, with its webhook event and its
publish scheduled on the session."""

from __future__ import annotations

import ast
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from shared.clock import utcnow
from shared.db.models import Job
from shared.jobs import lifecycle, repository
from shared.jobs.states import ErrorType, InvalidTransition, JobStatus, check_transition

PARAMS = {"mode": "txt2img", "prompt": "p", "seed": 5, "batch_size": 1, "n_iter": 1}
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> list[tuple[uuid.UUID, str]]:
    """The render messages `lifecycle.commit` sends, instead of a broker (these tests need none)."""
    sent: list[tuple[uuid.UUID, str]] = []
    monkeypatch.setattr(lifecycle, "publish_render", lambda job_id, queue: sent.append((job_id, queue)))
    return sent


def _new_job(session: Session, **webhook: object) -> Job:
    job = lifecycle.submit(session, owner="t", api_key_id=None, params=PARAMS, model_name="m", route="render",
                           **webhook)  # type: ignore[arg-type]
    session.commit()
    return job


def _claimed(session: Session, worker: str = "w1") -> Job:
    job = _new_job(session)
    assert lifecycle.claim(session, job.id, worker, 30) is not None
    session.commit()
    return job


def test_submit_publishes_after_commit_and_marks_published(session: Session, published: list) -> None:
    job = lifecycle.submit(session, owner="t", api_key_id=None, params=PARAMS, model_name="m", route="render.m.x")
    assert published == []  # nothing leaves before the commit
    marked: list[list[uuid.UUID]] = []
    lifecycle.commit(session, mark_published=marked.append)
    assert published == [(job.id, "render.m.x")] and marked == [[job.id]]
    assert job.status == JobStatus.QUEUED and job.status_seq == 1


def test_a_rolled_back_submit_publishes_nothing(session: Session, published: list) -> None:
    lifecycle.submit(session, owner="t", api_key_id=None, params=PARAMS, model_name="m", route="render")
    session.rollback()
    lifecycle.commit(session)
    assert published == []


def test_only_one_claim_wins(session: Session) -> None:
    job = _new_job(session)
    first = lifecycle.claim(session, job.id, "w1", 30)
    session.commit()
    second = lifecycle.claim(session, job.id, "w2", 30)
    session.commit()
    assert first is not None and first.status == JobStatus.RUNNING and first.lease_owner == "w1"
    assert first.attempt == 1 and first.status_seq == 2
    assert second is None


def test_completion_records_images_and_bumps_seq(session: Session) -> None:
    job = _claimed(session)
    images = [repository.ImageRecord(0, f"jobs/{job.id}/0.png", 5, 64, 64, "text")]
    assert lifecycle.succeed(session, job.id, "w2", images) is False  # not the lease holder
    assert lifecycle.succeed(session, job.id, "w1", images, model_hash="abc") is True
    session.commit()
    done = repository.get_job(session, job.id)
    assert done is not None
    session.refresh(done)
    assert done.status == JobStatus.SUCCEEDED and done.status_seq == 3 and len(done.images) == 1
    assert done.model_hash == "abc" and done.progress == 1.0 and done.lease_until is None
    assert lifecycle.succeed(session, job.id, "w1", images) is False  # already terminal
    assert lifecycle.fail(session, job.id, "w1", ErrorType.RENDER_ERROR, "late") is False


def test_only_the_lease_holder_fails_a_job(session: Session) -> None:
    job = _claimed(session)
    assert lifecycle.fail(session, job.id, "w2", ErrorType.RENDER_ERROR, "not mine") is False
    assert lifecycle.fail(session, job.id, "w1", ErrorType.INVALID_INPUT, "x" * 5000) is True
    session.commit()
    session.refresh(job)
    assert job.status == JobStatus.FAILED and job.error_type == "invalid_input" and len(job.error_message) == 4000


def test_progress_and_lease_only_for_the_holder(session: Session) -> None:
    job = _claimed(session)
    assert lifecycle.report_progress(session, job.id, "w2", 0.5) is False
    assert lifecycle.renew_lease(session, job.id, "w2", 30) is False
    assert lifecycle.report_progress(session, job.id, "w1", 0.5) is True
    assert lifecycle.renew_lease(session, job.id, "w1", 300) is True
    session.commit()
    session.refresh(job)
    assert job.progress == 0.5 and job.status_seq == 2  # no state change
    assert job.lease_until is not None and job.lease_until > utcnow() + timedelta(seconds=200)


def test_cancel_outcomes(session: Session) -> None:
    queued = _new_job(session)
    assert lifecycle.cancel(session, queued.id) == lifecycle.CancelOutcome.CANCELED
    session.commit()
    session.refresh(queued)
    assert queued.status == JobStatus.CANCELED and queued.finished_at is not None
    assert lifecycle.cancel(session, queued.id) == lifecycle.CancelOutcome.ALREADY_TERMINAL

    running = _claimed(session)
    assert lifecycle.cancel(session, running.id) == lifecycle.CancelOutcome.REQUESTED
    session.commit()
    assert lifecycle.cancel_requested(session, running.id)
    assert lifecycle.finish_canceled(session, running.id, "w2") is False  # only the worker that stopped it
    assert lifecycle.finish_canceled(session, running.id, "w1") is True
    session.commit()
    session.refresh(running)
    assert running.status == JobStatus.CANCELED


def test_retry_is_a_new_job_with_the_same_parameters_and_webhook(session: Session) -> None:
    old = _new_job(session, webhook_url="https://example.com/hook", webhook_events=["queued", "canceled"])
    with pytest.raises(lifecycle.NotRetryable):
        lifecycle.retry(session, old, route="render")
    lifecycle.cancel(session, old.id)
    session.commit()
    session.refresh(old)
    new = lifecycle.retry(session, old, route="render")
    session.commit()
    assert new.id != old.id and new.status == JobStatus.QUEUED and new.params == old.params
    assert new.owner == old.owner and new.max_attempts == old.max_attempts
    assert new.webhook_url == "https://example.com/hook" and new.webhook_events == ["queued", "canceled"]


def test_expired_leases_requeue_or_fail(session: Session, published: list) -> None:
    lost_once, lost_always = _claimed(session, "dead:1"), _claimed(session, "dead:2")
    past = utcnow() - timedelta(seconds=1)
    session.execute(sa.update(Job).where(Job.id.in_([lost_once.id, lost_always.id])).values(lease_until=past))
    session.execute(sa.update(Job).where(Job.id == lost_always.id).values(attempt=Job.max_attempts))
    session.commit()
    requeued, failed = lifecycle.expire_leases(session)
    assert lost_once.id in requeued and lost_always.id in failed
    lifecycle.commit(session)
    assert (lost_once.id, "render") in published and all(job_id != lost_always.id for job_id, _ in published)
    session.refresh(lost_once)
    session.refresh(lost_always)
    assert lost_once.status == JobStatus.QUEUED and lost_once.lease_owner is None
    assert lost_always.status == JobStatus.FAILED and lost_always.error_type == ErrorType.WORKER_LOST


def test_every_transition_is_checked_against_the_table(session: Session) -> None:
    job = _claimed(session)
    with pytest.raises(InvalidTransition):
        lifecycle._move(session, JobStatus.SUCCEEDED, JobStatus.RUNNING, [Job.id == job.id], {})


def test_owner_scoping(session: Session) -> None:
    job = _new_job(session)
    assert repository.get_job(session, job.id, owner="t") is not None
    assert repository.get_job(session, job.id, owner="someone-else") is None


def test_transition_rules() -> None:
    check_transition(JobStatus.QUEUED, JobStatus.RUNNING)
    check_transition(JobStatus.RUNNING, JobStatus.QUEUED)
    for terminal in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED):
        assert terminal.is_terminal
        with pytest.raises(InvalidTransition):
            check_transition(terminal, JobStatus.RUNNING)
    with pytest.raises(InvalidTransition):
        check_transition(JobStatus.QUEUED, JobStatus.SUCCEEDED)


def test_only_the_lifecycle_module_writes_job_rows() -> None:
    """`update(Job)` and `Job(...)` appear in the lifecycle module only (tests may set rows up by hand)."""
    offenders = []
    for package in ("api", "shared", "worker", "devtools"):
        for path in (ROOT / package).rglob("*.py"):
            if path == ROOT / "shared" / "jobs" / "lifecycle.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("update", "Job")
                        and (node.func.id == "Job" or (node.args and isinstance(node.args[0], ast.Name)
                                                       and node.args[0].id == "Job"))):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
