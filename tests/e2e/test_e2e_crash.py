"""Crash recovery with real processes and real signals: nothing lost, nothing rendered twice.

These tests own their PostgreSQL and Redis servers, because they kill and restart them.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from devtools.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from shared.db.migrate import upgrade
from tests.conftest import ADMIN_KEY, farm_env
from tests.farm_harness import Farm, Proc, start_api, start_webhook_worker, start_worker, wait_until
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.e2e

LONG = {"prompt": "a long render", "width": 256, "height": 256, "steps": 60, "sampler_name": "Euler"}
SHORT = {"prompt": "short", "width": 64, "height": 64, "steps": 2}


@dataclass
class CrashFarm:
    farm: Farm
    postgres: EmbeddedPostgres
    redis: EmbeddedRedis
    logs: Path
    workers: list[Proc]

    def add_worker(self, name: str) -> Proc:
        proc = start_worker(self.farm.env, self.logs, name=name)
        self.workers.append(proc)
        return proc

    def worker_holding(self, job_id: str) -> Proc:
        owner = self.job_row(job_id)["lease_owner"]
        for proc in self.workers:
            if owner and owner.startswith(f"{proc.name}:") and proc.popen.poll() is None:
                return proc
        raise AssertionError(f"no live worker holds job {job_id} (lease owner {owner})")

    def job_row(self, job_id: str) -> dict:
        engine = sa.create_engine(self.farm.env["DATABASE_URL"])
        with engine.connect() as conn:
            row = conn.execute(sa.text("SELECT * FROM jobs WHERE id=:id"), {"id": job_id}).mappings().one()
        engine.dispose()
        return dict(row)

    def image_rows(self, job_id: str) -> int:
        engine = sa.create_engine(self.farm.env["DATABASE_URL"])
        with engine.connect() as conn:
            count = conn.execute(sa.text("SELECT count(*) FROM job_images WHERE job_id=:id"), {"id": job_id})
            value = count.scalar_one()
        engine.dispose()
        return value

    def objects(self, job_id: str) -> list[str]:
        folder = Path(self.farm.env["STORAGE_URL"]) / "jobs" / job_id
        return sorted(p.name for p in folder.iterdir()) if folder.exists() else []

    def wait_running(self, job_id: str) -> None:
        wait_until(lambda: self.job_row(job_id)["status"] == "running", 120, message=f"job {job_id} to start")


def kill_worker(proc: Proc) -> None:
    """SIGKILL the whole worker: the Celery parent and its render child."""
    os.killpg(proc.popen.pid, signal.SIGKILL)
    proc.popen.wait()


@pytest.fixture
def crash_farm(tmp_path: Path, models_dir: Path) -> Iterator[CrashFarm]:
    postgres = EmbeddedPostgres(tmp_path / "pg", free_port()).start()
    redis_server = EmbeddedRedis(tmp_path / "redis", free_port(), persist=False).start()
    upgrade(postgres.url)
    env = farm_env(database_url=postgres.url, redis_url=redis_server.url, storage_url=str(tmp_path / "objects"),
                   models_dir=models_dir, admin_key=ADMIN_KEY, RENDERFARM_LEASE_SECONDS="6",
                   RENDERFARM_MAX_ATTEMPTS="2", RENDERFARM_REPUBLISH_AFTER_SECONDS="2",
                   RENDERFARM_WEBHOOK_ALLOW_HOSTS="127.0.0.1")
    api, base_url = start_api(env, tmp_path)
    cf = CrashFarm(Farm(base_url=base_url, admin_key=ADMIN_KEY, env=env, procs=[api]), postgres, redis_server,
                   tmp_path, [])
    try:
        yield cf
    finally:
        for proc in cf.workers:
            if proc.popen.poll() is None:
                kill_worker(proc)
        api.stop()
        redis_server.stop()
        postgres.stop()


def test_worker_killed_mid_render_job_finishes_exactly_once(crash_farm: CrashFarm) -> None:
    crash_farm.workers.append(start_webhook_worker(crash_farm.farm.env, crash_farm.logs))
    crash_farm.add_worker("w1")
    crash_farm.add_worker("w2")
    receiver_ctx = Receiver().running()
    receiver = receiver_ctx.__enter__()
    with crash_farm.farm.client() as c:
        receiver.secret = c.get("/v1/webhook-secret").json()["secret"]
    job_id = crash_farm.farm.submit(dict(LONG, webhook_url=receiver.url("/hook")))["id"]
    crash_farm.wait_running(job_id)
    victim = crash_farm.worker_holding(job_id)
    kill_worker(victim)

    job = crash_farm.farm.wait_for(job_id, timeout=180)
    assert job["status"] == "succeeded", job
    assert job["attempt"] == 2
    assert len(job["images"]) == 1
    assert crash_farm.image_rows(job_id) == 1
    assert crash_farm.objects(job_id) == ["0.png"]
    survivor = next(p for p in crash_farm.workers if p is not victim and p.name != "webhooks")
    assert crash_farm.job_row(job_id)["lease_owner"].startswith(f"{survivor.name}:")
    wait_until(lambda: receiver.received("/hook"), 60, message="the terminal webhook")
    time.sleep(2)  # a duplicate terminal event would arrive within this
    terminal_ids = {r.headers["webhook-id"] for r in receiver.received("/hook")
                    if json.loads(r.body)["event"] == "succeeded"}
    assert len(terminal_ids) == 1
    receiver_ctx.__exit__(None, None, None)


def test_job_that_keeps_killing_its_worker_fails_as_worker_lost(crash_farm: CrashFarm) -> None:
    job_id = crash_farm.farm.submit(LONG)["id"]
    for attempt in (1, 2):  # RENDERFARM_MAX_ATTEMPTS=2
        worker = crash_farm.add_worker(f"p{attempt}")
        wait_until(lambda a=attempt: crash_farm.job_row(job_id)["attempt"] == a
                   and crash_farm.job_row(job_id)["status"] == "running", 120, message=f"attempt {attempt}")
        kill_worker(worker)
    crash_farm.add_worker("sweeper")  # a live worker's recovery loop notices the second expired lease
    job = crash_farm.farm.wait_for(job_id, timeout=120)
    assert job["status"] == "failed"
    assert job["error"]["type"] == "worker_lost"
    assert job["attempt"] == 2
    assert crash_farm.image_rows(job_id) == 0


def test_redis_restarted_empty_queued_jobs_still_complete(crash_farm: CrashFarm) -> None:
    ids = [crash_farm.farm.submit(dict(SHORT, seed=i))["id"] for i in range(3)]
    crash_farm.redis.kill()  # no persistence: every queued message is gone
    crash_farm.redis.start()
    crash_farm.add_worker("w1")
    for job_id in ids:
        assert crash_farm.farm.wait_for(job_id, timeout=120)["status"] == "succeeded"
        assert crash_farm.image_rows(job_id) == 1


def test_sigterm_finishes_the_running_job_and_takes_no_new_one(crash_farm: CrashFarm) -> None:
    worker = crash_farm.add_worker("w1")
    running = crash_farm.farm.submit(LONG)["id"]
    waiting = crash_farm.farm.submit(SHORT)["id"]
    crash_farm.wait_running(running)
    worker.popen.send_signal(signal.SIGTERM)  # Celery warm shutdown
    worker.popen.wait(180)
    assert crash_farm.job_row(running)["status"] == "succeeded"
    assert crash_farm.job_row(waiting)["status"] == "queued"
    crash_farm.add_worker("w2")
    assert crash_farm.farm.wait_for(waiting, timeout=120)["status"] == "succeeded"
    assert crash_farm.job_row(running)["attempt"] == 1


def test_postgres_restarted_during_render_job_ends_consistent(crash_farm: CrashFarm) -> None:
    crash_farm.add_worker("w1")
    job_id = crash_farm.farm.submit(LONG)["id"]
    crash_farm.wait_running(job_id)
    crash_farm.postgres.stop()
    crash_farm.postgres.start()
    job = crash_farm.farm.wait_for(job_id, timeout=180)
    assert job["status"] == "succeeded", job
    assert crash_farm.image_rows(job_id) == 1
    assert crash_farm.objects(job_id) == ["0.png"]
