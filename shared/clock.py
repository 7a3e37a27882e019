"""The farm's one clock: timezone-aware UTC, as every timestamp column stores it."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """Now, aware, in UTC (never a naive ``datetime.utcnow()``)."""
    return datetime.now(UTC)
