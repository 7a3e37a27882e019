"""What a job view promises before the job runs: the steps it will take, counted as the WebUI counts them, and
while it is queued, when it will be done."""

from __future__ import annotations

from typing import Any

import pytest

from shared.db.models import Job
from shared.jobs import views
from shared.jobs.states import JobStatus
from shared.jobs.views import (
    DEFAULT_JOB_SECONDS,
    DEFAULT_SECONDS_PER_STEP,
    FLEET_PACE,
    RenderPace,
    eta_seconds,
    pace_from,
    planned_steps,
    queued_eta,
)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"mode": "txt2img", "steps": 20}, 20),
        ({"mode": "txt2img", "steps": 20, "n_iter": 3}, 60),
        ({"mode": "txt2img", "steps": 20, "enable_hr": True, "hr_second_pass_steps": 0}, 40),
        ({"mode": "txt2img", "steps": 20, "enable_hr": True, "hr_second_pass_steps": 7, "n_iter": 2}, 54),
        ({"mode": "txt2img", "steps": 20, "enable_hr": False, "hr_second_pass_steps": 7}, 20),
        ({"mode": "img2img", "steps": 20, "denoising_strength": 0.75}, 16),
        ({"mode": "img2img", "steps": 20, "denoising_strength": 1.0}, 20),
        ({"mode": "img2img", "steps": 20, "denoising_strength": 0.0}, 1),
    ],
)
def test_planned_steps(params: dict, expected: int) -> None:
    assert planned_steps(params) == expected


# A queued job's ETA (shared/jobs/views.py `queued_eta`): its position, the live workers and the recent pace.

def test_pace_from_recent_renders_and_heartbeats() -> None:
    renders = [("a", 2.0, {"steps": 20}), ("a", 4.0, {"steps": 20}), ("b", 1.0, {"steps": 10, "n_iter": 2}),
               ("a", 3.0, {"mode": "upscale"}), ("a", 0.0, {"steps": 20})]  # no steps: counts per job only; 0 s: none
    workers = [{"ready": True, "current_job": None, "current_batch": []},
               {"ready": True, "current_job": "j1", "current_batch": ["j1"]},
               {"ready": True, "current_job": None, "current_batch": ["j2", "j3"]},
               {"ready": False}]  # still loading its models
    pace = pace_from(renders, workers)
    assert (pace.workers, pace.idle) == (4, 1)
    assert pace.seconds_per_job == pytest.approx(10.0 / 4)
    assert pace.seconds_per_step == pytest.approx({"a": 6.0 / 40, "b": 1.0 / 20})
    assert pace.fleet_seconds_per_step == pytest.approx(7.0 / 60)
    assert pace.job_seconds("a", 10) == pytest.approx(1.5)
    assert pace.job_seconds("unseen", 10) == pytest.approx(70.0 / 60)  # the fleet's pace per step
    assert pace.job_seconds("a", 0) == pytest.approx(2.5)  # an upscale: the mean job


def test_pace_without_history_uses_the_defaults() -> None:
    pace = pace_from([], [{"ready": True}])
    assert pace.seconds_per_job == DEFAULT_JOB_SECONDS == 20 * DEFAULT_SECONDS_PER_STEP
    assert pace.job_seconds("any", 8) == pytest.approx(8 * DEFAULT_SECONDS_PER_STEP)


def test_queued_eta_grows_with_the_position_and_shrinks_with_workers() -> None:
    busy = RenderPace(workers=2, idle=0, seconds_per_job=4.0)
    etas = [queued_eta(position, 3.0, busy) for position in range(1, 8)]
    assert etas == [4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0]  # (p - 0.5) * 4 / 2 waiting, then its own 3 s
    assert all(a < b for a, b in zip(etas, etas[1:], strict=False))
    more = RenderPace(workers=4, idle=0, seconds_per_job=4.0)
    assert queued_eta(7, 3.0, more) == 9.5  # (7 - 0.5) * 4 / 4 + 3, against 16 with two workers


def test_idle_workers_start_the_first_jobs_at_once() -> None:
    pace = RenderPace(workers=3, idle=2, seconds_per_job=6.0)
    assert queued_eta(1, 2.5, pace) == queued_eta(2, 2.5, pace) == 2.5  # taken now: only its own render
    assert queued_eta(3, 2.5, pace) == 3.5  # the first busy worker frees up after half a job's share: 0.5 * 6 / 3
    assert queued_eta(1, 2.5, RenderPace(workers=1, idle=5, seconds_per_job=6.0)) == 2.5


def test_no_live_worker_means_no_eta() -> None:
    assert queued_eta(1, 2.0, RenderPace(workers=0, idle=0)) is None


def _queued(**params: Any) -> Job:
    return Job(status=JobStatus.QUEUED, mode=params.pop("mode", "txt2img"), model_name="a",
               params={"steps": 10} | params, progress=0.0)


