"""`Idempotency-Key` on job submission (IETF httpapi-idempotency-key-header semantics).

Same key and same body → the same job. Same key, different body → 422. A second request
while the first is still being created → 409. Keys are scoped per API key and kept for
`retention` (at least 24 hours). A reservation left behind by a crashed request is taken
over after `stale_after` seconds so a key can never be stuck forever.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from shared.clock import utcnow
from shared.db.models import IdempotencyKey

RETENTION = timedelta(hours=24)
STALE_AFTER = timedelta(seconds=60)


class IdempotencyConflict(Exception):
    """The first request with this key is still in flight (409)."""


class IdempotencyMismatch(Exception):
    """The key was used with a different body (422)."""


@dataclass(frozen=True)
class Reservation:
    job_id: uuid.UUID | None  # set: replay this job; None: we own the key, create the job


def fingerprint(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def reserve(session: Session, api_key_id: int, key: str, body_fingerprint: str) -> Reservation:
    """Claim the key for this request (committed at once) or return the job it already made."""
    now = utcnow()
    session.execute(
        delete(IdempotencyKey).where(
            IdempotencyKey.api_key_id == api_key_id,
            IdempotencyKey.key == key,
            (IdempotencyKey.created_at < now - RETENTION)
            | (IdempotencyKey.job_id.is_(None) & (IdempotencyKey.created_at < now - STALE_AFTER)),
        )
    )
    inserted = session.execute(
        insert(IdempotencyKey)
        .values(api_key_id=api_key_id, key=key, fingerprint=body_fingerprint, job_id=None)
        .on_conflict_do_nothing()
        .returning(IdempotencyKey.key)
    ).scalar_one_or_none()
    session.commit()
    if inserted is not None:
        return Reservation(job_id=None)
    row = session.scalar(
        select(IdempotencyKey).where(IdempotencyKey.api_key_id == api_key_id, IdempotencyKey.key == key)
    )
    if row is None:  # deleted between our insert and read: someone else's stale reservation expired
        return reserve(session, api_key_id, key, body_fingerprint)
    if row.fingerprint != body_fingerprint:
        raise IdempotencyMismatch(key)
    if row.job_id is None:
        raise IdempotencyConflict(key)
    return Reservation(job_id=row.job_id)


def attach_job(session: Session, api_key_id: int, key: str, job_id: uuid.UUID) -> None:
    """Record the job in the caller's transaction, so the key and the job commit together."""
    row = session.get(IdempotencyKey, (api_key_id, key))
    if row is not None:
        row.job_id = job_id


def release(session: Session, api_key_id: int, key: str) -> None:
    """Forget a reservation whose request failed before a job existed (e.g. bad input)."""
    session.execute(
        delete(IdempotencyKey).where(
            IdempotencyKey.api_key_id == api_key_id, IdempotencyKey.key == key, IdempotencyKey.job_id.is_(None)
        )
    )
    session.commit()
