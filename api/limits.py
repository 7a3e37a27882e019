"""Limits on job creation per owner (issue 17): the rate limit, the cap on queued jobs, and the quotas.

A route that creates jobs lists one dependency on its decorator (`dependencies=CREATE_LIMITS`, or
`SDAPI_CREATE_LIMITS` behind the WebUI API's auth). It runs before the body is used and answers 429 when the
owner is over a limit:

- rate limit: a token bucket per owner in Redis (shared/owners/ratelimit.py), with `Retry-After` and the
  `RateLimit-Policy` / `RateLimit` fields of draft-ietf-httpapi-ratelimit-headers-10; the two fields ride on
  every successful creation too (`RateLimitHeaders` adds them to whatever response the route builds);
- queued cap: "N jobs queued; the cap is M" (a count on the partial index ix_jobs_queued_owner, skipped while a
  recent count plus what the rate limit lets the owner create since is still below the cap: `QueuedCounts`, so a
  submit stays one transaction, issue 20);
- quotas: GPU-seconds and images per UTC day and month, with `Retry-After` to the reset and `resets_at` in the body.

A broker that cannot be reached does not stop submissions: the rate limit lets the request through and says so in
the log (the submit's own publish decides what happens next).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import redis
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute, iter_route_contexts
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import CachedKey
from api.responses import ErrorView
from api.sdapi.auth import SdapiKey
from shared.clock import utcnow
from shared.db.session import get_session_factory
from shared.owners import effective_policy
from shared.owners.periods import seconds_until
from shared.owners.policy import EffectivePolicy, cached_policy
from shared.owners.ratelimit import BucketState, TokenBuckets, take_on_loop
from shared.owners.usage import exceeded_quota, owner_used, queued_jobs, quotas_set
from shared.queueing.fleet import get_redis
from shared.queueing.queues import async_broker
from shared.settings import Settings, get_settings

log = logging.getLogger(__name__)
# Where a request's RateLimit fields wait for `RateLimitHeaders` to add them to the response.
STATE_KEY = "ratelimit_headers"


class LimitExceeded(Exception):
    """A 429: `detail` for people, `headers` for clients (Retry-After, RateLimit fields), `extra` body fields."""

    def __init__(self, detail: str, headers: dict[str, str], **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers
        self.extra = extra


@lru_cache
def _buckets() -> TokenBuckets:
    return TokenBuckets(get_redis())


def _take_token(policy: EffectivePolicy) -> dict[str, str] | None:
    """One token from the owner's bucket: its RateLimit fields, LimitExceeded when the bucket is empty, or None
    when Redis could not be asked (the request goes on)."""
    try:
        state = _buckets().take(policy.owner, policy.rate_burst, policy.rate_per_second)
    except redis.RedisError as error:
        log.warning("rate limit not checked for owner %r: Redis said %s", policy.owner, error)
        return None
    return _token_taken(policy, state)


async def _take_token_on_loop(policy: EffectivePolicy) -> dict[str, str] | None:
    """:func:`_take_token` with this event loop's Redis client."""
    try:
        state = await take_on_loop(async_broker(), policy.owner, policy.rate_burst, policy.rate_per_second)
    except redis.RedisError as error:
        log.warning("rate limit not checked for owner %r: Redis said %s", policy.owner, error)
        return None
    return _token_taken(policy, state)


def _token_taken(policy: EffectivePolicy, state: BucketState) -> dict[str, str]:
    headers = state.headers()
    if not state.allowed:
        raise LimitExceeded(
            f"too many jobs created: {policy.rate_burst} at once and {policy.rate_per_second:g} a second after "
            f"that; retry in {state.retry_after} s",
            {**headers, "Retry-After": str(state.retry_after)}, limit="rate", retry_after=state.retry_after,
        )
    return headers


@dataclass(frozen=True)
class Checked:
    policy: EffectivePolicy
    headers: dict[str, str]


