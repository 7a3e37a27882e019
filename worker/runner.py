"""Runs one job from claim to outputs. Knows nothing of Celery, so tests can call it directly.

The order follows docs/architecture.md (rules 3, 4 and 6): claim by compare-and-set, render, upload to
deterministic keys, then record the outputs and `succeeded` in one transaction. A render stops at its
next step when its cancel is requested or its time limit passes (`worker/control/job_control.py`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from shared.errors import FieldError
from shared.jobs import lifecycle
from shared.jobs.contract import RenderSpec
from shared.jobs.states import ErrorType
from shared.settings import Settings
from shared.storage.base import ObjectStore, StorageError, TransientStorageError
from shared.storage.object_store import image_key
from shared.webui.image_metadata import OUTPUT_FORMATS, encode_image
from shared.webui.infotext import format_infotext
from worker.control.job_control import JobCanceled, JobControl, JobTimedOut

if TYPE_CHECKING:
    from worker.engine.pipeline_cache import PipelineCache

log = logging.getLogger(__name__)
VERSION = "renderfarm-0.1.0"


class RunOutcome(StrEnum):
    """What :meth:`JobRunner.run` did with a job (the Celery task's return value)."""

    SKIPPED = "skipped"  # not queued any more: a duplicate delivery, or already done
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    LOST = "lost"  # the lease was lost before the outputs were recorded


def infotext_for(
    spec: RenderSpec,
    seed: int,
    model_name: str,
    model_hash: str,
    subseed: int | None = None,
    extra: dict[str, object] | None = None,
) -> str:
    """The WebUI's infotext for one image (``create_infotext``); ``extra`` holds keys the engine reported."""
    from shared.webui.samplers import resolve_sampler
    from worker.engine.hires import hires_infotext_fields

    strength, ensd = spec.subseed_strength, spec.eta_noise_seed_delta
    resize_w, resize_h = spec.seed_resize_from_w, spec.seed_resize_from_h
    fields: dict[str, object] = {
        "Steps": spec.steps,
        "Sampler": spec.sampler_name,
        "Schedule type": spec.scheduler if spec.scheduler != "Automatic" else None,
        "CFG scale": spec.cfg_scale,
        "Seed": seed,
        "Size": f"{spec.width}x{spec.height}",
        "Model hash": model_hash,
        "Model": model_name.rsplit("/", 1)[-1],
        "Variation seed": (subseed if subseed is not None else spec.subseed) if strength else None,
        "Variation seed strength": strength or None,
        "Seed resize from": f"{resize_w}x{resize_h}" if resize_w > 0 and resize_h > 0 else None,
        # txt2img writes it only with hires fix: the WebUI's txt2img passes None without it.
        "Denoising strength": spec.denoising_strength if spec.mode == "img2img" or spec.hires_enabled else None,
        "Clip skip": spec.clip_skip,
        "ENSD": ensd if ensd and resolve_sampler(spec.sampler_name, spec.scheduler).stochastic else None,
        "RNG": "CPU",
        **(hires_infotext_fields(spec) if spec.hires_enabled else {}),
        **(extra or {}),
        "Version": VERSION,
    }
    return format_infotext(spec.prompt, spec.negative_prompt, fields)


T = TypeVar("T")


def with_db_retry(action: Callable[[], T], what: str, deadline_seconds: float = 120.0) -> T:
    """Retry a database step through a restart or a dropped connection, so a finished render is not lost."""
    delay, started = 0.25, time.monotonic()
    while True:
        try:
            return action()
        except (OperationalError, InterfaceError) as exc:
            if time.monotonic() - started > deadline_seconds:
                raise
            log.warning("database unavailable while %s (%s); retrying in %.1fs", what, exc.__class__.__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def put_with_retry(
    store: ObjectStore, key: str, data: bytes, attempts: int = 4, content_type: str = "image/png"
) -> None:
    """Transient storage errors retry with backoff; the key is deterministic, so a retry overwrites."""
    for attempt in range(attempts):
        try:
            store.put(key, data, content_type)
            return
        except TransientStorageError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * 2**attempt)


def read_spec(params: dict[str, Any]) -> RenderSpec:
    """The job's render contract, parsed once; a row this worker cannot read (written by a newer API, or
    damaged) is the job's input error, named field by field."""
    try:
        return RenderSpec.from_stored(params)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
        raise FieldError(("params",), f"this worker cannot render the job's parameters: {problems}") from exc


class JobRunner:
    """One job from claim to outputs; every state change is a `shared.jobs.lifecycle` transition."""

    def __init__(
        self,
        worker: str,
        control: JobControl,
        pipelines: PipelineCache,
        session_factory: sessionmaker[Session],
        store: ObjectStore,
        settings: Settings,
        time_limit_errors: tuple[type[BaseException], ...] = (),
    ) -> None:
        """`time_limit_errors`: exceptions the host process raises when a job runs out of time anywhere (the
        Celery app passes its soft time limit's), failed as `timeout` like the step deadline."""
        self.worker = worker
        self.time_limit_errors = time_limit_errors
        self.control = control
        self.pipelines = pipelines
        self.session_factory = session_factory
        self.store = store
        self.settings = settings
        self._engine: Any = None

    @property
    def engine(self) -> Any:
        """The generation engine, built on first use in the child process (it imports torch)."""
        if self._engine is None:
            from worker.engine.engine import GenerationEngine

            self._engine = GenerationEngine(self.settings.models.models_dir)
        return self._engine

    def run(self, job_id: str) -> RunOutcome:
        """Render a job if it can be claimed, and say what became of it."""
        jid = uuid.UUID(job_id)

        def claim() -> dict[str, Any] | None:
            with self.session_factory() as session:
                job = lifecycle.claim(session, jid, self.worker, self.settings.jobs.lease_seconds)
                params = dict(job.params) if job is not None else None
                lifecycle.commit(session)
                return params

        params = with_db_retry(claim, "claiming a job")
        if params is None:
            log.info("job %s is not queued any more (duplicate delivery or done); nothing to do", job_id)
            return RunOutcome.SKIPPED
        self.control.begin(jid, self.settings.jobs.render_time_limit)
        try:
            return self._render_and_record(jid, read_spec(params))
        except JobCanceled:
            self._write(lambda session: lifecycle.finish_canceled(session, jid, self.worker), "canceling")
            log.info("job %s canceled; partial images discarded", job_id)
            return RunOutcome.CANCELED
        except FieldError as exc:
            return self._fail(jid, ErrorType.INVALID_INPUT, exc.message)
        except JobTimedOut as exc:
            log.warning("job %s: time limit reached", job_id)
            return self._fail(jid, ErrorType.TIMEOUT, str(exc))
        except self.time_limit_errors:  # the process's own backstop (Celery's soft limit), outside a step
            log.warning("job %s: time limit reached outside a denoising step", job_id)
            return self._fail(jid, ErrorType.TIMEOUT, str(JobTimedOut(self.settings.jobs.render_time_limit)))
        except StorageError as exc:
            log.exception("job %s: storage failed", job_id)
            return self._fail(jid, ErrorType.STORAGE_ERROR, f"could not store the images: {exc}")
        except Exception as exc:
            log.exception("job %s: render failed", job_id)
            return self._fail(jid, ErrorType.RENDER_ERROR, f"{exc.__class__.__name__}: {exc}")
        finally:
            self.control.end()

    def _render_and_record(self, jid: uuid.UUID, spec: RenderSpec) -> RunOutcome:
        model = self.pipelines.get(spec.model)
        rendered = self.engine.render(
            model.pipeline, spec, model.scheduler_config, load_image=self.store.get, on_step=self.control.on_step,
            loras=model.loras,
        )
        _, extension, content_type = OUTPUT_FORMATS[spec.output_format]
        images = []
        for item in rendered:
            infotext = infotext_for(spec, item.seed, model.name, model.short_hash, item.subseed, item.infotext)
            key = image_key(jid, item.index, extension)
            data = encode_image(item.image, infotext, spec.output_format)
            put_with_retry(self.store, key, data, content_type=content_type)
            images.append(
                lifecycle.NewImage(item.index, key, item.seed, item.image.width, item.image.height, infotext)
            )
        record = lambda session: lifecycle.succeed(  # noqa: E731
            session, jid, self.worker, images, model.short_hash
        )
        if not self._write(record, "recording the outputs"):
            log.warning("job %s: lease lost before completion; outputs not recorded", jid)
            return RunOutcome.LOST
        return RunOutcome.SUCCEEDED

    def _write(self, change: Callable[[Session], bool], what: str) -> bool:
        """One lifecycle transition in its own transaction, retried through database outages."""

        def attempt() -> bool:
            with self.session_factory() as session:
                if not change(session):
                    session.rollback()
                    return False
                lifecycle.commit(session)
                return True

        return with_db_retry(attempt, what)

    def _fail(self, jid: uuid.UUID, error_type: ErrorType, message: str) -> RunOutcome:
        self._write(lambda s: lifecycle.fail(s, jid, self.worker, error_type, message), "failing")
        return RunOutcome.FAILED
