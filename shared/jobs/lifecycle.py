"""Every job state change, one function per transition (docs/architecture.md, rule 3).

Each function checks its transition against the one table (`shared.jobs.states`), writes the row
with a compare-and-set UPDATE (a duplicate delivery, a second worker or a stale lease holder finds no
row to change), bumps `status_seq`, records the webhook event in the same transaction and schedules
what must be published once that transaction commits. Nothing else writes `jobs.status`.

Callers end the transaction with `commit(session)`: commit, then publish (rule 2). Publishing is
scheduled on the session, so a rollback drops it with the changes it announced.

Transitions: `submit` (-> queued; `submit_now`: the same on the event loop, in one statement), `claim` /
`claim_batch` / `claim_partners` (queued -> running, a batch claimed in one transaction), `report_progress`,
`report_training` and `renew_lease(s)` (running, no state change), `succeed`, `fail`, `cancel` /
`finish_canceled`, `retry` (a finished job -> a new queued job), and recovery: `expire_leases` (running -> queued
or failed), `republish_*` (queued, published again). Not state changes either: `move_to_front` (an admin's "run
next") and `nudge_capped_owners` (a capped owner's next job published again when one of its jobs ends).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from typing import Any

from pydantic import ValidationError
from sqlalchemy import ColumnElement, and_, case, event, func, select, update
from sqlalchemy.orm import Session

from shared.clock import utcnow
from shared.db.async_reads import get_reads
from shared.db.models import Job, JobImage
from shared.jobs import fair_share, repository
from shared.jobs.contract import RenderSpec
from shared.jobs.fair_share import FairOrder
from shared.jobs.repository import ImageRecord
from shared.jobs.states import ErrorType, JobStatus, check_transition
from shared.jobs.training_spec import TRAIN_MODE
from shared.owners.usage import record_usage
from shared.queueing import job_notices
from shared.queueing.queues import QueueName, publish_render, publish_render_async
from shared.queueing.routing import MODEL_QUEUE_PREFIX, model_queue
from shared.webhooks.outbox import enqueue_job_event, event_for_status, publish_deliveries

log = logging.getLogger(__name__)

_PENDING = "renderfarm.lifecycle.pending"


@dataclass
class Pending:
    """What committed changes must announce: webhook deliveries to nudge and render messages to send."""

    deliveries: list[int] = field(default_factory=list)
    # (job id, queue, whether `published_at` is still to be set once the message is sent)
    renders: list[tuple[uuid.UUID, str, bool]] = field(default_factory=list)
    # jobs inserted as published (`submit(..., published=True)`): un-marked if their message cannot be sent
    presumed_published: set[uuid.UUID] = field(default_factory=set)
    # jobs whose status or progress changed: announced to long-polls (shared.queueing.job_notices)
    notices: list[uuid.UUID] = field(default_factory=list)


def _pending(session: Session) -> Pending:
    pending = session.info.get(_PENDING)
    if pending is None:
        pending = session.info[_PENDING] = Pending()
    return pending


@event.listens_for(Session, "after_rollback")
@event.listens_for(Session, "after_commit")
def _drop_pending(session: Session) -> None:
    """A rolled-back change never happened: nothing of it is published. A plain `session.commit()` (tests
    that set rows up by hand) publishes nothing either, and leaves nothing for a later `commit` to send:
    only `commit` below publishes, having taken the pending work off the session first."""
    session.info.pop(_PENDING, None)


MarkPublished = Callable[[list[uuid.UUID]], None]


def commit(session: Session, *, mark_published: MarkPublished | None = None) -> None:
    """Commit the transaction, then publish what its changes scheduled.

    Only the commit itself can raise: once it succeeded, nothing that follows undoes or hides it. A
    render message that cannot be sent leaves its job queued and unpublished: the recovery loop
    publishes it. `mark_published` records `published_at` for the jobs sent (default: right here, in a
    second short transaction; the API defers it until after its response)."""
    pending = session.info.pop(_PENDING, None) or Pending()
    session.commit()
    if pending.deliveries:
        try:
            publish_deliveries(pending.deliveries)
        except Exception:  # the rows are durable: the webhook sender's poller dispatches them
            log.exception("could not nudge the webhook queue about deliveries %s", pending.deliveries)
    if pending.notices:
        try:
            job_notices.publish(pending.notices)
        except Exception:  # long-polls re-read at their timeout anyway
            log.warning("could not publish job notices for %s", pending.notices, exc_info=True)
    sent: list[uuid.UUID] = []
    unsent: list[uuid.UUID] = []
    for job_id, queue, mark in pending.renders:
        try:
            publish_render(job_id, queue)
        except Exception:  # the row is queued and unpublished; the recovery loop publishes it
            log.exception("could not publish job %s; it stays queued for the recovery loop", job_id)
            if job_id in pending.presumed_published:
                unsent.append(job_id)
            continue
        if mark:
            sent.append(job_id)
    if unsent:
        _unmark_published(session, unsent)
    if not sent:
        return
    try:
        if mark_published is not None:
            mark_published(sent)
        else:
            mark_jobs_published(session, sent)
            session.commit()
    except Exception:  # the recovery loop publishes them once more: harmless, claims are compare-and-set
        session.rollback()
        log.exception("could not record that jobs %s were published", sent)


def mark_jobs_published(session: Session, job_ids: Sequence[uuid.UUID]) -> None:
    """Tells the recovery loop the jobs' messages were sent (not a state change)."""
    session.execute(update(Job).where(Job.id.in_(list(job_ids))).values(published_at=utcnow()))


