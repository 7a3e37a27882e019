"""The runner's outcomes against a real PostgreSQL, with a stand-in engine (no torch, no Celery worker).

A render that runs past its time limit stops at its next step and fails as ``timeout`` with a message
naming the limit, not as a render error; a cancel requested mid-render ends it as ``canceled``. A claim
takes queued partners with the same batch key; each job of a batch ends on its own.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa
from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image
from sqlalchemy.orm import sessionmaker

from shared.errors import FieldError
from shared.jobs import lifecycle, repository
from shared.jobs.states import ErrorType, JobStatus
from shared.settings import (
    BatchingSettings,
    FairShareSettings,
    JobSettings,
    ModelSettings,
    ServiceSettings,
    Settings,
)
from shared.storage.local import LocalObjectStore
from worker.control.job_control import JobCanceled, JobControl, JobTimedOut
from worker.engine.batch import BatchJob, BatchLimits
from worker.runner import JobRunner, RunOutcome

PARAMS = {"mode": "txt2img", "prompt": "p", "negative_prompt": "", "seed": 5, "batch_size": 1, "n_iter": 1,
          "model": "m", "steps": 3, "cfg_scale": 7.0, "sampler_name": "Euler", "scheduler": "Automatic",
          "width": 64, "height": 64}


class StandInEngine:
    """``render_batch`` over a per-job ``render(job, on_step)``: what the job's step callback raises (or a
    FieldError) is that job's outcome, anything else escapes for the whole batch, as the engine does."""

    max_images_learned = None

    def __init__(self, render: Any) -> None:
        self.render = render
        self.batches: list[list[uuid.UUID]] = []

    def render_batch(self, pipe: Any, jobs: list[BatchJob], config: Any, load_image: Any = None,
                     on_step: Any = None, loras: Any = None, limits: Any = None,
                     controlnets: Any = None, upscalers: Any = None,
                     face_restorer: Any = None) -> dict[uuid.UUID, Any]:
        self.batches.append([job.job_id for job in jobs])
        out: dict[uuid.UUID, Any] = {}
        for job in jobs:
            try:
                out[job.job_id] = self.render(job, on_step=lambda d, t, j=job.job_id: on_step(j, d, t))
            except (JobCanceled, JobTimedOut, FieldError) as exc:
                out[job.job_id] = exc
        return out


def one_image(job: BatchJob, on_step: Any) -> list[Any]:
    on_step(1, 1)
    return [SimpleNamespace(index=0, seed=job.spec.seed, subseed=job.spec.subseed, image=Image.new("RGB", (64, 64)),
                            batch_images=2, infotext={})]


def _runner(database_url: str, tmp_path: Path, render: Any, time_limit: int = 90,
            time_limit_errors: tuple[type[BaseException], ...] = (), batching: bool = True,
            ) -> tuple[JobRunner, sessionmaker]:
    factory = sessionmaker(sa.create_engine(database_url))
    model = SimpleNamespace(name="m", short_hash="0123456789", pipeline=None, scheduler_config={}, loras=None)
    store = LocalObjectStore(tmp_path / "objects", "http://127.0.0.1:1", b"secret")
    settings = Settings(services=ServiceSettings(database_url=database_url),
                        jobs=JobSettings(job_time_limit=time_limit), models=ModelSettings(models_dir=tmp_path),
                        batching=BatchingSettings(batching=batching),
                        # The message's own job leads here (these tests share the "render" queue with other
                        # modules' queued jobs); fair share's choice is tests/integration/test_fair_share.py's.
                        fair_share=FairShareSettings(fair_share=False))
    pipelines = SimpleNamespace(get=lambda name: model, names=lambda: ["m"], controlnets=lambda: [], device="cpu")
    runner = JobRunner("worker-1", JobControl(), pipelines, factory, store, settings,  # type: ignore[arg-type]
                       time_limit_errors, limits=BatchLimits(max_images=4))
    runner._engine = StandInEngine(render)
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
    def render(job: BatchJob, on_step: Any) -> list:
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
    assert job.render_seconds is not None and job.render_seconds >= 0.9  # the GPU time it spent is charged
    # A second delivery of the same message finds nothing to claim.
    assert runner.run(str(job_id)) == RunOutcome.SKIPPED == "skipped"


