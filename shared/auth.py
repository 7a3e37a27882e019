"""API keys: random tokens shown once, stored as SHA-256 hashes.

`cached_api_key` serves a key from a per-process cache for at most `ttl` seconds after it was read from
Postgres, so a revoked key is refused within that bound (RENDERFARM_API_KEY_CACHE_SECONDS, 5 s by default) and
most requests make no query for their key.

Keys carry 256 bits of entropy, so a fast hash is enough (no password stretching needed)
and lookups stay a single indexed equality match.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from typing import Any

from sqlalchemy import inspect, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, make_transient_to_detached

from shared.db.models import ApiKey

KEY_PREFIX = "rf_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def create_api_key(
    session: Session, owner: str, *, is_admin: bool = False, name: str = "", key: str | None = None,
    can_manage_models: bool = False,
) -> tuple[ApiKey, str]:
    """Store a key (a new random one unless given) and return the row with the plaintext key. ``can_manage_models``:
    the key may add, rename and delete the model store's files."""
    plaintext = key or generate_key()
    existing = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(plaintext)))
    if existing is not None:
        if is_admin and not existing.is_admin:
            existing.is_admin = True
        return existing, plaintext
    # ON CONFLICT: several API processes starting at once each create RENDERFARM_ADMIN_KEY; one insert wins.
    session.execute(
        insert(ApiKey)
        .values(owner=owner, name=name, key_prefix=plaintext[:10], key_hash=hash_key(plaintext), is_admin=is_admin,
                can_manage_models=can_manage_models)
        .on_conflict_do_nothing(index_elements=[ApiKey.key_hash])
    )
    row = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_key(plaintext))).one()
    if is_admin and not row.is_admin:
        row.is_admin = True
    return row, plaintext


def find_api_key(session: Session, key: str) -> ApiKey | None:
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if row is None or row.revoked_at is not None:
        return None
    return row


# What a cached key carries; `webhook_secret` is left out (a rotation must show at once), so it loads on use.
_CACHED_COLUMNS = ("id", "owner", "name", "key_prefix", "key_hash", "is_admin", "created_at", "revoked_at")
_CACHE_LIMIT = 10_000


class ApiKeyCache:
    """Valid keys by hash, each for ``ttl`` seconds after it was read (invalid ones are never cached, so a
    key created a moment ago works at once). Thread-safe: sync routes run in a thread pool."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def cached(self, key: str) -> ApiKey | None:
        """The key as cached (detached, without `webhook_secret`), or None when it is not cached now: no I/O, so
        an async route can call it on its event loop."""
        values = self._fresh(key)
        if values is None:
            return None
        row = ApiKey(**values)
        make_transient_to_detached(row)
        return row

    def cached_owner(self, key: str) -> str | None:
        """The owner of the key while it is cached, else None: :meth:`cached` without building a row (a poll needs
        only the owner, and an ORM instance cost it more than the lookup)."""
        values = self._fresh(key)
        return None if values is None else str(values["owner"])

    def _fresh(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            entry = self._entries.get(hash_key(key))
        return None if entry is None or entry[0] <= time.monotonic() else entry[1]

    def lookup(self, session: Session, key: str, ttl: float) -> ApiKey | None:
        """The key's row attached to ``session`` (no query while cached), or None when unknown or revoked."""
        cached = self.cached(key)
        if cached is not None:  # detached, clean, with its identity: attaching it costs no SQL
            return session.merge(cached, load=False)
        digest, now = hash_key(key), time.monotonic()
        found = find_api_key(session, key)
        if found is None or ttl <= 0:
            with self._lock:
                self._entries.pop(digest, None)
            return found
        state = inspect(found)
        values = {name: state.dict[name] for name in _CACHED_COLUMNS if name in state.dict}
        with self._lock:
            if len(self._entries) >= _CACHE_LIMIT:
                self._entries = {d: e for d, e in self._entries.items() if e[0] > now}
                if len(self._entries) >= _CACHE_LIMIT:
                    self._entries.clear()
            self._entries[digest] = (now + ttl, values)
        return found


API_KEY_CACHE = ApiKeyCache()


def cached_api_key(session: Session, key: str, ttl: float) -> ApiKey | None:
    """`find_api_key` through this process's cache: a revoked key is refused at most ``ttl`` seconds later."""
    return API_KEY_CACHE.lookup(session, key, ttl)


def detached_api_key(session: Session, key: str, ttl: float) -> ApiKey | None:
    """:func:`cached_api_key`, detached from ``session`` (for a caller that closes its session at once)."""
    found = cached_api_key(session, key, ttl)
    if found is not None:
        session.expunge(found)
    return found