def _unmark_published(session: Session, job_ids: Sequence[uuid.UUID]) -> None:
    """Jobs inserted as published whose message was not sent: unpublished again, so the recovery loop sends it."""
    try:
        session.execute(update(Job).where(Job.id.in_(list(job_ids))).values(published_at=None))
        session.commit()
    except Exception:  # the recovery loop's broker-depth check (`republish_stale`) still finds them
        session.rollback()
        log.exception("could not record that jobs %s were not published", job_ids)


def _record_event(session: Session, job_id: uuid.UUID, event_name: str | None = None) -> None:
    job = session.get(Job, job_id)  # webhook_url never changes; enqueue_job_event re-reads the row locked
    if job is None or not job.webhook_url:
        return
    _pending(session).deliveries += enqueue_job_event(session, job, event_name or event_for_status(job.status))


def _move(
    session: Session,
    source: JobStatus | Collection[JobStatus],
    target: JobStatus,
    where: Sequence[ColumnElement[bool]],
    values: dict[str, Any],
) -> list[uuid.UUID]:
    """The one compare-and-set UPDATE behind every transition: rows in `source` matching `where` go to
    `target`; returns the ids that changed."""
    sources = [source] if isinstance(source, JobStatus) else list(source)
    for src in sources:
        check_transition(src, target)
    changed = list(
        session.execute(
            update(Job)
            .where(Job.status.in_([str(s) for s in sources]), *where)
            .values(status=target, status_seq=Job.status_seq + 1, **values)
            .returning(Job.id)
        ).scalars()
    )
    _pending(session).notices += changed
    return changed


# --- submit ---------------------------------------------------------------------------------------


def new_job(*, owner: str, api_key_id: int | None, params: dict[str, Any], model_name: str, route: str,
            max_attempts: int, priority: int, published: bool) -> dict[str, Any]:
    """The columns a new queued job is inserted with (by :func:`submit` and :func:`submit_now`): each one the
    model's Python-side defaults would fill too, since :func:`submit_now` inserts without the ORM."""
    return {
        "id": uuid.uuid4(), "owner": owner, "api_key_id": api_key_id, "mode": params.get("mode", "txt2img"),
        "status": str(JobStatus.QUEUED), "status_seq": 1, "attempt": 0, "progress": 0.0, "params": params,
        "model_name": model_name, "seed": params["seed"], "max_attempts": max_attempts, "route": route,
        "batch_key": _batch_key(params), "published_at": utcnow() if published else None, "priority": priority,
    }


