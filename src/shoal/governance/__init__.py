"""Governance and trust: the Rego policy that every update passes (see :mod:`.policy`)."""

from shoal.governance.policy import (
    DEFAULT_POLICY,
    ENTRYPOINT,
    POLICY_ERROR,
    Decision,
    PolicyBounds,
    PolicyEngine,
    Reason,
    UpdateFacts,
)

__all__ = [
    "DEFAULT_POLICY",
    "ENTRYPOINT",
    "POLICY_ERROR",
    "Decision",
    "PolicyBounds",
    "PolicyEngine",
    "Reason",
    "UpdateFacts",
]
