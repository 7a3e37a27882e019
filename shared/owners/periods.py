"""UTC days and months: the periods quotas count in, and when each resets.

>>> from datetime import datetime, UTC
>>> day_start(datetime(2026, 12, 3, 20, 15, tzinfo=UTC))
datetime.datetime(2026, 12, 3, 0, 0, tzinfo=datetime.timezone.utc)
>>> next_month_start(datetime(2026, 12, 31, 23, 59, tzinfo=UTC))
datetime.datetime(2027, 1, 1, 0, 0, tzinfo=datetime.timezone.utc)
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from enum import StrEnum


class Period(StrEnum):
    DAY = "day"
    MONTH = "month"


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("a naive datetime has no UTC day; pass an aware one (shared.clock.utcnow)")
    return now.astimezone(UTC)


def day_start(now: datetime) -> datetime:
    return _utc(now).replace(hour=0, minute=0, second=0, microsecond=0)


def month_start(now: datetime) -> datetime:
    return day_start(now).replace(day=1)


def next_day_start(now: datetime) -> datetime:
    return day_start(now) + timedelta(days=1)


def next_month_start(now: datetime) -> datetime:
    start = month_start(now)
    return start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)


def period_start(period: Period, now: datetime) -> datetime:
    return day_start(now) if period is Period.DAY else month_start(now)


def period_end(period: Period, now: datetime) -> datetime:
    """When the period that holds `now` ends, and its quota resets."""
    return next_day_start(now) if period is Period.DAY else next_month_start(now)


def seconds_until(moment: datetime, now: datetime) -> int:
    """Whole seconds from `now` to `moment`, rounded up (a Retry-After that never asks too early), at least 1."""
    return max(1, math.ceil((moment - _utc(now)).total_seconds()))