def submit(
    session: Session,
    *,
    owner: str,
    api_key_id: int | None,
    params: dict[str, Any],
    model_name: str,
    route: str,
    max_attempts: int = 3,
    webhook_url: str | None = None,
    webhook_events: list[str] | None = None,
    published: bool = False,
    priority: int = 0,
) -> Job:
    """A new queued job: the row, its `queued` event, and its render message once committed. ``published``: the
    row is inserted with `published_at` set (no second transaction to record it), and un-marked by `commit` if
    the message cannot be sent."""
    job = Job(**new_job(owner=owner, api_key_id=api_key_id, params=params, model_name=model_name, route=route,
                        max_attempts=max_attempts, priority=priority, published=published),
              model_hash=None, webhook_url=webhook_url, webhook_events=webhook_events)
    session.add(job)
    session.flush()
    _record_event(session, job.id)
    _pending(session).renders.append((job.id, route, not published))
    if published:
        _pending(session).presumed_published.add(job.id)
    return job


def _batch_key(params: dict[str, Any]) -> str | None:
    """The stored batch key of a job's contract; a row the contract cannot read, or a training, is never batched."""
    if params.get("mode") in (TRAIN_MODE, "upscale"):
        return None
    try:
        return RenderSpec.from_stored(params).batch_key_digest
    except ValidationError:
        return None


_NEW_COLUMNS = tuple(new_job(owner="", api_key_id=None, params={"seed": 0, "mode": TRAIN_MODE}, model_name="",
                             route="", max_attempts=0, priority=0, published=False))
_NEW_VALUES = ", ".join(f"%({name})s" for name in _NEW_COLUMNS)
_INSERT_JOB = (f"INSERT INTO jobs ({', '.join(_NEW_COLUMNS)}) VALUES ({_NEW_VALUES}) "
               f"RETURNING {repository.JOB_RECORD_COLUMNS}")
# With an Idempotency-Key: the key's record first; the job only when the key was free. The foreign key from the
# record to the job is checked at the end of the statement, when both rows are there.
_INSERT_JOB_WITH_KEY = (
    "WITH recorded AS (INSERT INTO idempotency_keys (api_key_id, key, fingerprint, job_id) "
    "VALUES (%(api_key_id)s, %(idempotency_key)s, %(fingerprint)s, %(id)s) ON CONFLICT DO NOTHING RETURNING 1) "
    f"INSERT INTO jobs ({', '.join(_NEW_COLUMNS)}) SELECT {_NEW_VALUES} WHERE EXISTS (SELECT FROM recorded) "
    f"RETURNING {repository.JOB_RECORD_COLUMNS}"
)
_UNMARK_PUBLISHED = "UPDATE jobs SET published_at = NULL WHERE id = %(id)s AND status = 'queued'"


async def submit_now(*, owner: str, api_key_id: int, params: dict[str, Any], model_name: str, route: str,
                     max_attempts: int, priority: int,
                     idempotency: tuple[str, str] | None = None) -> repository.JobRecord | None:
    """:func:`submit` on the event loop, for a job without a webhook (no delivery to record): the row, inserted as
    published, and with ``idempotency`` (key, body fingerprint) the key's record, written by one statement in
    autocommit (no BEGIN, no COMMIT: `shared.db.async_reads`), then its message. A message that cannot be sent
    un-marks the row for the recovery loop, as :func:`commit` does. None when the Idempotency-Key was already
    recorded (by an earlier request, or one in flight, which the statement waited for): nothing was written.

    The statement may run twice when its connection turns out dropped (`AsyncReads.rows`): harmless, the job's id
    is chosen here, so a second insert of a row that did commit fails on the primary key instead."""
    values = new_job(owner=owner, api_key_id=api_key_id, params=params, model_name=model_name, route=route,
                     max_attempts=max_attempts, priority=priority, published=True)
    if idempotency is None:
        rows = await get_reads().rows(_INSERT_JOB, values)
    else:
        rows = await get_reads().rows(_INSERT_JOB_WITH_KEY, {**values, "api_key_id": api_key_id,
                                                              "idempotency_key": idempotency[0],
                                                              "fingerprint": idempotency[1]})
    if not rows:
        return None
    job = repository.job_record(rows[0])
    try:
        await publish_render_async(job.id, route)
    except Exception:  # the row is queued; unpublished, the recovery loop publishes it
        log.exception("could not publish job %s; it stays queued for the recovery loop", job.id)
        try:
            await get_reads().rows(_UNMARK_PUBLISHED, {"id": job.id})
        except Exception:  # the recovery loop's broker-depth check (`republish_stale`) still finds it
            log.exception("could not record that job %s was not published", job.id)
    return job


