"""ClusterNotificationProvider (platform-owned); what a tenant's object may say about notifications and gates.

The platform team owns where messages go: a ClusterNotificationProvider holds the format
(``webhook``, ``slack`` or ``teams``) and the destination, either in a Secret of the operator's own
namespace (a webhook URL is a credential) or inline, where the operator's
``--allowed-notification-address`` allowlist admits it. A tenant's ModelRollout or ModelExperiment
only names a provider and the events it wants (``spec.notifications``), and a rollout may name
gates (``spec.gates``) that must answer 2xx before it moves on: it never chooses a Secret and a
destination together.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, StringConstraints, field_validator, model_validator

from model_rollouts.api.common import (
    MAX_TIMEOUT,
    Address,
    Duration,
    Model,
    Name,
    SecretKeyRef,
    cel,
    check_timeout,
    list_map,
)

NOTIFICATION_PROVIDER_KIND = "ClusterNotificationProvider"
NOTIFICATION_PROVIDER_PLURAL = "clusternotificationproviders"

#: Events a tenant can subscribe to (every one when ``events`` is empty).
NotificationEvent = Literal["Started", "Step", "Paused", "Promoted", "RolledBack", "Aborted", "SRM", "Error"]
NOTIFICATION_EVENTS: tuple[str, ...] = NotificationEvent.__args__  # type: ignore[attr-defined]
NotificationType = Literal["webhook", "slack", "teams"]
GateType = Literal["confirm-promotion", "confirm-rollout"]


class AddressSecretRef(SecretKeyRef):
    key: str = Field(default="address", min_length=1, max_length=253)


class LabelSelectorRequirement(Model):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)",
                    "In and NotIn need values; Exists and DoesNotExist take none",
                    ".values",
                )
            ]
        },
    )

    key: str = Field(min_length=1, max_length=317)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[Annotated[str, StringConstraints(max_length=63)]] = Field(
        default_factory=list, max_length=64
    )


class LabelSelector(Model):
    """A Kubernetes label selector over Namespace labels: ``{}`` selects every namespace."""

    matchLabels: dict[str, Annotated[str, StringConstraints(max_length=63)]] = Field(
        default_factory=dict, max_length=32
    )
    matchExpressions: list[LabelSelectorRequirement] = Field(default_factory=list, max_length=16)

    @model_validator(mode="after")
    def _values(self) -> LabelSelector:
        for i, r in enumerate(self.matchExpressions):
            if (r.operator in ("In", "NotIn")) != bool(r.values):
                raise ValueError(
                    f"matchExpressions[{i}].values: In and NotIn need values; "
                    "Exists and DoesNotExist take none"
                )
        return self

    def matches(self, labels: Mapping[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in self.matchLabels.items()):
            return False
        for r in self.matchExpressions:
            has = r.key in labels
            if r.operator == "Exists" and not has:
                return False
            if r.operator == "DoesNotExist" and has:
                return False
            if r.operator == "In" and (not has or labels[r.key] not in r.values):
                return False
            if r.operator == "NotIn" and has and labels[r.key] in r.values:
                return False
        return True


class ClusterNotificationProviderSpec(Model):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "has(self.address) != has(self.secretRef)",
                    "set exactly one of address or secretRef",
                ),
                cel(
                    "!has(self.timeout) || (duration(self.timeout) > duration('0s') && "
                    f"duration(self.timeout) <= duration('{MAX_TIMEOUT}'))",
                    f"timeout must be more than 0s and at most {MAX_TIMEOUT}",
                    ".timeout",
                ),
            ]
        },
    )
    type: NotificationType = Field(
        description="Payload format: webhook (generic JSON), slack (incoming-webhook text and blocks), "
        "teams (MessageCard). Gates need webhook."
    )
    address: Address | None = Field(
        default=None,
        description="Inline URL, used only if the operator's --allowed-notification-address admits it. "
        "A URL that carries a token belongs in secretRef.",
    )
    secretRef: AddressSecretRef | None = Field(
        default=None,
        description="Secret in the operator's own namespace whose key (default: address) holds the URL.",
    )
    timeout: Duration = Field(default="5s", description="Per-request timeout (more than 0s, at most 30s).")
    allowedNamespaces: list[Name] = Field(
        default_factory=list,
        max_length=256,
        json_schema_extra={"x-kubernetes-list-type": "set"},
        description="Namespaces whose ModelRollouts and ModelExperiments may use this provider "
        "(notifications and gates), besides those namespaceSelector selects. With neither set, only the "
        "operator's own namespace may use it: a provider is the platform's, and a team's channel or gate "
        "is opened to other namespaces only by naming them.",
    )
    namespaceSelector: LabelSelector | None = Field(
        default=None,
        description="Namespaces (by their labels) that may use this provider, besides allowedNamespaces. "
        "{} selects every namespace.",
    )

    _timeout = field_validator("timeout")(check_timeout)

    def admits(self, namespace: str, labels: Mapping[str, str] | None, own: str) -> bool:
        """Whether an object in ``namespace`` (with these Namespace labels, None: unknown) may use it."""
        if namespace == own or namespace in self.allowedNamespaces:
            return True
        if self.namespaceSelector is None:
            return False
        # Every Namespace carries kubernetes.io/metadata.name (set by the API server).
        known = {"kubernetes.io/metadata.name": namespace, **(labels or {})}
        return self.namespaceSelector.matches(known)


NOTIFICATION_PROVIDER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Type", "type": "string", "jsonPath": ".spec.type"},
    {"name": "Address", "type": "string", "jsonPath": ".spec.address"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


class NotificationRef(Model):
    """Send these events of this object to a platform-owned ClusterNotificationProvider."""

    provider: Name = Field(description="Name of a ClusterNotificationProvider.")
    events: list[NotificationEvent] = Field(
        default_factory=list,
        max_length=len(NOTIFICATION_EVENTS),
        json_schema_extra={"x-kubernetes-list-type": "set"},
        description="Which events to send (empty: all): Started, Step (a weight change), Paused, Promoted "
        "(for an experiment: concluded), RolledBack, Aborted, SRM (sample-ratio mismatch), Error "
        "(a decision that could not be applied, a deadline or error limit reached).",
    )


NOTIFICATIONS_FIELD: Any = Field(
    default_factory=list,
    max_length=8,
    json_schema_extra=list_map("provider"),
    description="Where to send this object's events: ClusterNotificationProviders by name. Sending never "
    "delays or changes a decision.",
)


class Gate(Model):
    """A webhook that must answer 2xx before the rollout moves past a point (Flagger-like)."""

    name: Name = Field(description="Named in status and messages while the gate holds the rollout.")
    type: GateType = Field(
        default="confirm-promotion",
        description="confirm-promotion: asked before the weight goes to 100. confirm-rollout: asked before "
        "every weight increase.",
    )
    provider: Name = Field(
        description="A ClusterNotificationProvider of type webhook that admits this namespace: the gate's "
        "URL."
    )
    maxHold: Duration = Field(
        default="1h",
        description="How long this gate may hold the rollout (closed, or busy with another object's request) "
        "before the hold counts towards progressDeadline like any other hold.",
    )


GATES_FIELD: Any = Field(
    default_factory=list,
    max_length=4,
    json_schema_extra=list_map("name"),
    description="Gates asked (HTTP POST) at each analysis before the weight moves past them; anything but a "
    "2xx, or no answer within the provider's timeout, holds the weight. A gate still answering another "
    "object's request is busy: it holds without counting as closed. A gate's hold does not count towards "
    "progressDeadline for its maxHold (default 1h); after that it does. The promote-full annotation "
    "skips gates.",
)


class GateState(Model):
    """The last answer of one gate, as the engine recorded it."""

    name: str = Field(max_length=63)
    open: bool
    message: str = Field(default="", max_length=1024)
    lastAskedTime: datetime
    busy: bool | None = Field(
        default=None,
        description="True: not asked, because it was still answering another object's request (a hold, "
        "not a closed gate).",
    )
    heldSince: datetime | None = Field(
        default=None, description="Since when this gate has held the rollout (closed or busy), if it does."
    )
