"""The token bucket's Lua script (shared/owners/ratelimit.py) on a real Redis: a burst, then refusals; refill at
the rate; atomic under concurrent takes; the key expires once the bucket would be full."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from shared.owners.ratelimit import KEY_PREFIX, TokenBuckets


@pytest.fixture(scope="module")
def client(redis_db_url: Callable[[], str]) -> redis.Redis:
    return redis.Redis.from_url(redis_db_url())


def test_burst_then_refusal_then_refill(client: redis.Redis) -> None:
    buckets, owner = TokenBuckets(client), f"o-{uuid.uuid4().hex[:6]}"
    takes = [buckets.take(owner, burst=3, rate=10) for _ in range(4)]
    assert [t.allowed for t in takes] == [True, True, True, False]
    assert takes[0].tokens == pytest.approx(2, abs=0.05) and takes[3].remaining == 0
    assert takes[3].retry_after == 1
    time.sleep(0.25)  # 10 a second: two tokens back
    assert [buckets.take(owner, burst=3, rate=10).allowed for _ in range(3)] == [True, True, False]
    ttl = client.pttl(KEY_PREFIX + owner)
    assert 0 < ttl <= 3 / 10 * 1000 + 1000


def test_concurrent_takes_never_hand_out_more_than_the_burst(client: redis.Redis) -> None:
    buckets, owner = TokenBuckets(client), f"o-{uuid.uuid4().hex[:6]}"
    with ThreadPoolExecutor(8) as pool:
        allowed = list(pool.map(lambda _: buckets.take(owner, burst=10, rate=0.001).allowed, range(40)))
    assert allowed.count(True) == 10


def test_a_lower_burst_applies_to_a_fuller_bucket(client: redis.Redis) -> None:
    buckets, owner = TokenBuckets(client), f"o-{uuid.uuid4().hex[:6]}"
    assert buckets.take(owner, burst=100, rate=0.001).tokens == pytest.approx(99, abs=0.01)
    # An admin lowers the burst to 2: the bucket holds at most 2 from now on.
    assert [buckets.take(owner, burst=2, rate=0.001).allowed for _ in range(3)] == [True, True, False]


def test_the_event_loop_takes_from_the_same_bucket(client: redis.Redis) -> None:
    """`take_on_loop` (the submit's limits on the event loop) and `TokenBuckets.take` share one bucket per owner."""
    import asyncio

    import redis.asyncio as aredis

    from shared.owners.ratelimit import take_on_loop

    owner, same = f"o-{uuid.uuid4().hex[:6]}", client.connection_pool.connection_kwargs
    assert TokenBuckets(client).take(owner, burst=3, rate=0.001).allowed

    async def takes() -> list[bool]:
        loop_client = aredis.Redis(host=same["host"], port=same["port"], db=same["db"])
        try:
            return [(await take_on_loop(loop_client, owner, burst=3, rate=0.001)).allowed for _ in range(3)]
        finally:
            await loop_client.aclose()

    assert asyncio.run(takes()) == [True, True, False]
