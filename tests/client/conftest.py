"""Fixtures for the client's tests: a key of its own on the farm, and a transport that records (and can block)
what the client sends, so a test sees SSE, long-polls and 304s as the farm answered them."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest
from renderfarm_client import Client, Job

from tests.conftest import make_key
from tests.farm_harness import Farm, wait_until

TINY = {"width": 64, "height": 64, "steps": 2}
# Occupies the farm's one worker for a few seconds, so jobs submitted after it stay queued.
BLOCKER = {"width": 256, "height": 256, "steps": 60, "sampler_name": "Euler"}


class Recorder(httpx.HTTPTransport):
    """Passes requests to the farm and records ``(method, path, status)``; ``block_events`` answers the SSE
    route with a 404 itself, as a proxy that does not pass event streams (or an older farm) would."""

    def __init__(self, block_events: bool = False) -> None:
        super().__init__()
        self.block_events = block_events
        self.seen: list[tuple[str, str, int]] = []
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.block_events and request.url.path.endswith("/events"):
            response = httpx.Response(404, json={"detail": "Not Found"}, request=request)
        else:
            response = super().handle_request(request)
        self.seen.append((request.method, request.url.path, response.status_code))
        self.requests.append(request)
        return response


@pytest.fixture(scope="module")
def owner_key(farm: Farm) -> str:
    """A key whose owner has no jobs but this module's."""
    return make_key(farm.env["DATABASE_URL"], f"client-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def client(farm: Farm, owner_key: str) -> Iterator[Client]:
    with Client(farm.base_url, owner_key) as c:
        yield c


@pytest.fixture
def start_blocker(client: Client) -> Iterator[Callable[[], Job]]:
    """Submits a long job and returns it once it runs; cancels it after the test."""
    started: list[Job] = []

    def start() -> Job:
        job = client.submit("blocker", **BLOCKER)
        started.append(job)
        return wait_until(lambda: (j := client.get(job.id)).status == "running" and j, 90, interval=0.05,
                          message="the blocker to run")

    yield start
    for job in started:
        if not client.get(job.id).is_terminal:
            client.cancel(job.id)
        client.wait(job.id, timeout=60)