RETRYABLE = (JobStatus.FAILED, JobStatus.CANCELED)


class NotRetryable(ValueError):
    """Only failed or canceled jobs can be retried."""


def retry(session: Session, old: Job, route: str) -> Job:
    """A failed or canceled job rendered again as a new job: same owner, parameters and webhook.
    Finished states are final, so the old row keeps its history. A training goes to the `train` queue whatever
    ``route`` says, and goes on from the old job's last checkpoint (its state up to it is carried over)."""
    if old.status not in RETRYABLE:
        raise NotRetryable(f"job {old.id} is {old.status}; only failed or canceled jobs can be retried")
    training = old.mode == TRAIN_MODE
    job = submit(
        session, owner=old.owner, api_key_id=old.api_key_id, params=dict(old.params), model_name=old.model_name,
        route=QueueName.TRAIN if training else route, max_attempts=old.max_attempts, webhook_url=old.webhook_url,
        webhook_events=list(old.webhook_events) if old.webhook_events is not None else None,
    )
    if training and old.training and old.training.get("checkpoint"):
        job.training = {**{key: value for key, value in old.training.items() if key not in ("result", "probe_loss")},
                        "step": old.training["checkpoint"]["step"], "eta_seconds": None}
        session.flush()
    return job


# --- a worker's job -------------------------------------------------------------------------------


def claim(session: Session, job_id: uuid.UUID, worker: str, lease_seconds: int,
          batch_id: uuid.UUID | None = None) -> Job | None:
    """queued -> running for exactly one caller, holding a lease; everybody else gets None."""
    claimed = _claim_where(session, [Job.id == job_id], worker, lease_seconds, batch_id)
    return claimed[0] if claimed else None


def _claim_where(session: Session, where: Sequence[ColumnElement[bool]], worker: str, lease_seconds: int,
                 batch_id: uuid.UUID | None) -> list[Job]:
    now = utcnow()
    changed = _move(
        session, JobStatus.QUEUED, JobStatus.RUNNING, where,
        dict(attempt=Job.attempt + 1, lease_owner=worker, lease_until=now + timedelta(seconds=lease_seconds),
             started_at=now, progress=0.0, batch_id=batch_id, batch_images=None, render_seconds=None, phase=None),
    )
    if not changed:
        return []
    session.flush()
    jobs = []
    for job_id in changed:
        job = session.get(Job, job_id, populate_existing=True)
        assert job is not None
        _record_event(session, job_id)
        jobs.append(job)
    return jobs


def image_count(params: dict[str, Any] | None) -> int:
    """Images a job's params render (batch_size x n_iter as its contract reads missing keys; an upscale job: its
    inputs)."""
    params = params or {}
    if params.get("mode") == "upscale":
        return max(1, len(params.get("images") or ()))
    return max(1, int(params.get("batch_size") or 1)) * max(1, int(params.get("n_iter") or 1))


def claim_batch(session: Session, job_id: uuid.UUID, worker: str, lease_seconds: int, queues: Collection[str],
                max_images: int, order: FairOrder | None = None) -> list[Job]:
    """Claim a batch for the message naming ``job_id``: its first job first; empty when there is nothing to take
    (a duplicate message).

    Without ``order`` the named job leads, whatever its size: partners join it, never replace it. With ``order``
    (fair share, shared/jobs/fair_share.py) the leader is the fair choice among the queued jobs of ``queues``,
    which may be another owner's job: the named job, still queued, then gets its message back (published once this
    transaction commits), so every queued job keeps one."""
    batch_id = uuid.uuid4()
    if order is None:
        leader = claim(session, job_id, worker, lease_seconds, batch_id=batch_id)
    else:
        leader = _claim_fair_leader(session, job_id, worker, lease_seconds, queues, order, batch_id)
    if leader is None:
        return []
    room = max_images - image_count(leader.params)
    return [leader, *claim_partners(session, leader, worker, lease_seconds, queues, room, order)]


_FAIR_TRIES = 8  # owners at their running cap skipped before a claim gives up on the fair choice


