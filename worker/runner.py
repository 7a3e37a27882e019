"""Runs a batch of jobs from claim to outputs. Knows nothing of Celery, so tests can call it directly.

The order follows docs/architecture.md (rules 3, 4 and 6, and "Batches"): claim the message's job by
compare-and-set with its queued partners, render them together, upload each job's images to
deterministic keys, then record each job's outputs and `succeeded` in its own transaction. A job leaves
the batch at its next step when its cancel is requested or its time limit passes
(`worker/control/job_control.py`); the others go on.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from shared.errors import FieldError
from shared.jobs import lifecycle
from shared.jobs.contract import JobSpec, RenderSpec, TrainSpec, UpscaleSpec, parse_job_spec
from shared.jobs.fair_share import FairOrder
from shared.jobs.repository import ImageRecord, held_job
from shared.jobs.states import ErrorType
from shared.queueing.farm_state import get_pause_state
from shared.queueing.queues import QueueName
from shared.queueing.routing import affinity_keys, desired_queues, disk_key
from shared.settings import Settings
from shared.storage.base import ObjectNotFoundError, ObjectStore, StorageError, TransientStorageError
from shared.storage.object_store import image_key
from shared.webui.image_metadata import OUTPUT_FORMATS, encode_extras_image, encode_image
from shared.webui.infotext import format_infotext
from worker.control.job_control import JobCanceled, JobControl, JobTimedOut
from worker.engine.batch import BatchJob, BatchLimits

if TYPE_CHECKING:
    from worker.engine.engine import RenderedImage
    from worker.engine.pipeline_cache import PipelineCache
    from worker.model_pull.puller import ModelPuller

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
    from shared.controlnet.infotext import unit_infotext
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
        "Face restoration": "GFPGAN" if spec.restore_faces else None,
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
        **unit_infotext(spec.controlnet),
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


def read_spec(params: dict[str, Any]) -> JobSpec:
    """The job's contract (a render, or an upscale job), parsed once; a row this worker cannot read (written by
    a newer API, or damaged) is the job's input error, named field by field."""
    try:
        return parse_job_spec(params)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
        raise FieldError(("params",), f"this worker cannot render the job's parameters: {problems}") from exc


class LeaseLost(RuntimeError):
    """The job's lease went to another worker (this one was presumed lost): stop without writing anything more."""


@dataclass
class _ClaimedTraining:
    """A training in hand: its id, params, owner and the state an earlier attempt left (`jobs.training`)."""

    job_id: uuid.UUID
    params: dict[str, Any]
    owner: str
    training: dict[str, Any]


@dataclass
class _Claimed:
    """A job of the batch in hand: its id and its row's params (parsed after the claim's transaction)."""

    job_id: uuid.UUID
    params: dict[str, Any]


