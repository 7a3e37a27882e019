"""`GET /v1/usage`: the caller's own use of the farm today and this month (UTC), against its quotas."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CurrentKey, SessionDep, SettingsDep
from api.owner_views import UsageView
from shared.clock import utcnow
from shared.owners import effective_policy
from shared.owners.usage import owner_used, queued_jobs

router = APIRouter(prefix="/v1/usage", tags=["usage"])


@router.get("", response_model=UsageView)
def get_usage(key: CurrentKey, session: SessionDep, settings: SettingsDep) -> UsageView:
    """Render seconds of the owner's finished jobs and images of its succeeded ones (running jobs count once they
    finish), what is left of each quota (null: no quota) and when it resets, the jobs queued now, and the owner's
    limits."""
    now = utcnow()
    policy = effective_policy(session, key.owner, settings)
    return UsageView.build(key.owner, owner_used(session, key.owner, now), policy,
                           queued_jobs(session, key.owner), now)
