"""Waiting's transport-free half (renderfarm_client/_watch.py): SSE parsing and one wait's state."""

from __future__ import annotations

import json

import pytest
from renderfarm_client import Job, WaitTimeout
from renderfarm_client._watch import JobWatch, SseDecoder, SseEvent

from tests.client.stub_server import JOB

pytestmark = pytest.mark.unit


def test_decoder_reads_the_farms_events_and_skips_keepalives() -> None:
    running = {**JOB, "status": "running", "current_step": 1}
    lines = [": keepalive", "", "id: 2.1", "event: progress", f"data: {json.dumps(running)}", "",
             "id:3.0", "event:succeeded", "data:{\"a\":", "data: 1}", ""]
    decoder = SseDecoder()
    events = [e for e in map(decoder.feed, lines) if e is not None]
    assert events == [SseEvent("progress", json.dumps(running), "2.1"), SseEvent("succeeded", '{"a":\n1}', "3.0")]
    assert decoder.last_event_id == "3.0"


def test_watch_reports_each_change_once_and_knows_the_end() -> None:
    seen: list[tuple[str, int]] = []
    watch = JobWatch("j", lambda job: seen.append((job.status, job.current_step)), None, poll_wait=30)
    states = [("queued", 0), ("queued", 0), ("running", 1), ("running", 1), ("running", 2), ("succeeded", 2)]
    ends = [watch.see(Job.from_json({**JOB, "status": s, "current_step": n})) for s, n in states]
    assert ends == [False, False, False, False, False, True]
    assert seen == [("queued", 0), ("running", 1), ("running", 2), ("succeeded", 2)]


def test_watch_deadline_caps_the_long_poll_and_then_times_out() -> None:
    now = [100.0]
    watch = JobWatch("j", None, 10, poll_wait=30, clock=lambda: now[0])
    watch.see(Job.from_json(JOB))
    assert watch.next_poll_wait() == 10
    now[0] = 106.0
    assert watch.next_poll_wait() == 4
    now[0] = 110.5
    with pytest.raises(WaitTimeout) as raised:
        watch.next_poll_wait()
    assert raised.value.job.id == JOB["id"]


def test_a_farm_that_does_not_hold_polls_is_not_hammered() -> None:
    assert JobWatch.pause_after_poll(changed=False, asked_wait=30, elapsed=0.01) == pytest.approx(0.49)
    assert JobWatch.pause_after_poll(changed=True, asked_wait=30, elapsed=0.01) == 0
    assert JobWatch.pause_after_poll(changed=False, asked_wait=30, elapsed=30) == 0
