"""What an autoscaler scrapes, over HTTP: queued jobs per route and their age, queued work, busy workers.

The first test submits to the worker-less API (nothing takes the jobs); the second runs one job on the farm,
so the model has history, then pauses the farm and prices the jobs it queues with that history.
"""

from __future__ import annotations

import time

import pytest

from api.admin.work_estimate import DEFAULT_SECONDS_PER_STEP
from tests.e2e.test_metrics import TINY, scrape, value
from tests.farm_harness import Farm, wait_until

CACHE_S = 2.1  # the collector keeps a snapshot for 2 s


def cancel(farm: Farm, job_ids: list[str]) -> None:
    with farm.client() as client:
        for job_id in job_ids:
            client.post(f"/v1/jobs/{job_id}/cancel")


def test_queued_jobs_per_route_age_and_work_without_a_worker(api_only: Farm) -> None:
    before = scrape(api_only)
    jobs = [api_only.submit(TINY | {"seed": seed}) for seed in (1, 2, 3)]
    model = jobs[0]["model"]
    try:
        time.sleep(CACHE_S)
        first = scrape(api_only)
        # No worker advertises the model: the router sends every job to the shared queue.
        queued = "renderfarm_route_queued_jobs"
        assert value(first, queued, route="render") == value(before, queued, route="render") + 3
        assert value(first, "renderfarm_queued_steps", model=model) == (
            value(before, "renderfarm_queued_steps", model=model) + 3 * TINY["steps"])
        work = value(first, "renderfarm_queued_work_seconds", model=model)
        assert work >= 3 * TINY["steps"] * DEFAULT_SECONDS_PER_STEP > 0
        assert value(first, "renderfarm_seconds_per_step", model=model, source="default") == DEFAULT_SECONDS_PER_STEP
        assert value(first, "renderfarm_workers_busy") == 0 and value(first, "renderfarm_workers_idle") == 0
        age = value(first, "renderfarm_route_oldest_queued_job_age_seconds", route="render")
        assert age > 0
        time.sleep(CACHE_S)
        second = scrape(api_only)
        assert value(second, "renderfarm_route_oldest_queued_job_age_seconds", route="render") >= age + 2
        assert value(second, "renderfarm_oldest_queued_job_age_seconds") >= age + 2
    finally:
        cancel(api_only, [job["id"] for job in jobs])


@pytest.mark.parametrize("farm", ["local"], indirect=True)
def test_queued_work_is_priced_from_the_models_history(farm: Farm) -> None:
    done = farm.wait_for(farm.submit(TINY | {"seed": 41})["id"])
    assert done["status"] == "succeeded", done
    model = done["model"]

    def with_history() -> dict | None:
        samples = scrape(farm)
        return samples if value(samples, "renderfarm_seconds_per_step", model=model, source="history") > 0 else None

    history = wait_until(with_history, 15, interval=0.5, message="the finished job to become history")
    per_step = value(history, "renderfarm_seconds_per_step", model=model, source="history")
    assert per_step != DEFAULT_SECONDS_PER_STEP

    with farm.client() as client:
        assert client.post("/v1/admin/queue/pause").status_code == 200
    jobs: list[str] = []
    try:
        jobs = [farm.submit(TINY | {"seed": seed, "n_iter": 2})["id"] for seed in (42, 43)]
        time.sleep(CACHE_S)

        def priced() -> dict | None:
            samples = scrape(farm)
            return samples if value(samples, "renderfarm_queued_steps", model=model) >= 2 * 2 * TINY["steps"] else None

        samples = wait_until(priced, 10, interval=0.5, message="the queued jobs in /metrics")
        steps = value(samples, "renderfarm_queued_steps", model=model)
        assert steps == 2 * 2 * TINY["steps"]
        per_step = value(samples, "renderfarm_seconds_per_step", model=model, source="history")
        work = value(samples, "renderfarm_queued_work_seconds", model=model)
        assert work == pytest.approx(steps * per_step, rel=1e-3, abs=1e-3)  # the gauge is rounded to milliseconds
        assert value(samples, "renderfarm_workers_idle") + value(samples, "renderfarm_workers_busy") >= 1
    finally:
        with farm.client() as client:
            assert client.post("/v1/admin/queue/resume").status_code == 200
        for job_id in jobs:
            assert farm.wait_for(job_id)["status"] == "succeeded"
