"""Per-owner policy and usage (issue 17, "Limits and quotas"): what an owner may do and what it has used.

`effective_policy` resolves an owner's `owner_policies` row against the settings defaults; `usage` measures the
render time and images of an owner's finished jobs per UTC day and month.
"""

from shared.owners.policy import POLICY_FIELDS, EffectivePolicy, effective_policy, forget_policy

__all__ = ["POLICY_FIELDS", "EffectivePolicy", "effective_policy", "forget_policy"]
