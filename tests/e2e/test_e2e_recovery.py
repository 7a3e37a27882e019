"""Jobs left behind by a crash are recovered by the recovery loop every worker runs."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from shared.clock import utcnow
from shared.jobs import lifecycle
from shared.jobs.schemas import Txt2ImgRequest, resolve_params
from tests.conftest import ADMIN_KEY
from tests.farm_harness import Farm

pytestmark = pytest.mark.e2e


def _insert_job(farm: Farm, **state: object) -> str:
    """Commit a job row the way the API does, but never publish it (as if the API died right after)."""
    from shared.auth import find_api_key

    engine = sa.create_engine(farm.env["DATABASE_URL"])
    with Session(engine) as session:
        key = find_api_key(session, ADMIN_KEY)
        params = resolve_params(Txt2ImgRequest(prompt="orphan", width=64, height=64, steps=2, seed=3), "demo-tiny")
        job = lifecycle.submit(session, owner=key.owner, api_key_id=key.id, params=params,
                               model_name="demo-tiny", route="render")
        for name, value in state.items():
            setattr(job, name, value)
        session.commit()  # not lifecycle.commit: nothing is published
        job_id = str(job.id)
    engine.dispose()
    return job_id


def test_job_committed_but_never_published_still_runs(farm: Farm) -> None:
    job_id = _insert_job(farm)
    job = farm.wait_for(job_id, timeout=90)
    assert job["status"] == "succeeded"
    assert job["attempt"] == 1


def test_expired_lease_goes_back_to_the_queue_and_renders_once(farm: Farm) -> None:
    past = utcnow() - timedelta(seconds=30)
    job_id = _insert_job(farm, status="running", attempt=1, lease_owner="dead-worker:1", lease_until=past,
                         published_at=past)
    job = farm.wait_for(job_id, timeout=90)
    assert job["status"] == "succeeded"
    assert job["attempt"] == 2
    assert len(job["images"]) == 1


def test_job_that_lost_its_worker_on_every_attempt_fails(farm: Farm) -> None:
    past = utcnow() - timedelta(seconds=30)
    job_id = _insert_job(farm, status="running", attempt=3, max_attempts=3, lease_owner="dead-worker:1",
                         lease_until=past, published_at=past)
    job = farm.wait_for(job_id, timeout=90)
    assert job["status"] == "failed"
    assert job["error"]["type"] == "worker_lost"
    assert job["images"] == []