def _claim_fair_leader(session: Session, job_id: uuid.UUID, worker: str, lease_seconds: int,
                       queues: Collection[str], order: FairOrder, batch_id: uuid.UUID) -> Job | None:
    at_cap: set[str] = set()
    for _ in range(_FAIR_TRIES):
        found = fair_share.pick(session, order, [*queues, *_named_route(session, job_id)], limit=1,
                                exclude_owners=at_cap)
        if not found:
            return None
        choice = found[0]
        if fair_share.within_cap(session, choice.owner, choice.max_running) < 1:
            at_cap.add(choice.owner)  # its next job is nudged when one of its running jobs ends
            continue
        leader = claim(session, choice.job_id, worker, lease_seconds, batch_id=batch_id)
        if leader is not None and leader.id != job_id:
            _keep_message(session, job_id)
        return leader
    return None


def _queued_route(session: Session, job_id: uuid.UUID) -> str | None:
    return session.scalar(select(Job.route).where(Job.id == job_id, Job.status == JobStatus.QUEUED))


def _named_route(session: Session, job_id: uuid.UUID) -> list[str]:
    """The named job's own queue, if it is queued: a message that reached this worker from a queue the job has
    since left (affinity's bounded wait moved it) still lets the worker take it."""
    route = _queued_route(session, job_id)
    return [route] if route else []


def _keep_message(session: Session, job_id: uuid.UUID) -> None:
    """A message spent on another (fairer) job: the job it named, if still queued, is published again to its queue.
    Not a state change; a spare duplicate message is harmless (claims are compare-and-set)."""
    route = _queued_route(session, job_id)
    if route is not None:
        _pending(session).renders.append((job_id, route, False))


def move_to_front(session: Session, job_id: uuid.UUID) -> bool:
    """An admin's "run this next": the queued job goes ahead of fair share and priorities (not a state change), and
    its message is sent again once this transaction commits. False when the job is not queued."""
    moved = session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED)
                            .values(front_at=utcnow()).returning(Job.route)).first()
    if moved is None:
        return False
    _pending(session).renders.append((job_id, moved[0] or QueueName.RENDER, False))
    _pending(session).notices.append(job_id)
    return True


def nudge_capped_owners(session: Session, job_ids: Collection[uuid.UUID], default_max_running: int) -> None:
    """After jobs leave `running`: for each of their owners with a `max_running` cap, publish its next queued
    job again (once this transaction commits). A claim that found the owner at its cap spent that job's message on
    another owner's job, or on nothing; without this nudge the job would wait for the recovery loop."""
    if not job_ids:
        return
    owners = session.scalars(select(Job.owner).where(Job.id.in_(list(job_ids))).distinct()).all()
    for next_id, route in fair_share.next_of_capped_owners(session, owners, default_max_running):
        _pending(session).renders.append((next_id, route or QueueName.RENDER, False))


def claim_partners(session: Session, leader: Job, worker: str, lease_seconds: int, queues: Collection[str],
                   room: int, order: FairOrder | None = None) -> list[Job]:
    """Queued jobs with ``leader``'s batch key from the queues this worker consumes, up to ``room`` images,
    claimed into ``leader``'s batch (``FOR UPDATE SKIP LOCKED``: jobs another claim is taking are skipped, never
    waited for or taken twice). Their messages then find nothing to claim. Oldest first; with ``order``, in fair
    order, and no owner past its running cap."""
    if leader.batch_key is None or room <= 0 or not queues:
        return []
    if order is None:
        candidates = [(job_id, params, "", 0) for job_id, params in session.execute(
            select(Job.id, Job.params)
            .where(Job.status == JobStatus.QUEUED, Job.batch_key == leader.batch_key, Job.route.in_(list(queues)),
                   Job.id != leader.id)
            .order_by(Job.created_at, Job.id)
            .limit(room)
            .with_for_update(skip_locked=True)
        ).all()]
    else:
        candidates = [(c.job_id, c.params, c.owner, c.max_running) for c in fair_share.pick(
            session, order, queues, limit=room, batch_key=leader.batch_key, exclude_ids=[leader.id])]
    chosen: list[uuid.UUID] = []
    slots: dict[str, int] = {}
    for candidate_id, params, owner, cap in candidates:
        images = image_count(params)
        if images > room:
            break  # in order: a later, smaller job does not overtake an earlier one into this batch
        if cap > 0:
            if owner not in slots:
                slots[owner] = fair_share.within_cap(session, owner, cap, taking=room)
            if slots[owner] <= 0:
                continue
            slots[owner] -= 1
        chosen.append(candidate_id)
        room -= images
    if not chosen:
        return []
    jobs = _claim_where(session, [Job.id.in_(chosen)], worker, lease_seconds, leader.batch_id)
    order_of = {job_id: i for i, job_id in enumerate(chosen)}
    return sorted(jobs, key=lambda job: order_of[job.id])


