"""Which metric-provider addresses the operator may reach, and where provider credentials live.

The operator's tenancy policy, read by metrics/ (provider addresses and Secrets) and notify/
(notification provider Secrets): process infrastructure below both (see tests/unit/test_layers.py).

Set once at start-up from the operator's flags (``--allowed-provider-address``,
``--provider-secret-namespace``). A tenant's inline ``analysis.prometheus.address`` is used only
if it matches an allowlist entry or is the address of a ClusterMetricProvider; by default the list
is empty, so only the platform's ClusterMetricProviders are reachable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass
class Policy:
    #: Regular expressions; an inline address is allowed if one matches all of it.
    allowed: list[re.Pattern[str]] = field(default_factory=list)
    #: The operator's own namespace: the only one provider Secrets are read from.
    secret_namespace: str = "model-rollouts"


POLICY = Policy()


def configure(allowed: list[str], secret_namespace: str) -> Policy:
    """Compile the allowlist (a bad expression fails start-up, never a tenant's object)."""
    POLICY.allowed = [re.compile(a) for a in allowed]
    POLICY.secret_namespace = secret_namespace
    return POLICY


def normalise(address: str) -> str:
    return address.rstrip("/")


def address_allowed(address: str, provider_addresses: list[str]) -> bool:
    """True if the inline ``address`` is a ClusterMetricProvider's address or matches an allowlist entry."""
    a = normalise(address)
    if a in {normalise(p) for p in provider_addresses}:
        return True
    return any(p.fullmatch(a) or p.fullmatch(address) for p in POLICY.allowed)
