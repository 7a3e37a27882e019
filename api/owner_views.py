"""JSON shapes of owners' policies and usage: `/v1/usage` (the caller's own) and `/v1/admin/owners` (everyone's)."""

from __future__ import annotations

from dataclasses import asdict
from datetime import date, datetime

from pydantic import BaseModel, Field

from shared.owners.periods import Period, period_end, period_start
from shared.owners.policy import EffectivePolicy
from shared.owners.usage import OwnerUsed, Used


class PolicyView(BaseModel):
    """An owner's effective limits; 0 means no cap (max_running, max_queued, quotas)."""

    weight: float
    max_running: int
    max_priority: int
    max_queued: int
    rate_burst: int
    rate_per_second: float
    gpu_seconds_per_day: float
    gpu_seconds_per_month: float
    images_per_day: int
    images_per_month: int
    overrides: list[str] = Field(description="the fields an admin set for this owner; the rest are defaults")

    @classmethod
    def of(cls, policy: EffectivePolicy) -> PolicyView:
        values = asdict(policy)
        values.pop("owner")
        values["overrides"] = sorted(policy.overrides)
        return cls(**values)


class UsedView(BaseModel):
    gpu_seconds: float
    images: int
    jobs: int

    @classmethod
    def of(cls, used: Used) -> UsedView:
        return cls(gpu_seconds=round(used.gpu_seconds, 3), images=used.images, jobs=used.jobs)


class PeriodUsage(UsedView):
    """Use in one UTC period against its quotas (None: no quota)."""

    period: Period
    starts_at: datetime
    resets_at: datetime
    gpu_seconds_quota: float | None
    images_quota: int | None
    gpu_seconds_left: float | None
    images_left: int | None

    @classmethod
    def build(cls, period: Period, used: Used, policy: EffectivePolicy, now: datetime) -> PeriodUsage:
        gpu_quota = float(getattr(policy, f"gpu_seconds_per_{period}")) or None
        image_quota = int(getattr(policy, f"images_per_{period}")) or None
        return cls(
            period=period, starts_at=period_start(period, now), resets_at=period_end(period, now),
            gpu_seconds=round(used.gpu_seconds, 3), images=used.images, jobs=used.jobs,
            gpu_seconds_quota=gpu_quota, images_quota=image_quota,
            gpu_seconds_left=None if gpu_quota is None else round(max(0.0, gpu_quota - used.gpu_seconds), 3),
            images_left=None if image_quota is None else max(0, image_quota - used.images),
        )


class DayUsage(UsedView):
    day: date


class UsageView(BaseModel):
    """The caller's use of the farm: today and this month (UTC), and each day of this month."""

    owner: str
    today: PeriodUsage
    month: PeriodUsage
    days: list[DayUsage]
    queued: int
    policy: PolicyView

    @classmethod
    def build(cls, owner: str, used: OwnerUsed, policy: EffectivePolicy, queued: int, now: datetime) -> UsageView:
        return cls(
            owner=owner, today=PeriodUsage.build(Period.DAY, used.today, policy, now),
            month=PeriodUsage.build(Period.MONTH, used.month, policy, now),
            days=[DayUsage(day=day, **UsedView.of(u).model_dump()) for day, u in used.days],
            queued=queued, policy=PolicyView.of(policy),
        )


class OwnerView(BaseModel):
    owner: str
    policy: PolicyView
    today: UsedView
    month: UsedView


class OwnerList(BaseModel):
    owners: list[OwnerView]
    checked_at: datetime
