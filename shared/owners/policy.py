"""An owner's effective policy: its `owner_policies` row where an admin set a value, the settings default where
not (a missing row or a NULL column).

The claim asks for the weight and `max_running` of every owner with queued work, and each submit for the caller's
limits, so rows are cached per process for `POLICY_CACHE_SECONDS` after they were read (like API keys in
shared/auth.py): an admin's change reaches other API processes and workers within that bound, and the process that
made it at once (`forget_policy`). Only the row is cached; it is resolved against the settings given on each call.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, fields

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db.models import OwnerPolicy
from shared.settings import FairShareSettings, Settings

POLICY_CACHE_SECONDS = 5.0
_CACHE_LIMIT = 10_000


@dataclass(frozen=True)
class EffectivePolicy:
    """Every limit of one owner, resolved. 0 means "no cap" for max_running, max_queued and the quotas."""

    owner: str
    weight: float
    max_running: int
    max_priority: int
    max_queued: int
    rate_burst: int
    rate_per_second: float
    gpu_seconds_per_day: float
    gpu_seconds_per_month: float
    images_per_day: int
    images_per_month: int
    # The fields an admin set for this owner (the others are the settings defaults).
    overrides: frozenset[str] = frozenset()


# The settable fields, in the order the admin views and the CLI show them.
POLICY_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(EffectivePolicy) if f.name not in ("owner", "overrides"))


def defaults(settings: FairShareSettings) -> dict[str, float | int]:
    """What an owner gets when an admin set nothing: the `default_*` settings."""
    return {name: getattr(settings, f"default_{name}") for name in POLICY_FIELDS}


def resolve(owner: str, row: dict[str, float | int | None] | None, settings: FairShareSettings) -> EffectivePolicy:
    """The policy from a row's values (None: not set) over the defaults; a max_priority is kept within the
    settings' range."""
    values = defaults(settings)
    set_values = {name: value for name, value in (row or {}).items() if value is not None and name in values}
    values.update(set_values)
    overrides = frozenset(set_values)
    values["max_priority"] = max(settings.min_priority, min(int(values["max_priority"]), settings.max_priority_limit))
    return EffectivePolicy(owner=owner, overrides=overrides, **values)  # type: ignore[arg-type]


def row_values(row: OwnerPolicy | None) -> dict[str, float | int | None] | None:
    return None if row is None else {name: getattr(row, name) for name in POLICY_FIELDS}


class PolicyCache:
    """Owners' rows (or "no row") by owner, each for `POLICY_CACHE_SECONDS` after it was read. Thread-safe."""

    def __init__(self, ttl: float = POLICY_CACHE_SECONDS) -> None:
        self.ttl = ttl
        self._entries: dict[str, tuple[float, dict[str, float | int | None] | None]] = {}
        self._lock = threading.Lock()

    def clear(self) -> None:
        """Forget every row."""
        with self._lock:
            self._entries.clear()

    def forget(self, owner: str) -> None:
        with self._lock:
            self._entries.pop(owner, None)

    def fresh(self, owner: str) -> tuple[bool, dict[str, float | int | None] | None]:
        """(True, the row's values) while the owner's row is cached, else (False, None): no I/O."""
        with self._lock:
            entry = self._entries.get(owner)
        return (True, entry[1]) if entry is not None and entry[0] > time.monotonic() else (False, None)

    def row(self, session: Session, owner: str) -> dict[str, float | int | None] | None:
        now = time.monotonic()
        cached, values = self.fresh(owner)
        if cached:
            return values
        values = row_values(session.scalar(select(OwnerPolicy).where(OwnerPolicy.owner == owner)))
        with self._lock:
            if len(self._entries) >= _CACHE_LIMIT:
                self._entries = {o: e for o, e in self._entries.items() if e[0] > now}
                if len(self._entries) >= _CACHE_LIMIT:
                    self._entries.clear()
            self._entries[owner] = (now + self.ttl, values)
        return values


POLICY_CACHE = PolicyCache()


def effective_policy(session: Session, owner: str, settings: Settings) -> EffectivePolicy:
    """The owner's policy: one indexed read of its row at most every `POLICY_CACHE_SECONDS` per process."""
    return resolve(owner, POLICY_CACHE.row(session, owner), settings.fair_share)


def cached_policy(owner: str, settings: Settings) -> EffectivePolicy | None:
    """The owner's policy while its row is cached in this process (no I/O), else None."""
    cached, values = POLICY_CACHE.fresh(owner)
    return resolve(owner, values, settings.fair_share) if cached else None


def forget_policy(owner: str) -> None:
    """Drop the owner's cached row in this process (after an admin changed it), so the change applies at once."""
    POLICY_CACHE.forget(owner)
