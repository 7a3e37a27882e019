"""The transport-independent half of every request: what to send, when to send it again, what an answer means.

`Client` and `AsyncClient` only do the I/O and the sleeping; the request, the retry decision and the mapping
of an answer to a result or a typed error live here once, so the two cannot drift.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Generic, TypeVar

import httpx

from renderfarm_client.errors import (
    ApiError,
    AuthenticationError,
    ClientError,
    Conflict,
    FarmUnreachable,
    NotFound,
    RateLimited,
    ServerError,
    ValidationError,
)

T = TypeVar("T")
DEFAULT_TIMEOUT = 30.0
USER_AGENT = "renderfarm-client/0.1"


@dataclass(frozen=True)
class RequestSpec:
    """One HTTP request to the farm (``path`` relative to its URL) or to an image URL (absolute)."""

    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    files: dict[str, tuple[str, bytes, str]] | None = None
    content: bytes | None = None  # a raw body (a chunk of a resumable model upload)
    timeout: float | None = None
    authenticated: bool = True  # image URLs are signed: sending the key there would leak it (and S3 refuses it)
    replay_safe: bool = True  # may go again after the farm may have acted on it (a 5xx, a dropped connection)
    ok_statuses: frozenset[int] = frozenset({200, 201, 202})


@dataclass(frozen=True)
class Call(Generic[T]):
    """A request and how to read its successful answer."""

    spec: RequestSpec
    parse: Callable[[httpx.Response], T]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter on 429, 5xx and connection errors; a 429's or 503's
    ``Retry-After`` is honoured instead, unless it asks for longer than ``max_retry_after``."""

    max_retries: int = 4
    backoff: float = 0.5
    max_backoff: float = 30.0
    max_retry_after: float = 120.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def backoff_delay(self, attempt: int) -> float:
        return self.rng.uniform(0.0, min(self.max_backoff, self.backoff * 2**attempt))

    def delay_after_response(self, spec: RequestSpec, attempt: int, response: httpx.Response) -> float | None:
        """Seconds to wait before sending ``spec`` again after this answer, or None: do not."""
        status = response.status_code
        if attempt >= self.max_retries or status in spec.ok_statuses:
            return None
        if status == 429 or (status >= 500 and spec.replay_safe):
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            if retry_after is None:
                return self.backoff_delay(attempt)
            return retry_after if retry_after <= self.max_retry_after else None
        return None

    def delay_after_error(self, spec: RequestSpec, attempt: int, error: httpx.TransportError) -> float | None:
        """After a connection error: a request that never left (refused, DNS) may always go again."""
        never_sent = isinstance(error, httpx.ConnectError | httpx.ConnectTimeout)
        if attempt >= self.max_retries or not (spec.replay_safe or never_sent):
            return None
        return self.backoff_delay(attempt)


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date (RFC 9110 10.2.3); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def build_request(client: httpx.Client | httpx.AsyncClient, spec: RequestSpec, api_key: str | None) -> httpx.Request:
    headers = {"User-Agent": USER_AGENT, **spec.headers}
    if spec.authenticated and api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    timeout = httpx.Timeout(spec.timeout) if spec.timeout is not None else client.timeout
    return client.build_request(spec.method, spec.path, params=spec.params, json=spec.json, files=spec.files,
                                content=spec.content, headers=headers, timeout=timeout)


def unreachable(spec: RequestSpec, base_url: str, error: httpx.TransportError) -> FarmUnreachable:
    target = spec.path if spec.path.startswith(("http://", "https://")) else f"{base_url.rstrip('/')}{spec.path}"
    return FarmUnreachable(f"no answer from {target}: {type(error).__name__}: {error}")


def error_for(response: httpx.Response) -> ApiError:
    """The typed error for a non-success answer."""
    status = response.status_code
    try:
        body = response.json()
        detail = body.get("detail", body) if isinstance(body, dict) else body
    except ValueError:
        detail = response.text or response.reason_phrase
    if status == 422:
        return ValidationError(status, detail)
    if status == 429:
        return RateLimited(status, detail, parse_retry_after(response.headers.get("Retry-After")))
    if status in (401, 403):
        return AuthenticationError(status, detail)
    if status == 404:
        return NotFound(status, detail)
    if status == 409:
        return Conflict(status, detail)
    if 400 <= status < 500:
        return ClientError(status, detail)
    return ServerError(status, detail)


def read_json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise ServerError(response.status_code, response.text[:200],
                          f"the farm's answer to {response.request.url} is not JSON") from exc


def delay_or_raise(policy: RetryPolicy, spec: RequestSpec, attempt: int, response: httpx.Response) -> float:
    """How long to wait before sending again after this error answer; raises its typed error when not."""
    delay = policy.delay_after_response(spec, attempt, response)
    if delay is None:
        raise error_for(response)
    return delay


def delay_or_unreachable(policy: RetryPolicy, spec: RequestSpec, attempt: int, error: httpx.TransportError,
                         base_url: str) -> float:
    """How long to wait before sending again after a connection error; FarmUnreachable when not."""
    delay = policy.delay_after_error(spec, attempt, error)
    if delay is None:
        raise unreachable(spec, base_url, error) from error
    return delay