class QueuedCounts:
    """Each owner's queued jobs as last counted by this process, and when.

    The rate limit bounds what an owner can create in any span of L seconds, across every API process, by
    `burst + rate * L`. So a count taken `age` seconds ago plus `burst + rate * (age + IN_FLIGHT_SECONDS)` (the last
    term: submits that took their token before the count but committed after it) is an upper bound of the owner's
    queued jobs now, and while that bound is below the cap no new count is needed. A count is reused for at most
    `FRESH_SECONDS` (jobs an admin retries take no token). Without the rate limit, or when Redis could not be asked
    (the request went through untaxed), every check counts."""

    FRESH_SECONDS = 60.0
    IN_FLIGHT_SECONDS = 1.0

    def __init__(self) -> None:
        self._counts: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    @classmethod
    def bound(cls, count: int, age: float, burst: int, rate: float) -> float:
        return count + burst + rate * (age + cls.IN_FLIGHT_SECONDS)

    def below_cap(self, owner: str, policy: EffectivePolicy, rate_limited: bool, now: float) -> bool:
        """True when a recent count proves the owner is below its cap without a query."""
        with self._lock:
            entry = self._counts.get(owner)
        if not rate_limited or entry is None or now - entry[0] > self.FRESH_SECONDS:
            return False
        return self.bound(entry[1], now - entry[0], policy.rate_burst, policy.rate_per_second) < policy.max_queued

    def counted(self, owner: str, count: int, now: float) -> None:
        with self._lock:
            if len(self._counts) > 10_000:
                self._counts = {o: e for o, e in self._counts.items() if now - e[0] <= self.FRESH_SECONDS}
            self._counts[owner] = (now, count)


QUEUED_COUNTS = QueuedCounts()


def check_job_creation(owner: str, settings: Settings, now: datetime | None = None) -> Checked:
    """Every limit on one more job of `owner`; raises LimitExceeded. Sync (Redis and Postgres): call it in a
    thread. The session is closed before the route runs."""
    with get_session_factory()() as session:
        policy = effective_policy(session, owner, settings)
        taken = _take_token(policy) if settings.fair_share.rate_limit else None
        _check_counts(session, policy, taken, now)
    return Checked(policy, taken or {})


def _counts_needed(policy: EffectivePolicy, rate_limited: bool) -> bool:
    """Whether :func:`_check_counts` reads the database: a queued count is due, or the owner has quotas."""
    return ((policy.max_queued > 0 and not QUEUED_COUNTS.below_cap(policy.owner, policy, rate_limited,
                                                                    time.monotonic()))
            or quotas_set(policy))


def _check_counts(session: Session, policy: EffectivePolicy, taken: dict[str, str] | None,
                  now: datetime | None = None) -> None:
    """The queued cap and the quotas, after the rate limit (``taken``: its fields, None when it did not apply)."""
    owner, headers = policy.owner, taken or {}
    if policy.max_queued > 0 and not QUEUED_COUNTS.below_cap(owner, policy, taken is not None, time.monotonic()):
        counted_at = time.monotonic()
        queued = queued_jobs(session, owner)
        QUEUED_COUNTS.counted(owner, queued, counted_at)
        if queued >= policy.max_queued:
            raise LimitExceeded(
                f"{queued} jobs queued; the cap is {policy.max_queued} (policy max_queued): wait for some to "
                f"start or cancel some", {**headers, "Retry-After": "10"}, limit="max_queued", queued=queued,
                cap=policy.max_queued,
            )
    if quotas_set(policy):
        now = now or utcnow()
        hit = exceeded_quota(policy, owner_used(session, owner, now), now)
        if hit is not None:
            raise LimitExceeded(
                hit.message, {**headers, "Retry-After": str(seconds_until(hit.resets_at, now))},
                limit=hit.quota, used=hit.used, quota=hit.limit,
                resets_at=hit.resets_at.isoformat().replace("+00:00", "Z"),
            )


