"""`effective_policy` against a real PostgreSQL: an `owner_policies` row over the settings defaults, cached per
process until `forget_policy`."""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from shared.db.models import OwnerPolicy
from shared.owners import effective_policy, forget_policy
from shared.settings import FairShareSettings, Settings


def test_row_over_defaults_and_cache_until_forgotten(session: Session) -> None:
    owner = f"policy-{uuid.uuid4().hex[:8]}"
    settings = Settings(fair_share=FairShareSettings(default_weight=1.0, default_max_running=0))
    assert effective_policy(session, owner, settings).weight == 1.0

    session.add(OwnerPolicy(owner=owner, weight=3.0, max_running=2))
    session.commit()
    assert effective_policy(session, owner, settings).weight == 1.0  # cached "no row" for a few seconds
    forget_policy(owner)
    policy = effective_policy(session, owner, settings)
    assert (policy.weight, policy.max_running, policy.rate_burst) == (3.0, 2, 60)
    assert policy.overrides == {"weight", "max_running"}
    # The cached row resolves against the settings of each call.
    other = Settings(fair_share=FairShareSettings(default_rate_burst=5))
    assert effective_policy(session, owner, other).rate_burst == 5
