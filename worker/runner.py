"""Runs one job from claim to outputs. Knows nothing of Celery (but the soft time limit's exception),
so tests can call it directly.

The order follows the design notes: claim by compare-and-set, render, upload to
deterministic keys, then record the outputs and `succeeded` in one transaction.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from shared.errors import FieldError
from shared.jobs import repository
from shared.jobs.events import publish_events, record_event
from shared.jobs.states import ErrorType
from shared.settings import Settings
from shared.storage.base import ObjectStore, StorageError, TransientStorageError
from shared.storage.object_store import image_key
from shared.webui.image_metadata import OUTPUT_FORMATS, encode_image
from shared.webui.infotext import format_infotext

if TYPE_CHECKING:
    from worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)
VERSION = "renderfarm-0.1.0"


class JobCanceled(Exception):
    """Raised from the step callback when the job's cancel was requested."""


class RunOutcome(StrEnum):
    """What :meth:`JobRunner.run` did with a job (the Celery task's return value)."""

    SKIPPED = "skipped"  # not queued any more: a duplicate delivery, or already done
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    LOST = "lost"  # the lease was lost before the outputs were recorded


def infotext_for(
    params: dict[str, Any],
    seed: int,
    model_name: str,
    model_hash: str,
    subseed: int | None = None,
    extra: dict[str, object] | None = None,
) -> str:
    """The WebUI's infotext for one image (``create_infotext``); ``extra`` holds keys the engine reported."""
    from shared.webui.samplers import resolve_sampler
    from worker.engine.hires import hires_infotext_fields

    mode = params.get("mode", "txt2img")
    enable_hr = mode == "txt2img" and bool(params.get("enable_hr"))
    strength = float(params.get("subseed_strength", 0) or 0)
    ensd = int(params.get("eta_noise_seed_delta", 0) or 0)
    resize_w, resize_h = int(params.get("seed_resize_from_w", 0) or 0), int(params.get("seed_resize_from_h", 0) or 0)
    fields: dict[str, object] = {
        "Steps": params["steps"],
        "Sampler": params["sampler_name"],
        "Schedule type": params["scheduler"] if params["scheduler"] != "Automatic" else None,
        "CFG scale": params["cfg_scale"],
        "Seed": seed,
        "Size": f"{params['width']}x{params['height']}",
        "Model hash": model_hash,
        "Model": model_name.rsplit("/", 1)[-1],
        "Variation seed": (subseed if subseed is not None else params.get("subseed")) if strength else None,
        "Variation seed strength": strength or None,
        "Seed resize from": f"{resize_w}x{resize_h}" if resize_w > 0 and resize_h > 0 else None,
        # txt2img writes it only with hires fix: the WebUI's txt2img passes None without it.
        "Denoising strength": params.get("denoising_strength") if mode == "img2img" or enable_hr else None,
        "Clip skip": params.get("clip_skip"),
        "ENSD": ensd if ensd and resolve_sampler(params["sampler_name"], params["scheduler"]).stochastic else None,
        "RNG": "CPU",
        **(hires_infotext_fields(params) if enable_hr else {}),
        **(extra or {}),
        "Version": VERSION,
    }
    return format_infotext(params["prompt"], params["negative_prompt"], fields)


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


