"""Changing an owner's policy (the admin routes and `renderfarm owners`): what may be set, and the writes.

A value of None means "the settings default". Every write drops this process's cached row
(`forget_policy`), so the change applies here at once and in other processes within the cache's few seconds.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from shared.clock import utcnow
from shared.db.models import OwnerPolicy
from shared.owners.policy import POLICY_FIELDS, forget_policy
from shared.settings import FairShareSettings


class PolicyUpdate(BaseModel):
    """Fields to set; null (or, for a replacement, absent) means the settings default."""

    model_config = ConfigDict(extra="forbid", strict=True)  # `true` is not a number here

    weight: float | None = Field(None, gt=0, le=1_000_000, description="share of GPU time relative to others")
    max_running: int | None = Field(None, ge=0, le=1_000_000, description="jobs running at once (0: no cap)")
    max_priority: int | None = Field(None, description="highest job priority allowed (within the settings' range)")
    max_queued: int | None = Field(None, ge=0, le=100_000_000, description="jobs queued at once (0: no cap)")
    rate_burst: int | None = Field(None, ge=1, le=1_000_000, description="job creations allowed at once")
    rate_per_second: float | None = Field(None, gt=0, le=1_000_000, description="sustained creations a second")
    gpu_seconds_per_day: float | None = Field(None, ge=0, le=1e12, description="0: no quota")
    gpu_seconds_per_month: float | None = Field(None, ge=0, le=1e12, description="0: no quota")
    images_per_day: int | None = Field(None, ge=0, le=1_000_000_000, description="0: no quota")
    images_per_month: int | None = Field(None, ge=0, le=1_000_000_000, description="0: no quota")

    def priority_error(self, settings: FairShareSettings) -> str | None:
        """Why max_priority is refused (outside the settings' range), or None."""
        low, high = settings.min_priority, settings.max_priority_limit
        if self.max_priority is not None and not low <= self.max_priority <= high:
            return (f"max_priority must be between {low} and {high} (RENDERFARM_MIN_PRIORITY and "
                    f"RENDERFARM_MAX_PRIORITY_LIMIT), got {self.max_priority}")
        return None

    def replacement(self) -> dict[str, float | int | None]:
        """Every field: what was not sent goes back to its default."""
        return {name: getattr(self, name) for name in POLICY_FIELDS}

    def changes(self) -> dict[str, float | int | None]:
        """Only the fields sent."""
        return {name: getattr(self, name) for name in POLICY_FIELDS if name in self.model_fields_set}


def write_policy(session: Session, owner: str, values: dict[str, float | int | None]) -> None:
    """Set these fields of the owner's policy (creating its row) and commit."""
    statement = insert(OwnerPolicy).values(owner=owner, **values)
    if values:
        statement = statement.on_conflict_do_update(index_elements=[OwnerPolicy.owner],
                                                    set_={**values, "updated_at": utcnow()})
    else:
        statement = statement.on_conflict_do_nothing(index_elements=[OwnerPolicy.owner])
    session.execute(statement)
    session.commit()
    forget_policy(owner)


def reset_policy(session: Session, owner: str) -> bool:
    """Back to every default (the row goes) and commit; False when there was no row."""
    removed = session.execute(delete(OwnerPolicy).where(OwnerPolicy.owner == owner).returning(OwnerPolicy.owner))
    gone = removed.first() is not None
    session.commit()
    forget_policy(owner)
    return gone
