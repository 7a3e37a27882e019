"""Job creation rate limit per owner: a token bucket kept in Redis, and the headers that describe it.

A bucket holds up to `burst` tokens and refills at `rate` tokens a second; each job creation takes one. The state
(tokens, last update) lives in one Redis hash per owner, updated by one Lua script with Redis's own clock, so every
API process shares it, a restart forgets nothing, and two requests cannot both take the last token. A full bucket
needs no state, so the key expires once it would have refilled.

Headers follow draft-ietf-httpapi-ratelimit-headers-10 (the `RateLimit-Policy` and `RateLimit` structured
fields of drafts 08 to 11): the policy `"burst"` has quota `q` = the burst and window `w` = the seconds an empty
bucket takes to refill; `r` is the whole tokens left and `t` the seconds until the bucket is full again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import redis
import redis.asyncio as aredis

KEY_PREFIX = "renderfarm:ratelimit:jobs:"
POLICY_NAME = "burst"

# KEYS[1]: the owner's bucket; ARGV: burst, rate per second, cost. Returns {allowed (0/1), tokens left as text}
# (Lua numbers reach the client as integers, so the fraction travels as a string).
TOKEN_BUCKET_LUA = """
local burst = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens = burst
  at = now
end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'at', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return {allowed, string.format('%.6f', tokens)}
"""


@dataclass(frozen=True)
class BucketState:
    """One take from a bucket: whether it was allowed and what is left."""

    allowed: bool
    tokens: float
    burst: int
    rate: float

    @property
    def remaining(self) -> int:
        return max(0, math.floor(self.tokens))

    @property
    def retry_after(self) -> int:
        """Whole seconds until one token is back (0 when one is there now)."""
        return seconds_to(1.0, self.tokens, self.rate)

    @property
    def reset(self) -> int:
        """Whole seconds until the bucket is full again."""
        return seconds_to(float(self.burst), self.tokens, self.rate)

    def headers(self) -> dict[str, str]:
        return {"RateLimit-Policy": policy_header(self.burst, self.rate),
                "RateLimit": f'"{POLICY_NAME}";r={self.remaining};t={self.reset}'}


def refill(tokens: float, elapsed: float, burst: int, rate: float) -> float:
    """The tokens after `elapsed` seconds (the Lua script's arithmetic, for tests and readers)."""
    return min(float(burst), tokens + max(0.0, elapsed) * rate)


def seconds_to(target: float, tokens: float, rate: float) -> int:
    """Whole seconds, rounded up, until a bucket holding `tokens` holds `target` (0 if it does)."""
    missing = target - tokens
    return 0 if missing <= 1e-9 else math.ceil(missing / rate - 1e-9)


def window_seconds(burst: int, rate: float) -> int:
    """The draft's `w`: the seconds an empty bucket takes to fill (at least 1)."""
    return max(1, math.ceil(burst / rate - 1e-9))


def policy_header(burst: int, rate: float) -> str:
    return f'"{POLICY_NAME}";q={burst};w={window_seconds(burst, rate)}'


class TokenBuckets:
    """The per-owner buckets in one Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self._script = client.register_script(TOKEN_BUCKET_LUA)

    def take(self, owner: str, burst: int, rate: float, cost: int = 1) -> BucketState:
        return _taken(self._script(keys=[KEY_PREFIX + owner], args=_script_args(burst, rate, cost)), burst, rate)


async def take_on_loop(client: aredis.Redis, owner: str, burst: int, rate: float, cost: int = 1) -> BucketState:
    """:meth:`TokenBuckets.take` with an asyncio client (the same script, so the same bucket)."""
    script = client.register_script(TOKEN_BUCKET_LUA)
    return _taken(await script(keys=[KEY_PREFIX + owner], args=_script_args(burst, rate, cost)), burst, rate)


def _script_args(burst: int, rate: float, cost: int) -> list[int | str]:
    return [burst, repr(float(rate)), cost]


def _taken(result: list[int | str], burst: int, rate: float) -> BucketState:
    """The bucket as :data:`TOKEN_BUCKET_LUA` answered: (allowed 0/1, tokens left)."""
    allowed, tokens = result
    return BucketState(allowed=bool(int(allowed)), tokens=float(tokens), burst=burst, rate=rate)