class JobRunner:
    def __init__(
        self, runtime: WorkerRuntime, session_factory: sessionmaker[Session], store: ObjectStore, settings: Settings
    ) -> None:
        self.runtime = runtime
        self.session_factory = session_factory
        self.store = store
        self.settings = settings
        self._engine: Any = None

    @property
    def engine(self) -> Any:
        """The generation engine, built on first use in the child process (it imports torch)."""
        if self._engine is None:
            from worker.engine.engine import GenerationEngine

            self._engine = GenerationEngine(self.settings.models_dir)
        return self._engine

    def run(self, job_id: str) -> RunOutcome:
        """Render a job if it can be claimed, and say what became of it."""
        jid = uuid.UUID(job_id)

        def claim() -> tuple[dict[str, Any] | None, list[int]]:
            with self.session_factory() as session:
                job = repository.claim_job(session, jid, self.runtime.name, self.settings.lease_seconds)
                if job is None:
                    return None, []
                params = dict(job.params)
                deliveries = record_event(session, jid)
                session.commit()
                return params, deliveries

        params, deliveries = with_db_retry(claim, "claiming a job")
        publish_events(deliveries)
        if params is None:
            log.info("job %s is not queued any more (duplicate delivery or done); nothing to do", job_id)
            return RunOutcome.SKIPPED
        self.runtime.heartbeat.track(job_id)
        try:
            return self._render_and_record(jid, params)
        except JobCanceled:
            self._write(jid, lambda session: repository.finish_canceled(session, jid, self.runtime.name), "canceling")
            log.info("job %s canceled; partial images discarded", job_id)
            return RunOutcome.CANCELED
        except FieldError as exc:
            return self._fail(jid, ErrorType.INVALID_INPUT, exc.message)
        except SoftTimeLimitExceeded:
            # Celery's soft time limit, raised inside the render (the one Celery name the runner knows).
            log.warning("job %s: time limit reached", job_id)
            limit = self.settings.job_time_limit
            return self._fail(jid, ErrorType.TIMEOUT, f"the job ran past its time limit of {limit} s and was stopped")
        except StorageError as exc:
            log.exception("job %s: storage failed", job_id)
            return self._fail(jid, ErrorType.STORAGE_ERROR, f"could not store the images: {exc}")
        except Exception as exc:
            log.exception("job %s: render failed", job_id)
            return self._fail(jid, ErrorType.RENDER_ERROR, f"{exc.__class__.__name__}: {exc}")
        finally:
            self.runtime.heartbeat.untrack()
            self.runtime.jobs_done += 1

    def _render_and_record(self, jid: uuid.UUID, params: dict[str, Any]) -> RunOutcome:
        model = self.runtime.pipelines.get(params["model"])
        heartbeat = self.runtime.heartbeat

        def on_step(done: int, total: int) -> None:
            heartbeat.progress = done / total
            if heartbeat.cancel_event.is_set():
                raise JobCanceled()

        rendered = self.engine.render(
            model.pipeline, params, model.scheduler_config, load_image=self.store.get, on_step=on_step,
            loras=model.loras,
        )
        output_format = params.get("output_format") or "png"
        _, extension, content_type = OUTPUT_FORMATS.get(output_format, OUTPUT_FORMATS["png"])
        images = []
        for item in rendered:
            infotext = infotext_for(params, item.seed, model.name, model.short_hash, item.subseed, item.infotext)
            key = image_key(jid, item.index, extension)
            data = encode_image(item.image, infotext, output_format)
            put_with_retry(self.store, key, data, content_type=content_type)
            images.append(
                repository.NewImage(item.index, key, item.seed, item.image.width, item.image.height, infotext)
            )
        record = lambda session: repository.complete_job(  # noqa: E731
            session, jid, self.runtime.name, images, model.short_hash
        )
        if not self._write(jid, record, "recording the outputs"):
            log.warning("job %s: lease lost before completion; outputs not recorded", jid)
            return RunOutcome.LOST
        return RunOutcome.SUCCEEDED

    def _write(self, jid: uuid.UUID, change: Callable[[Session], bool], what: str) -> bool:
        """One state change and its webhook event in one transaction, retried through database outages."""

        def attempt() -> tuple[bool, list[int]]:
            with self.session_factory() as session:
                if not change(session):
                    session.rollback()
                    return False, []
                deliveries = record_event(session, jid)
                session.commit()
                return True, deliveries

        changed, deliveries = with_db_retry(attempt, what)
        publish_events(deliveries)
        return changed

    def _fail(self, jid: uuid.UUID, error_type: str, message: str) -> RunOutcome:
        worker = self.runtime.name
        self._write(jid, lambda s: repository.fail_job(s, jid, error_type, message, worker=worker), "failing")
        return RunOutcome.FAILED
