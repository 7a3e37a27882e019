"""The runner's outcomes against a real PostgreSQL, with a stand-in engine (no torch, no Celery worker).

A render that runs past its time limit stops at its next step and fails as ``timeout`` with a message
naming the limit, not as a render error; a cancel requested mid-render ends it as ``canceled``.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import sessionmaker

from shared.jobs import lifecycle, repository
from shared.jobs.states import ErrorType, JobStatus
from shared.settings import JobSettings, ModelSettings, ServiceSettings, Settings
from shared.storage.local import LocalObjectStore
from worker.control.job_control import JobControl
from worker.runner import JobRunner, RunOutcome

PARAMS = {"mode": "txt2img", "prompt": "p", "negative_prompt": "", "seed": 5, "batch_size": 1, "n_iter": 1,
          "model": "m", "steps": 3, "cfg_scale": 7.0, "sampler_name": "Euler", "scheduler": "Automatic",
          "width": 64, "height": 64}


def _runner(database_url: str, tmp_path: Path, render: Any, time_limit: int = 90,
            time_limit_errors: tuple[type[BaseException], ...] = ()) -> tuple[JobRunner, sessionmaker]:
    factory = sessionmaker(sa.create_engine(database_url))
    model = SimpleNamespace(name="m", short_hash="0123456789", pipeline=None, scheduler_config={}, loras=None)
    store = LocalObjectStore(tmp_path / "objects", "http://127.0.0.1:1", b"secret")
    settings = Settings(services=ServiceSettings(database_url=database_url),
                        jobs=JobSettings(job_time_limit=time_limit), models=ModelSettings(models_dir=tmp_path))
    pipelines = SimpleNamespace(get=lambda name: model)
    runner = JobRunner("worker-1", JobControl(), pipelines, factory, store, settings,  # type: ignore[arg-type]
                       time_limit_errors)
    runner._engine = SimpleNamespace(render=render)
    return runner, factory


def _queued_job(factory: sessionmaker, params: dict[str, Any] = PARAMS) -> uuid.UUID:
    with factory() as session:
        job = lifecycle.submit(session, owner="t", api_key_id=None, params=params, model_name="m", route="render")
        session.commit()  # not lifecycle.commit: no broker here, the runner is called directly
        return job.id


def _job(factory: sessionmaker, job_id: uuid.UUID) -> Any:
    with factory() as session:
        return repository.get_job(session, job_id)


def test_a_render_past_its_time_limit_fails_as_timeout(database_url: str, tmp_path: Path) -> None:
    def render(*args: object, on_step: Any, **kwargs: object) -> list:
        for step in range(1, 100):
            time.sleep(0.1)
            on_step(step, 100)
        raise AssertionError("the time limit never stopped the render")

    runner, factory = _runner(database_url, tmp_path, render, time_limit=2)  # stops after 1 s (3/4 of it)
    job_id = _queued_job(factory)
    started = time.monotonic()
    assert runner.run(str(job_id)) == RunOutcome.FAILED
    assert time.monotonic() - started < 10
    job = _job(factory, job_id)
    assert job.status == JobStatus.FAILED and job.error_type == ErrorType.TIMEOUT
    assert "time limit of 1 s" in (job.error_message or "")
    # A second delivery of the same message finds nothing to claim.
    assert runner.run(str(job_id)) == RunOutcome.SKIPPED == "skipped"


def test_a_cancel_requested_mid_render_ends_the_job_canceled(database_url: str, tmp_path: Path) -> None:
    runner: JobRunner

    def render(*args: object, on_step: Any, **kwargs: object) -> list:
        on_step(1, 3)
        assert runner.control.job_id is not None
        runner.control.request_cancel(runner.control.job_id)
        on_step(2, 3)
        raise AssertionError("the cancel never stopped the render")

    runner, factory = _runner(database_url, tmp_path, render)
    job_id = _queued_job(factory)
    assert runner.run(str(job_id)) == RunOutcome.CANCELED
    assert _job(factory, job_id).status == JobStatus.CANCELED
    assert runner.control.job_id is None and runner.control.jobs_done == 1


def test_other_render_errors_stay_render_errors(database_url: str, tmp_path: Path) -> None:
    def render(*args: object, **kwargs: object) -> list:
        raise RuntimeError("device fault")

    runner, factory = _runner(database_url, tmp_path, render)
    job_id = _queued_job(factory)
    assert runner.run(str(job_id)) == "failed"
    job = _job(factory, job_id)
    assert job.error_type == ErrorType.RENDER_ERROR and job.error_message == "RuntimeError: device fault"


def test_the_hosts_time_limit_outside_a_step_fails_as_timeout(database_url: str, tmp_path: Path) -> None:
    """Celery's soft time limit (passed in by the Celery app) can fire outside the denoising loop."""
    def render(*args: object, **kwargs: object) -> list:
        raise SoftTimeLimitExceeded()

    runner, factory = _runner(database_url, tmp_path, render, 600, time_limit_errors=(SoftTimeLimitExceeded,))
    job_id = _queued_job(factory)
    assert runner.run(str(job_id)) == RunOutcome.FAILED
    job = _job(factory, job_id)
    assert job.error_type == ErrorType.TIMEOUT and "time limit of 570 s" in (job.error_message or "")


def test_parameters_this_worker_cannot_read_fail_as_invalid_input(database_url: str, tmp_path: Path) -> None:
    def render(*args: object, **kwargs: object) -> list:
        raise AssertionError("nothing renders from a row the worker cannot read")

    runner, factory = _runner(database_url, tmp_path, render)
    job_id = _queued_job(factory, PARAMS | {"version": 2})
    assert runner.run(str(job_id)) == RunOutcome.FAILED
    job = _job(factory, job_id)
    assert job.error_type == ErrorType.INVALID_INPUT
    assert "cannot render the job's parameters" in (job.error_message or "") and "version 2" in job.error_message