def test_a_queued_jobs_view_eta_uses_this_processes_latest_pace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FLEET_PACE, "_pace", None)
    assert eta_seconds(_queued(), position=3) is None  # no pace read yet in this process
    monkeypatch.setattr(FLEET_PACE, "_pace", RenderPace(workers=1, idle=0, seconds_per_job=2.0,
                                                        seconds_per_step={"a": 0.5}))
    assert eta_seconds(_queued(), position=3) == (3 - 0.5) * 2.0 + 10 * 0.5
    assert eta_seconds(_queued(), position=None) is None  # the caller did not place it
    assert eta_seconds(_queued(mode="train"), position=1) is None  # a training's time is not a render's
    running = _queued()
    running.status = JobStatus.RUNNING
    assert eta_seconds(running, position=3) is None  # not started: no progress to extrapolate


@pytest.mark.parametrize(("took", "refresh", "again_after"), [
    (0.005, 1.0, 1.0),  # a short queue: read once a second
    (0.060, 1.0, 3.0),  # a long one: its reads take at most READ_SHARE (2%) of the time
    (0.060, 0.0, 0.0),  # refresh 0: read on every use, however long a read takes
])
def test_a_snapshot_is_read_again_after_refresh_or_longer_when_its_reads_are_long(
        monkeypatch: pytest.MonkeyPatch, took: float, refresh: float, again_after: float) -> None:
    clock = [100.0]
    monkeypatch.setattr(views.time, "monotonic", lambda: clock[0])
    reads: list[float] = []

    def read() -> None:
        reads.append(clock[0])
        clock[0] += took

    snapshot = views.QueueSnapshot()
    with snapshot._lock:
        snapshot._refresh(refresh, read)
    for elapsed, read_again in ((again_after * 0.9, again_after == 0), (again_after * 1.001, True)):
        before = len(reads)
        clock[0] = snapshot._read_at + elapsed
        with snapshot._lock:
            snapshot._refresh(refresh, read)
        assert len(reads) == before + read_again, (elapsed, reads)


def test_a_poll_waits_for_a_snapshot_read_only_when_it_has_none_recent_to_answer_from(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`poll_position` reads the snapshots again when they are due: in the background, one read at a time, while
    polls answer from the last read. A poll waits only when there is none recent to answer from (the process's first
    read, or a read older than twice the time between reads) and with refresh 0. (When every poll waited, each read
    of an 80,000-job queue stalled a process's polls 0.2-0.5 s.)"""
    import asyncio
    import threading

    release, reads = threading.Event(), []
    snapshots = (views.FLEET_PACE, views.FAIR_QUEUE_SNAPSHOT, views.QUEUE_SNAPSHOT)

    def slow_read(_session: object, _refresh: float) -> None:  # a long queue's read, held until released
        reads.append(_refresh)
        assert release.wait(10)
        for snapshot in snapshots:
            snapshot._read_at = views.time.monotonic()

    def read_ago(share_of_interval: float) -> None:  # as if the last read was that share of its interval ago
        for snapshot, interval in ((views.FLEET_PACE, views.PaceSnapshot.interval(1.0)),
                                   (views.FAIR_QUEUE_SNAPSHOT, 1.0)):
            snapshot._read_at = views.time.monotonic() - share_of_interval * interval

    monkeypatch.setattr(views, "refresh_snapshots", slow_read)
    monkeypatch.setattr(views.repository, "read", lambda work: work(None))
    for snapshot in snapshots:
        monkeypatch.setattr(snapshot, "_read_at", float("-inf"))
        monkeypatch.setattr(snapshot, "_took", 0.0)

    async def done_within(seconds: float, refresh: float) -> bool:
        poll = asyncio.ensure_future(views._snapshots_refreshed(refresh))
        await asyncio.wait([poll], timeout=seconds)
        if not poll.done():
            release.set()
            await poll
            release.clear()
            return False
        return True

    async def background_read_done() -> None:
        release.set()
        while views._refreshing is not None and not views._refreshing.done():
            await asyncio.sleep(0.01)
        release.clear()

    async def started(count: int) -> None:  # the background read has started in its thread
        for _ in range(100):
            if len(reads) == count:
                return
            await asyncio.sleep(0.01)

    async def scenario() -> None:
        assert not await done_within(0.3, 1.0)  # nothing read yet: the first poll waits for the read
        assert len(reads) == 1
        read_ago(1.5)  # due, and recent enough to answer from
        assert views.snapshots_due(1.0)
        assert await done_within(0.3, 1.0)  # answered from the last read while the next one runs
        await started(2)
        assert await done_within(0.3, 1.0)  # a poll meanwhile starts no second read
        assert len(reads) == 2
        await background_read_done()
        assert not views.snapshots_due(1.0)
        read_ago(2.5)  # a quiet spell: too old to answer from
        assert not await done_within(0.3, 1.0)
        assert len(reads) == 3
        assert not await done_within(0.3, 0.0)  # refresh 0: every poll reads for itself, and waits for its read
        assert len(reads) == 4
        read_ago(1.5)
        assert await done_within(0.3, 1.0)  # a read in the background...
        await started(5)
        assert not await done_within(0.3, 0.0)  # ...is not what a refresh-0 poll answers from: it reads again
        assert len(reads) == 6

    asyncio.run(scenario())
