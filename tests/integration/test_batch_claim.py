"""The batch claim (shared/jobs/lifecycle.py: claim_batch, claim_partners) against a real PostgreSQL: the
message's job always leads its batch; partners with its batch key join from the worker's queues, oldest
first, within the image limit; two workers claiming at once never take a job twice."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from shared.jobs import lifecycle
from shared.jobs.states import JobStatus

BASE = {"mode": "txt2img", "prompt": "p", "negative_prompt": "", "steps": 3, "cfg_scale": 7.0,
        "sampler_name": "Euler", "scheduler": "Automatic", "seed": 5, "width": 64, "height": 64}


@pytest.fixture
def key() -> dict[str, Any]:
    """Params under a checkpoint of the test's own: no other test's queued jobs share its batch key."""
    return BASE | {"model": f"m-{uuid.uuid4().hex[:8]}"}


def queue(session: Session, params: dict[str, Any], route: str = "render") -> uuid.UUID:
    job = lifecycle.submit(session, owner="t", api_key_id=None, params=params, model_name=params["model"], route=route)
    session.commit()
    return job.id


def status(session: Session, job_id: uuid.UUID) -> str:
    return str(session.scalar(sa.text("SELECT status FROM jobs WHERE id = :id"), {"id": job_id}))


def test_partners_join_oldest_first_within_the_image_limit(session: Session, key: dict[str, Any]) -> None:
    older = [queue(session, key | {"seed": s}) for s in (1, 2)]
    big = queue(session, key | {"seed": 3, "batch_size": 3})
    leader = queue(session, key | {"seed": 4, "prompt": "another prompt", "cfg_scale": 2.0})
    last = queue(session, key | {"seed": 5})
    batch = lifecycle.claim_batch(session, leader, "w1", 60, ["render"], max_images=4)
    session.commit()
    assert [job.id for job in batch] == [leader, *older]  # big (3 images) does not fit; last does not overtake it
    assert len({job.batch_id for job in batch}) == 1 and batch[0].batch_id is not None
    assert all(job.status == JobStatus.RUNNING and job.lease_owner == "w1" and job.attempt == 1 for job in batch)
    assert status(session, big) == status(session, last) == "queued"
    # The partners' own messages find nothing to claim.
    assert lifecycle.claim_batch(session, older[0], "w2", 60, ["render"], max_images=4) == []


def test_the_named_job_leads_even_when_it_alone_exceeds_the_limit(session: Session, key: dict[str, Any]) -> None:
    partner = queue(session, key | {"seed": 1})
    leader = queue(session, key | {"seed": 2, "batch_size": 4, "n_iter": 2})
    batch = lifecycle.claim_batch(session, leader, "w1", 60, ["render"], max_images=4)
    session.commit()
    assert [job.id for job in batch] == [leader] and status(session, partner) == "queued"


@pytest.mark.parametrize("other", [
    {"steps": 4}, {"width": 128}, {"sampler_name": "Heun"}, {"batch_invariant": True}, {"model": "another"},
])
def test_jobs_with_another_key_are_not_partners(session: Session, key: dict[str, Any], other: dict) -> None:
    stranger = queue(session, key | other)
    leader = queue(session, key)
    assert [job.id for job in lifecycle.claim_batch(session, leader, "w1", 60, ["render"], 8)] == [leader]
    session.commit()
    assert status(session, stranger) == "queued"


def test_an_invariant_job_is_claimed_alone(session: Session, key: dict[str, Any]) -> None:
    same = queue(session, key | {"batch_invariant": True})
    leader = queue(session, key | {"batch_invariant": True, "seed": 9})
    assert [job.id for job in lifecycle.claim_batch(session, leader, "w1", 60, ["render"], 8)] == [leader]
    session.commit()
    assert status(session, same) == "queued"


def test_partners_come_only_from_the_queues_the_worker_consumes(session: Session, key: dict[str, Any]) -> None:
    elsewhere = queue(session, key | {"seed": 1}, route="render.m.someone-else")
    here = queue(session, key | {"seed": 2}, route="render.m.mine")
    leader = queue(session, key | {"seed": 3})
    batch = lifecycle.claim_batch(session, leader, "w1", 60, ["render", "render.m.mine"], 8)
    session.commit()
    assert [job.id for job in batch] == [leader, here] and status(session, elsewhere) == "queued"


def test_batching_off_claims_no_partner(session: Session, key: dict[str, Any]) -> None:
    partner = queue(session, key | {"seed": 1})
    leader = queue(session, key | {"seed": 2})
    assert [job.id for job in lifecycle.claim_batch(session, leader, "w1", 60, ["render"], 0)] == [leader]
    session.commit()
    assert status(session, partner) == "queued"


def test_leases_of_a_whole_batch_are_renewed_and_cancels_read_at_once(session: Session, key: dict) -> None:
    ids = [queue(session, key | {"seed": s}) for s in range(3)]
    batch = lifecycle.claim_batch(session, ids[0], "w1", 5, ["render"], 8)
    session.commit()
    assert len(batch) == 3
    assert sorted(lifecycle.renew_leases(session, ids, "w1", 300)) == sorted(ids)
    assert lifecycle.renew_leases(session, ids, "w2", 300) == []  # another worker holds none of them
    assert lifecycle.cancel(session, ids[2]) == lifecycle.CancelOutcome.REQUESTED
    session.commit()
    assert lifecycle.cancels_requested(session, ids) == {ids[2]}


def test_two_workers_claiming_at_once_never_take_a_job_twice(database_url: str, key: dict[str, Any]) -> None:
    engine = sa.create_engine(database_url)
    with Session(engine) as session:
        ids = [queue(session, key | {"seed": s}) for s in range(40)]
    claimed: dict[str, list[uuid.UUID]] = {"w1": [], "w2": []}
    barrier = threading.Barrier(2)

    def worker(name: str, leaders: list[uuid.UUID]) -> None:
        barrier.wait()
        for leader in leaders:
            with Session(engine) as session:
                batch = lifecycle.claim_batch(session, leader, name, 60, ["render"], 4)
                session.commit()
                claimed[name] += [job.id for job in batch]

    threads = [threading.Thread(target=worker, args=("w1", ids[::2])), threading.Thread(target=worker,
                                                                                         args=("w2", ids[1::2]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = claimed["w1"] + claimed["w2"]
    assert sorted(everything) == sorted(ids)  # every job claimed, none twice
    assert claimed["w1"] and claimed["w2"]
    engine.dispose()