def test_a_cancel_requested_mid_render_ends_the_job_canceled(database_url: str, tmp_path: Path) -> None:
    runner: JobRunner

    def render(job: BatchJob, on_step: Any) -> list:
        time.sleep(0.05)  # a step's work, charged to the owner all the same
        on_step(1, 3)
        assert runner.control.job_id is not None
        runner.control.request_cancel(runner.control.job_id)
        on_step(2, 3)
        raise AssertionError("the cancel never stopped the render")

    runner, factory = _runner(database_url, tmp_path, render)
    job_id = _queued_job(factory)
    assert runner.run(str(job_id)) == RunOutcome.CANCELED
    canceled = _job(factory, job_id)
    assert canceled.status == JobStatus.CANCELED and (canceled.render_seconds or 0) >= 0.05
    assert runner.control.job_id is None and runner.control.jobs_done == 1


def test_other_render_errors_stay_render_errors(database_url: str, tmp_path: Path) -> None:
    def render(job: BatchJob, on_step: Any) -> list:
        raise RuntimeError("device fault")

    runner, factory = _runner(database_url, tmp_path, render)
    job_id = _queued_job(factory)
    assert runner.run(str(job_id)) == "failed"
    job = _job(factory, job_id)
    assert job.error_type == ErrorType.RENDER_ERROR and job.error_message == "RuntimeError: device fault"


def test_the_hosts_time_limit_outside_a_step_fails_as_timeout(database_url: str, tmp_path: Path) -> None:
    """Celery's soft time limit (passed in by the Celery app) can fire outside the denoising loop."""
    def render(job: BatchJob, on_step: Any) -> list:
        raise SoftTimeLimitExceeded()

    runner, factory = _runner(database_url, tmp_path, render, 600, time_limit_errors=(SoftTimeLimitExceeded,))
    job_id = _queued_job(factory)
    assert runner.run(str(job_id)) == RunOutcome.FAILED
    job = _job(factory, job_id)
    assert job.error_type == ErrorType.TIMEOUT and "time limit of 570 s" in (job.error_message or "")


def test_parameters_this_worker_cannot_read_fail_as_invalid_input(database_url: str, tmp_path: Path) -> None:
    def render(job: BatchJob, on_step: Any) -> list:
        raise AssertionError("nothing renders from a row the worker cannot read")

    runner, factory = _runner(database_url, tmp_path, render)
    job_id = _queued_job(factory, PARAMS | {"version": 2})
    assert runner.run(str(job_id)) == RunOutcome.FAILED
    job = _job(factory, job_id)
    assert job.error_type == ErrorType.INVALID_INPUT
    assert "cannot render the job's parameters" in (job.error_message or "") and "version 2" in job.error_message


def fresh_key() -> dict[str, Any]:
    """PARAMS under a checkpoint name of the test's own: a batch key no other test's queued jobs share."""
    return PARAMS | {"model": f"m-{uuid.uuid4().hex[:8]}"}


def test_a_claim_takes_queued_partners_and_each_job_ends_on_its_own(database_url: str, tmp_path: Path) -> None:
    def render(job: BatchJob, on_step: Any) -> list:
        if job.spec.prompt == "late bad input":
            raise FieldError(("body", "init_images"), "init_images: no uploaded image under 'x'")
        return one_image(job, on_step)

    runner, factory = _runner(database_url, tmp_path, render)
    own = fresh_key()
    leader = _queued_job(factory, own | {"seed": 1})
    partner = _queued_job(factory, own | {"seed": 2, "prompt": "another prompt", "cfg_scale": 3.0})
    failing = _queued_job(factory, own | {"seed": 3, "prompt": "late bad input"})
    unreadable = _queued_job(factory, own | {"seed": 4})
    other_key = _queued_job(factory, own | {"seed": 5, "steps": 4})
    too_many = _queued_job(factory, own | {"seed": 6, "batch_size": 2})  # 5 images > the limit of 4
    with factory() as session:  # a row this worker cannot read (claimed by its key, failed after the claim)
        session.execute(sa.text("UPDATE jobs SET params = params || '{\"version\": 2}' WHERE id = :id"),
                        {"id": unreadable})
        session.commit()

    assert runner.run(str(leader)) == RunOutcome.SUCCEEDED
    assert runner._engine.batches == [[leader, partner, failing]]  # the unreadable one never reaches the engine
    jobs = {job_id: _job(factory, job_id) for job_id in (leader, partner, failing, unreadable, other_key, too_many)}
    assert jobs[leader].batch_id is not None and jobs[leader].batch_id == jobs[partner].batch_id \
        == jobs[failing].batch_id == jobs[unreadable].batch_id
    assert jobs[leader].status == jobs[partner].status == JobStatus.SUCCEEDED
    assert jobs[leader].batch_images == 2 and jobs[leader].render_seconds is not None
    assert jobs[failing].status == JobStatus.FAILED and jobs[failing].error_type == ErrorType.INVALID_INPUT
    assert jobs[unreadable].status == JobStatus.FAILED and jobs[unreadable].error_type == ErrorType.INVALID_INPUT
    assert jobs[other_key].status == jobs[too_many].status == JobStatus.QUEUED
    assert runner.control.jobs_done == 4 and runner.control.images_done == 2
    # The partners' own messages find nothing to claim.
    assert runner.run(str(partner)) == RunOutcome.SKIPPED and runner._engine.batches[1:] == []


