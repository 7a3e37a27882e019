"""The pure parts of the limits (shared/owners): token bucket arithmetic and its headers, UTC period boundaries,
and which quota an owner's use has reached."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from shared.owners.periods import (
    Period,
    day_start,
    month_start,
    next_day_start,
    next_month_start,
    period_end,
    seconds_until,
)
from shared.owners.policy import resolve
from shared.owners.ratelimit import BucketState, policy_header, refill, seconds_to, window_seconds
from shared.owners.usage import OwnerUsed, Used, exceeded_quota
from shared.settings import FairShareSettings


def test_refill_adds_rate_times_elapsed_up_to_the_burst() -> None:
    assert refill(0.0, 0.25, burst=60, rate=10) == pytest.approx(2.5)
    assert refill(59.0, 5.0, burst=60, rate=10) == 60.0
    assert refill(3.0, -1.0, burst=60, rate=10) == 3.0  # a clock step back adds nothing


def test_seconds_to_rounds_up_and_is_zero_when_already_there() -> None:
    assert seconds_to(1.0, 0.0, rate=10) == 1  # 0.1 s -> 1 s: Retry-After is whole seconds
    assert seconds_to(1.0, 0.0, rate=0.5) == 2
    assert seconds_to(60.0, 0.0, rate=10) == 6
    assert seconds_to(1.0, 1.0, rate=10) == 0
    assert seconds_to(60.0, 59.99, rate=10) == 1


def test_window_is_the_time_an_empty_bucket_takes_to_fill() -> None:
    assert window_seconds(60, 10) == 6
    assert window_seconds(60, 0.5) == 120
    assert window_seconds(5, 100) == 1


def test_headers_follow_the_draft_structured_fields() -> None:
    assert policy_header(60, 10) == '"burst";q=60;w=6'
    empty = BucketState(allowed=False, tokens=0.4, burst=60, rate=10)
    assert empty.headers() == {"RateLimit-Policy": '"burst";q=60;w=6', "RateLimit": '"burst";r=0;t=6'}
    assert empty.retry_after == 1
    fresh = BucketState(allowed=True, tokens=59.0, burst=60, rate=10)
    assert fresh.headers()["RateLimit"] == '"burst";r=59;t=1'
    assert fresh.retry_after == 0


def test_period_boundaries_in_utc() -> None:
    late = datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert day_start(late) == datetime(2026, 12, 31, tzinfo=UTC)
    assert month_start(late) == datetime(2026, 12, 1, tzinfo=UTC)
    assert next_day_start(late) == datetime(2027, 1, 1, tzinfo=UTC)
    assert next_month_start(late) == datetime(2027, 1, 1, tzinfo=UTC)
    assert next_month_start(datetime(2026, 1, 31, 12, tzinfo=UTC)) == datetime(2026, 2, 1, tzinfo=UTC)
    assert period_end(Period.MONTH, datetime(2028, 2, 29, 1, tzinfo=UTC)) == datetime(2028, 3, 1, tzinfo=UTC)
    # 01:00 in UTC+2 is still the previous UTC day.
    cairo = datetime(2026, 12, 4, 1, 0, tzinfo=timezone(timedelta(hours=2)))
    assert day_start(cairo) == datetime(2026, 12, 3, tzinfo=UTC)
    assert seconds_until(next_day_start(late), late) == 1
    assert seconds_until(late, late) == 1  # never "retry in 0 s"
    with pytest.raises(ValueError, match="naive"):
        day_start(datetime(2026, 12, 3))


def _used(today: Used, month: Used) -> OwnerUsed:
    return OwnerUsed(today=today, month=month, days=((date(2026, 12, 3), today),))


NOW = datetime(2026, 12, 3, 20, 0, tzinfo=UTC)


def test_no_quota_is_never_exceeded() -> None:
    policy = resolve("o", None, FairShareSettings())
    assert exceeded_quota(policy, _used(Used(1e9, 10**9, 1), Used(1e9, 10**9, 1)), NOW) is None


def test_a_daily_quota_resets_at_the_next_utc_midnight() -> None:
    policy = resolve("o", {"images_per_day": 4}, FairShareSettings())
    assert exceeded_quota(policy, _used(Used(1.0, 3, 1), Used(1.0, 3, 1)), NOW) is None
    hit = exceeded_quota(policy, _used(Used(1.0, 4, 2), Used(1.0, 4, 2)), NOW)
    assert hit is not None and (hit.quota, hit.used, hit.limit) == ("images_per_day", 4, 4)
    assert hit.resets_at == datetime(2026, 12, 4, tzinfo=UTC)
    assert "images quota per day used up: 4 of 4" in hit.message and "2026-12-04T00:00:00Z" in hit.message


def test_when_day_and_month_are_both_used_up_the_later_reset_wins() -> None:
    policy = resolve("o", {"gpu_seconds_per_day": 10.0, "gpu_seconds_per_month": 100.0}, FairShareSettings())
    hit = exceeded_quota(policy, _used(Used(12.0, 1, 1), Used(150.0, 9, 9)), NOW)
    assert hit is not None and hit.quota == "gpu_seconds_per_month"
    assert hit.resets_at == datetime(2027, 1, 1, tzinfo=UTC)
    # The month alone used up (today is fine): still refused until the month ends.
    hit = exceeded_quota(policy, _used(Used(0.0, 0, 0), Used(100.0, 9, 9)), NOW)
    assert hit is not None and hit.period is Period.MONTH


def test_a_recent_count_spares_the_query_only_while_the_rate_cannot_reach_the_cap() -> None:
    from api.limits import QueuedCounts

    counts = QueuedCounts()
    policy = resolve("o", {"rate_burst": 60, "rate_per_second": 10, "max_queued": 200}, FairShareSettings())
    assert not counts.below_cap("o", policy, rate_limited=True, now=100.0)  # never counted
    counts.counted("o", 100, now=100.0)
    assert counts.below_cap("o", policy, rate_limited=True, now=100.5)  # 100 + 60 + 10 * 1.5 = 175 < 200
    assert not counts.below_cap("o", policy, rate_limited=True, now=104.0)  # 100 + 60 + 10 * 5 = 210
    assert not counts.below_cap("o", policy, rate_limited=False, now=100.5)  # nothing bounds the creations
    counts.counted("o", 130, now=200.0)
    assert not counts.below_cap("o", policy, rate_limited=True, now=200.1)  # 130 + 60 + 11 = 201: count again
    roomy = resolve("o", {"rate_burst": 60, "rate_per_second": 10, "max_queued": 10_000}, FairShareSettings())
    assert counts.below_cap("o", roomy, rate_limited=True, now=259.0)
    assert not counts.below_cap("o", roomy, rate_limited=True, now=261.0)  # older than FRESH_SECONDS


def test_the_schema_documents_the_429_on_exactly_the_job_creation_routes() -> None:
    from api.main import create_app
    from api.openapi import farm_openapi
    from shared.settings import Settings

    schema = farm_openapi(create_app(), Settings())
    limited = {(path, method) for path, operations in schema["paths"].items()
               for method, operation in operations.items() if "429" in operation.get("responses", {})}
    assert limited == {("/v1/jobs", "post"), ("/sdapi/v1/txt2img", "post"), ("/sdapi/v1/img2img", "post"),
                       ("/sdapi/v1/extra-single-image", "post"), ("/sdapi/v1/extra-batch-images", "post"),
                       # trainings are jobs too (issue 15)
                       ("/v1/trainings", "post"), ("/sdapi/v1/create/embedding", "post"),
                       ("/sdapi/v1/create/hypernetwork", "post"), ("/sdapi/v1/train/embedding", "post"),
                       ("/sdapi/v1/train/hypernetwork", "post")}