class JobRunner:
    """A batch of jobs from claim to outputs; every state change is a `shared.jobs.lifecycle` transition.

    A message names one job; the claim takes it and, with batching on, queued jobs with its batch key
    (docs/architecture.md, "Batches"). Each job of the batch keeps its own life: its spec is read alone,
    its images are uploaded and recorded alone, and a late input error, a cancel or its time limit ends
    it alone while the others go on."""

    def __init__(
        self,
        worker: str,
        control: JobControl,
        pipelines: PipelineCache,
        session_factory: sessionmaker[Session],
        store: ObjectStore,
        settings: Settings,
        time_limit_errors: tuple[type[BaseException], ...] = (),
        limits: BatchLimits | None = None,
        puller: ModelPuller | None = None,
    ) -> None:
        """`time_limit_errors`: exceptions the host process raises when a job runs out of time anywhere (the
        Celery app passes its soft time limit's), failed as `timeout` like the step deadline. `limits`: the
        images and pixels per UNet call (default: fitted to the device, `worker.engine.batch`). `puller`: pulls
        the model files a batch needs from the model store (None: the folder only)."""
        self.worker = worker
        self.time_limit_errors = time_limit_errors
        self.control = control
        self.pipelines = pipelines
        self.session_factory = session_factory
        self.store = store
        self.settings = settings
        self._fair_order = FairOrder.from_settings(settings.fair_share)
        self._limits = limits
        self.puller = puller
        self._engine: Any = None

    @property
    def engine(self) -> Any:
        """The generation engine, built on first use in the child process (it imports torch)."""
        if self._engine is None:
            from worker.engine.engine import GenerationEngine

            self._engine = GenerationEngine(self.settings.models.models_dir)
        return self._engine

    @property
    def limits(self) -> BatchLimits:
        if self._limits is None:
            from worker.engine.batch import device_batch_limits

            batching = self.settings.batching
            self._limits = device_batch_limits(self.pipelines.device, batching.max_batch_images,
                                               batching.batch_pixel_budget)
        return self._limits

    def claim_limit(self) -> int:
        """Images a claim may take in all: none beside the named job's with batching off."""
        if not self.settings.batching.batching:
            return 0
        learned = getattr(self._engine, "max_images_learned", None)
        return min(self.limits.max_images, learned or self.limits.max_images)

    def queues(self) -> list[str]:
        """The render queues this worker consumes: partners come only from these."""
        keys = affinity_keys(self.pipelines.names(), self.pipelines.controlnets())
        if self.puller is not None:
            keys |= {disk_key(name) for name in self.puller.on_disk()}
        return sorted(desired_queues(False, keys, self.settings.routing.affinity_routing))

    def run(self, job_id: str) -> RunOutcome:
        """Render the batch a message's job leads, if that job can be claimed; say what became of that job."""
        jid = uuid.UUID(job_id)
        batch = with_db_retry(lambda: self._claim(jid), "claiming a job")
        if not batch:
            log.info("job %s is not queued any more (duplicate delivery or done); nothing to do", job_id)
            return RunOutcome.SKIPPED
        leader = batch[0].job_id  # with fair share, not always the job the message named
        if leader != jid:
            log.info("message for job %s: fair share chose job %s", job_id, leader)
        self.control.begin([job.job_id for job in batch], self.settings.jobs.render_time_limit)
        try:
            batch += self._wait_for_partners(leader, batch)
            if len(batch) > 1:
                log.info("job %s: batch of %d jobs (%s)", leader, len(batch), ", ".join(str(j.job_id) for j in batch))
            outcomes = self._run_batch(batch)
        finally:
            self.control.end()
        if self._fair_order is not None:
            with_db_retry(lambda: self._nudge([job.job_id for job in batch]), "nudging capped owners' next jobs")
        return outcomes.get(jid, outcomes[leader])

    def _nudge(self, job_ids: list[uuid.UUID]) -> None:
        with self.session_factory() as session:
            lifecycle.nudge_capped_owners(session, job_ids, self.settings.fair_share.default_max_running)
            lifecycle.commit(session)

    def _partner_limit(self, session: Session) -> int:
        """The claim limit, or 0 while the farm is paused: a message taken just before a pause renders its
        own job, but takes no queued partners with it (pause holds queued jobs)."""
        limit = self.claim_limit()
        return 0 if limit and get_pause_state(session).paused else limit

    def _claim(self, jid: uuid.UUID) -> list[_Claimed]:
        with self.session_factory() as session:
            jobs = lifecycle.claim_batch(session, jid, self.worker, self.settings.jobs.lease_seconds, self.queues(),
                                         self._partner_limit(session), self._fair_order)
            claimed = [_Claimed(job.id, dict(job.params)) for job in jobs]
            lifecycle.commit(session)
            return claimed

    def _wait_for_partners(self, jid: uuid.UUID, batch: list[_Claimed]) -> list[_Claimed]:
        """With a batch window, claim more partners until the window closes or the batch is full."""
        window = self.settings.batching.batch_window_ms / 1000
        limit = self.claim_limit()
        images = sum(lifecycle.image_count(job.params) for job in batch)
        if window <= 0 or images >= limit:
            return []
        deadline, more = time.monotonic() + window, []
        while images < limit and time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

            def claim_more(room: int = limit - images) -> list[_Claimed]:
                with self.session_factory() as session:
                    leader = held_job(session, jid, self.worker)
                    if leader is None or not self._partner_limit(session):
                        return []
                    jobs = lifecycle.claim_partners(session, leader, self.worker, self.settings.jobs.lease_seconds,
                                                    self.queues(), room, self._fair_order)
                    claimed = [_Claimed(job.id, dict(job.params)) for job in jobs]
                    lifecycle.commit(session)
                    return claimed

            joined = with_db_retry(claim_more, "claiming batch partners")
            if joined:
                self.control.add([job.job_id for job in joined])
                more += joined
                images += sum(lifecycle.image_count(job.params) for job in joined)
        return more

    def _run_batch(self, batch: list[_Claimed]) -> dict[uuid.UUID, RunOutcome]:
        outcomes: dict[uuid.UUID, RunOutcome] = {}
        jobs = []
        for claimed in batch:
            try:
                spec = read_spec(claimed.params)
            except FieldError as exc:
                outcomes[claimed.job_id] = self._fail(claimed.job_id, ErrorType.INVALID_INPUT, exc.message)
                continue
            if isinstance(spec, TrainSpec):  # trainings come only from the train queue (run_training)
                outcomes[claimed.job_id] = self._fail(claimed.job_id, ErrorType.INVALID_INPUT,
                                                      "a training cannot be rendered; it runs on the train queue")
            elif isinstance(spec, UpscaleSpec):  # never batched: its batch is itself
                outcomes[claimed.job_id] = self._run_upscale(claimed.job_id, spec)
            else:
                jobs.append(BatchJob(claimed.job_id, spec))
        if not jobs:
            return outcomes
        for job_id, error in self._pull([(job.job_id, job.spec) for job in jobs]).items():
            outcomes[job_id] = self._fail(job_id, ErrorType.STORAGE_ERROR, error)
        jobs = [job for job in jobs if job.job_id not in outcomes]
        if not jobs:
            return outcomes
        started: float | None = None
        try:
            model = self.pipelines.get(jobs[0].spec.model)
            started = time.monotonic()
            results = self.engine.render_batch(
                model.pipeline, jobs, model.scheduler_config, load_image=self.store.get, on_step=self.control.on_step,
                loras=model.loras, limits=self.limits,
                controlnets=lambda unit: self.pipelines.controlnet(unit.model_location, unit.model_title),
                upscalers=lambda location: self.pipelines.upscaler(location),
                face_restorer=lambda: self.pipelines.face_restorer(),
            )
            elapsed = time.monotonic() - started
        except (Exception, *self.time_limit_errors) as exc:  # the whole batch: pipeline, time limit, engine fault
            spent = (time.monotonic() - started) / len(jobs) if started is not None else None
            for job in jobs:
                outcomes[job.job_id] = self._end_with(job.job_id, exc, batch_wide=True, seconds=spent)
            return outcomes
        # Each job's share of the batch's time, by its images; a job that failed or was canceled spent its share too.
        planned = sum(job.spec.image_count for job in jobs) or 1
        for job in jobs:
            result, share = results[job.job_id], elapsed * job.spec.image_count / planned
            if isinstance(result, Exception):
                outcomes[job.job_id] = self._end_with(job.job_id, result, seconds=share)
                continue
            try:
                outcomes[job.job_id] = self._record(job, result, model, share)
            except Exception as exc:
                outcomes[job.job_id] = self._end_with(job.job_id, exc, seconds=share)
        return outcomes

    def run_training(self, job_id: str) -> RunOutcome:
        """Claim a training from the `train` queue (fair share among trainings) and run it to its end: resumed from
        its last checkpoint when an earlier attempt was lost, checkpointed every `save_every` steps, its result
        installed into the model store (worker/training_job.py, worker/engine/training/)."""
        jid = uuid.UUID(job_id)
        claimed = with_db_retry(lambda: self._claim_training(jid), "claiming a training")
        if claimed is None:
            log.info("training %s is not queued any more (duplicate delivery or done); nothing to do", job_id)
            return RunOutcome.SKIPPED
        self.control.begin([claimed.job_id], self.settings.training.training_time_limit)
        try:
            outcome = self._train(claimed)
        finally:
            self.control.end()
        if self._fair_order is not None:
            with_db_retry(lambda: self._nudge([claimed.job_id]), "nudging capped owners' next jobs")
        return outcome

    def _claim_training(self, jid: uuid.UUID) -> _ClaimedTraining | None:
        with self.session_factory() as session:
            jobs = lifecycle.claim_batch(session, jid, self.worker, self.settings.jobs.lease_seconds,
                                         [QueueName.TRAIN], 0, self._fair_order)
            claimed = [_ClaimedTraining(job.id, dict(job.params), job.owner, dict(job.training or {}))
                       for job in jobs]
            lifecycle.commit(session)
            return claimed[0] if claimed else None

    def _train(self, claimed: _ClaimedTraining) -> RunOutcome:
        from worker.engine.training import train
        from worker.training_job import (
            TrainingProgress,
            checkpoint_key,
            install_result,
            load_samples,
            preview_key,
            preview_png,
        )

        jid = claimed.job_id
        try:
            spec = read_spec(claimed.params)
        except FieldError as exc:
            return self._fail(jid, ErrorType.INVALID_INPUT, exc.message)
        if not isinstance(spec, TrainSpec):
            return self._fail(jid, ErrorType.INVALID_INPUT, "a job on the train queue that is not a training")
        pull_error = self._pull([(jid, spec)]).get(jid)
        if pull_error is not None:
            return self._fail(jid, ErrorType.STORAGE_ERROR, pull_error)
        progress = TrainingProgress.resumed(spec.steps, claimed.training)
        every = self.settings.training.training_progress_seconds
        last_write = time.monotonic()

        def write() -> None:
            nonlocal last_write
            state, fraction = progress.as_dict(), progress.fraction
            if not self._write(lambda s: lifecycle.report_training(s, jid, self.worker, state, fraction),
                               "recording the training's progress"):
                raise LeaseLost(jid)
            last_write = time.monotonic()

        def on_step(report: Any) -> None:
            progress.record_step(report.step, report.loss, report.learn_rate)
            self.control.on_step(jid, report.step, report.steps)  # a cancel or the time limit stops it here
            if time.monotonic() - last_write >= every:
                write()

        def on_checkpoint(step: int, data: bytes) -> None:
            key = checkpoint_key(jid)
            put_with_retry(self.store, key, data, content_type="application/octet-stream")
            progress.checkpoint = {"step": step, "key": key}
            progress.step = step  # the step is done (its report follows the checkpoint)
            write()

        def on_preview(step: int, image: Any, prompt: str) -> None:
            key = preview_key(jid, step)
            put_with_retry(self.store, key, preview_png(image, prompt, step, spec))
            progress.previews.append({"step": step, "key": key, "prompt": prompt})
            write()

        started = time.monotonic()
        try:
            resume = None
            if progress.checkpoint:
                try:
                    resume = self.store.get(progress.checkpoint["key"])
                    log.info("training %s: resuming from the checkpoint at step %d", jid, progress.step)
                except ObjectNotFoundError:  # an operator emptied the store: the work since step 0 is redone
                    log.warning("training %s: its checkpoint %s is gone; starting from step 0", jid,
                                progress.checkpoint["key"])
                    progress = TrainingProgress(steps=spec.steps)
            write()
            samples = load_samples(spec, self.store.get)
            initial = (self.settings.models.models_dir / spec.start_from).read_bytes() if spec.start_from else None
            model = self.pipelines.get(spec.model)
            model.loras.apply(model.pipeline, [])  # no LoRA of an earlier render may ride into the training
            result = train(model.pipeline, spec, samples, initial=initial, resume=resume, on_step=on_step,
                           on_checkpoint=on_checkpoint, on_preview=on_preview)
            with self.session_factory() as session:
                progress.result = install_result(session, self.store, spec, jid, claimed.owner, result.file_bytes)
            progress.finish(result.losses, result.probe_loss_before, result.probe_loss_after)
        except LeaseLost:
            log.warning("training %s: lease lost; another attempt goes on from its last checkpoint", jid)
            return RunOutcome.LOST
        except ValueError as exc:  # the trainer's: this spec, file or checkpoint cannot train on this checkpoint
            return self._fail(jid, ErrorType.INVALID_INPUT, str(exc), time.monotonic() - started)
        except (Exception, *self.time_limit_errors) as exc:
            return self._end_with(jid, exc, seconds=time.monotonic() - started)
        state, seconds = progress.as_dict(), round(time.monotonic() - started, 4)
        if not self._write(lambda s: lifecycle.succeed(s, jid, self.worker, [], spec.model_hash, None, seconds,
                                                       training=state), "recording the training's result"):
            log.warning("training %s: lease lost before completion; result installed, not recorded", jid)
            return RunOutcome.LOST
        log.info("training %s: %s installed (%s steps, loss %.4f)", jid, state["result"]["file"], spec.steps,
                 progress.loss or float("nan"))
        return RunOutcome.SUCCEEDED

    def _pull(self, jobs: list[tuple[uuid.UUID, JobSpec]]) -> dict[uuid.UUID, str]:
        """Download the model files the jobs need and this worker lacks (they show the phase `downloading`
        meanwhile). Returns, by job, the error naming the file that could not be pulled for it: only the jobs that
        need that file fail; the others' files are pulled and they render."""
        if self.puller is None:
            return {}
        from worker.model_pull.puller import ModelPullError

        ids = [job_id for job_id, _ in jobs]
        each = dict(zip(ids, self.puller.needed([spec for _, spec in jobs]), strict=True))
        failed: dict[uuid.UUID, str] = {}
        shown = False

        def phase(value: str | None) -> None:
            self._write(lambda session: bool(lifecycle.set_phase(session, ids, self.worker, value)),
                        "setting the phase")

        def downloading() -> None:
            nonlocal shown
            if not shown:
                phase("downloading")
                shown = True

        try:
            while True:
                live = {job_id: records for job_id, records in each.items() if job_id not in failed}
                needed = list({r.relpath: r for records in live.values() for r in records}.values())
                missing = self.puller.missing(needed)
                if not missing:
                    return failed
                try:
                    self.puller.pull(missing, on_start=downloading, keep=[record.relpath for record in needed])
                    return failed
                except ModelPullError as exc:
                    hit = [job_id for job_id, records in live.items() if exc.relpath in {r.relpath for r in records}]
                    log.error("jobs %s: %s", ", ".join(map(str, hit or live)), exc)
                    failed |= {job_id: str(exc) for job_id in (hit or live)}
        finally:
            if shown:
                phase(None)

    def _run_upscale(self, jid: uuid.UUID, spec: UpscaleSpec) -> RunOutcome:
        """An upscale job (the Extras tab): each input upscaled, stored with the WebUI's postprocessing text."""
        from worker.engine.extras import extras_infotext, run_extras
        from worker.engine.face_restoration import FaceRestorationUnavailable
        from worker.engine.img2img import read_stored_image
        from worker.engine.upscalers import UpscalerRefused

        def load_upscaler(location: str) -> Any:
            try:
                return self.pipelines.upscaler(location)
            except UpscalerRefused as exc:
                raise FieldError(("body", "upscaler_1"), f"upscaler {location!r} cannot be used: {exc}") from exc

        def load_face_restorer() -> Any:
            try:
                return self.pipelines.face_restorer()
            except FaceRestorationUnavailable as exc:
                raise FieldError(("body", "gfpgan_visibility"), f"face restoration is not available: {exc}") from exc

        pull_error = self._pull([(jid, spec)]).get(jid)
        if pull_error is not None:
            return self._fail(jid, ErrorType.STORAGE_ERROR, pull_error)
        started = time.monotonic()
        try:
            results = run_extras(spec, lambda key: read_stored_image(key, self.store.get, ("body", "image")),
                                 load_upscaler, load_face_restorer,
                                 on_image=lambda done, total: self.control.on_step(jid, done, total))
            _, extension, content_type = OUTPUT_FORMATS[spec.output_format]
            images = []
            for item in results:
                text = extras_infotext(item.info)
                key = image_key(jid, item.index, extension)
                put_with_retry(self.store, key, encode_extras_image(item.image, text, item.source_infotext,
                                                                    spec.output_format), content_type=content_type)
                images.append(ImageRecord(item.index, key, spec.seed, item.image.width, item.image.height,
                                                 text))
        except (Exception, *self.time_limit_errors) as exc:
            return self._end_with(jid, exc, seconds=time.monotonic() - started)
        seconds = round(time.monotonic() - started, 4)
        record = lambda session: lifecycle.succeed(session, jid, self.worker, images, None, 1, seconds)  # noqa: E731
        if not self._write(record, "recording the outputs"):
            log.warning("job %s: lease lost before completion; outputs not recorded", jid)
            return RunOutcome.LOST
        self.control.images_done += len(images)
        return RunOutcome.SUCCEEDED

    def _end_with(self, jid: uuid.UUID, exc: BaseException, batch_wide: bool = False,
                  seconds: float | None = None) -> RunOutcome:
        """A job that did not succeed: canceled, or failed with the kind its exception means. ``seconds``: the GPU
        time it spent, charged to its owner all the same."""
        if isinstance(exc, JobCanceled):
            self._write(lambda session: lifecycle.finish_canceled(session, jid, self.worker, _rounded(seconds)),
                        "canceling")
            log.info("job %s canceled; partial images discarded", jid)
            return RunOutcome.CANCELED
        if isinstance(exc, FieldError):
            return self._fail(jid, ErrorType.INVALID_INPUT, exc.message, seconds)
        if isinstance(exc, JobTimedOut):
            log.warning("job %s: time limit reached", jid)
            return self._fail(jid, ErrorType.TIMEOUT, str(exc), seconds)
        if self.time_limit_errors and isinstance(exc, self.time_limit_errors):
            log.warning("job %s: time limit reached outside a denoising step", jid)
            return self._fail(jid, ErrorType.TIMEOUT, str(JobTimedOut(self.settings.jobs.render_time_limit)), seconds)
        if isinstance(exc, StorageError):
            log.error("job %s: storage failed: %s", jid, exc)
            return self._fail(jid, ErrorType.STORAGE_ERROR, f"could not store the images: {exc}", seconds)
        log.error("job %s: render failed%s", jid, " (its whole batch)" if batch_wide else "", exc_info=exc)
        return self._fail(jid, ErrorType.RENDER_ERROR, f"{exc.__class__.__name__}: {exc}", seconds)

    def _record(self, job: BatchJob, rendered: list[RenderedImage], model: Any, render_seconds: float
                ) -> RunOutcome:
        """Upload a job's images to their deterministic keys, then record them and `succeeded` at once."""
        spec, jid = job.spec, job.job_id
        _, extension, content_type = OUTPUT_FORMATS[spec.output_format]
        images = []
        for item in rendered:
            infotext = infotext_for(spec, item.seed, model.name, model.short_hash, item.subseed, item.infotext)
            key = image_key(jid, item.index, extension)
            data = encode_image(item.image, infotext, spec.output_format)
            put_with_retry(self.store, key, data, content_type=content_type)
            images.append(
                ImageRecord(item.index, key, item.seed, item.image.width, item.image.height, infotext)
            )
        batch_images = max((item.batch_images for item in rendered), default=1)
        record = lambda session: lifecycle.succeed(  # noqa: E731
            session, jid, self.worker, images, model.short_hash, batch_images, round(render_seconds, 4)
        )
        if not self._write(record, "recording the outputs"):
            log.warning("job %s: lease lost before completion; outputs not recorded", jid)
            return RunOutcome.LOST
        self.control.images_done += len(images)
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

    def _fail(self, jid: uuid.UUID, error_type: ErrorType, message: str, seconds: float | None = None) -> RunOutcome:
        self._write(lambda s: lifecycle.fail(s, jid, self.worker, error_type, message, _rounded(seconds)), "failing")
        return RunOutcome.FAILED


def _rounded(seconds: float | None) -> float | None:
    return round(seconds, 4) if seconds is not None else None