def _held_by(job_id: uuid.UUID, worker: str) -> list[ColumnElement[bool]]:
    return [Job.id == job_id, Job.lease_owner == worker]


def renew_lease(session: Session, job_id: uuid.UUID, worker: str, lease_seconds: int) -> bool:
    """The lease keeper's beat: the job stays running while its worker lives (no state change)."""
    return bool(renew_leases(session, [job_id], worker, lease_seconds))


def renew_leases(session: Session, job_ids: Collection[uuid.UUID], worker: str, lease_seconds: int
                 ) -> list[uuid.UUID]:
    """Renew the leases of every job of a batch this worker holds; returns those still held."""
    return list(
        session.execute(
            update(Job)
            .where(Job.status == JobStatus.RUNNING, Job.id.in_(list(job_ids)), Job.lease_owner == worker)
            .values(lease_until=utcnow() + timedelta(seconds=lease_seconds))
            .returning(Job.id)
        ).scalars()
    )


def report_progress(session: Session, job_id: uuid.UUID, worker: str, progress: float) -> bool:
    """Progress of a running job (no state change) and its throttled `progress` event."""
    return _report(session, job_id, worker, progress=progress)


def _report(session: Session, job_id: uuid.UUID, worker: str, **values: Any) -> bool:
    """Write ``values`` on a running job this worker holds, announce it and record its throttled `progress` event;
    False if the lease was lost."""
    changed = session.execute(
        update(Job)
        .where(Job.status == JobStatus.RUNNING, *_held_by(job_id, worker))
        .values(**values)
        .returning(Job.id)
    ).scalar_one_or_none()
    if changed is None:
        return False
    _pending(session).notices.append(job_id)
    _record_event(session, job_id, "progress")
    return True


def set_phase(session: Session, job_ids: Collection[uuid.UUID], worker: str, phase: str | None) -> list[uuid.UUID]:
    """What running jobs are doing before they render ("downloading": their worker pulls model files), or None
    when that is over. No state change: the status stays `running`; long-polls and SSE hear of it."""
    changed = list(session.execute(
        update(Job)
        .where(Job.status == JobStatus.RUNNING, Job.id.in_(list(job_ids)), Job.lease_owner == worker)
        .values(phase=phase)
        .returning(Job.id)
    ).scalars())
    _pending(session).notices += changed
    return changed


def report_training(session: Session, job_id: uuid.UUID, worker: str, training: dict[str, Any], progress: float
                    ) -> bool:
    """A running training's own state (step, loss, ETA, its last checkpoint, previews: `jobs.training`) and its
    progress, with a throttled `progress` event. No state change; only the lease holder writes it."""
    return _report(session, job_id, worker, training=training, progress=progress)


def succeed(
    session: Session, job_id: uuid.UUID, worker: str, images: Sequence[ImageRecord], model_hash: str | None = None,
    batch_images: int | None = None, render_seconds: float | None = None, training: dict[str, Any] | None = None,
) -> bool:
    """running -> succeeded with its outputs, in one transaction; False if the lease was lost. ``batch_images``:
    the images per UNet call that rendered it; ``render_seconds``: its share of its batch's render time (a
    training: its time on this attempt); ``training``: a training's final state, with its installed ``result``."""
    extra: dict[str, Any] = {"model_hash": model_hash} if model_hash else {}
    if training is not None:
        extra["training"] = training
    if batch_images is not None:
        extra["batch_images"] = batch_images
    if render_seconds is not None:
        extra["render_seconds"] = render_seconds
    if not _move(
        session, JobStatus.RUNNING, JobStatus.SUCCEEDED, _held_by(job_id, worker),
        dict(extra, finished_at=utcnow(), progress=1.0, lease_until=None),
    ):
        return False
    for image in images:
        session.add(JobImage(job_id=job_id, index=image.index, key=image.key, seed=image.seed, width=image.width,
                             height=image.height, infotext=image.infotext))
    session.flush()
    record_usage(session, job_id, render_seconds, len(images))  # the owner's quotas, in the same transaction
    _record_event(session, job_id)
    return True


