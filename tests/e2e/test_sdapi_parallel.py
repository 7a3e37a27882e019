"""Four concurrent WebUI txt2img calls on two workers run in parallel (the WebUI would serialize them).

The proof is what Postgres recorded: each job's worker (lease owner) and running interval; jobs on
different workers must overlap in time. The speed-up is measured by ``bench/sdapi_parallel.py``,
not asserted here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from devtools.embedded import EmbeddedPostgres
from tests.conftest import ADMIN_KEY, _fresh_database, farm_env
from tests.farm_harness import Farm, start_api, start_worker, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def two_worker_farm(postgres: EmbeddedPostgres, redis_db_url: Callable[[], str], models_dir: Path,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    """API + two render workers (w1, w2) on a database and Redis db of their own."""
    logs = tmp_path_factory.mktemp("sdapi-two-workers")
    env = farm_env(database_url=_fresh_database(postgres, "farm_sdapi_parallel"),
                   redis_url=redis_db_url(), storage_url=str(logs / "objects"),
                   models_dir=models_dir, admin_key=ADMIN_KEY,
                   # One job per claim: this test is about calls spreading over workers, not sharing a batch
                   # (tests/e2e/test_e2e_batching.py shows concurrent calls batching on one worker).
                   RENDERFARM_BATCHING="0")
    api, base_url = start_api(env, logs)
    farm = Farm(base_url=base_url, admin_key=ADMIN_KEY, env=env, procs=[api])
    try:
        with ThreadPoolExecutor(2) as pool:  # both load their models at once
            workers = list(pool.map(lambda name: start_worker(env, logs, name=name), ["w1", "w2"]))
        farm.procs.extend(workers)
        # A worker reports ready before it consumes its model's queue (the queue sync adds it a moment later); jobs
        # routed there meanwhile all went to the other worker. Both consume it before the test starts.
        wait_until(lambda: all("Started consuming from render.m." in worker.log() for worker in workers), 60,
                   message="both workers to consume their model's queue")
        yield farm
    finally:
        farm.stop()


def _txt2img(farm: Farm, seed: int) -> dict:
    resp = httpx.post(f"{farm.base_url}/sdapi/v1/txt2img", auth=("user", farm.admin_key), timeout=300,
                      json={"prompt": f"parallel {seed}", "seed": seed, "width": 64, "height": 64, "steps": 20})
    assert resp.status_code == 200, resp.text
    return json.loads(resp.json()["info"])


def test_four_calls_run_in_parallel_across_two_workers(two_worker_farm: Farm) -> None:
    with ThreadPoolExecutor(4) as pool:
        infos = list(pool.map(lambda seed: _txt2img(two_worker_farm, seed), [1, 2, 3, 4]))
    assert sorted(info["seed"] for info in infos) == [1, 2, 3, 4]
    engine = sa.create_engine(two_worker_farm.env["DATABASE_URL"])
    with engine.connect() as conn:
        query = sa.text("SELECT lease_owner, started_at, finished_at, status FROM jobs WHERE id = ANY(:ids)")
        rows = conn.execute(query, {"ids": [info["job_id"] for info in infos]}).all()
    engine.dispose()
    assert len(rows) == 4 and {row.status for row in rows} == {"succeeded"}
    workers = {row.lease_owner.split(":")[0] for row in rows}
    assert workers == {"w1", "w2"}, rows
    overlapping = [(a, b) for a in rows for b in rows if a.lease_owner != b.lease_owner
                   and a.started_at < b.finished_at and b.started_at < a.finished_at]
    assert overlapping, f"no two jobs on different workers ran at the same time: {rows}"
