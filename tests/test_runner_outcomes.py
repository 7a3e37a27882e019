"""The runner's outcomes against a real PostgreSQL, with a stand-in engine (no torch, no Celery worker).

Celery raises ``SoftTimeLimitExceeded`` inside the task when a job passes its soft time limit; the
runner must fail the job as ``timeout`` with a message naming the limit, not as a render error.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import sessionmaker

from shared.jobs import repository
from shared.jobs.states import ErrorType, JobStatus
from shared.settings import Settings
from shared.storage.local import LocalObjectStore
from worker.runner import JobRunner, RunOutcome

PARAMS = {"mode": "txt2img", "prompt": "p", "negative_prompt": "", "seed": 5, "batch_size": 1, "n_iter": 1,
          "model": "m"}


class _Heartbeat:
    def __init__(self) -> None:
        self.progress = 0.0
        self.cancel_event = threading.Event()
        self.tracked: list[str] = []

    def track(self, job_id: str) -> None:
        self.tracked.append(job_id)

    def untrack(self) -> None:
        pass


def _runner(database_url: str, tmp_path: Path, render: Any) -> tuple[JobRunner, sessionmaker]:
    factory = sessionmaker(sa.create_engine(database_url))
    model = SimpleNamespace(name="m", short_hash="0123456789", pipeline=None, scheduler_config={}, loras=None)
    runtime = SimpleNamespace(name="worker-1", heartbeat=_Heartbeat(), jobs_done=0,
                              pipelines=SimpleNamespace(get=lambda name: model))
    store = LocalObjectStore(tmp_path / "objects", "http://127.0.0.1:1", b"secret")
    settings = Settings(database_url=database_url, job_time_limit=90, models_dir=tmp_path)
    runner = JobRunner(runtime, factory, store, settings)  # type: ignore[arg-type]
    runner._engine = SimpleNamespace(render=render)
    return runner, factory


def _queued_job(factory: sessionmaker) -> uuid.UUID:
    with factory() as session:
        job = repository.create_job(session, owner="t", api_key_id=None, params=PARAMS, model_name="m",
                                    model_hash=None)
        session.commit()
        return job.id


def test_a_render_past_the_soft_time_limit_fails_as_timeout(database_url: str, tmp_path: Path) -> None:
    def render(*args: object, **kwargs: object) -> list:
        raise SoftTimeLimitExceeded()

    runner, factory = _runner(database_url, tmp_path, render)
    job_id = _queued_job(factory)
    assert runner.run(str(job_id)) == RunOutcome.FAILED
    with factory() as session:
        job = repository.get_job(session, job_id)
        assert job.status == JobStatus.FAILED and job.error_type == ErrorType.TIMEOUT
        assert "time limit of 90 s" in (job.error_message or "")
    # A second delivery of the same message finds nothing to claim.
    assert runner.run(str(job_id)) == RunOutcome.SKIPPED == "skipped"


def test_other_render_errors_stay_render_errors(database_url: str, tmp_path: Path) -> None:
    def render(*args: object, **kwargs: object) -> list:
        raise RuntimeError("device fault")

    runner, factory = _runner(database_url, tmp_path, render)
    job_id = _queued_job(factory)
    assert runner.run(str(job_id)) == "failed"
    with factory() as session:
        job = repository.get_job(session, job_id)
        assert job.error_type == ErrorType.RENDER_ERROR and job.error_message == "RuntimeError: device fault"
