"""Queue positions in the fair order (shared/jobs/views.py): how many of another owner's jobs run first."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from shared.jobs.views import _ahead_of

T0 = datetime(2026, 12, 3, tzinfo=UTC)


def keys(count: int, start: int = 0, priority: int = 0) -> list[tuple[int, datetime]]:
    return [(-priority, T0 + timedelta(seconds=start + i)) for i in range(count)]


def test_equal_weights_take_turns_and_the_older_job_wins_a_tie() -> None:
    heavy = keys(200)  # submitted first
    light = keys(10, start=1000)
    assert _ahead_of(1, light[0], 1.0, 1.0, heavy) == 1  # one heavy job (older, tied turn) runs first
    assert _ahead_of(10, light[9], 1.0, 1.0, heavy) == 10
    assert _ahead_of(1, heavy[0], 1.0, 1.0, light) == 0  # the heavy owner's first job is next
    assert _ahead_of(50, heavy[49], 1.0, 1.0, light) == 10  # never more than the other owner has


def test_weights_scale_the_other_owners_turns() -> None:
    other = keys(100)
    mine = keys(100, start=1000)
    assert _ahead_of(5, mine[4], 2.0, 1.0, other) == 3  # (5-1)*1/2 = 2 turns, plus the older tied one
    assert _ahead_of(5, mine[4], 1.0, 2.0, other) == 9  # (5-1)*2/1 = 8 turns, plus the older tied one
    assert _ahead_of(4, mine[3], 2.0, 1.0, other) == 2  # 1.5: two of its jobs come first, no tie


def test_a_tie_goes_to_the_higher_priority() -> None:
    other = keys(3, start=0, priority=0)
    urgent = keys(1, start=1000, priority=5)[0]
    assert _ahead_of(1, urgent, 1.0, 1.0, other) == 0


def test_recent_render_time_counts_as_jobs_already_run() -> None:
    """The claim's first key is recent render time per weight: an owner that used 30 jobs' worth lately waits for a
    fresh owner's turns to catch up (all 10 of them here), and the fresh owner's jobs wait for none of its."""
    heavy = keys(5)
    fresh = keys(10, start=1000)
    assert _ahead_of(1, heavy[0], 1.0, 1.0, fresh, used=30.0, other_used=0.0) == 10
    assert _ahead_of(1, fresh[0], 1.0, 1.0, heavy, used=0.0, other_used=30.0) == 0
    assert _ahead_of(10, fresh[9], 1.0, 1.0, heavy, used=0.0, other_used=30.0) == 0
    # 3.5 jobs' worth: the fresh owner's first four turns come first, then they alternate.
    assert _ahead_of(1, heavy[0], 1.0, 1.0, fresh, used=3.5) == 4
    assert _ahead_of(3, heavy[2], 1.0, 1.0, fresh, used=3.5) == 6
    assert _ahead_of(6, fresh[5], 1.0, 1.0, heavy, other_used=3.5) == 2  # (5 - 3.5) = 1.5: two heavy jobs


def test_recent_render_time_is_per_weight() -> None:
    heavy = keys(5)
    fresh = keys(10, start=1000)
    # 4 jobs' worth at weight 2 is 2 per unit of weight: two of a weight-1 owner's turns come first.
    assert _ahead_of(1, heavy[0], 2.0, 1.0, fresh, used=4.0) == 2
