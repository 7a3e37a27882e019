"""Typed errors: what the farm answered, mapped to something a caller can catch and act on.

`ClientError` (the request was wrong: fix it, do not retry) and `ServerError`/`FarmUnreachable`
(the farm could not answer: try later) are kept apart, as the CLI's exit codes are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from renderfarm_client.models import Job


class RenderfarmError(Exception):
    """Every error this package raises."""


class ApiError(RenderfarmError):
    """The farm answered with an error status."""

    def __init__(self, status_code: int, detail: Any, message: str | None = None) -> None:
        self.status_code = status_code
        self.detail = detail
        super().__init__(message or f"{status_code}: {describe_detail(detail)}")


class ClientError(ApiError):
    """A 4xx: the request was wrong (or not allowed); sending it again will not help."""


class AuthenticationError(ClientError):
    """401/403: the API key is missing, unknown, revoked, or not allowed this route."""


class NotFound(ClientError):
    """404: no such job (or it belongs to another key's owner), or no such route on this farm."""


class Conflict(ClientError):
    """409: e.g. canceling a finished job, or an Idempotency-Key still being processed."""


class ValidationError(ClientError):
    """422: the farm names the field (``field``, e.g. ``("body", "steps")``) and what is allowed."""

    def __init__(self, status_code: int, detail: Any) -> None:
        self.errors: list[dict[str, Any]] = detail if isinstance(detail, list) else []
        first = self.errors[0] if self.errors else {}
        loc = first.get("loc") if isinstance(first, dict) else None
        self.field: tuple[str | int, ...] = tuple(loc) if isinstance(loc, list) else ()
        super().__init__(status_code, detail)

    @property
    def fields(self) -> list[tuple[str | int, ...]]:
        """Every field the farm complained about, in its order."""
        return [tuple(e.get("loc", ())) for e in self.errors if isinstance(e, dict)]


class RateLimited(ClientError):
    """429 after the retries ran out; ``retry_after`` is the farm's Retry-After in seconds, when it sent one."""

    def __init__(self, status_code: int, detail: Any, retry_after: float | None) -> None:
        self.retry_after = retry_after
        super().__init__(status_code, detail)


class ServerError(ApiError):
    """A 5xx after the retries ran out: the farm is there but failing."""


class FarmUnreachable(RenderfarmError):
    """No answer at all (connection refused, DNS, timeouts) after the retries ran out."""


class WaitTimeout(RenderfarmError, TimeoutError):
    """``wait()`` gave up before the job finished; ``job`` is its last known state."""

    def __init__(self, job: Job, timeout: float) -> None:
        self.job = job
        super().__init__(f"job {job.id} still {job.status} after {timeout:g} s")


class JobFailed(RenderfarmError):
    """Raised by ``Job.raise_for_status()`` for a failed or canceled job."""

    def __init__(self, job: Job) -> None:
        self.job = job
        reason = f": {job.error.type}: {job.error.message}" if job.error else ""
        super().__init__(f"job {job.id} {job.status}{reason}")


class WebhookVerificationFailed(RenderfarmError):
    """A webhook's signature, timestamp or headers did not verify: do not trust its body."""


def describe_detail(detail: Any) -> str:
    """The farm's ``detail`` as one line: a string as is, a 422 list as ``field: message; ...``."""
    if isinstance(detail, list):
        parts = []
        for error in detail:
            if isinstance(error, dict):
                loc = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
                parts.append(f"{loc}: {error.get('msg', '')}" if loc else str(error.get("msg", "")))
            else:
                parts.append(str(error))
        return "; ".join(parts)
    return str(detail)
