"""Micro-batching with real processes: jobs queued together are claimed and denoised as one batch.

This module runs its own farm (API + one worker, own database and Redis db) because it pauses it to
let jobs queue up, and kills its worker. Batches are proven by what Postgres recorded: the batch id
the claim gave every job of a batch, and the images per UNet call each job was rendered with.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from devtools.embedded import EmbeddedPostgres
from tests.conftest import ADMIN_KEY, _fresh_database, farm_env
from tests.farm_harness import Farm, Proc, start_api, start_worker, wait_until

pytestmark = pytest.mark.e2e

JOB = {"width": 64, "height": 64, "steps": 4, "sampler_name": "Euler a"}
LONG = {"width": 256, "height": 256, "steps": 100, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def batch_farm(postgres: EmbeddedPostgres, redis_db_url: Callable[[], str], models_dir: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    logs = tmp_path_factory.mktemp("batch-farm")
    env = farm_env(database_url=_fresh_database(postgres, "farm_batching"), redis_url=redis_db_url(),
                   storage_url=str(logs / "objects"), models_dir=models_dir, admin_key=ADMIN_KEY,
                   RENDERFARM_PAUSE_POLL_SECONDS="1", RENDERFARM_LEASE_SECONDS="6",
                   RENDERFARM_REPUBLISH_AFTER_SECONDS="2", RENDERFARM_MAX_BATCH_IMAGES="8")
    api, base_url = start_api(env, logs)
    farm = Farm(base_url=base_url, admin_key=ADMIN_KEY, env=env, procs=[api])
    farm.logs = logs  # type: ignore[attr-defined]
    try:
        farm.procs.append(start_worker(env, logs, name="b1"))
        yield farm
    finally:
        farm.stop()


def admin(farm: Farm, path: str) -> None:
    with farm.client() as client:
        assert client.post(path).status_code == 200


class Paused:
    """The farm paused while jobs are submitted, so they wait in the queue together; resumed on exit."""

    def __init__(self, farm: Farm) -> None:
        self.farm = farm

    def __enter__(self) -> Paused:
        admin(self.farm, "/v1/admin/queue/pause")
        return self

    def __exit__(self, *exc: object) -> None:
        admin(self.farm, "/v1/admin/queue/resume")


def rows(farm: Farm, ids: list[str]) -> dict[str, dict[str, Any]]:
    engine = sa.create_engine(farm.env["DATABASE_URL"])
    with engine.connect() as conn:
        result = conn.execute(sa.text("SELECT j.*, (SELECT count(*) FROM job_images i WHERE i.job_id = j.id) AS "
                                      "image_rows FROM jobs j WHERE j.id = ANY(:ids)"), {"ids": ids}).mappings()
        found = {str(row["id"]): dict(row) for row in result}
    engine.dispose()
    return found


def test_compatible_queued_jobs_share_a_batch_and_incompatible_ones_do_not(batch_farm: Farm) -> None:
    with Paused(batch_farm):
        first = batch_farm.submit(JOB | {"prompt": "a red fox", "seed": 1, "cfg_scale": 7})["id"]
        second = batch_farm.submit(JOB | {"prompt": "a castle at night, oil painting", "seed": 2,
                                          "cfg_scale": 4, "negative_prompt": "blurry"})["id"]
        other = batch_farm.submit(JOB | {"prompt": "a red fox", "seed": 3, "steps": 3})["id"]
        strict = batch_farm.submit(JOB | {"prompt": "a red fox", "seed": 4, "batch_invariant": True})["id"]
    jobs = {job_id: batch_farm.wait_for(job_id) for job_id in (first, second, other, strict)}
    assert all(job["status"] == "succeeded" for job in jobs.values()), jobs
    assert jobs[first]["batch_id"] is not None and jobs[first]["batch_id"] == jobs[second]["batch_id"]
    assert jobs[first]["batch_images"] == jobs[second]["batch_images"] == 2
    assert jobs[other]["batch_id"] not in (jobs[first]["batch_id"], None)  # 3 steps: another batch key
    assert jobs[other]["batch_images"] == 1
    assert jobs[strict]["batch_id"] not in (jobs[first]["batch_id"], None) and jobs[strict]["batch_images"] == 1
    infos = [image["infotext"] for job in (jobs[first], jobs[second]) for image in job["images"]]
    assert "Seed: 1," in infos[0] and "CFG scale: 7" in infos[0] and "Seed: 2," in infos[1] and "blurry" in infos[1]
    # The partner's own message came later and did not render it again: with fair share it is a chance to claim
    # the fairest queued job (another one, or none).
    worker = next(p for p in batch_farm.procs if p.name == "b1")
    wait_until(lambda: f"job {second} is not queued any more" in worker.log()
               or f"message for job {second}: fair share chose job" in worker.log(), 30,
               message="the partner's own message to be spent elsewhere")
    recorded = rows(batch_farm, [first, second])
    assert all(row["attempt"] == 1 and row["image_rows"] == 1 for row in recorded.values())


def test_canceling_one_job_mid_batch_leaves_the_other_to_finish(batch_farm: Farm) -> None:
    with Paused(batch_farm):
        keep = batch_farm.submit(LONG | {"prompt": "keep me", "seed": 10})["id"]
        drop = batch_farm.submit(LONG | {"prompt": "drop me", "seed": 11})["id"]
    wait_until(lambda: all(r["status"] == "running" and r["progress"] > 0 for r in rows(batch_farm, [keep, drop])
                           .values()), 120, message="both jobs to render")
    with batch_farm.client() as client:
        assert client.post(f"/v1/jobs/{drop}/cancel").status_code == 200
    dropped, kept = batch_farm.wait_for(drop), batch_farm.wait_for(keep, timeout=300)
    assert dropped["status"] == "canceled" and dropped["images"] == []
    assert kept["status"] == "succeeded" and len(kept["images"]) == 1
    assert kept["batch_id"] == dropped["batch_id"] is not None
    assert kept["batch_images"] == 2  # it started in a batch of two and finished alone


def test_the_webui_apis_concurrent_calls_batch_too(batch_farm: Farm) -> None:
    def txt2img(seed: int) -> dict[str, Any]:
        resp = httpx.post(f"{batch_farm.base_url}/sdapi/v1/txt2img", auth=("user", batch_farm.admin_key),
                          timeout=300, json={"prompt": f"webui call {seed}", "seed": seed, **JOB})
        assert resp.status_code == 200, resp.text
        return json.loads(resp.json()["info"])

    with ThreadPoolExecutor(3) as pool:
        with Paused(batch_farm):  # resumed before the pool waits for the calls
            futures = [pool.submit(txt2img, seed) for seed in (21, 22, 23)]
            wait_until(lambda: _queued(batch_farm) >= 3, 60, message="the three calls' jobs to queue")
        infos = [future.result() for future in futures]
    recorded = rows(batch_farm, [info["job_id"] for info in infos])
    assert len({row["batch_id"] for row in recorded.values()}) == 1
    assert {row["batch_images"] for row in recorded.values()} == {3}


def _queued(farm: Farm) -> int:
    engine = sa.create_engine(farm.env["DATABASE_URL"])
    with engine.connect() as conn:
        count = conn.execute(sa.text("SELECT count(*) FROM jobs WHERE status = 'queued'")).scalar_one()
    engine.dispose()
    return int(count)


def test_killing_the_worker_mid_batch_reruns_every_job_exactly_once(batch_farm: Farm) -> None:
    worker = next(p for p in batch_farm.procs if p.name == "b1")
    with Paused(batch_farm):
        ids = [batch_farm.submit(LONG | {"prompt": f"survivor {k}", "seed": 30 + k})["id"] for k in range(3)]
    wait_until(lambda: all(r["status"] == "running" for r in rows(batch_farm, ids).values()), 120,
               message="the batch to start")
    first_batch = {row["batch_id"] for row in rows(batch_farm, ids).values()}
    assert len(first_batch) == 1
    os.killpg(worker.popen.pid, signal.SIGKILL)
    worker.popen.wait()
    batch_farm.procs.remove(worker)
    replacement: Proc = start_worker(batch_farm.env, batch_farm.logs, name="b2")  # type: ignore[attr-defined]
    batch_farm.procs.append(replacement)
    jobs = [batch_farm.wait_for(job_id, timeout=300) for job_id in ids]
    assert [job["status"] for job in jobs] == ["succeeded"] * 3, jobs
    recorded = rows(batch_farm, ids)
    assert all(row["attempt"] == 2 and row["image_rows"] == 1 for row in recorded.values()), recorded
    assert all(row["lease_owner"].startswith("b2:") for row in recorded.values())
    for job_id in ids:
        assert sorted(p.name for p in (Path(batch_farm.env["STORAGE_URL"]) / "jobs" / job_id).iterdir()) == ["0.png"]


def test_two_dozen_concurrent_submits_are_accepted_and_rendered_in_batches_of_at_most_eight(batch_farm: Farm) -> None:
    """The claim limit in images: 24 queued one-image jobs become three batches of eight."""
    def submit(k: int) -> str:
        with batch_farm.client() as client:
            resp = client.post("/v1/jobs", json=JOB | {"prompt": f"crowd {k}", "seed": 100 + k})
        assert resp.status_code == 202, resp.text
        return str(resp.json()["id"])

    with Paused(batch_farm), ThreadPoolExecutor(24) as pool:
        ids = list(pool.map(submit, range(24)))
    jobs = [batch_farm.wait_for(job_id, timeout=300) for job_id in ids]
    assert all(job["status"] == "succeeded" for job in jobs)
    sizes = [job["batch_images"] for job in jobs]
    assert max(sizes) == 8 and len({job["batch_id"] for job in jobs}) == 3  # RENDERFARM_MAX_BATCH_IMAGES=8