def _spent(render_seconds: float | None) -> dict[str, Any]:
    return {"render_seconds": render_seconds} if render_seconds else {}


def _charge(session: Session, job_id: uuid.UUID, render_seconds: float | None) -> None:
    """A job that ends without its images still spent GPU time: it counts toward its owner's quotas (and, through
    `render_seconds`, its fair share) as its images would have."""
    if render_seconds:
        record_usage(session, job_id, render_seconds, 0, succeeded=False)


def fail(session: Session, job_id: uuid.UUID, worker: str, error_type: ErrorType, message: str,
         render_seconds: float | None = None) -> bool:
    """running -> failed with a kind and a message a user can act on; only the lease holder may fail it.
    ``render_seconds``: the GPU time it spent before it failed, charged to its owner."""
    if not _move(session, JobStatus.RUNNING, JobStatus.FAILED, _held_by(job_id, worker),
                 dict(finished_at=utcnow(), error_type=error_type, error_message=message[:4000], lease_until=None,
                      **_spent(render_seconds))):
        return False
    _charge(session, job_id, render_seconds)
    _record_event(session, job_id)
    return True


class CancelOutcome(StrEnum):
    CANCELED = "canceled"  # was queued: canceled at once, never renders
    REQUESTED = "requested"  # is running: its worker stops at the next step
    ALREADY_TERMINAL = "terminal"


def cancel(session: Session, job_id: uuid.UUID) -> CancelOutcome:
    """Cancel a queued job at once (with its `canceled` event) or ask a running one to stop; repeating a
    cancel is harmless."""
    now = utcnow()
    if _move(session, JobStatus.QUEUED, JobStatus.CANCELED, [Job.id == job_id],
             dict(finished_at=now, cancel_requested_at=now)):
        _record_event(session, job_id)
        return CancelOutcome.CANCELED
    requested = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING)
        .values(cancel_requested_at=func.coalesce(Job.cancel_requested_at, now))
        .returning(Job.id)
    ).scalar_one_or_none()
    return CancelOutcome.REQUESTED if requested is not None else CancelOutcome.ALREADY_TERMINAL


def cancel_requested(session: Session, job_id: uuid.UUID) -> bool:
    return bool(cancels_requested(session, [job_id]))


def cancels_requested(session: Session, job_ids: Collection[uuid.UUID]) -> set[uuid.UUID]:
    """Which of a batch's jobs have a cancel request (one query for the whole batch)."""
    return set(session.scalars(select(Job.id).where(Job.id.in_(list(job_ids)), Job.cancel_requested_at.is_not(None))))


def finish_canceled(session: Session, job_id: uuid.UUID, worker: str, render_seconds: float | None = None) -> bool:
    """running -> canceled by the worker that stopped it; its partial images are not recorded, the GPU time it
    spent (``render_seconds``) is charged to its owner."""
    if not _move(session, JobStatus.RUNNING, JobStatus.CANCELED, _held_by(job_id, worker),
                 dict(finished_at=utcnow(), lease_until=None, **_spent(render_seconds))):
        return False
    _charge(session, job_id, render_seconds)
    _record_event(session, job_id)
    return True


# --- recovery (docs/architecture.md, rules 2 and 5) ------------------------------------------------


