"""`Idempotency-Key` on job submission (IETF httpapi-idempotency-key-header semantics).

Same key and same body → the same job. Same key, different body → 422. The key is recorded in the
transaction that creates the job, so a concurrent second request waits for the first to commit and then
replays its job; a reservation without a job (left by an older gateway) answers 409 until it is
stale (`stale_after`), so a key can never be stuck forever. Keys are scoped per API key and kept
for `retention` (at least 24 hours).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete
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


def find(session: Session, api_key_id: int, key: str, body_fingerprint: str) -> Reservation | None:
    """What an earlier request with this key made, read in the caller's transaction: None when the key is free
    (never used, or its record outlived `retention`, or a reservation left by a crash is older than
    `stale_after`: both are deleted in that transaction). Raises IdempotencyMismatch for another body and
    IdempotencyConflict while the earlier request is still in flight (a reservation without a job)."""
    row = session.get(IdempotencyKey, (api_key_id, key), populate_existing=True)
    if row is None:
        return None
    now = utcnow()
    if row.created_at < now - RETENTION or (row.job_id is None and row.created_at < now - STALE_AFTER):
        session.execute(delete(IdempotencyKey).where(IdempotencyKey.api_key_id == api_key_id,
                                                     IdempotencyKey.key == key))
        session.expunge(row)
        return None
    if row.fingerprint != body_fingerprint:
        raise IdempotencyMismatch(key)
    if row.job_id is None:
        raise IdempotencyConflict(key)
    return Reservation(job_id=row.job_id)


def record(session: Session, api_key_id: int, key: str, body_fingerprint: str, job_id: uuid.UUID) -> bool:
    """Record the key with its job in the caller's transaction, so the key and the job commit together. False
    when another request recorded it first (a concurrent one waits here until that one commits or rolls back):
    the caller rolls back and replays what :func:`find` then returns."""
    inserted = session.execute(
        insert(IdempotencyKey)
        .values(api_key_id=api_key_id, key=key, fingerprint=body_fingerprint, job_id=job_id)
        .on_conflict_do_nothing()
        .returning(IdempotencyKey.key)
    ).scalar_one_or_none()
    return inserted is not None
