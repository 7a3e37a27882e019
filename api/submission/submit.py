"""Submitting a job, shared by `POST /v1/jobs` and the WebUI API (`/sdapi/v1/txt2img|img2img`).

Order matters and is the same for every caller: every check first (nothing is stored for bad
input), then one transaction: the Idempotency-Key look-up, the input images written, the row, its
`queued` event and the key's record committed together, and only then the broker message (commit,
then publish).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from api.submission import idempotency
from api.submission.inputs import StagedInputs, stage_inputs
from api.submission.params import plan_job
from api.submission.upscale import plan_upscale, stage_upscale_inputs
from shared.db.models import ApiKey, Job
from shared.errors import FieldError
from shared.jobs import lifecycle, repository
from shared.jobs.repository import JobRecord
from shared.jobs.schemas import Txt2ImgRequest, UpscaleRequest
from shared.jobs.training_schemas import TrainingRequest
from shared.owners import effective_policy
from shared.queueing.queues import QueueName
from shared.queueing.routing import get_router
from shared.settings import Settings, get_settings
from shared.storage.base import ObjectStore
from shared.webhooks.outbox import check_webhook_events
from shared.webhooks.ssrf import WebhookUrlError, check_webhook_url

log = logging.getLogger(__name__)
SubmittedBody = Txt2ImgRequest | UpscaleRequest | TrainingRequest


@dataclass(frozen=True)
class Submitted:
    job: Job
    plan: object  # what the request was resolved into: a JobPlan, an UpscalePlan, a TrainingPlan
    replayed: bool  # an earlier request with the same Idempotency-Key made this job


@dataclass(frozen=True)
class Prepared:
    """A request every check has passed: what its job is inserted with, its input images staged (not written)."""

    body: SubmittedBody
    plan: object  # a JobPlan, an UpscalePlan, a TrainingPlan
    params: dict[str, Any]
    model_name: str
    route: str
    inputs: StagedInputs
    webhook_events: list[str] | None


def check_webhook(body: SubmittedBody) -> list[str] | None:
    """The SSRF guard runs at submit (and again at delivery): private and loopback targets are refused."""
    if body.webhook_url is not None:
        try:
            check_webhook_url(body.webhook_url)
        except WebhookUrlError as exc:
            raise FieldError(("body", "webhook_url"), str(exc)) from exc
    try:
        return check_webhook_events(body.webhook_events)
    except ValueError as exc:
        raise FieldError(("body", "webhook_events"), str(exc)) from exc


def prepare_job(key: ApiKey, body: Txt2ImgRequest, settings: Settings, store: ObjectStore,
                skipped_loras: list[str] | None = None) -> Prepared:
    """Every check of a render (nothing is stored for bad input; raises FieldError), its input images staged.
    Sync: it reads the models folder (and may hash a file seen for the first time): call it in a thread.
    `skipped_loras`: collect unknown prompt-tag LoRAs there instead of refusing them (the WebUI API)."""
    plan = plan_job(body, settings, skipped_loras=skipped_loras)
    webhook_events = check_webhook(body)
    # Input images last: the costliest check. Nothing is stored until every check has passed.
    inputs = stage_inputs(plan.request.init_images, plan.request.mask, owner=key.owner, store=store,
                          settings=settings, controls=[(unit.image, unit.mask) for unit in plan.units])
    params = plan.with_inputs(inputs.init_keys, inputs.mask_key, inputs.control_keys).to_stored()
    route = get_router().queue_for(plan.checkpoint.name,
                                   plan.spec.controlnet[0].model_title if plan.spec.controlnet else None)
    return Prepared(body, plan, params, plan.checkpoint.name, route, inputs, webhook_events)


def prepare_upscale(key: ApiKey, body: UpscaleRequest, settings: Settings, store: ObjectStore) -> Prepared:
    """:func:`prepare_job` for an upscale job (the Extras tab). It goes to the shared render queue: any worker can
    run it, none needs a checkpoint warm for it."""
    plan = plan_upscale(body, settings)
    webhook_events = check_webhook(body)
    spec, inputs = stage_upscale_inputs(plan, owner=key.owner, store=store, settings=settings)
    return Prepared(body, plan, spec.to_stored(), plan.model_name, QueueName.RENDER, inputs, webhook_events)


def prepare(key: ApiKey, body: Txt2ImgRequest | UpscaleRequest, settings: Settings, store: ObjectStore) -> Prepared:
    """:func:`prepare_upscale` or :func:`prepare_job`, by the body's kind."""
    if isinstance(body, UpscaleRequest):
        return prepare_upscale(key, body, settings, store)
    return prepare_job(key, body, settings, store)


