"""Per-owner policy for admins: fair-share weight, caps, rate limit and quotas (issue 17).

An owner is the `owner` of API keys. A policy field left unset (null) takes its default from settings
(`RENDERFARM_DEFAULT_*`). PUT replaces the whole policy (fields not sent go back to the default), PATCH changes
only the fields sent (null resets one), DELETE resets them all. A change applies at once in the process that made
it and within a few seconds elsewhere (shared/owners/policy.py caches rows briefly).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from api.deps import AdminKey, SessionDep, SettingsDep
from api.owner_views import OwnerList, OwnerView, PolicyView, UsedView
from shared.clock import utcnow
from shared.db.models import ApiKey, OwnerPolicy
from shared.errors import FieldError
from shared.owners import effective_policy, forget_policy
from shared.owners.policy import POLICY_FIELDS, resolve, row_values
from shared.owners.usage import Used, known_owners, used_by_owner
from shared.settings import Settings

router = APIRouter(prefix="/v1/admin/owners", tags=["admin"])
OwnerName = Annotated[str, Path(min_length=1, max_length=200, description="the `owner` of API keys")]


class PolicyUpdate(BaseModel):
    """Fields to set; null (or, for PUT, absent) means the settings default."""

    model_config = ConfigDict(extra="forbid")

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


def _check_priority(update: PolicyUpdate, settings: Settings) -> None:
    low, high = settings.fair_share.min_priority, settings.fair_share.max_priority_limit
    if update.max_priority is not None and not low <= update.max_priority <= high:
        raise FieldError(("body", "max_priority"),
                         f"max_priority must be between {low} and {high} (RENDERFARM_MIN_PRIORITY and "
                         f"RENDERFARM_MAX_PRIORITY_LIMIT), got {update.max_priority}")


def _owner_view(session: Session, owner: str, settings: Settings) -> OwnerView:
    now = utcnow()
    today, month = used_by_owner(session, now).get(owner, (Used(), Used()))
    forget_policy(owner)  # an admin reads the row as it is now
    policy = effective_policy(session, owner, settings)
    return OwnerView(owner=owner, policy=PolicyView.of(policy), today=UsedView.of(today), month=UsedView.of(month))


def _write(session: Session, owner: str, values: dict[str, float | int | None]) -> None:
    statement = insert(OwnerPolicy).values(owner=owner, **values)
    if values:
        statement = statement.on_conflict_do_update(index_elements=[OwnerPolicy.owner],
                                                    set_={**values, "updated_at": utcnow()})
    else:
        statement = statement.on_conflict_do_nothing(index_elements=[OwnerPolicy.owner])
    session.execute(statement)
    session.commit()
    forget_policy(owner)


@router.get("", response_model=OwnerList)
def list_owners(_: AdminKey, session: SessionDep, settings: SettingsDep) -> OwnerList:
    """Every owner with an API key or a policy: its effective policy and its use today and this month (UTC)."""
    now = utcnow()
    used = used_by_owner(session, now)
    rows = {row.owner: row_values(row) for row in session.scalars(select(OwnerPolicy))}
    owners = [
        OwnerView(owner=owner, policy=PolicyView.of(resolve(owner, rows.get(owner), settings.fair_share)),
                  today=UsedView.of(used.get(owner, (Used(), Used()))[0]),
                  month=UsedView.of(used.get(owner, (Used(), Used()))[1]))
        for owner in known_owners(session)
    ]
    return OwnerList(owners=owners, checked_at=now)


@router.get("/{owner}", response_model=OwnerView)
def get_owner(owner: OwnerName, _: AdminKey, session: SessionDep, settings: SettingsDep) -> OwnerView:
    known = session.scalar(select(ApiKey.owner).where(ApiKey.owner == owner).limit(1)) or session.get(
        OwnerPolicy, owner)
    if known is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no API key or policy has owner {owner!r}")
    return _owner_view(session, owner, settings)


@router.put("/{owner}", response_model=OwnerView)
def put_owner(owner: OwnerName, body: PolicyUpdate, _: AdminKey, session: SessionDep,
              settings: SettingsDep) -> OwnerView:
    """Replace the owner's policy: every field not sent goes back to its default."""
    _check_priority(body, settings)
    _write(session, owner, {name: getattr(body, name) for name in POLICY_FIELDS})
    return _owner_view(session, owner, settings)


@router.patch("/{owner}", response_model=OwnerView)
def patch_owner(owner: OwnerName, body: PolicyUpdate, _: AdminKey, session: SessionDep,
                settings: SettingsDep) -> OwnerView:
    """Change the fields sent (null resets one to its default); the others keep their values."""
    _check_priority(body, settings)
    _write(session, owner, {name: getattr(body, name) for name in POLICY_FIELDS if name in body.model_fields_set})
    return _owner_view(session, owner, settings)


@router.delete("/{owner}", response_model=OwnerView)
def reset_owner(owner: OwnerName, _: AdminKey, session: SessionDep, settings: SettingsDep) -> OwnerView:
    """Reset the owner to the defaults (its policy row is removed); its usage is kept."""
    session.execute(delete(OwnerPolicy).where(OwnerPolicy.owner == owner))
    session.commit()
    forget_policy(owner)
    return _owner_view(session, owner, settings)
