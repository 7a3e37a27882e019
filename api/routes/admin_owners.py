"""Per-owner policy for admins: fair-share weight, caps, rate limit and quotas (issue 17).

An owner is the `owner` of API keys. A policy field left unset (null) takes its default from settings
(`RENDERFARM_DEFAULT_*`). PUT replaces the whole policy (fields not sent go back to the default), PATCH changes
only the fields sent (null resets one), DELETE resets them all. A change applies at once in the process that made
it and within a few seconds elsewhere (shared/owners/policy.py caches rows briefly).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import AdminKey, SessionDep, SettingsDep
from api.owner_views import OwnerList, OwnerView, PolicyView, UsedView
from api.responses import NOT_FOUND
from shared.clock import utcnow
from shared.db.models import ApiKey, OwnerPolicy
from shared.errors import FieldError
from shared.owners import effective_policy, forget_policy
from shared.owners.changes import PolicyUpdate, reset_policy, write_policy
from shared.owners.policy import resolve, row_values
from shared.owners.usage import Used, known_owners, owner_used, used_by_owner
from shared.settings import Settings

router = APIRouter(prefix="/v1/admin/owners", tags=["admin"])
OwnerName = Annotated[str, Path(min_length=1, max_length=200, description="the `owner` of API keys")]


def _check_priority(update: PolicyUpdate, settings: Settings) -> None:
    error = update.priority_error(settings.fair_share)
    if error:
        raise FieldError(("body", "max_priority"), error)


def _owner_view(session: Session, owner: str, settings: Settings) -> OwnerView:
    used = owner_used(session, owner, utcnow())
    forget_policy(owner)  # an admin reads the row as it is now
    policy = effective_policy(session, owner, settings)
    return OwnerView(owner=owner, policy=PolicyView.of(policy), today=UsedView.of(used.today),
                     month=UsedView.of(used.month))


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


@router.get("/{owner}", response_model=OwnerView, responses=NOT_FOUND)
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
    write_policy(session, owner, body.replacement())
    return _owner_view(session, owner, settings)


@router.patch("/{owner}", response_model=OwnerView)
def patch_owner(owner: OwnerName, body: PolicyUpdate, _: AdminKey, session: SessionDep,
                settings: SettingsDep) -> OwnerView:
    """Change the fields sent (null resets one to its default); the others keep their values."""
    _check_priority(body, settings)
    write_policy(session, owner, body.changes())
    return _owner_view(session, owner, settings)


@router.delete("/{owner}", response_model=OwnerView)
def reset_owner(owner: OwnerName, _: AdminKey, session: SessionDep, settings: SettingsDep) -> OwnerView:
    """Reset the owner to the defaults (its policy row is removed); its usage is kept."""
    reset_policy(session, owner)
    return _owner_view(session, owner, settings)
