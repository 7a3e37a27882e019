"""The job repository against a real PostgreSQL: compare-and-set claims and completions."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from shared.jobs import repository
from shared.jobs.states import InvalidTransition, JobStatus, check_transition

PARAMS = {"mode": "txt2img", "prompt": "p", "seed": 5, "batch_size": 1, "n_iter": 1}


@pytest.fixture
def session(database_url: str) -> Iterator[Session]:
    engine = sa.create_engine(database_url)
    with Session(engine) as s:
        yield s
    engine.dispose()


def _new_job(session: Session):
    job = repository.create_job(session, owner="t", api_key_id=None, params=PARAMS, model_name="m", model_hash=None)
    session.commit()
    return job


def test_only_one_claim_wins(session: Session) -> None:
    job = _new_job(session)
    first = repository.claim_job(session, job.id, "w1", 30)
    session.commit()
    second = repository.claim_job(session, job.id, "w2", 30)
    session.commit()
    assert first is not None and first.status == JobStatus.RUNNING and first.lease_owner == "w1"
    assert first.attempt == 1 and first.status_seq == 2
    assert second is None


def test_completion_records_images_and_bumps_seq(session: Session) -> None:
    job = _new_job(session)
    repository.claim_job(session, job.id, "w1", 30)
    session.commit()
    images = [repository.NewImage(0, f"jobs/{job.id}/0.png", 5, 64, 64, "text")]
    assert repository.complete_job(session, job.id, "w2", images) is False  # not the lease holder
    assert repository.complete_job(session, job.id, "w1", images) is True
    session.commit()
    done = repository.get_job(session, job.id)
    session.refresh(done)
    assert done.status == JobStatus.SUCCEEDED and done.status_seq == 3 and len(done.images) == 1
    assert repository.complete_job(session, job.id, "w1", images) is False  # already terminal
    assert repository.fail_job(session, job.id, "render_error", "late", worker="w1") is False


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
