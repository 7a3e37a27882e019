"""Which queued job a worker takes next when several owners are waiting (issue 17).

Weighted fair share across owners, decided in Postgres at claim time: among the queued jobs a worker may take
(its queues; its batch key when it looks for batch partners), jobs an admin moved to the front come first, then
the owner with the least recent render time per unit of weight, then, within an owner, the highest `priority`,
then the oldest. "Recent render time" is each finished job's measured `render_seconds`, decayed with a half-life
(`RENDERFARM_FAIR_SHARE_HALF_LIFE_SECONDS`), plus the time its running jobs have run so far, so two workers
taking jobs at once already see each other's choice. It is work-conserving: an owner alone gets every worker.

An owner's `max_running` caps its jobs running at once across the fleet. The cap is checked under a
transaction-scoped advisory lock per capped owner, so two workers claiming at the same moment cannot both take
that owner's last slot. This module only reads and locks; the state change itself is `lifecycle`'s.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from sqlalchemy import ColumnElement, Float, func, literal, nulls_last, select, union_all
from sqlalchemy.dialects.postgresql import distinct_on
from sqlalchemy.orm import Session

from shared.db.models import Job, OwnerPolicy
from shared.jobs.states import JobStatus
from shared.settings import FairShareSettings

# Finished jobs older than this many half-lives weigh under 1/16 of their time: left out of the sum.
_HALF_LIVES_COUNTED = 4


@dataclass(frozen=True)
class FairOrder:
    """The fair-share settings a claim needs (from `FairShareSettings`)."""

    half_life_seconds: float
    default_weight: float
    default_max_running: int

    @classmethod
    def from_settings(cls, settings: FairShareSettings) -> FairOrder | None:
        """None when fair share is off: claims then take the job their message names, oldest partners first."""
        if not settings.fair_share:
            return None
        return cls(settings.fair_share_half_life_seconds, settings.default_weight, settings.default_max_running)


@dataclass(frozen=True)
class Candidate:
    job_id: uuid.UUID
    owner: str
    params: dict
    max_running: int  # 0: no cap


def recent_usage(order: FairOrder):  # noqa: ANN202 (a SQLAlchemy subquery)
    """Seconds of render time per owner (columns ``owner``, ``used``): finished jobs decayed by age, plus running
    jobs' time so far. The claim's first sort key (per weight); the job view's fair queue position reads the same
    (`shared.jobs.views.FairQueueSnapshot`)."""
    age = func.extract("epoch", func.now() - Job.finished_at)
    finished = (
        select(Job.owner.label("owner"),
               (Job.render_seconds * func.power(0.5, age / order.half_life_seconds)).label("used"))
        .where(Job.finished_at > func.now() - func.make_interval(0, 0, 0, 0, 0, 0,
                                                                  order.half_life_seconds * _HALF_LIVES_COUNTED),
               Job.render_seconds.is_not(None))
    )
    running = (
        select(Job.owner.label("owner"), func.extract("epoch", func.now() - Job.started_at).label("used"))
        .where(Job.status == JobStatus.RUNNING, Job.started_at.is_not(None))
    )
    both = union_all(finished, running).subquery("usage_rows")
    return select(both.c.owner, func.sum(both.c.used).label("used")).group_by(both.c.owner).subquery("usage")


def pick(session: Session, order: FairOrder, queues: Collection[str], *, limit: int,
         batch_key: str | None = None, exclude_ids: Sequence[uuid.UUID] = (),
         exclude_owners: Collection[str] = ()) -> list[Candidate]:
    """Up to ``limit`` queued jobs in fair order, locked (`FOR UPDATE SKIP LOCKED`: rows another claim is taking
    are skipped, never waited for). Caps are not checked here: see :func:`within_cap`."""
    if not queues or limit <= 0:
        return []
    usage = recent_usage(order)
    weight = func.coalesce(OwnerPolicy.weight, literal(order.default_weight, Float))
    where: list[ColumnElement[bool]] = [Job.status == JobStatus.QUEUED, Job.route.in_(list(queues))]
    if batch_key is not None:
        where.append(Job.batch_key == batch_key)
    if exclude_ids:
        where.append(Job.id.not_in(list(exclude_ids)))
    if exclude_owners:
        where.append(Job.owner.not_in(list(exclude_owners)))
    rows = session.execute(
        select(Job.id, Job.owner, Job.params,
               func.coalesce(OwnerPolicy.max_running, order.default_max_running))
        .select_from(Job)
        .outerjoin(usage, usage.c.owner == Job.owner)
        .outerjoin(OwnerPolicy, OwnerPolicy.owner == Job.owner)
        .where(*where)
        .order_by(nulls_last(Job.front_at.asc()), func.coalesce(usage.c.used, 0.0) / weight,
                  Job.priority.desc(), Job.created_at, Job.id)
        .limit(limit)
        .with_for_update(of=Job, skip_locked=True)
    ).all()
    return [Candidate(job_id, owner, params, int(cap or 0)) for job_id, owner, params, cap in rows]


def within_cap(session: Session, owner: str, cap: int, taking: int = 1) -> int:
    """How many of ``taking`` more jobs ``owner`` may start now under its ``max_running`` cap (0 = no cap), counted
    under an advisory lock held until this transaction ends: concurrent claims for one capped owner take turns.
    Jobs this transaction already claimed are counted (they are running in it)."""
    if cap <= 0:
        return taking
    session.execute(select(func.pg_advisory_xact_lock(func.hashtext(f"fair-share:{owner}"))))
    running = session.scalar(select(func.count()).select_from(Job)
                             .where(Job.owner == owner, Job.status == JobStatus.RUNNING)) or 0
    return max(0, min(taking, cap - int(running)))


def next_of_capped_owners(session: Session, owners: Collection[str], default_max_running: int
                          ) -> list[tuple[uuid.UUID, str | None]]:
    """For each of ``owners`` that has a `max_running` cap, its first queued job in its own order (front, priority,
    age) and that job's queue: what to nudge when one of its running jobs ends, since a claim that found the owner
    at its cap took another job (or none) and that message is spent."""
    if not owners:
        return []
    cap = func.coalesce(OwnerPolicy.max_running, default_max_running)
    rows = session.execute(
        select(Job.id, Job.route).ext(distinct_on(Job.owner))
        .outerjoin(OwnerPolicy, OwnerPolicy.owner == Job.owner)
        .where(Job.owner.in_(list(owners)), Job.status == JobStatus.QUEUED, cap > 0)
        .order_by(Job.owner, nulls_last(Job.front_at.asc()), Job.priority.desc(), Job.created_at)
    ).all()
    return [(job_id, route) for job_id, route in rows]
