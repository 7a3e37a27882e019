"""The client's own retry logic (renderfarm_client/_http.py), against a scripted local HTTP server: backoff on
5xx and connection errors, Retry-After on 429, the same Idempotency-Key on every attempt of a submit."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from renderfarm_client import AsyncClient, Client, FarmUnreachable, RateLimited, RetryPolicy, ServerError
from renderfarm_client._http import parse_retry_after

from devtools.embedded import free_port
from tests.client.stub_server import JOB, Reply, StubServer

pytestmark = pytest.mark.unit

FAST = RetryPolicy(max_retries=3, backoff=0.05, max_backoff=0.2, rng=random.Random(1))


def test_503_then_200_is_retried_and_the_submit_keeps_its_idempotency_key() -> None:
    stub = StubServer(Reply(503, {"detail": "busy"}), Reply(502, {"detail": "bad gateway"}), Reply(202, JOB))
    with stub.running(), Client(stub.url, "k", retry=FAST) as client:
        job = client.submit("a cat", steps=2)
    assert job.id == JOB["id"] and job.status == "queued"
    assert [s.method for s in stub.seen] == ["POST", "POST", "POST"]
    keys = {s.headers.get("idempotency-key") for s in stub.seen}
    assert len(keys) == 1 and None not in keys, "every attempt carries the same key, so the farm makes one job"
    assert stub.seen[0].headers["authorization"] == "Bearer k"


def test_a_submit_without_idempotency_key_is_not_sent_again_after_a_5xx() -> None:
    stub = StubServer(Reply(503, {"detail": "busy"}), Reply(202, JOB))
    with stub.running(), Client(stub.url, "k", retry=FAST, idempotency=False) as client:
        with pytest.raises(ServerError) as raised:
            client.submit("a cat")
    assert raised.value.status_code == 503
    assert len(stub.seen) == 1 and "idempotency-key" not in stub.seen[0].headers


def test_5xx_gives_up_after_max_retries_with_growing_delays() -> None:
    stub = StubServer(Reply(500, {"detail": "boom"}))
    policy = RetryPolicy(max_retries=3, backoff=0.1, max_backoff=10, rng=random.Random(7))
    with stub.running(), Client(stub.url, "k", retry=policy) as client:
        with pytest.raises(ServerError, match="boom"):
            client.get(JOB["id"])
    assert len(stub.seen) == 4  # the first try and three retries
    expected = random.Random(7)
    bounds = [expected.uniform(0, 0.1 * 2**n) for n in range(3)]  # full jitter: uniform(0, backoff * 2^n)
    gaps = [b.at - a.at for a, b in zip(stub.seen, stub.seen[1:], strict=False)]
    for gap, delay in zip(gaps, bounds, strict=True):
        assert delay - 0.01 <= gap < delay + 0.5


def test_429_waits_for_retry_after() -> None:
    stub = StubServer(Reply(429, {"detail": "slow down"}, {"Retry-After": "1"}), Reply(200, JOB))
    with stub.running(), Client(stub.url, "k", retry=FAST) as client:
        started = time.monotonic()
        assert client.get(JOB["id"]).id == JOB["id"]
    assert len(stub.seen) == 2
    assert stub.seen[1].at - stub.seen[0].at >= 0.95, "Retry-After: 1 is honoured, not the 50 ms backoff"
    assert time.monotonic() - started < 5


def test_429_after_the_retries_is_rate_limited_with_retry_after() -> None:
    stub = StubServer(Reply(429, {"detail": "slow down"}, {"Retry-After": "600"}))
    with stub.running(), Client(stub.url, "k", retry=FAST) as client:
        with pytest.raises(RateLimited) as raised:
            client.get(JOB["id"])
    assert raised.value.retry_after == 600
    assert len(stub.seen) == 1, "a Retry-After beyond max_retry_after is not waited out"


def test_connection_refused_is_retried_then_farm_unreachable() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    policy = RetryPolicy(max_retries=2, backoff=0.2, rng=random.Random(3))
    expected = random.Random(3)
    slept = sum(expected.uniform(0, 0.2 * 2**n) for n in range(2))
    with Client(url, "k", retry=policy) as client:
        started = time.monotonic()
        with pytest.raises(FarmUnreachable, match="127.0.0.1"):
            client.get(JOB["id"])
    assert slept - 0.01 <= time.monotonic() - started < slept + 3, "two backoffs, then it gave up"


def test_async_client_retries_the_same_way() -> None:
    stub = StubServer(Reply(503, {"detail": "busy"}, {"Retry-After": "0"}), Reply(202, JOB))

    async def submit() -> str:
        async with AsyncClient(stub.url, "k", retry=FAST) as client:
            return (await client.submit("a cat")).id

    with stub.running():
        assert asyncio.run(submit()) == JOB["id"]
    assert len(stub.seen) == 2
    assert stub.seen[0].headers["idempotency-key"] == stub.seen[1].headers["idempotency-key"]


def test_retry_after_forms() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: now
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    delay = parse_retry_after(future)
    assert delay is not None and 25 <= delay <= 31