def expire_leases(session: Session) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
    """Running jobs whose lease expired (their worker died) go back to the shared queue, or fail with
    `worker_lost` once they have used every attempt: a poison job must not loop. Returns (requeued, failed)."""
    now = utcnow()
    expired = [Job.lease_until < now]
    failed = _move(
        session, JobStatus.RUNNING, JobStatus.FAILED, [*expired, Job.attempt >= Job.max_attempts],
        dict(finished_at=now, lease_owner=None, lease_until=None, error_type=ErrorType.WORKER_LOST,
             error_message="the worker rendering this job was lost on every attempt"),
    )
    requeued = _move(
        session, JobStatus.RUNNING, JobStatus.QUEUED, [*expired, Job.attempt < Job.max_attempts],
        dict(lease_owner=None, lease_until=None, published_at=now, route=_shared_queue()),
    )
    for job_id in failed:
        log.warning("job %s failed: worker lost on every attempt", job_id)
        _record_event(session, job_id)
    for job_id in requeued:
        log.warning("job %s: lease expired, back to the queue", job_id)
    _pending(session).renders += _routes_of(session, requeued)
    return requeued, failed


def _shared_queue() -> ColumnElement[str]:
    """The queue a job goes back to when no worker is preferred any more: `train` for trainings, else `render`."""
    return case((Job.mode == TRAIN_MODE, str(QueueName.TRAIN)), else_=str(QueueName.RENDER))


def _routes_of(session: Session, job_ids: Sequence[uuid.UUID]) -> list[tuple[uuid.UUID, str, bool]]:
    """The messages to send for jobs just routed to their shared queue (after the UPDATE that set the route)."""
    if not job_ids:
        return []
    routes = dict(session.execute(select(Job.id, Job.route).where(Job.id.in_(list(job_ids)))).tuples().all())
    return [(job_id, routes.get(job_id) or QueueName.RENDER, False) for job_id in job_ids]


def _republish(session: Session, condition: ColumnElement[bool], limit: int) -> list[uuid.UUID]:
    """Queued jobs matching `condition` (oldest first) published again to the shared queue. Not a state
    change: `published_at` and `route` move, so a spare duplicate message is harmless (claims are CAS)."""
    candidates = (select(Job.id).where(Job.status == JobStatus.QUEUED, condition).order_by(Job.created_at)
                  .limit(limit).with_for_update(skip_locked=True))
    ids = list(
        session.execute(
            update(Job).where(Job.id.in_(candidates)).values(published_at=utcnow(), route=_shared_queue())
            .returning(Job.id)
        ).scalars()
    )
    _pending(session).renders += _routes_of(session, ids)
    return ids


def republish_unpublished(session: Session, older_than_seconds: float = 5.0, limit: int = 100) -> list[uuid.UUID]:
    """Queued jobs never published within `older_than_seconds` of their creation (the API died between
    commit and publish, or the broker was down)."""
    cutoff = utcnow() - timedelta(seconds=older_than_seconds)
    return _republish(session, and_(Job.published_at.is_(None), Job.created_at < cutoff), limit)


def queued_count(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(Job).where(Job.status == JobStatus.QUEUED)) or 0)


def republish_stale(session: Session, broker_depth: int, republish_after: float, limit: int = 500) -> list[uuid.UUID]:
    """Queued jobs whose message the broker seems to have lost (Redis restarted empty): nothing when the
    broker holds at least as many messages as there are queued jobs."""
    queued = queued_count(session)
    if broker_depth >= queued:
        return []
    cutoff = utcnow() - timedelta(seconds=republish_after)
    return _republish(session, Job.published_at < cutoff, min(limit, queued - broker_depth))


def republish_deferred(
    session: Session, max_wait_seconds: float, limit: int = 500, keep: Collection[str] = ()
) -> list[uuid.UUID]:
    """Queued jobs published to a model's queue more than `max_wait_seconds` ago: the bound on affinity.
    Jobs in the queue of an affinity key in `keep` (a checkpoint, or checkpoint-ControlNet pair, held by every
    worker: any worker that frees up takes them from that queue anyway) stay where they are, so a backlog does not
    get a spare message per job."""
    cutoff = utcnow() - timedelta(seconds=max_wait_seconds)
    condition = and_(Job.route.startswith(MODEL_QUEUE_PREFIX, autoescape=True), Job.published_at < cutoff)
    if keep:
        condition = and_(condition, Job.route.not_in([model_queue(key) for key in keep]))
    return _republish(session, condition, limit)
