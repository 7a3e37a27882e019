"""A duplicate queue message for a finished job does not render it again."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from celery import Celery

from shared.queueing.queues import QueueName, TaskName
from tests.farm_harness import Farm, wait_until

pytestmark = pytest.mark.e2e


def test_duplicate_message_for_finished_job_does_nothing(farm: Farm) -> None:
    job = farm.wait_for(farm.submit({"prompt": "once", "width": 64, "height": 64, "steps": 2, "seed": 7})["id"])
    assert job["status"] == "succeeded" and job["attempt"] == 1

    engine = sa.create_engine(farm.env["DATABASE_URL"])
    with engine.connect() as conn:
        images_before = conn.execute(sa.text("SELECT id, key, created_at FROM job_images WHERE job_id=:id"),
                                     {"id": job["id"]}).all()
    producer = Celery(broker=farm.env["REDIS_URL"])
    for _ in range(2):
        producer.send_task(TaskName.RENDER_JOB, args=[job["id"]], queue=QueueName.RENDER)
    # One worker process takes messages in order: once a later job is done, the duplicates were handled.
    sentinel = farm.wait_for(farm.submit({"prompt": "after", "width": 64, "height": 64, "steps": 2})["id"])
    assert sentinel["status"] == "succeeded"
    worker_log = farm.procs[-1]
    # Each duplicate found its job finished: it took nothing, or (fair share: a message is a chance to claim) the
    # fairest queued job, never the finished one again.
    wait_until(lambda: worker_log.log().count(f"job {job['id']} is not queued any more")
               + worker_log.log().count(f"message for job {job['id']}: fair share chose job") >= 2, 30,
               message="the worker to log the skipped duplicates")

    with farm.client() as c:
        after = c.get(f"/v1/jobs/{job['id']}").json()
    assert after["status_seq"] == job["status_seq"]
    assert after["attempt"] == 1
    assert after["finished_at"] == job["finished_at"]
    with engine.connect() as conn:
        images_after = conn.execute(sa.text("SELECT id, key, created_at FROM job_images WHERE job_id=:id"),
                                    {"id": job["id"]}).all()
    engine.dispose()
    assert images_after == images_before
