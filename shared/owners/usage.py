"""What owners used: render seconds of their finished jobs (failed and canceled ones too: the GPU was spent) and
images of their succeeded jobs per UTC day (table `owner_usage`), and the quota check against an owner's policy.

`record_usage` adds a job to its owner's day in the transaction that ends it, so a quota check and
`/v1/usage` read at most a month of small rows, never the jobs. Running jobs are not counted until they finish.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from shared.db.models import ApiKey, Job, OwnerPolicy, OwnerUsage
from shared.owners.periods import Period, day_start, month_start, period_end
from shared.owners.policy import EffectivePolicy

_RECORD = text(
    """
    INSERT INTO owner_usage (owner, day, gpu_seconds, images, jobs)
    SELECT owner, (coalesce(finished_at, now()) AT TIME ZONE 'UTC')::date, :seconds, :images, :jobs
    FROM jobs WHERE id = :job_id
    ON CONFLICT (owner, day) DO UPDATE SET
      gpu_seconds = owner_usage.gpu_seconds + excluded.gpu_seconds,
      images = owner_usage.images + excluded.images,
      jobs = owner_usage.jobs + excluded.jobs
    """
)


def record_usage(session: Session, job_id: uuid.UUID, render_seconds: float | None, images: int,
                 succeeded: bool = True) -> None:
    """Count a job that just finished toward its owner's UTC day (of its `finished_at`). Call it once per job, in
    the transaction that moves it to its final state (`shared.jobs.lifecycle`), so a retry cannot count twice. A
    failed or canceled job (``succeeded`` False) counts only its GPU time: the GPU was spent all the same."""
    session.execute(_RECORD, {"job_id": job_id, "seconds": float(render_seconds or 0.0), "images": int(images),
                              "jobs": 1 if succeeded else 0})


@dataclass(frozen=True)
class Used:
    gpu_seconds: float = 0.0
    images: int = 0
    jobs: int = 0


@dataclass(frozen=True)
class OwnerUsed:
    """An owner's use today and this month (UTC), with this month's days."""

    today: Used
    month: Used
    days: tuple[tuple[date, Used], ...] = ()


def owner_used(session: Session, owner: str, now: datetime) -> OwnerUsed:
    """One indexed read of the owner's rows for this month (the primary key is (owner, day))."""
    rows = session.execute(
        select(OwnerUsage.day, OwnerUsage.gpu_seconds, OwnerUsage.images, OwnerUsage.jobs)
        .where(OwnerUsage.owner == owner, OwnerUsage.day >= month_start(now).date())
        .order_by(OwnerUsage.day)
    ).all()
    days = tuple((row.day, Used(row.gpu_seconds, row.images, row.jobs)) for row in rows)
    today = next((used for day, used in days if day == day_start(now).date()), Used())
    month = Used(sum(u.gpu_seconds for _, u in days), sum(u.images for _, u in days), sum(u.jobs for _, u in days))
    return OwnerUsed(today=today, month=month, days=days)


def used_by_owner(session: Session, now: datetime) -> dict[str, tuple[Used, Used]]:
    """Every owner with use this month: (today, this month)."""
    today = day_start(now).date()
    rows = session.execute(
        select(
            OwnerUsage.owner,
            func.sum(OwnerUsage.gpu_seconds).filter(OwnerUsage.day == today),
            func.sum(OwnerUsage.images).filter(OwnerUsage.day == today),
            func.sum(OwnerUsage.jobs).filter(OwnerUsage.day == today),
            func.sum(OwnerUsage.gpu_seconds), func.sum(OwnerUsage.images), func.sum(OwnerUsage.jobs),
        )
        .where(OwnerUsage.day >= month_start(now).date())
        .group_by(OwnerUsage.owner)
    ).all()
    return {
        row[0]: (Used(float(row[1] or 0), int(row[2] or 0), int(row[3] or 0)),
                 Used(float(row[4] or 0), int(row[5] or 0), int(row[6] or 0)))
        for row in rows
    }


def totals_by_owner(session: Session) -> dict[str, Used]:
    """Every owner's use since usage was first recorded (running totals for /metrics counters)."""
    rows = session.execute(
        select(OwnerUsage.owner, func.sum(OwnerUsage.gpu_seconds), func.sum(OwnerUsage.images),
               func.sum(OwnerUsage.jobs)).group_by(OwnerUsage.owner)
    ).all()
    return {row[0]: Used(float(row[1] or 0), int(row[2] or 0), int(row[3] or 0)) for row in rows}


def known_owners(session: Session) -> list[str]:
    """Owners of any API key or policy row, sorted."""
    owners = select(ApiKey.owner).union(select(OwnerPolicy.owner))
    return sorted(session.scalars(owners))


def queued_jobs(session: Session, owner: str) -> int:
    """The owner's queued jobs: an index-only count on the partial index ix_jobs_queued_owner."""
    return int(session.scalar(select(func.count()).select_from(Job).where(Job.owner == owner,
                                                                           Job.status == "queued")) or 0)


@dataclass(frozen=True)
class QuotaExceeded:
    """The first quota an owner has used up: which, how much of it, and when it resets."""

    quota: str  # the policy field, e.g. "gpu_seconds_per_day"
    period: Period
    used: float
    limit: float
    resets_at: datetime

    @property
    def message(self) -> str:
        what = "GPU-seconds" if self.quota.startswith("gpu_seconds") else "images"
        used = f"{self.used:g}" if what == "images" else f"{self.used:.1f}"
        return (f"{what} quota per {self.period} used up: {used} of {self.limit:g} "
                f"(policy {self.quota}); it resets at {self.resets_at.isoformat().replace('+00:00', 'Z')}")


def quotas_set(policy: EffectivePolicy) -> bool:
    return any((policy.gpu_seconds_per_day, policy.gpu_seconds_per_month, policy.images_per_day,
                policy.images_per_month))


def exceeded_quota(policy: EffectivePolicy, used: OwnerUsed, now: datetime) -> QuotaExceeded | None:
    """The quota `used` has reached (the one that resets last when several have: the time to wait), or None.
    0 means no quota."""
    hits: list[QuotaExceeded] = []
    for period, use in ((Period.DAY, used.today), (Period.MONTH, used.month)):
        for name, amount in ((f"gpu_seconds_per_{period}", use.gpu_seconds), (f"images_per_{period}", use.images)):
            limit = float(getattr(policy, name))
            if limit > 0 and amount >= limit:
                hits.append(QuotaExceeded(name, period, float(amount), limit, period_end(period, now)))
    return max(hits, key=lambda hit: hit.resets_at, default=None)