def submit_job(
    session: Session,
    key: ApiKey,
    body: Txt2ImgRequest,
    settings: Settings,
    store: ObjectStore,
    *,
    idempotency_key: str | None = None,
    skipped_loras: list[str] | None = None,
) -> Submitted:
    """Create and enqueue a job; raises FieldError (nothing stored) on bad input and
    idempotency.IdempotencyConflict while a request with the same key is in flight."""
    return persist(session, key, prepare_job(key, body, settings, store, skipped_loras), store,
                   settings.jobs.max_attempts, idempotency_key)


def submit_upscale(session: Session, key: ApiKey, body: UpscaleRequest, settings: Settings, store: ObjectStore,
                   *, idempotency_key: str | None = None) -> Submitted:
    """Create and enqueue an upscale job, in the same order as :func:`submit_job`."""
    return persist(session, key, prepare_upscale(key, body, settings, store), store, settings.jobs.max_attempts,
                   idempotency_key)


def check_priority(session: Session, owner: str, priority: int) -> None:
    """A job may ask for any priority up to its owner's `max_priority` (0 unless an admin raised it)."""
    if priority > 0:
        check_priority_allowed(priority, effective_policy(session, owner, get_settings()).max_priority)


def check_priority_allowed(priority: int, allowed: int) -> None:
    if priority > allowed:
        raise FieldError(("body", "priority"),
                         f"priority {priority} is above this owner's max_priority {allowed}; an admin can raise it "
                         "(PUT /v1/admin/owners/{owner})")


class _KeyTaken(Exception):
    """A concurrent request recorded the same Idempotency-Key first."""


def persist(session: Session, key: ApiKey, prepared: Prepared, store: ObjectStore, max_attempts: int,
            idempotency_key: str | None) -> Submitted:
    """One transaction: the Idempotency-Key look-up, the row (inserted as published), its `queued` event and the
    key's record; the inputs written before it commits; then the publish (rule 2). Nothing runs after the
    response: a message that cannot be sent un-marks the job for the recovery loop (`lifecycle.commit`)."""
    body, plan, inputs = prepared.body, prepared.plan, prepared.inputs
    body_fingerprint = _fingerprint(body) if idempotency_key is not None else ""
    check_priority(session, key.owner, body.priority)
    if idempotency_key is not None:
        earlier = _replay(session, key, idempotency_key, body_fingerprint, plan)
        if earlier is not None:
            return earlier
    try:
        inputs.write(store)  # before the row commits: a worker must find them as soon as the job exists
        job = lifecycle.submit(
            session, owner=key.owner, api_key_id=key.id, params=prepared.params, model_name=prepared.model_name,
            route=prepared.route, max_attempts=max_attempts, webhook_url=body.webhook_url,
            webhook_events=prepared.webhook_events, published=True, priority=body.priority,
        )
        set_committed_value(job, "images", [])  # a new job has none: its view needs no query for them
        if idempotency_key is not None and not idempotency.record(session, key.id, idempotency_key,
                                                                   body_fingerprint, job.id):
            raise _KeyTaken
        lifecycle.commit(session)
    except _KeyTaken:
        session.rollback()
        inputs.discard(store)
        assert idempotency_key is not None
        replayed = _replay(session, key, idempotency_key, body_fingerprint, plan)
        if replayed is None:  # the winner's job is gone (deleted by an operator): nothing to replay
            raise idempotency.IdempotencyConflict(idempotency_key) from None
        return replayed
    except Exception:
        session.rollback()
        inputs.discard(store)
        raise
    return Submitted(job, plan, replayed=False)