async def check_job_creation_on_loop(owner: str, settings: Settings) -> Checked:
    """:func:`check_job_creation` from the event loop: no thread while the owner's policy is cached and neither a
    queued count nor a quota needs the database (a submit's usual case: the policy is read once a minute, the
    count skipped while `QueuedCounts` proves the owner below its cap); the token from Redis on the loop."""
    policy = cached_policy(owner, settings)
    if policy is None:
        return await run_in_threadpool(check_job_creation, owner, settings)
    taken = await _take_token_on_loop(policy) if settings.fair_share.rate_limit else None
    if _counts_needed(policy, taken is not None):
        def counts() -> None:
            with get_session_factory()() as session:
                _check_counts(session, policy, taken)

        await run_in_threadpool(counts)
    return Checked(policy, taken or {})


async def limit_on_loop(request: Request, owner: str, settings: Settings) -> EffectivePolicy:
    """The limits on one more job of ``owner`` (:func:`check_job_creation_on_loop`); the RateLimit fields go on the
    response (`RateLimitHeaders`). Returns the owner's policy (a submit checks the job's priority against it). A
    route that calls this documents its 429 with `TOO_MANY_RESPONSES`."""
    checked = await check_job_creation_on_loop(owner, settings)
    if checked.headers:
        request.scope.setdefault("state", {})[STATE_KEY] = checked.headers
    return checked.policy


async def limit_job_creation(request: Request, key: CachedKey) -> None:
    """The limits as a route's dependency (the key as the route reads it: FastAPI resolves it once per request)."""
    await limit_on_loop(request, key.owner, get_settings())


async def limit_sdapi_job_creation(request: Request, key: SdapiKey) -> None:
    """The same limits behind the WebUI API's auth (txt2img, img2img, the Extras routes)."""
    await limit_on_loop(request, key.owner, get_settings())


CREATE_LIMITS = [Depends(limit_job_creation)]
SDAPI_CREATE_LIMITS = [Depends(limit_sdapi_job_creation)]
_LIMIT_CALLS = (limit_job_creation, limit_sdapi_job_creation)


async def _limit_exceeded(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, LimitExceeded)
    return JSONResponse({"detail": exc.detail, **exc.extra}, status_code=429, headers=exc.headers)


class RateLimitHeaders:
    """Adds a request's RateLimit fields (set by the limit dependency) to its response, whatever the route
    returned (the WebUI routes build their own JSONResponse). Pure ASGI: a request without them costs one lookup."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})  # shared with the routes' scopes (copies of this one)

        async def send_with_fields(message: Message) -> None:
            if message["type"] == "http.response.start":
                fields = state.get(STATE_KEY)
                if fields:
                    present = {name.lower() for name, _ in message.get("headers", [])}
                    message["headers"] = list(message.get("headers", [])) + [
                        (name.lower().encode(), value.encode()) for name, value in fields.items()
                        if name.lower().encode() not in present
                    ]
            await send(message)

        await self.app(scope, receive, send_with_fields)


def install(app: FastAPI) -> None:
    """The 429 answer and the success headers (api/main.py calls this once)."""
    app.add_exception_handler(LimitExceeded, _limit_exceeded)
    app.add_middleware(RateLimitHeaders)


TOO_MANY = {"model": ErrorView, "description": "over a limit of the owner: the job creation rate (Retry-After, "
                                               "RateLimit fields), queued jobs, or a GPU-seconds/images quota "
                                               "(Retry-After to the reset, `resets_at`)"}
TOO_MANY_RESPONSES: dict[int | str, dict[str, Any]] = {429: TOO_MANY}


def document_limits(app: FastAPI, schema: dict[str, Any]) -> None:
    """Add the 429 to the OpenAPI operations of the routes that carry a limit dependency."""
    for context in iter_route_contexts(app.routes):  # included routers' routes, with their full paths
        route = context.original_route
        if not isinstance(route, APIRoute) or not any(dep.call in _LIMIT_CALLS for dep in route.dependant.dependencies):
            continue
        for method in route.methods or ():
            operation = schema.get("paths", {}).get(context.path_format, {}).get(method.lower())
            if isinstance(operation, dict):
                operation.setdefault("responses", {}).setdefault("429", {
                    "description": TOO_MANY["description"],
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorView"}}},
                })
