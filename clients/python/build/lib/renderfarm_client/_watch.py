"""Waiting for a job, transport-independent: Server-Sent Events parsing and the state of one ``wait()``.

``wait()`` follows the job's SSE stream (GET /v1/jobs/{id}/events) and, when the stream cannot be had or
breaks (a proxy that buffers or blocks it, an older farm, a dropped connection), long-polls GET
/v1/jobs/{id}?wait=N with the last ETag, which the farm answers with 304 while nothing changed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import httpx

from renderfarm_client.errors import WaitTimeout
from renderfarm_client.models import Job

ProgressCallback = Callable[[Job], None]
JOB_EVENTS = frozenset({"queued", "started", "progress", "succeeded", "failed", "canceled"})
STREAM_READ_TIMEOUT = 45.0  # the farm sends a keepalive comment every 15 s
MIN_POLL_INTERVAL = 0.5  # a farm that does not hold long-polls is not asked more often than this


@dataclass(frozen=True)
class SseEvent:
    event: str
    data: str
    id: str | None


class SseDecoder:
    """Turns a stream's lines into events (the WHATWG EventSource rules, for the fields the farm sends)."""

    def __init__(self) -> None:
        self.last_event_id: str | None = None
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> SseEvent | None:
        """The event this line completes (a blank line ends one), else None."""
        if not line:
            data, name = self._data, self._event or "message"
            self._event, self._data = "", []
            return SseEvent(name, "\n".join(data), self.last_event_id) if data else None
        if line.startswith(":"):  # a comment: the farm's keepalive
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self.last_event_id = value
        return None


class StreamVerdict(Enum):
    FOLLOW = "follow"  # a 200 event stream
    POLL = "poll"  # no usable stream here: long-poll instead
    FAIL = "fail"  # an answer polling would get too (the key is refused): raise it


class JobWatch:
    """One ``wait()``: the job's last state and ETag, the deadline, and the progress callback, called once
    for each change of status, step or queue position."""

    def __init__(self, job_id: str, on_progress: ProgressCallback | None, timeout: float | None,
                 poll_wait: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.job_id = job_id
        self.job: Job | None = None
        self.etag: str | None = None
        self._on_progress = on_progress
        self._timeout = timeout
        self._poll_wait = poll_wait
        self._clock = clock
        self._deadline = None if timeout is None else clock() + timeout
        self._reported: tuple[object, ...] | None = None
        self.last_changed = False  # whether the last state seen differed from the one before

    def see(self, job: Job) -> bool:
        """Record a state of the job; True once it is terminal."""
        self.job = job
        key = (job.status, job.current_step, job.total_steps, job.queue_position, len(job.images))
        self.last_changed = key != self._reported
        if self.last_changed:
            self._reported = key
            if self._on_progress is not None:
                self._on_progress(job)
        return job.is_terminal

    def job_from(self, event: SseEvent | None) -> Job | None:
        if event is None or event.event not in JOB_EVENTS or not event.data:
            return None
        return Job.from_json(json.loads(event.data))

    @staticmethod
    def verdict(response: httpx.Response) -> StreamVerdict:
        if response.status_code in (401, 403):
            return StreamVerdict.FAIL
        content_type = response.headers.get("content-type", "")
        if response.status_code == 200 and content_type.startswith("text/event-stream"):
            return StreamVerdict.FOLLOW
        return StreamVerdict.POLL

    def remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - self._clock()

    def check_deadline(self) -> None:
        remaining = self.remaining()
        if remaining is not None and remaining <= 0:
            raise self.timed_out()

    def timed_out(self) -> WaitTimeout:
        assert self.job is not None, "wait() reads the job before it can time out"
        return WaitTimeout(self.job, self._timeout or 0.0)

    def stream_read_timeout(self) -> float:
        remaining = self.remaining()
        return STREAM_READ_TIMEOUT if remaining is None else max(1.0, min(STREAM_READ_TIMEOUT, remaining))

    def next_poll_wait(self) -> float:
        """How long the next long-poll may hold; WaitTimeout when the deadline has passed."""
        self.check_deadline()
        remaining = self.remaining()
        return self._poll_wait if remaining is None else max(0.0, min(self._poll_wait, remaining))

    @staticmethod
    def pause_after_poll(changed: bool, asked_wait: float, elapsed: float) -> float:
        """Seconds to sleep before the next poll: none after a change or a held poll; a little when the farm
        answered an unchanged job at once (it does not hold long-polls)."""
        if changed or elapsed >= min(asked_wait, MIN_POLL_INTERVAL):
            return 0.0
        return MIN_POLL_INTERVAL - elapsed