def test_with_batching_off_a_claim_takes_only_its_job(database_url: str, tmp_path: Path) -> None:
    runner, factory = _runner(database_url, tmp_path, one_image, batching=False)
    own = fresh_key()
    first, second = _queued_job(factory, own | {"seed": 1}), _queued_job(factory, own | {"seed": 2})
    assert runner.run(str(first)) == RunOutcome.SUCCEEDED
    assert _job(factory, second).status == JobStatus.QUEUED and runner._engine.batches == [[first]]


def test_a_cancel_mid_batch_ends_one_job_and_the_others_finish(database_url: str, tmp_path: Path) -> None:
    runner: JobRunner
    victim: uuid.UUID

    def render(job: BatchJob, on_step: Any) -> list:
        if job.job_id == victim:
            runner.control.request_cancel(victim)
        return one_image(job, on_step)

    runner, factory = _runner(database_url, tmp_path, render)
    own = fresh_key()
    leader = _queued_job(factory, own | {"seed": 1})
    victim = _queued_job(factory, own | {"seed": 2})
    assert runner.run(str(leader)) == RunOutcome.SUCCEEDED
    assert _job(factory, victim).status == JobStatus.CANCELED
    assert _job(factory, leader).status == JobStatus.SUCCEEDED


def test_the_batch_window_lets_a_job_submitted_just_after_the_claim_join(database_url: str, tmp_path: Path) -> None:
    runner, factory = _runner(database_url, tmp_path, one_image)
    runner.settings = runner.settings.model_copy(update={"batching": BatchingSettings(batch_window_ms=2000)})
    own = fresh_key()
    leader = _queued_job(factory, own | {"seed": 1})
    late: list[uuid.UUID] = []

    def submit_later() -> None:
        time.sleep(0.3)
        late.append(_queued_job(factory, own | {"seed": 2}))

    thread = threading.Thread(target=submit_later)
    thread.start()
    started = time.monotonic()
    assert runner.run(str(leader)) == RunOutcome.SUCCEEDED
    thread.join()
    assert runner._engine.batches == [[leader, late[0]]]
    assert _job(factory, late[0]).status == JobStatus.SUCCEEDED
    assert time.monotonic() - started < 5  # the window closed when its time was up, not later


def test_without_a_window_nothing_waits(database_url: str, tmp_path: Path) -> None:
    runner, factory = _runner(database_url, tmp_path, one_image)
    leader = _queued_job(factory, fresh_key())
    started = time.monotonic()
    assert runner.run(str(leader)) == RunOutcome.SUCCEEDED
    assert time.monotonic() - started < 1.5


def test_while_paused_a_claim_takes_no_partners(database_url: str, tmp_path: Path) -> None:
    from shared.queueing.farm_state import set_paused

    runner, factory = _runner(database_url, tmp_path, one_image)
    own = fresh_key()
    leader, partner = _queued_job(factory, own | {"seed": 1}), _queued_job(factory, own | {"seed": 2})
    with factory() as session:
        set_paused(session, True, by="test")
        session.commit()
    try:
        assert runner.run(str(leader)) == RunOutcome.SUCCEEDED  # its message was taken before the pause
        assert _job(factory, partner).status == JobStatus.QUEUED
    finally:
        with factory() as session:
            set_paused(session, False, by="test")
            session.commit()
