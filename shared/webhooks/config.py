"""Webhook knobs, read from the environment on each call.

They live here rather than in `shared.settings` so the webhook sender stays one package; they are
read per call (not cached) because they are cheap to read and tests shorten them per process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Roughly exponential, about 2.8 days in all: 5s 30s 2m 10m 30m 1h 2h 4h 8h 12h 16h 24h.
DEFAULT_RETRY_SCHEDULE: tuple[float, ...] = (
    5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800, 43200, 57600, 86400,
)


@dataclass(frozen=True)
class WebhookConfig:
    # Delay before retry n (after the n-th failed attempt); its length is the number of retries.
    retry_schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE
    # Each delay is drawn from [d * (1 - jitter), d * (1 + jitter)] so failed receivers are not hit in waves.
    jitter: float = 0.2
    timeout_seconds: float = 15.0
    # At most one `progress` event per job in this window.
    progress_interval_seconds: float = 0.5
    # How often the webhook worker looks for due deliveries.
    poll_seconds: float = 1.0
    # A delivery whose broker message was lost is dispatched again by the poller after this long.
    redispatch_after_seconds: float = 10.0
    # A `Retry-After` longer than this is cut down to it.
    max_retry_after_seconds: float = 86400.0
    # Finished deliveries are kept this long for the listing (finished progress events: one day).
    keep_days: float = 30.0
    # Hosts, addresses or CIDR networks exempt from the SSRF address check (local testing only).
    allow_hosts: tuple[str, ...] = ()

    @property
    def lease_seconds(self) -> float:
        """How long an attempt may hold its delivery before another worker may try it again."""
        return self.timeout_seconds * 2 + 30


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from exc
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {raw!r}")
    return value


def _schedule(name: str) -> tuple[float, ...]:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return DEFAULT_RETRY_SCHEDULE
    try:
        delays = tuple(float(part) for part in raw.split(",") if part.strip())
    except ValueError as exc:
        raise ValueError(f"{name} must be comma-separated seconds like '5,30,120', got {raw!r}") from exc
    if any(d < 0 for d in delays):
        raise ValueError(f"{name} must not contain negative delays, got {raw!r}")
    return delays


def allow_hosts_from_env() -> tuple[str, ...]:
    raw = os.environ.get("RENDERFARM_WEBHOOK_ALLOW_HOSTS", "")
    return tuple(part.strip().lower() for part in raw.split(",") if part.strip())


def webhook_config() -> WebhookConfig:
    """The current configuration; every variable is optional."""
    return WebhookConfig(
        retry_schedule=_schedule("RENDERFARM_WEBHOOK_RETRY_SCHEDULE"),
        jitter=min(_float("RENDERFARM_WEBHOOK_JITTER", 0.2), 1.0),
        timeout_seconds=_float("RENDERFARM_WEBHOOK_TIMEOUT_SECONDS", 15.0),
        progress_interval_seconds=_float("RENDERFARM_WEBHOOK_PROGRESS_INTERVAL_SECONDS", 0.5),
        poll_seconds=max(_float("RENDERFARM_WEBHOOK_POLL_SECONDS", 1.0), 0.05),
        redispatch_after_seconds=_float("RENDERFARM_WEBHOOK_REDISPATCH_SECONDS", 10.0),
        max_retry_after_seconds=_float("RENDERFARM_WEBHOOK_MAX_RETRY_AFTER_SECONDS", 86400.0),
        keep_days=_float("RENDERFARM_WEBHOOK_KEEP_DAYS", 30.0),
        allow_hosts=allow_hosts_from_env(),
    )
