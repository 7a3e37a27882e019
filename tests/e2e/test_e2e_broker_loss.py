"""Redis loses every message while jobs are queued (flushed; the same as a restart without persistence): the
workers notice within a second and publish every queued job again, so the queue drains at once instead of
after ``RENDERFARM_REPUBLISH_AFTER_SECONDS`` (30 s here, the default), and the worker logs no traceback."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from tests.conftest import ADMIN_KEY, _fresh_database, farm_env
from tests.farm_harness import Farm, start_api, start_worker

pytestmark = pytest.mark.e2e
JOB = {"width": 64, "height": 64, "steps": 2, "sampler_name": "Euler", "prompt": "a lighthouse"}
CLAIM_BOUND_SECONDS = 5.0


@pytest.fixture(scope="module")
def lossy_farm(postgres: Any, redis_db_url: Callable[[], str], models_dir: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    logs = tmp_path_factory.mktemp("broker-loss")
    env = farm_env(database_url=_fresh_database(postgres, "farm_broker_loss"), redis_url=redis_db_url(),
                   storage_url=str(logs / "objects"), models_dir=models_dir, admin_key=ADMIN_KEY,
                   RENDERFARM_PAUSE_POLL_SECONDS="1", RENDERFARM_REPUBLISH_AFTER_SECONDS="30")
    api, base_url = start_api(env, logs)
    farm = Farm(base_url=base_url, admin_key=ADMIN_KEY, env=env, procs=[api])
    try:
        farm.procs.append(start_worker(env, logs, name="lossy"))
        yield farm
    finally:
        farm.stop()


def _times(farm: Farm, ids: list[str], column: str) -> list[float | None]:
    engine = sa.create_engine(farm.env["DATABASE_URL"])
    with engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT extract(epoch FROM {column}) AS t FROM jobs WHERE id = ANY(:ids)"),
                            {"ids": ids}).mappings().all()
    engine.dispose()
    return [float(row["t"]) if row["t"] is not None else None for row in rows]


def test_a_flushed_broker_is_noticed_and_every_queued_job_claimed_within_seconds(lossy_farm: Farm) -> None:
    with lossy_farm.client() as admin:
        assert admin.post("/v1/admin/queue/pause").status_code == 200
    with lossy_farm.client(ADMIN_KEY) as client:
        ids = [client.post("/v1/jobs", json={**JOB, "seed": seed}).json()["id"] for seed in range(10)]
    deadline = time.monotonic() + 30
    while any(t is None for t in _times(lossy_farm, ids, "published_at")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(t is not None for t in _times(lossy_farm, ids, "published_at")), "the jobs were never published"
    broker = redis.Redis.from_url(lossy_farm.env["REDIS_URL"])
    assert broker.dbsize() > 0
    broker.flushdb()  # every message (and every other key) is gone
    flushed = time.time()
    with lossy_farm.client() as admin:
        assert admin.post("/v1/admin/queue/resume").status_code == 200
    deadline = time.monotonic() + 60
    while any(t is None for t in _times(lossy_farm, ids, "started_at")) and time.monotonic() < deadline:
        time.sleep(0.1)
    started = _times(lossy_farm, ids, "started_at")
    assert all(t is not None for t in started), "queued jobs were not claimed after the broker lost its messages"
    last_claim = max(t for t in started if t is not None) - flushed
    print(f"broker flushed with {len(ids)} jobs queued: the last one claimed {last_claim:.2f} s later")
    assert last_claim <= CLAIM_BOUND_SECONDS
    log = (lossy_farm.procs[-1].log_path).read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
    assert "the broker lost its messages" in log
