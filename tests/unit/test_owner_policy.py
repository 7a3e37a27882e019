"""Resolving an owner's policy (shared/owners/policy.py): a set column wins, a NULL or missing row takes the
settings default, and max_priority stays within the settings' range."""

from __future__ import annotations

import pytest

from shared.owners.policy import POLICY_FIELDS, PolicyCache, resolve
from shared.settings import FairShareSettings


def test_no_row_takes_every_default() -> None:
    settings = FairShareSettings(default_weight=1.5, default_rate_burst=7, default_images_per_day=3)
    policy = resolve("alice", None, settings)
    assert (policy.owner, policy.weight, policy.rate_burst, policy.images_per_day) == ("alice", 1.5, 7, 3)
    assert policy.rate_per_second == settings.default_rate_per_second
    assert policy.max_queued == settings.default_max_queued
    assert policy.overrides == frozenset()


def test_set_columns_win_and_nulls_fall_back() -> None:
    row: dict[str, float | int | None] = dict.fromkeys(POLICY_FIELDS)
    row.update(weight=2.0, max_running=1, gpu_seconds_per_month=0.0)
    policy = resolve("bob", row, FairShareSettings(default_gpu_seconds_per_month=900.0, default_max_running=4))
    assert (policy.weight, policy.max_running, policy.gpu_seconds_per_month) == (2.0, 1, 0.0)
    assert policy.rate_burst == 60
    assert policy.overrides == {"weight", "max_running", "gpu_seconds_per_month"}


@pytest.mark.parametrize(("asked", "expected"), [(500, 100), (-500, -100), (5, 5)])
def test_max_priority_is_kept_within_the_range(asked: int, expected: int) -> None:
    row: dict[str, float | int | None] = {"max_priority": asked}
    assert resolve("c", row, FairShareSettings(min_priority=-100, max_priority_limit=100)).max_priority == expected


def test_every_policy_field_has_a_default_setting() -> None:
    settings = FairShareSettings()
    assert all(hasattr(settings, f"default_{name}") for name in POLICY_FIELDS)
    assert set(POLICY_FIELDS) >= {"weight", "max_running", "max_priority", "max_queued", "rate_burst",
                                  "rate_per_second", "gpu_seconds_per_day", "images_per_month"}


class _Session:
    """Counts reads; stands in for a SQLAlchemy session's `scalar` (the cache's only call)."""

    def __init__(self) -> None:
        self.reads = 0

    def scalar(self, statement: object) -> None:
        self.reads += 1
        return None


def test_cache_reads_each_owner_once_per_ttl_and_forgets_on_demand() -> None:
    cache, session = PolicyCache(ttl=60), _Session()
    for _ in range(3):
        assert cache.row(session, "a") is None  # type: ignore[arg-type]
    assert session.reads == 1
    cache.row(session, "b")  # type: ignore[arg-type]
    assert session.reads == 2
    cache.forget("a")
    cache.row(session, "a")  # type: ignore[arg-type]
    assert session.reads == 3
    cache.clear()
    cache.row(session, "b")  # type: ignore[arg-type]
    assert session.reads == 4


def test_a_zero_ttl_cache_reads_every_time() -> None:
    cache, session = PolicyCache(ttl=0), _Session()
    cache.row(session, "a")  # type: ignore[arg-type]
    cache.row(session, "a")  # type: ignore[arg-type]
    assert session.reads == 2
