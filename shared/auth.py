"""API keys: random tokens shown once, stored as SHA-256 hashes.

Keys carry 256 bits of entropy, so a fast hash is enough (no password stretching needed)
and lookups stay a single indexed equality match.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db.models import ApiKey

KEY_PREFIX = "rf_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def create_api_key(
    session: Session, owner: str, *, is_admin: bool = False, name: str = "", key: str | None = None
) -> tuple[ApiKey, str]:
    """Store a key (a new random one unless given) and return the row with the plaintext key."""
    plaintext = key or generate_key()
    existing = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(plaintext)))
    if existing is not None:
        if is_admin and not existing.is_admin:
            existing.is_admin = True
        return existing, plaintext
    row = ApiKey(owner=owner, name=name, key_prefix=plaintext[:10], key_hash=hash_key(plaintext), is_admin=is_admin)
    session.add(row)
    session.flush()
    return row, plaintext


def find_api_key(session: Session, key: str) -> ApiKey | None:
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if row is None or row.revoked_at is not None:
        return None
    return row