def _fingerprint(body: SubmittedBody) -> str:
    return idempotency.fingerprint(body.model_dump(mode="json"))


def runs_on_loop(body: SubmittedBody) -> bool:
    """Whether a submit's transaction can run on the event loop (:func:`persist_on_loop`): one without a webhook
    (its `queued` delivery is recorded with the ORM, `lifecycle.submit`)."""
    return body.webhook_url is None


def prepares_on_loop(body: Txt2ImgRequest | UpscaleRequest) -> bool:
    """Whether a submit's checks can run on the event loop: a job :func:`runs_on_loop` accepts, without input images
    (decoding and writing them is CPU and I/O for a thread), and only inside `shared.blocking.refused` (a check that
    would block raises there, and the checks run in a thread instead). The hop to a thread and back, with the GIL
    handed between the two, cost a submit about 0.45 ms of CPU, more than the checks (issue 20)."""
    return runs_on_loop(body) and not _has_images(body)


def _has_images(body: Txt2ImgRequest | UpscaleRequest) -> bool:
    if isinstance(body, UpscaleRequest):  # its image is the job
        return True
    return bool(body.init_images or body.mask or body.controlnet)  # ControlNet: its image, or the init image


def write_inputs(prepared: Prepared, store: ObjectStore) -> Prepared:
    """Write a prepared job's input images (in the thread that prepared it), before :func:`persist_on_loop`."""
    prepared.inputs.write(store)
    return prepared


async def persist_on_loop(key: ApiKey, prepared: Prepared, store: ObjectStore, max_attempts: int, max_priority: int,
                          idempotency_key: str | None) -> JobRecord | None:
    """:func:`persist` on the event loop, for a job :func:`runs_on_loop` accepts, its inputs already written
    (:func:`write_inputs`): the row and the Idempotency-Key's record in one statement, then the message
    (`lifecycle.submit_now`). None when the Idempotency-Key was already recorded: the inputs are removed and nothing
    else was written; :func:`persist` answers it (the earlier job, a 409 or a 422)."""
    body = prepared.body
    assert runs_on_loop(body)
    check_priority_allowed(body.priority, max_priority)
    try:
        job = await lifecycle.submit_now(
            owner=key.owner, api_key_id=key.id, params=prepared.params, model_name=prepared.model_name,
            route=prepared.route, max_attempts=max_attempts, priority=body.priority,
            idempotency=None if idempotency_key is None else (idempotency_key, _fingerprint(body)))
    except BaseException:
        await _discard(prepared, store)
        raise
    if job is None:
        await _discard(prepared, store)
    return job


async def _discard(prepared: Prepared, store: ObjectStore) -> None:
    if prepared.inputs.blobs:
        await asyncio.to_thread(prepared.inputs.discard, store)


def _replay(session: Session, key: ApiKey, idempotency_key: str, body_fingerprint: str,
            plan: object) -> Submitted | None:
    """The job an earlier request with this Idempotency-Key made, or None when the key is free."""
    try:
        reservation = idempotency.find(session, key.id, idempotency_key, body_fingerprint)
    except idempotency.IdempotencyMismatch as exc:
        session.rollback()
        raise FieldError(
            ("header", "Idempotency-Key"), "this Idempotency-Key was already used with a different request body"
        ) from exc
    except idempotency.IdempotencyConflict:
        session.rollback()
        raise
    if reservation is None or reservation.job_id is None:
        return None
    earlier = repository.get_job(session, reservation.job_id, owner=key.owner)
    return Submitted(earlier, plan, replayed=True) if earlier is not None else None
